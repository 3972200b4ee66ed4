"""peer_kernels.ops.peer_fused (its three schedules: one-pass kernel, two kernels, two kernels
overlapped over token chunks) against reference.peer_fused, and the PEER module on backend="triton".

Interpreter shapes stay at one or two token tiles (its tl.sort is slow per element). test_aot_*
compiles the one-pass kernel at the paper's shapes for sm_80 / sm_90 and checks the SASS.
"""
import pytest
import torch

import aot
import configs
import peer_kernels
from conftest import DEVICE, gpu_sizes
from peer_kernels import _library, reference
from peer_kernels.ops import fused as fused_ops
from peer_kernels.ops import peer_fused, product_key_topk
import bounds
from utils import poison_empty, untie, untie_layer

NAMES = ("y", "dx", "dqueries", "dkeys", "dw_down", "dw_up")


def make_inputs(T=20, h=2, key_heads=2, n=5, dk=12, d=24, separate=False, dtype=torch.float64):
    """Random inputs; queries are the module's non-contiguous (T, 2, h, dk) -> (T, h, 2, dk) view."""
    x = torch.randn(T, d, device=DEVICE, dtype=dtype)
    queries = torch.randn(T, 2, h, dk, device=DEVICE, dtype=dtype).transpose(1, 2)
    keys = torch.randn(key_heads, n, 2, dk, device=DEVICE, dtype=dtype)
    rows = (h if separate else 1) * n * n
    w_down = torch.randn(rows, d, device=DEVICE, dtype=dtype) / d ** 0.5
    w_up = torch.randn(rows, d, device=DEVICE, dtype=dtype)
    return x, queries, keys, w_down, w_up


def forward_and_grads(fn, inputs, dy=None, **kwargs):
    """{y, dx, dqueries, dkeys, dw_down, dw_up} of fn with dy (fresh random if None)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, **kwargs)
    dy = torch.randn_like(y) if dy is None else dy
    return dict(zip(NAMES, (y, *torch.autograd.grad(y, leaves, dy)))), dy


def exact(inputs, dy, k, k_sub=None, gating="softmax", activation="gelu", separate_embed_per_head=False, ids=None):
    """name -> (float64 value, S) of the fused op on the same inputs (tests/bounds.py), on their
    device; the table gradients on the rows the picks touch only, as (value, S, rows): the oracle
    never copies a whole table (a million rows at the paper's shapes)."""
    x, queries, keys, w_down, w_up = (t.detach() for t in inputs)
    queries, keys = queries.double(), keys.double()
    k_sub = k if k_sub is None else k_sub
    if ids is None:
        _, ids = reference.product_key_topk(queries, keys, k, k_sub)
    rows = reference.head_offsets(ids, keys.shape[1] ** 2) if separate_embed_per_head else ids
    used, local, (down, up) = bounds.touched_rows(rows, w_down, w_up)
    x = x.double()
    out = bounds.fused(x, torch.zeros_like(x), queries, torch.zeros_like(queries), keys, down.double(), up.double(),
                       dy.double(), torch.zeros_like(x), k, k_sub, gating, activation, separate_embed_per_head,
                       ids=ids, rows=local)
    out.update({name: (*out[name], used) for name in ("dw_down", "dw_up")})
    return out


def untied_inputs(k, k_sub, **shape):
    """make_inputs with queries clear of near-ties (utils.untie), still the module's strided view."""
    x, queries, keys, w_down, w_up = make_inputs(**shape)
    T, h, _, dk = queries.shape
    projection = queries.transpose(1, 2).reshape(T, -1).contiguous()

    def as_queries(t):
        return t.view(T, 2, h, dk).transpose(1, 2)

    untie(projection, as_queries, keys, k, k_sub)
    return x, as_queries(projection), keys, w_down, w_up


# peer_fused's options per forward schedule (ops/fused.py)
SCHEDULES = {"one_pass": dict(one_pass=True), "two_kernel": {}, "overlap": dict(overlap=True)}

# every gating with one activation and every activation with one gating, then the other schedules
COMBOS = [(g, "gelu", "one_pass") for g in reference.GATINGS] + [
    ("softmax", a, "one_pass") for a in reference.ACTIVATIONS if a != "gelu"] + [
    ("sigmoid", "silu", "two_kernel"), ("relu", "gelu_tanh", "two_kernel"), ("softmax", "gelu", "overlap")]


@pytest.mark.parametrize("gating, activation, schedule", COMBOS, ids=[f"{g}-{a}-{s}" for g, a, s in COMBOS])
def test_matches_reference(gating, activation, schedule, monkeypatch):
    inputs = untied_inputs(3, 4)
    options = dict(k=3, k_sub=4, gating=gating, activation=activation)
    poison_empty(monkeypatch)
    actual, dy = forward_and_grads(peer_fused, inputs, **SCHEDULES[schedule], **options)
    assert all(actual[name].dtype == torch.float64 for name in NAMES)
    bounds.check_all(actual, exact(inputs, dy, **options))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_separate_embed_and_shared_keys(schedule, monkeypatch):
    """Separate tables per head and keys shared by all heads; n = 13, k = 5 not powers of two."""
    inputs = untied_inputs(5, 6, T=16, h=2, key_heads=1, n=13, dk=10, d=20, separate=True)
    options = dict(k=5, k_sub=6, separate_embed_per_head=True)
    poison_empty(monkeypatch)
    actual, dy = forward_and_grads(peer_fused, inputs, **SCHEDULES[schedule], **options)
    bounds.check_all(actual, exact(inputs, dy, **options))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_float32(schedule, monkeypatch):
    inputs = untied_inputs(3, 4, dtype=torch.float32)
    poison_empty(monkeypatch)
    actual, dy = forward_and_grads(peer_fused, inputs, k=3, k_sub=4, **SCHEDULES[schedule])
    assert all(actual[name].dtype == torch.float32 for name in NAMES)
    bounds.check_all(actual, exact(inputs, dy, 3, 4))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["bf16", "bf16-x-fp32-tables"])
def test_bfloat16_given_the_same_picks(dtypes):
    """bf16 queries select on floored int32 keys, so a pick may differ from the float64 oracle's within
    that floor; the oracle runs on the kernel's picks (saved ids), so the comparison measures
    arithmetic, not tie-breaking. fp32 tables with bf16 activations are mixed precision."""
    x, queries, keys, w_down, w_up = make_inputs(d=32, dk=16, dtype=torch.bfloat16)
    w_down, w_up = w_down.to(dtypes[1]), w_up.to(dtypes[1])
    _, kernel_ids = product_key_topk(queries, keys, 3, 4)
    for options in SCHEDULES.values():
        actual, dy = forward_and_grads(peer_fused, (x, queries, keys, w_down, w_up), k=3, k_sub=4, **options)
        assert actual["y"].dtype == torch.bfloat16 and actual["dw_down"].dtype == dtypes[1]
        bounds.check_all(actual, exact((x, queries, keys, w_down, w_up), dy, 3, 4, ids=kernel_ids))


@pytest.mark.parametrize("k, k_sub, n, ties", [(3, 4, 7, False), (9, 3, 3, False), (4, 4, 7, True)],
                         ids=["k3-n7", "k=k'^2-k'=n", "ties"])
def test_overlap_over_many_chunks(k, k_sub, n, ties, monkeypatch):
    """The overlapped schedule's chunks (two whole ones and a partial one; under the interpreter one
    token tile each) and its persistent expert programs (one per chunk under the interpreter,
    striding over the chunk's tiles; the last chunk one program per tile) give the same picks,
    scores and gates as the two-kernel path, bit for bit, and outputs within the oracle's bounds
    (on those picks where inputs in {-1, 0, 1} tie); empty inputs launch nothing."""
    _, _, chunk = configs.launched_tiles(configs.Case(T=0, h=2, n=n, dk=12, k=k, k_sub=k_sub, d=24,
                                                      dtype=torch.float32), DEVICE)
    shape = dict(T=2 * chunk + 13, h=2, key_heads=2, n=n, dk=12, d=24, dtype=torch.float32)
    if ties:
        inputs = tuple(t.round().clamp(-1, 1) if i in (1, 2) else t for i, t in enumerate(make_inputs(**shape)))
    else:
        inputs = untied_inputs(k, k_sub, **shape)
    args = (*inputs, k, k_sub, "softmax", "gelu", 0)
    overlapped = _library.fused_forward("triton", *args, "overlap", True, False)
    two_kernel = _library.fused_forward("triton", *args, "two_kernel", True, False)
    for name, a, b in zip(("scores", "ids", "gates"), overlapped[1:4], two_kernel[1:4]):
        assert torch.equal(a, b), name
    poison_empty(monkeypatch)
    actual, dy = forward_and_grads(peer_fused, inputs, k=k, k_sub=k_sub, overlap=True)
    bounds.check_all(actual, exact(inputs, dy, k, k_sub, ids=two_kernel[2] if ties else None))
    assert _library.fused_forward("triton", *(t[:0] if i in (0, 1) else t for i, t in enumerate(inputs)), k, k_sub,
                                  "softmax", "gelu", 0, "overlap", True, False)[0].shape == (0, 24)


def test_one_pass_and_overlap_are_exclusive():
    with pytest.raises(ValueError, match="one_pass and overlap"):
        peer_fused(*make_inputs(), 3, one_pass=True, overlap=True)


@pytest.mark.parametrize("options, schedule", [({}, "two_kernel"), (dict(overlap=True), "overlap"),
                                               (dict(one_pass=True), "one_pass")])
def test_schedule_chosen_by_the_options(options, schedule, monkeypatch):
    """Until a GPU has timed them, the default forward is two kernels in turn."""
    ran = []
    for name, forward in fused_ops._SCHEDULE_FORWARDS.items():
        def record(name=name, forward=forward, **kwargs):
            ran.append(name)
            return forward(**kwargs)
        monkeypatch.setitem(fused_ops._SCHEDULE_FORWARDS, name, record)
    peer_fused(*make_inputs(T=4), 3, **options)
    assert ran == [schedule]


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_float32_at_many_tiles(schedule):
    """Block sizes of a real GPU (64-token retrieval tiles, 64-key tiles, gather tiles over d=256):
    several tiles of each, n not a multiple of the key tile, forward and every gradient; the overlap
    runs 3 chunks on two streams."""
    T, many, h, n, dk, d, k, k_sub = gpu_sizes((300, 3000, 4, 100, 64, 256, 16, 16), (20, 45, 2, 37, 16, 24, 5, 6))
    T = many if schedule == "overlap" else T
    block_t, block_n, chunk = configs.launched_tiles(
        configs.Case(T=T, h=h, n=n, dk=dk, k=k, k_sub=k_sub, d=d, dtype=torch.float32), DEVICE)
    assert (T > 2 * chunk if schedule == "overlap" else T > block_t) and n > block_n and n % block_n, (T, n)
    inputs = untied_inputs(k, k_sub, T=T, h=h, key_heads=h, n=n, dk=dk, d=d, dtype=torch.float32)
    actual, dy = forward_and_grads(peer_fused, inputs, k=k, k_sub=k_sub, **SCHEDULES[schedule])
    bounds.check_all(actual, exact(inputs, dy, k, k_sub))


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")   # tens of GB, as test_large_row_offsets: not side by side
def test_gpu_bfloat16_at_paper_shapes():
    """The paper's shape (d=1024, N=1024**2, h=8, k=k'=16, dk=128) at T=2048 tokens: retrieval by
    score, then the layer on every schedule against the reference run on the kernel's own picks, on
    the table rows they touch (the overlap runs 4 chunks)."""
    T, h, n, dk, d, k = gpu_sizes((2048, 8, 1024, 128, 1024, 16), (40, 2, 20, 16, 32, 4))
    _, _, chunk = configs.launched_tiles(configs.Case(T=T, h=h, n=n, dk=dk, k=k, k_sub=k, d=d), DEVICE)
    assert T >= 2 * chunk, (T, chunk)
    inputs = make_inputs(T=T, h=h, key_heads=h, n=n, dk=dk, d=d, dtype=torch.bfloat16)
    scores, kernel_ids = product_key_topk(inputs[1], inputs[2], k)
    bounds.check("scores", scores, *bounds.pick_scores(inputs[1], inputs[2], kernel_ids))
    dy = torch.randn(T, d, device=DEVICE, dtype=torch.bfloat16)
    expected = exact(inputs, dy, k, ids=kernel_ids)
    for options in SCHEDULES.values():
        actual, _ = forward_and_grads(peer_fused, inputs, dy=dy, k=k, **options)
        bounds.check_all(actual, expected)


def test_gradcheck():
    x, queries, keys, w_down, w_up = make_inputs(T=5, h=2, n=3, dk=4, d=6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, queries, keys, w_down, w_up)]
    assert torch.autograd.gradcheck(lambda *a: peer_fused(*a, 2, 2, "sigmoid", "silu"), leaves, fast_mode=True)


def test_empty_batch():
    inputs = [t.detach().requires_grad_() for t in make_inputs(T=0)]
    y = peer_fused(*inputs, 3, 4)
    assert y.shape == (0, 24)
    grads = torch.autograd.grad(y.sum(), inputs)
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert torch.equal(grads[3], torch.zeros_like(inputs[3]))


@pytest.mark.parametrize("change, error, match", [
    (dict(gating="tanh"), ValueError, "gating"),
    (dict(activation="elu"), ValueError, "activation"),
    (dict(k=17, k_sub=4), ValueError, "k: expected <= k_sub\\*\\*2"),
    (dict(x=torch.randn(7, 24, dtype=torch.float64)), ValueError, "queries"),
    (dict(x=torch.randn(20, 24)), TypeError, "float64 mixes"),
    (dict(x=torch.randn(20, 0, dtype=torch.float64)), ValueError, "x: expected at least 1 feature"),
    (dict(w_down=torch.randn(26, 24, dtype=torch.float64)), ValueError, "w_down"),
    (dict(separate_embed_per_head=True), ValueError, "w_down"),
])
def test_bad_inputs_raise(change, error, match):
    x, queries, keys, w_down, w_up = make_inputs()
    args = dict(x=x, queries=queries, keys=keys, w_down=w_down, w_up=w_up, k=3, k_sub=4, gating="softmax",
                activation="gelu", separate_embed_per_head=False)
    args.update(change)
    with pytest.raises(error, match=match):
        peer_fused(**args)


def _layer(**options):
    return peer_kernels.PEER(24, heads=2, num_experts=25, num_experts_per_head=3, dim_key=12,
                             product_key_topk=4, dtype=torch.float64, device=DEVICE, **options).eval()


@pytest.mark.parametrize("options", [dict(gating="softmax", activation="gelu"),
                                     dict(gating="relu", activation="silu", shared_keys=True,
                                          query_norm="layernorm", separate_embed_per_head=True)],
                         ids=["default", "options"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_module_on_triton_backend(options, dtype):
    layer = _layer(backend="triton", **options).to(dtype).train()
    x = untie_layer(layer, torch.randn(3, 6, 24, device=DEVICE, dtype=dtype))
    dy = torch.randn_like(x)
    bounds.check_all(bounds.layer_results(layer, x, dy), bounds.expected_layer(layer, x, dy))


@pytest.mark.aot
def test_aot_one_pass_kernel_at_paper_shapes():
    """bf16, T=8192, d=1024, h=8, n=1024, dk=128, k=k'=16, softmax, GELU: no spills, 128-bit loads."""
    jobs = [configs.one_pass(configs.PAPER, arch) for arch in aot.ARCHS]
    for job, stats in zip(jobs, aot.compile_report(jobs)):
        label = aot.describe(job)
        assert stats["stl"] == 0 and stats["ldl"] == 0 and stats["local_bytes"] == 0, (label, stats)
        assert stats["ldg128"] > 0, (label, stats)


# The device-copy bandwidth of the devices the overlapped schedule is planned for (their
# makers' figures: H200 ~4.3 TB/s; A100 ~1.9 TB/s), and the latency of a row load from HBM.
BANDWIDTH = {90: 4.3e12, 80: 1.9e12}
LOAD_LATENCY_S = 600e-9


@pytest.mark.aot
def test_aot_overlap_expert_programs_take_whole_sms():
    """The overlapped forward's expert kernel at the paper's shapes (bf16, d=1024, h*k=128; whole-SM
    tile, persistent): no spills, 128-bit row loads, and one CTA per SM, so that its persistent
    programs hold whole SMs and leave the others to the retrieval (one 8-warp, 255-register CTA per
    SM, tests/test_retrieval.py). Those programs keep bandwidth x latency bytes of rows in flight,
    one tile each (issue 15: >= 32 KB per SM), so the gather can run at full bandwidth on its share."""
    jobs = []
    for arch in aot.ARCHS:
        chunk, programs = configs.overlap_chunk(configs.PAPER, arch)
        jobs += [(job, programs) for job in configs.experts_forward(configs.PAPER, arch, T=chunk, persistent=True)]
    for (job, programs), stats in zip(jobs, aot.compile_report([job for job, _ in jobs])):
        label = aot.describe(job)
        c, num_warps = job["constexprs"], job["num_warps"]
        tile_bytes = c["BLOCK_T"] * c["BLOCK_S"] * c["BLOCK_D"] * 2
        assert stats["stl"] == 0 and stats["ldl"] == 0 and stats["local_bytes"] == 0, (label, stats)
        assert stats["ldg128"] >= 2 * tile_bytes // (32 * num_warps * 16), (label, stats)
        assert aot.ctas_per_sm(stats["registers"], num_warps) == 1, (label, stats["registers"])
        bytes_in_flight = programs * tile_bytes
        assert tile_bytes >= 32 * 1024 and bytes_in_flight >= BANDWIDTH[job["arch"]] * LOAD_LATENCY_S, (label, programs)
