"""The paper's instruments on the PEER layer: expert usage counts and their KL from uniform
(track_usage, usage_stats), and growing the pool of experts (grow)."""
import copy
import math

import pytest
import torch

import peer_kernels
from conftest import DEVICE, device_for, gpu_sizes
from peer_kernels import _device, reference
from utils import no_host_sync, untie_layer

BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])


def make_layer(backend="reference", device=DEVICE, **options):
    options = {**dict(heads=3, num_experts=49, num_experts_per_head=4, dim_key=8, query_norm="layernorm"), **options}
    return peer_kernels.PEER(16, backend=backend, device=device, **options)


def reference_ids(layer, x):
    """The float64 oracle's expert ids (T, h, k) for the layer's input x, offset per head with
    separate_embed_per_head."""
    layer64 = copy.deepcopy(layer).double().cpu()
    with torch.no_grad():
        queries = layer64.queries(layer64.norm(x.detach().double().cpu().reshape(-1, layer.dim)))
        _, ids = reference.product_key_topk(queries, layer64.keys, layer.num_experts_per_head, layer.product_key_topk)
    return reference.head_offsets(ids, layer.num_experts) if layer.separate_embed_per_head else ids


# ---- usage ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("separate", [False, True], ids=["shared_table", "separate_embed_per_head"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_usage_counts_are_a_bincount_of_the_reference_ids(backend, separate):
    layer = make_layer(backend, device=device_for(backend), separate_embed_per_head=separate).train()
    rows = layer.w_down.shape[0]
    layer.track_usage = True
    expected = torch.zeros(rows, dtype=torch.int64)
    for _ in range(2):   # counts accumulate over forwards
        x = untie_layer(layer, torch.randn(2, 5, 16, device=device_for(backend)))
        layer(x)
        expected += torch.bincount(reference_ids(layer, x).reshape(-1), minlength=rows)
    stats = layer.usage_stats()
    assert stats["counts"].dtype == torch.int64 and stats["counts"].device == layer.w_down.device
    assert torch.equal(stats["counts"].cpu(), expected)
    total = int(expected.sum())
    assert total == 2 * 10 * 3 * 4
    kl = math.log(rows) + sum(c / total * math.log(c / total) for c in expected.tolist() if c)
    assert stats["kl_from_uniform"] == pytest.approx(kl, rel=1e-12, abs=1e-12)
    assert stats["used_fraction"] == pytest.approx(int((expected > 0).sum()) / rows, rel=1e-15)
    assert int(layer.usage_stats()["counts"].sum()) == 0   # reset=True zeroed them


def test_tracking_changes_no_result():
    """Tracking counts on the side: the output and every gradient are the very same."""
    plain = make_layer("auto").train()
    tracked = copy.deepcopy(plain)
    tracked.track_usage = True
    x = torch.randn(3, 4, 16, device=DEVICE)
    results = []
    for layer in (plain, tracked):
        x_ = x.clone().requires_grad_()
        y = layer(x_)
        y.square().sum().backward()
        results.append([y, x_.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert int(tracked.usage_stats()["counts"].sum()) == 12 * 3 * 4


def test_usage_stats_formulas_on_known_counts():
    layer = make_layer()
    layer.track_usage = True
    layer.usage_counts.fill_(5)                 # uniform: no divergence, every expert used
    stats = layer.usage_stats(reset=False)
    assert stats["kl_from_uniform"] == pytest.approx(0.0, abs=1e-12) and stats["used_fraction"] == 1.0
    layer.usage_counts.zero_()
    layer.usage_counts[7] = 3                   # one expert: KL = log N
    stats = layer.usage_stats()
    assert stats["kl_from_uniform"] == pytest.approx(math.log(49), rel=1e-12)
    assert stats["used_fraction"] == pytest.approx(1 / 49, rel=1e-12)
    assert math.isnan(layer.usage_stats()["kl_from_uniform"])   # after the reset: no retrievals


def test_track_usage_switches_and_errors():
    layer = make_layer()
    with pytest.raises(RuntimeError, match="usage_stats: no usage was tracked.*track_usage = True"):
        layer.usage_stats()
    with pytest.raises(TypeError, match="track_usage: expected a bool, got int 1"):
        layer.track_usage = 1
    layer.track_usage = True
    layer(torch.randn(4, 16, device=DEVICE))
    layer.track_usage = False
    layer(torch.randn(4, 16, device=DEVICE))    # not counted; the counts so far are kept
    assert "usage_counts" not in layer.state_dict()
    layer.double()
    counts = layer.usage_stats()["counts"]
    assert counts.dtype == torch.int64 and int(counts.sum()) == 4 * 3 * 4


def test_compiled_forward_counts_as_eager():
    layer = make_layer("reference").eval()
    layer.track_usage = True
    x = untie_layer(layer, torch.randn(6, 16, device=DEVICE))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x)
    compiled(x)
    expected = 2 * torch.bincount(reference_ids(layer, x).reshape(-1), minlength=49)
    assert torch.equal(layer.usage_stats()["counts"].cpu(), expected)


@pytest.mark.gpu
def test_tracking_never_waits_for_the_device():
    T, n, heads, k, dk = gpu_sizes((256, 64, 4, 8, 32), (16, 8, 2, 4, 8))
    layer = make_layer("triton", num_experts=n ** 2, heads=heads, num_experts_per_head=k, dim_key=dk)
    x = torch.randn(T, 16, device=DEVICE)
    layer.track_usage = True
    layer(x)   # warm-up: compilation and first-call work may sync
    with no_host_sync(DEVICE):
        layer(x)
    assert int(layer.usage_stats()["counts"].sum()) == 2 * T * heads * k


# ---- grow -------------------------------------------------------------------------------------------

GROW_OPTIONS = [dict(), dict(separate_embed_per_head=True), dict(shared_keys=True, pre_rmsnorm=True),
                dict(query_norm="batchnorm", gating="relu", activation="silu")]


@pytest.mark.parametrize("options", GROW_OPTIONS, ids=["plain", "separate", "shared_keys", "batchnorm"])
def test_grow_keeps_every_expert(options):
    """Rows move to their new ids, sub-keys keep their index, nothing else changes, and every token
    whose retrieval still picks the old experts gets the same output."""
    torch.manual_seed(1)
    layer = make_layer(**{**dict(heads=2, num_experts_per_head=2), **options}).double().eval()
    with torch.no_grad():
        for p in layer.parameters():           # move norms etc. off their initial values
            p.add_(torch.randn_like(p) * 0.1)
    before = copy.deepcopy(layer)
    x = torch.randn(300, 16, dtype=torch.float64, device=DEVICE)
    ids_before, y_before = reference_ids(layer, x), layer(x)

    assert layer.grow(64) is layer
    n, n_new, sets = 7, 8, layer.w_down.shape[0] // 64
    assert layer.num_experts == 64 and layer.keys.shape[1] == n_new and layer.w_down.shape == (sets * 64, 16)
    assert torch.equal(layer.keys[:, :n], before.keys)
    for name in ("w_down", "w_up"):
        new, old = getattr(layer, name).view(sets, n_new, n_new, 16), getattr(before, name).view(sets, n, n, 16)
        assert torch.equal(new[:, :n, :n], old)
        fresh = torch.cat([new[:, n:].reshape(-1, 16), new[:, :n, n:].reshape(-1, 16)])
        assert fresh.std().item() == pytest.approx(1 / 4, rel=0.15)   # reset_parameters' N(0, 1/dim)
    assert 0.5 < layer.keys[:, n:].std().item() * math.sqrt(8) < 1.5   # N(0, 1/dim_key), a few values
    kept = {k: v for k, v in before.state_dict().items() if k not in ("keys", "w_down", "w_up")}
    for name, value in kept.items():
        assert torch.equal(layer.state_dict()[name], value), name

    ids_after, y_after = reference_ids(layer, x), layer(x)
    old_ids = ids_before % 49 // n * n_new + ids_before % n + ids_before // 49 * 64
    same = (ids_after == old_ids).flatten(1).all(1)
    assert 20 < int(same.sum()) < 300, int(same.sum())   # some tokens kept their experts, some did not
    torch.testing.assert_close(y_after[same], y_before[same], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_after[~same], y_before[~same])


def test_grow_hands_the_optimizer_the_new_parameters():
    layer = make_layer().double().train()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(20, 16, dtype=torch.float64, device=DEVICE)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    old = {name: getattr(layer, name) for name in ("keys", "w_down", "w_up")}
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in old.items()}
    layer.grow(64, optimizer=optimizer)
    params = optimizer.param_groups[0]["params"]
    for name, p in old.items():
        new = getattr(layer, name)
        assert any(q is new for q in params) and not any(q is p for q in params) and p not in optimizer.state
        state = optimizer.state[new]
        assert torch.equal(state["step"], old_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            value, before = state[key], old_state[name][key]
            if name == "keys":
                assert torch.equal(value[:, :7], before) and not value[:, 7:].any()
            else:
                grid = value.view(8, 8, 16)
                assert torch.equal(grid[:7, :7], before.view(7, 7, 16))
                assert not grid[7:].any() and not grid[:, 7:].any()
    grown = {name: getattr(layer, name).detach().clone() for name in old}
    optimizer.zero_grad()
    layer(x).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(getattr(layer, name), grown[name]) for name in old)


def test_grow_relays_usage_counts():
    layer = make_layer()
    layer.track_usage = True
    layer.usage_counts.copy_(torch.arange(49))
    layer.grow(64)
    grid = layer.usage_stats()["counts"].view(8, 8)
    assert torch.equal(grid[:7, :7].reshape(-1).cpu(), torch.arange(49))
    assert not grid[7:].any() and not grid[:, 7:].any()


def test_grow_refuses_bad_sizes_and_unknown_optimizer_state():
    layer = make_layer()
    with pytest.raises(ValueError, match="num_experts: expected a perfect square"):
        layer.grow(50)
    with pytest.raises(ValueError, match="num_experts: expected a perfect square larger than 49, got 36"):
        layer.grow(36)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    optimizer.state[layer.w_down]["odd"] = torch.zeros(3)
    with pytest.raises(ValueError, match="optimizer: cannot re-lay its state 'odd' of shape \\(3,\\) for w_down"):
        layer.grow(64, optimizer=optimizer)
    assert layer.num_experts == 49 and layer.w_down.shape == (49, 16)


@pytest.mark.gpu
def test_grow_on_the_device():
    layer = make_layer("triton")
    layer.grow(64)
    assert layer.w_down.device == DEVICE and layer(torch.randn(5, 16, device=DEVICE)).shape == (5, 16)
