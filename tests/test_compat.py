"""peer_kernels.compat against peer-pytorch itself: signatures, structure, initialisation, outputs and
gradients (fp32 within tests/bounds.py's bound of the float64 oracle; float64 to its rounding),
train_mem_mask, dropout, and patch_peer_pytorch."""
import functools
import inspect

import pytest
import torch
from torch import nn

import bounds
import peer_kernels
from conftest import DEVICE, device_for
from peer_kernels import _device, backends, compat, reference
from utils import untie_layer

PEER_pytorch = pytest.importorskip("PEER_pytorch")

BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])
CLASSES = [(compat.PEER, PEER_pytorch.PEER), (compat.PEERLora, PEER_pytorch.PEERLora)]
SHAPE = dict(dim=24, heads=3, num_experts=36, num_experts_per_head=4)
PEER_CONFIGS = [  # peer-pytorch's defaults (non_competing_scores: relu gates, one expert a head), then the rest
    dict(), dict(non_competing_scores=False), dict(non_competing_scores=False, separate_embed_per_head=True),
    dict(non_competing_scores=False, pre_rmsnorm=True, activation=nn.ReLU, dim_key=5),
    dict(pre_rmsnorm=True, separate_embed_per_head=True, product_key_topk=3, activation=nn.SiLU),
    dict(non_competing_scores=False, activation=functools.partial(nn.GELU, approximate="tanh"), product_key_topk=5),
]
LORA_CONFIGS = [dict(), dict(non_competing_scores=False, pre_rmsnorm=True, expansion_factor=1.5),
                dict(activation=nn.Tanh, dim_key=6, product_key_topk=3)]


@pytest.fixture
def patched():
    peer_kernels.patch_peer_pytorch()
    yield
    peer_kernels.unpatch_peer_pytorch()


def pair(ours_cls, theirs_cls, seed=0, backend="reference", **config):
    """peer-pytorch's module and ours, each built from the same seed."""
    torch.manual_seed(seed)
    theirs = theirs_cls(**config)
    torch.manual_seed(seed)
    ours = ours_cls(**config, backend=backend)
    return ours, theirs


def perturbed(module):
    """Every parameter moved off its initial value (gamma = 0, ...), in place; returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


# ---- the same classes ------------------------------------------------------------------------------

@pytest.mark.parametrize("ours,theirs", CLASSES + [(compat.ChunkedPEER, PEER_pytorch.ChunkedPEER)])
def test_signatures_are_peer_pytorchs(ours, theirs):
    """Every argument of peer-pytorch's constructor, in order, of the same kind and default; ours
    add backend, device and dtype after them."""
    mine = list(inspect.signature(ours).parameters.values())
    theirs = list(inspect.signature(theirs).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[:len(theirs)]] == \
        [(p.name, p.kind, p.default) for p in theirs]
    assert [p.name for p in mine[len(theirs):]] in ([], ["backend", "device", "dtype"])


@pytest.mark.parametrize("config", [dict(dim=8), dict(dim=16, heads=2, num_experts=64, num_experts_per_head=4, pre_rmsnorm=True,
                                                      separate_embed_per_head=True, non_competing_scores=False)])
@pytest.mark.parametrize("ours_cls,theirs_cls", CLASSES)
def test_same_modules_state_and_initial_weights_from_a_seed(ours_cls, theirs_cls, config):
    """Module tree, attributes, state_dict keys in order, and from one seed the very same weights
    (the first config is peer-pytorch's full defaults: a million experts)."""
    config = {k: v for k, v in config.items() if ours_cls is compat.PEER or k != "separate_embed_per_head"}
    ours, theirs = pair(ours_cls, theirs_cls, **config)
    modules = [(name, type(m).__name__) for name, m in ours.named_modules()]
    their_modules = [(name, type(m).__name__) for name, m in theirs.named_modules()]
    assert [name for name, _ in modules] == [name for name, _ in their_modules]
    # all of one type but to_queries[1], peer-pytorch's einops Rearrange of the query layout
    assert [m for m in modules if m[0] != "to_queries.1"] == [m for m in their_modules if m[0] != "to_queries.1"]
    mine, their_state = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(their_state)
    for name, value in their_state.items():
        assert torch.equal(mine[name], value), name
    attributes = ["heads", "num_experts", "num_keys", "product_key_topk", "num_experts_per_head_topk"]
    attributes += ["num_experts_per_head", "lora_k"] if ours_cls is compat.PEERLora else ["separate_embed_per_head"]
    for name in attributes:
        assert getattr(ours, name) == getattr(theirs, name), name
    x = torch.randn(2, 3, config["dim"])
    torch.testing.assert_close(ours.to_queries(x), theirs.to_queries(x), rtol=0, atol=0)


def test_reset_parameters_redraws_peer_pytorchs_initialisation():
    ours, theirs = pair(compat.PEERLora, PEER_pytorch.PEERLora, dim=16, num_experts=64, pre_rmsnorm=True)
    perturbed(ours)
    torch.manual_seed(0)
    ours.reset_parameters()
    torch.manual_seed(0)
    fresh = PEER_pytorch.PEERLora(16, num_experts=64, pre_rmsnorm=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", PEER_CONFIGS)
def test_peer_outputs_and_gradients(config, backend, dtype):
    """Ours and peer-pytorch's, same weights, both within the bound of the float64 oracle
    (peer_kernels.PEER on the reference backend with these weights)."""
    ours, theirs = pair(compat.PEER, PEER_pytorch.PEER, backend=backend, **SHAPE, **config)
    device = device_for(backend)
    perturbed(theirs).to(device, dtype)
    ours.to(device, dtype).load_state_dict(theirs.state_dict())
    oracle = peer_kernels.PEER.from_peer_pytorch(theirs, backend="reference")
    x = untie_layer(oracle, torch.randn(2, 5, 24, device=device, dtype=dtype))
    dy = torch.randn(2, 5, 24, device=device, dtype=dtype)
    expected = bounds.expected_layer(oracle, x, dy)
    names = {"y": "y", "x": "x", "keys": "keys", "to_queries.0.weight": "to_queries.weight",
             "weight_down_embed.weight": "w_down", "weight_up_embed.weight": "w_up", "norm.gamma": "norm.gamma"}
    for module in (ours, theirs):
        results = bounds.layer_results(module, x, dy)
        bounds.check_all({names[n]: t for n, t in results.items()}, expected)


def lora_bound(theirs, x):
    """(exact, S) of PEERLora's output (tests/bounds.py's running bound through the two adapter
    stages; no pre-norm): theirs in float64 on x (T, dim)."""
    T, zero = x.shape[0], torch.zeros_like(x)
    keys, k, k_sub = theirs.keys.detach(), theirs.num_experts_per_head_topk, theirs.product_key_topk
    q, eq = bounds._linear_forward(x, zero, theirs.to_queries[0].weight.detach())
    queries, eq = (t.view(T, 2, theirs.heads, -1).transpose(1, 2) for t in (q, eq))
    _, ids = reference.product_key_topk(queries, keys, k, k_sub)
    scores, es, _ = bounds.retrieval_forward(queries, eq, keys, ids)
    g, eg = (t.reshape(T, -1) for t in bounds.gate_forward(scores, es, compat._gating(theirs.score_activation)))
    rows = ids.reshape(T, -1)

    def stage(h, eh, proj, a, b):
        dense, e_dense = bounds._linear_forward(h, eh, proj.weight.detach())
        lora, e_lora, _ = bounds.experts_forward(h, eh, rows, g, eg, a.weight.detach(), b.weight.detach(), "identity")
        out = dense + lora
        return out, e_dense + e_lora + out.abs()

    pre, e_pre = stage(x, zero, theirs.proj_in, theirs.proj_in_lora_a, theirs.proj_in_lora_b)
    a, da, _, own_a, _ = bounds._derivatives(pre, "gelu")
    return stage(a, da.abs() * e_pre + own_a, theirs.proj_out, theirs.proj_out_lora_a, theirs.proj_out_lora_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", LORA_CONFIGS)
def test_lora_outputs_and_gradients(config, backend):
    """float64: ours equals peer-pytorch's, output and every gradient, to float64 rounding; fp32
    (default GELU, no pre-norm): the output within the bound of the float64 computation."""
    ours, theirs = pair(compat.PEERLora, PEER_pytorch.PEERLora, backend=backend, **SHAPE, **config)
    device = device_for(backend)
    perturbed(theirs).to(device, torch.float64)
    ours.to(device, torch.float64).load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 24, device=device, dtype=torch.float64)
    dy = torch.randn(2, 5, 24, device=device, dtype=torch.float64)
    mine, their_results = bounds.layer_results(ours, x, dy), bounds.layer_results(theirs, x, dy)
    assert set(mine) == set(their_results) == {"y", "x", *dict(theirs.named_parameters())}
    for name, value in their_results.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-10, atol=1e-10 * value.abs().max().item(), msg=name)
    if config is LORA_CONFIGS[0]:
        ours.float()
        tokens = x.reshape(10, 24).float()
        exact, magnitude = lora_bound(theirs, tokens.double())
        bounds.check("y", ours(tokens), exact, magnitude)


def test_train_mem_mask_scales_the_retrieved_rows_gradients():
    """The output is unchanged; each table row's gradient is its unmasked gradient times mask[row];
    keys and queries get their full gradients; peer-pytorch agrees."""
    ours, theirs = pair(compat.PEER, PEER_pytorch.PEER, **SHAPE, non_competing_scores=False)
    perturbed(theirs).double()
    ours.double().load_state_dict(theirs.state_dict())
    x, dy = torch.randn(3, 6, 24, dtype=torch.float64), torch.randn(3, 6, 24, dtype=torch.float64)
    full = bounds.layer_results(ours, x, dy)
    for mask in (torch.rand(36) < 0.5, torch.rand(36, dtype=torch.float64)):
        masked = bounds.layer_results(WithMask(ours, mask), x, dy)
        for name, value in full.items():
            scale = mask.double()[:, None] if name.startswith("weight_") else 1
            torch.testing.assert_close(masked[name], value * scale, rtol=1e-12, atol=1e-12, msg=name)
        theirs_masked = bounds.layer_results(WithMask(theirs, mask), x, dy)
        for name, value in theirs_masked.items():
            torch.testing.assert_close(masked[name], value, rtol=1e-10, atol=1e-10, msg=name)


class WithMask(nn.Module):
    """module(x, train_mem_mask=mask), with the module's parameter names."""

    def __init__(self, module, mask):
        super().__init__()
        self.module, self.mask = module, mask

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def forward(self, x):
        return self.module(x, train_mem_mask=self.mask)


def test_train_mem_mask_errors_and_separate_tables():
    layer = compat.PEER(**SHAPE, backend="reference")
    x = torch.randn(2, 3, 24)
    with pytest.raises(ValueError, match=r"train_mem_mask: expected shape \(36\), got \(35,\)"):
        layer(x, train_mem_mask=torch.ones(35, dtype=torch.bool))
    separate = compat.PEER(**SHAPE, separate_embed_per_head=True, backend="reference")
    mask = torch.zeros(3 * 36, dtype=torch.bool)
    separate(x, train_mem_mask=mask).sum().backward()
    assert not separate.weight_down_embed.weight.grad.any() and separate.keys.grad.any()


def test_dropout_draws_peer_pytorchs_mask():
    """Dropout on the gates instead of the activations: the same products, and from one seed the
    same mask as peer-pytorch's."""
    ours, theirs = pair(compat.PEER, PEER_pytorch.PEER, **SHAPE, non_competing_scores=False, dropout=0.4)
    theirs.double()
    ours.double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours(x), expected)   # another mask
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-12, atol=1e-12)


def test_autocast_output_dtype_is_peer_pytorchs():
    ours, theirs = pair(compat.PEER, PEER_pytorch.PEER, **SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(torch.randn(2, 5, 24)).dtype == theirs(torch.randn(2, 5, 24)).dtype == torch.bfloat16


def test_chunked_peer_runs_the_wrapped_module():
    ours, theirs = pair(compat.PEER, PEER_pytorch.PEER, **SHAPE)
    chunked, their_chunked = compat.ChunkedPEER(ours.double(), 2), PEER_pytorch.ChunkedPEER(theirs.double(), 2)
    assert list(chunked.state_dict()) == list(their_chunked.state_dict())
    assert chunked.seq_chunk_size == 2
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(chunked.train()(x), their_chunked.train()(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="peer: expected a PEER or PEERLora module"):
        compat.ChunkedPEER(lambda x: x)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dim=23), ValueError, "dim: expected an even number"),
    (dict(num_experts=50), ValueError, "num_experts: expected a perfect square"),
    (dict(activation=nn.Tanh), ValueError, "activation: expected nn.ReLU, nn.GELU or nn.SiLU"),
    (dict(num_experts_per_head=7), ValueError,
     r"num_experts_per_head \(product_key_topk defaults to it\): expected <= n = sqrt\(num_experts\) = 6 .*, got 7"),
    (dict(num_experts_per_head=2, product_key_topk=7), ValueError,
     r"product_key_topk: expected <= n = sqrt\(num_experts\) = 6 .*, got 7"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        compat.PEER(**{**SHAPE, **kwargs})


def test_bad_input():
    layer = compat.PEER(**SHAPE, backend="reference")
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., dim\) with dim = 24, got \(2, 23\)"):
        layer(torch.randn(2, 23))
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer(torch.ones(2, 24, dtype=torch.int64))
    assert layer(torch.randn(24)).shape == (24,)


# ---- patch_peer_pytorch ----------------------------------------------------------------------------

def test_patch_runs_existing_and_new_instances_on_our_ops(patched, monkeypatch):
    """Instances made before the patch and after it call the backend's ops (counted here), and
    compute what they computed before."""
    made_before = perturbed(PEER_pytorch.PEER(**SHAPE)).double()
    lora_before = perturbed(PEER_pytorch.PEERLora(**SHAPE)).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    peer_kernels.unpatch_peer_pytorch()
    expected = made_before(x), lora_before(x)
    peer_kernels.patch_peer_pytorch()
    peer_kernels.patch_peer_pytorch()   # idempotent
    made_after = PEER_pytorch.PEER(**SHAPE).double()
    calls = []
    get = backends.get
    monkeypatch.setattr(backends, "get", lambda backend, device: calls.append(backend) or get(backend, device))
    for module in (made_before, lora_before, made_after):
        module.backend = "reference"
    torch.testing.assert_close(made_before(x), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora_before(x), expected[1], rtol=1e-12, atol=1e-12)
    made_after(x)
    assert calls == ["reference"] * 3
    chunked = PEER_pytorch.ChunkedPEER(made_before, 2).train()   # peer-pytorch's chunks on our forward
    xg = x.clone().requires_grad_()
    chunked(xg).sum().backward()
    assert xg.grad is not None and made_before.keys.grad is not None


def test_unpatch_restores_peer_pytorch():
    original = PEER_pytorch.PEER.forward, PEER_pytorch.PEERLora.forward
    peer_kernels.patch_peer_pytorch()
    assert PEER_pytorch.PEER.forward is compat.PEER.forward
    assert PEER_pytorch.PEERLora.forward is compat.PEERLora.forward
    peer_kernels.unpatch_peer_pytorch()
    peer_kernels.unpatch_peer_pytorch()
    assert (PEER_pytorch.PEER.forward, PEER_pytorch.PEERLora.forward) == original


def test_importing_peer_kernels_needs_neither_transformers_nor_peer_pytorch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = sys.modules['PEER_pytorch'] = None\n"
            "import peer_kernels, peer_kernels.compat, peer_kernels.transformers\n"
            "print(peer_kernels.patch_peer_pytorch.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "peer_kernels.compat"
