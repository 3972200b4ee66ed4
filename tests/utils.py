"""Helpers for the tests: fresh random inputs, NaN-poisoned outputs, inputs clear of near-ties, and
the GPU-only steps of the gpu-marked tests with their dry-run stand-ins."""
import contextlib

import torch

from peer_kernels import reference

# Scores of every test input are O(1)-O(10); two correct backends differ by ~1e-6 there.
NEAR_TIE = 1e-3


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors while a test runs, so a kernel that
    leaves part of its output unwritten fails the comparison instead of passing on stale zeros."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2 ** 31) + 7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))


def random_ids(T, h, k, rows, device="cpu", dtype=torch.int64):
    """Expert ids in [0, rows), the last row always among them."""
    ids = torch.randint(0, rows, (T, h, k), device=device, dtype=dtype)
    ids.view(-1)[0] = rows - 1
    return ids


class NearTieError(AssertionError):
    """Redrawing inputs did not clear the near-ties: they come from the parameters (e.g. two equal
    sub-keys, or a one-wide query half that a layernorm turns into its bias for every token)."""


def untie(tokens, queries_of, keys, k, k_sub, rounds=100):
    """Redraws rows of `tokens` (in place) until every token's routing, by the float64 oracle on
    queries_of(tokens), keeps NEAR_TIE between the last score kept and the first dropped at each
    top-k: backends that round differently then pick the same experts. Returns tokens."""
    keys64 = keys.detach().double()
    with torch.no_grad():
        for _ in range(rounds):
            margin = reference.routing_margin(queries_of(tokens).detach().double(), keys64, k, k_sub)
            close = margin < NEAR_TIE
            if not close.any():
                return tokens
            tokens[close] = torch.randn_like(tokens[close])
    raise NearTieError(f"untie: {int(close.sum())} tokens still have near-ties after {rounds} redraws")


def untie_layer(layer, x):
    """untie for a PEER layer's input x (..., dim): the queries are the layer's own (float64 copy,
    same mode: with batchnorm in training, every redraw moves every token's queries)."""
    import copy

    layer64 = copy.deepcopy(layer).double()
    flat = x.detach().reshape(-1, layer.dim)

    def queries_of(tokens):
        return layer64.queries(layer64.norm(tokens.double()))

    untie(flat, queries_of, layer64.keys, layer.num_experts_per_head, layer.product_key_topk)
    return flat.reshape(x.shape)


@contextlib.contextmanager
def no_host_sync(device):
    """Makes any host-device synchronization inside an error (torch.cuda.set_sync_debug_mode). Off a
    GPU (the dry run of the gpu-marked tests, tests/conftest.py) nothing can wait for a device, and
    this is a plain context."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_replay(step, device):
    """step()'s outputs as a CUDA graph of it gives them: one warm-up call on a side stream (compiles
    kernels, fills caches), the capture, one replay. Off a GPU (the dry run) a second eager call."""
    if device.type != "cuda":
        return step()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize(device)
    return captured
