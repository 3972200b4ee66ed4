"""peer_kernels.ops.peer_fused (one-pass kernel and two-kernel path) against reference.peer_fused,
and the PEER module on backend="triton".

Interpreter shapes stay at one or two token tiles (its tl.sort is slow per element). test_aot_*
compiles the one-pass kernel at the paper's shapes for sm_80 / sm_90 and checks the SASS.
"""
import pytest
import torch

import aot
import peer_kernels
from conftest import DEVICE
from peer_kernels import reference
from peer_kernels.ops import fused as fused_ops
from peer_kernels.ops import peer_fused
from peer_kernels.ops import retrieval as retrieval_ops
from utils import poison_empty, rel_rms_error

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
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, **kwargs)
    dy = torch.randn_like(y) if dy is None else dy
    return (y, *torch.autograd.grad(y, leaves, dy)), dy


TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# every gating with one activation and every activation with one gating, on both paths
COMBOS = [(g, "gelu", True) for g in reference.GATINGS] + [
    ("softmax", a, True) for a in reference.ACTIVATIONS if a != "gelu"] + [
    ("sigmoid", "silu", False), ("relu", "gelu_tanh", False)]


@pytest.mark.parametrize("gating, activation, one_pass", COMBOS,
                         ids=[f"{g}-{a}-{'one_pass' if o else 'two_kernel'}" for g, a, o in COMBOS])
def test_matches_reference(gating, activation, one_pass, monkeypatch):
    inputs = make_inputs()
    options = dict(k=3, k_sub=4, gating=gating, activation=activation)
    expected, dy = forward_and_grads(reference.peer_fused, inputs, **options)
    poison_empty(monkeypatch)
    actual, _ = forward_and_grads(peer_fused, inputs, dy=dy, one_pass=one_pass, **options)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, **TOLERANCES[torch.float64], msg=name)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_kernel"])
def test_separate_embed_and_shared_keys(one_pass, monkeypatch):
    """Separate tables per head and keys shared by all heads; n = 13, k = 5 not powers of two."""
    inputs = make_inputs(T=16, h=2, key_heads=1, n=13, dk=10, d=20, separate=True)
    options = dict(k=5, k_sub=6, separate_embed_per_head=True)
    expected, dy = forward_and_grads(reference.peer_fused, inputs, **options)
    poison_empty(monkeypatch)
    actual, _ = forward_and_grads(peer_fused, inputs, dy=dy, one_pass=one_pass, **options)
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCES[torch.float64], msg=name)


def test_float32(monkeypatch):
    inputs = make_inputs(dtype=torch.float32)
    expected, dy = forward_and_grads(reference.peer_fused, inputs, k=3, k_sub=4)
    poison_empty(monkeypatch)
    actual, _ = forward_and_grads(peer_fused, inputs, dy=dy, k=3, k_sub=4)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, e, **TOLERANCES[torch.float32], msg=name)


def test_bfloat16_given_the_same_picks():
    """bf16 sub-scores may tie after rounding; the reference runs on the kernel's picks (taken from the
    saved ids), so the comparison measures arithmetic, not tie-breaking."""
    x, queries, keys, w_down, w_up = make_inputs(d=32, dk=16, dtype=torch.bfloat16)
    y = peer_fused(x, queries, keys, w_down, w_up, 3, 4)
    scores, ids = reference.product_key_topk(queries, keys, 3, 4)
    kernel_scores, kernel_ids = retrieval_ops.product_key_topk(queries, keys, 3, 4)
    assert rel_rms_error(kernel_scores, scores) < 1e-5
    expected = reference.peer_experts(x, kernel_ids, reference.gate(kernel_scores, "softmax"), w_down, w_up)
    assert y.dtype == torch.bfloat16
    assert rel_rms_error(y, expected) < 1e-2
    assert rel_rms_error(y, reference.peer_fused(x, queries, keys, w_down, w_up, 3, 4)) < 5e-2


def test_one_pass_equals_two_kernel():
    inputs = make_inputs(dtype=torch.float32)
    one, dy = forward_and_grads(peer_fused, inputs, k=3, k_sub=4, one_pass=True)
    two, _ = forward_and_grads(peer_fused, inputs, dy=dy, k=3, k_sub=4, one_pass=False)
    for name, a, b in zip(NAMES, one, two):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_kernel"])
def test_gpu_float32_at_many_tiles(one_pass):
    """Block sizes of a real GPU (64-token retrieval tiles, 64-key tiles, gather tiles over d=256):
    several tiles of each, n not a multiple of the key tile, forward and every gradient."""
    inputs = make_inputs(T=300, h=4, key_heads=4, n=100, dk=64, d=256, dtype=torch.float32)
    options = dict(k=16, k_sub=16)
    expected, dy = forward_and_grads(reference.peer_fused, inputs, **options)
    actual, _ = forward_and_grads(peer_fused, inputs, dy=dy, one_pass=one_pass, **options)
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_gpu_bfloat16_at_paper_shapes():
    """T=512 tokens of SPEC's paper shape (d=1024, N=1024**2, h=8, k=k'=16, dk=128): retrieval by
    score, then the layer against the reference run on the kernel's own picks."""
    x, queries, keys, w_down, w_up = make_inputs(T=512, h=8, key_heads=8, n=1024, dk=128, d=1024,
                                                 dtype=torch.bfloat16)
    scores, _ = reference.product_key_topk(queries, keys, 16)
    kernel_scores, kernel_ids = retrieval_ops.product_key_topk(queries, keys, 16)
    assert rel_rms_error(kernel_scores, scores) < 1e-5
    expected = reference.peer_experts(x, kernel_ids, reference.gate(kernel_scores, "softmax"), w_down, w_up)
    for one_pass in (True, False):
        assert rel_rms_error(peer_fused(x, queries, keys, w_down, w_up, 16, one_pass=one_pass), expected) < 1e-2


def test_gradcheck():
    x, queries, keys, w_down, w_up = make_inputs(T=5, h=2, n=3, dk=4, d=6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, queries, keys, w_down, w_up)]
    assert torch.autograd.gradcheck(lambda *a: peer_fused(*a, 2, 2, "sigmoid", "silu"), leaves, fast_mode=True)


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the op."""
    x, queries, keys, w_down, w_up = (t.requires_grad_() for t in make_inputs(T=4, h=1, key_heads=1, n=3, dk=4, d=6))
    torch.library.opcheck(fused_ops.fused_forward,
                          (x, queries, keys, w_down, w_up, 2, 2, "softmax", "gelu", 0, True, False))


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
    (dict(k=17, k_sub=4), ValueError, "k "),
    (dict(x=torch.randn(7, 24, dtype=torch.float64)), ValueError, "queries"),
    (dict(x=torch.randn(20, 24)), TypeError, "queries"),
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
def test_module_on_triton_backend(options):
    layer = _layer(backend="reference", **options)
    x = torch.randn(3, 6, 24, device=DEVICE, dtype=torch.float64, requires_grad=True)
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.sum(), [x, *layer.parameters()])
    layer.backend = "triton"
    actual = layer(x)
    actual_grads = torch.autograd.grad(actual.sum(), [x, *layer.parameters()])
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_compile_fullgraph_does_not_break():
    layer = _layer(backend="triton")
    x = torch.randn(16, 24, device=DEVICE, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_aot_one_pass_kernel_at_paper_shapes():
    """bf16, T=8192, d=1024, h=8, n=1024, dk=128, k=k'=16, softmax, GELU: no spills, 128-bit loads."""
    n, dk, k, heads, d = 1024, 128, 16, 8, 1024
    ints = ["T", "heads", "n", "dk", "k", "stride_t", "stride_h", "stride_p", "key_head_stride", "id_head_offset"]
    ptrs = {"x_ptr": "*bf16", "queries_ptr": "*bf16", "keys_ptr": "*bf16", "pairs_ptr": "*i32", "w_down_ptr": "*bf16",
            "w_up_ptr": "*bf16", "y_ptr": "*bf16", "scores_ptr": "*fp32", "ids_ptr": "*i64", "gates_ptr": "*fp32",
            "z_ptr": "*fp32"}
    jobs = []
    for arch in aot.ARCHS:
        consts, launch = fused_ops.one_pass_config(8192, heads, d, n, dk, k, k, torch.bfloat16, "gelu", "softmax",
                                                  arch, interpreted=False)
        jobs.append(dict(module="peer_kernels.kernels.fused", kernel="peer_fused_kernel",
                         signature={**ptrs, **{name: "i32" for name in ints}}, constexprs=consts, arch=arch, **launch,
                         aligned=list(ptrs) + ["dk", "stride_t", "stride_h", "stride_p", "key_head_stride"]))
    for job, stats in zip(jobs, aot.compile_report(jobs)):
        label = aot.describe(job)
        assert stats["stl"] == 0 and stats["ldl"] == 0 and stats["local_bytes"] == 0, (label, stats)
        assert stats["ldg128"] > 0, (label, stats)
