"""What every backend must do alike (peer_kernels.backends): the one tie rule on exact ties, NaN in
giving NaN out, the same errors on bad input (the oracle included), and degenerate sizes that either
work or raise a ValueError naming the argument."""
import pytest
import torch

import bounds
from conftest import DEVICE, device_for
from peer_kernels import _device, backends, reference

BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])


@pytest.fixture(params=BACKENDS)
def ops(request):
    """The op namespace of one backend, for tensors on the test device (the C++ one on the CPU)."""
    device = device_for(request.param)
    return backends.get(request.param, device), device


def half_keys(first, second, dtype=torch.float64):
    """Queries (1, 1, 2, 1) of ones and keys (1, n, 2, 1) whose sub-key scores are exactly `first`
    and `second`."""
    keys = torch.tensor([first, second], dtype=dtype).T[None, :, :, None].contiguous()
    return torch.ones(1, 1, 2, 1, dtype=dtype), keys


# ---- ties -------------------------------------------------------------------------------------------

def test_tie_between_candidates_goes_to_the_better_ranked_pair(ops):
    """Half scores a = [5, 6], b = [2, 1], k = k' = 2: pairs by rank (a1, b0) = 8, then (a1, b1) and
    (a0, b0) tie at 7; the rule takes (rank 0, rank 1) first: ids [1*2 + 0, 1*2 + 1] = [2, 3]."""
    ops, device = ops
    queries, keys = half_keys([5.0, 6.0], [2.0, 1.0])
    scores, ids = ops.product_key_topk(queries.to(device), keys.to(device), 2, 2)
    assert ids.cpu().tolist() == [[[2, 3]]]
    assert scores.cpu().tolist() == [[[8.0, 7.0]]]


def test_ties_within_a_half_go_to_the_smaller_index(ops):
    """Every sub-key equal: each half ranks by index, the pairs by (rank a, rank b)."""
    ops, device = ops
    queries, keys = half_keys([1.0] * 5, [2.0] * 5)
    _, ids = ops.product_key_topk(queries.to(device), keys.to(device), 4, 3)
    assert ids.cpu().tolist() == [[[0, 1, 2, 5]]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_exact_ties_everywhere_match_the_oracle(ops, dtype):
    """Small integers make every score exact in any summation order, and few distinct values make
    many of them equal: the picks (order included) must be the oracle's, as must the scores and,
    with them, the layer's output and gradients."""
    ops, device = ops
    T, h, n, dk, k, k_sub, d = 12, 2, 7, 4, 6, 4, 10
    queries = torch.randint(-2, 3, (T, h, 2, dk)).to(dtype)
    keys = torch.randint(-1, 2, (h, n, 2, dk)).to(dtype)
    keys[:, 4:, 1] = keys[:, :3, 1]                # repeated sub-keys: equal scores
    expected_scores, expected_ids = reference.product_key_topk(queries.double(), keys.double(), k, k_sub)
    scores, ids = ops.product_key_topk(queries.to(device), keys.to(device), k, k_sub)
    assert torch.equal(ids.cpu(), expected_ids)
    assert torch.equal(scores.cpu().double(), expected_scores)
    x = torch.randn(T, d, dtype=dtype)
    w_down, w_up = torch.randn(n * n, d, dtype=dtype), torch.randn(n * n, d, dtype=dtype)
    inputs = [t.to(device).requires_grad_() for t in (x, queries, keys, w_down, w_up)]
    y = ops.peer_fused(*inputs, k, k_sub, "softmax", "relu")
    expected = reference.peer_fused(*(t.detach().cpu().double() for t in inputs), k, k_sub, "softmax", "relu")
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4   # a loose fp32 check: the picks are the point
    torch.testing.assert_close(y.detach().cpu().double(), expected, rtol=tolerance, atol=tolerance)


# ---- NaN in, NaN out --------------------------------------------------------------------------------

def test_a_nan_sub_key_score_is_picked(ops):
    """NaN ranks above every number (torch.sort's order): scores [0, NaN, 1, 3] keep NaN (index 1)
    and 3 (index 3); nothing finite may come out of a pick that involves the NaN."""
    ops, device = ops
    queries, keys = half_keys([0.0, float("nan"), 1.0, 3.0], [0.0, 2.0, 1.0, -1.0])
    expected_scores, expected_ids = reference.product_key_topk(queries, keys, 3, 2)
    scores, ids = ops.product_key_topk(queries.to(device), keys.to(device), 3, 2)
    assert torch.equal(ids.cpu(), expected_ids)
    assert expected_ids.tolist() == [[[1 * 4 + 1, 1 * 4 + 2, 3 * 4 + 1]]]
    assert torch.equal(torch.isnan(scores.cpu()), torch.isnan(expected_scores))
    assert torch.isnan(scores[0, 0, :2]).all() and scores[0, 0, 2].item() == 5.0


@pytest.mark.parametrize("gating, activation", [("relu", "relu"), ("softmax", "relu"), ("sigmoid", "gelu")])
@pytest.mark.parametrize("where", ["x", "w_down", "queries"])
def test_nan_in_gives_nan_out(ops, gating, activation, where):
    """A NaN token, an all-NaN w_down, or a NaN query: the outputs are NaN exactly where the oracle's
    are, through relu activation and relu gating too (max(NaN, 0) must not turn NaN into 0)."""
    ops, device = ops
    T, h, n, dk, d, k = 5, 2, 4, 6, 8, 3
    inputs = dict(x=torch.randn(T, d, dtype=torch.float64), queries=torch.randn(T, h, 2, dk, dtype=torch.float64),
                  keys=torch.randn(h, n, 2, dk, dtype=torch.float64),
                  w_down=torch.randn(n * n, d, dtype=torch.float64), w_up=torch.randn(n * n, d, dtype=torch.float64))
    if where == "x":
        inputs["x"][2] = float("nan")
    elif where == "w_down":
        inputs["w_down"].fill_(float("nan"))
    else:
        inputs["queries"][3, 1, 0, 2] = float("nan")
    expected = reference.peer_fused(*inputs.values(), k, k, gating, activation)
    actual = ops.peer_fused(*(t.to(device) for t in inputs.values()), k, k, gating, activation).cpu()
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-10, atol=1e-10)


# ---- bad input: the same errors on every backend, the oracle included ---------------------------------

def _expert_args(**change):
    args = dict(x=torch.randn(4, 6), expert_ids=torch.randint(0, 5, (4, 2, 3)), gates=torch.rand(4, 2, 3),
                w_down=torch.randn(5, 6), w_up=torch.randn(5, 6))
    args.update(change)
    return args


EXPERT_ERRORS = [
    (dict(expert_ids=torch.full((4, 2, 3), -1)), ValueError, r"expert_ids: expected values in \[0, 5\)"),
    (dict(expert_ids=torch.full((4, 2, 3), 5)), ValueError, r"expert_ids: expected values in \[0, 5\)"),
    (dict(expert_ids=torch.zeros(4, 2, 3, dtype=torch.int16)), TypeError, "expert_ids: expected dtype"),
    (dict(expert_ids=torch.zeros(4, 2, 3, dtype=torch.uint8)), TypeError, "expert_ids: expected dtype"),
    (dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "x: expected dtype"),
    (dict(x=torch.randn(4, 0), w_down=torch.randn(5, 0), w_up=torch.randn(5, 0)), ValueError, "x: expected at least 1"),
    (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError, "float64 mixes"),
    (dict(w_up=torch.randn(5, 6).bfloat16()), TypeError, "w_up: expected dtype"),
    (dict(gates=torch.rand(4, 2, 2)), ValueError, "gates: expected shape"),
    # quantized tables (peer_kernels.quantize_): int8 / float8_e4m3fn with a float32 scale per row
    (dict(w_down=torch.ones(5, 6, dtype=torch.int8), w_up=torch.ones(5, 6, dtype=torch.int8)), TypeError,
     "w_down: a torch.int8 table needs its per-row scale w_down_scale"),
    (dict(w_down_scale=torch.ones(5), w_up_scale=torch.ones(5)), TypeError,
     "w_down_scale: scales go with quantized tables .* but w_down is torch.float32"),
    (dict(w_down=torch.ones(5, 6, dtype=torch.int8), w_up=torch.ones(5, 6, dtype=torch.int8), w_down_scale=torch.ones(4),
          w_up_scale=torch.ones(5)), ValueError, r"w_down_scale: expected shape \(5\), got \(4,\)"),
    (dict(w_down=torch.ones(5, 6, dtype=torch.int8), w_up=torch.ones(5, 6, dtype=torch.int8), w_down_scale=torch.ones(5),
          w_up_scale=torch.ones(5, dtype=torch.float64)), TypeError, "w_up_scale: expected dtype"),
    (dict(w_down=torch.ones(5, 6, dtype=torch.int8), w_up=torch.ones(5, 6, dtype=torch.float8_e4m3fn),
          w_down_scale=torch.ones(5), w_up_scale=torch.ones(5)), TypeError, "w_up: expected dtype torch.int8"),
    (dict(x=torch.randn(4, 6, dtype=torch.float64), w_down=torch.ones(5, 6, dtype=torch.int8),
          w_up=torch.ones(5, 6, dtype=torch.int8), w_down_scale=torch.ones(5), w_up_scale=torch.ones(5)), TypeError,
     "float64 mixes"),
    (dict(x=torch.randn(4, 6, requires_grad=True), w_down=torch.ones(5, 6, dtype=torch.int8),
          w_up=torch.ones(5, 6, dtype=torch.int8), w_down_scale=torch.ones(5), w_up_scale=torch.ones(5)), ValueError,
     r"x: requires a gradient, but the expert tables are quantized \(peer_kernels.quantize_\)"),
]


@pytest.mark.parametrize("change, error, match", EXPERT_ERRORS)
def test_expert_errors(ops, change, error, match):
    ops, device = ops
    args = {name: t.detach().to(device).requires_grad_(t.requires_grad) for name, t in _expert_args(**change).items()}
    with pytest.raises(error, match=match):
        ops.peer_experts(**args)


RETRIEVAL_ERRORS = [
    (dict(k=4, k_sub=7), ValueError, r"k_sub: expected <= n = sqrt\(num_experts\) = 6 sub-keys per half, got 7"),
    (dict(k=7, k_sub=None), ValueError, r"k \(k_sub defaults to it\): expected <= n"),
    (dict(k=10, k_sub=3), ValueError, r"k: expected <= k_sub\*\*2 = 9"),
    (dict(queries=torch.randn(5, 0, 2, 8)), ValueError, "queries: expected at least 1 head"),
    (dict(queries=torch.randn(5, 2, 2, 0), keys=torch.randn(1, 6, 2, 0)), ValueError, "queries: expected at least 1"),
    (dict(keys=torch.randn(1, 0, 2, 8)), ValueError, "k_sub: expected <= n .* = 0"),
    (dict(keys=torch.randn(3, 6, 2, 8)), ValueError, "keys: expected 2 heads"),
    (dict(keys=torch.randn(1, 6, 2, 8).double()), TypeError, "keys: expected dtype"),
]


@pytest.mark.parametrize("change, error, match", RETRIEVAL_ERRORS)
def test_retrieval_errors(ops, change, error, match):
    ops, device = ops
    args = dict(queries=torch.randn(5, 2, 2, 8), keys=torch.randn(1, 6, 2, 8), k=4, k_sub=3)
    args.update(change)
    args = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with pytest.raises(error, match=match):
        ops.product_key_topk(**args)


MIX_ERRORS = [
    (dict(z=torch.randn(4, 2, 3).bfloat16()), TypeError, r"z: expected dtype in \('torch.float32', 'torch.float64'\)"),
    (dict(z=torch.randn(4, 2, 3).half()), TypeError, r"z: expected dtype in \('torch.float32', 'torch.float64'\)"),
    (dict(z=torch.randn(4, 2, 3).double()), TypeError, "float64 mixes"),
    (dict(gates=torch.rand(4, 2, 2)), ValueError, "gates: expected shape"),
]


@pytest.mark.parametrize("change, error, match", MIX_ERRORS)
def test_mix_errors(ops, change, error, match):
    """z is peer_down's output, in the compute dtype (float32, or float64): a 16-bit z was run by the
    reference, a C++ RuntimeError and a Triton InterpreterError, one op with three behaviours."""
    ops, device = ops
    args = dict(z=torch.randn(4, 2, 3), expert_ids=torch.randint(0, 5, (4, 2, 3)), gates=torch.rand(4, 2, 3),
                w_up=torch.randn(5, 6))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.peer_mix(**{name: t.to(device) for name, t in args.items()})


# ---- degenerate sizes that work ---------------------------------------------------------------------

@pytest.mark.parametrize("T", [0, 1])
def test_zero_and_one_token(ops, T):
    ops, device = ops
    n, h, d = 3, 2, 5
    inputs = [torch.randn(T, d, dtype=torch.float64), torch.randn(T, h, 2, 4, dtype=torch.float64),
              torch.randn(h, n, 2, 4, dtype=torch.float64), torch.randn(n * n, d, dtype=torch.float64),
              torch.randn(n * n, d, dtype=torch.float64)]
    leaves = [t.to(device).requires_grad_() for t in inputs]
    y = ops.peer_fused(*leaves, 2, 2)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    expected_y = reference.peer_fused(*ref_leaves, 2, 2)
    expected = torch.autograd.grad(expected_y, ref_leaves, torch.ones_like(expected_y))
    assert y.shape == (T, d)
    torch.testing.assert_close(y.detach().cpu(), expected_y.detach(), rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-10)


def test_no_experts_per_token(ops):
    """expert_ids (T, h, 0): y is zero and every gradient too."""
    ops, device = ops
    args = {name: t.to(device) for name, t in _expert_args(expert_ids=torch.zeros(4, 2, 0, dtype=torch.int64),
                                                            gates=torch.rand(4, 2, 0)).items()}
    y = ops.peer_experts(**args)
    assert y.shape == (4, 6) and not y.any()


# ---- the expert stage: both widths, the identity activation, and its two halves ---------------------

def _expert_inputs(T=7, h=2, k=3, d_in=10, d_out=6, rows=9, dtype=torch.float32):
    ids = torch.randint(0, rows, (T, h, k))
    ids[0, 1] = ids[0, 0]                      # duplicates across heads
    ids.view(-1)[-1] = rows - 1                # the table's last row
    return (torch.randn(T, d_in, dtype=dtype), ids, torch.rand(T, h, k, dtype=dtype) + 0.1,
            torch.randn(rows, d_in, dtype=dtype), torch.randn(rows, d_out, dtype=dtype))


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy)


@pytest.mark.parametrize("activation", ["identity", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_experts_with_two_widths(ops, activation, dtype):
    """x (T, d_in), w_down (E, d_in), w_up (E, d_out) -> y (T, d_out): retrieved rank-1 adapters with
    the identity activation (peer-pytorch's PEERLora), or any activation."""
    ops, device = ops
    x, ids, gates, w_down, w_up = _expert_inputs(dtype=dtype)
    dy = torch.randn(7, 6, dtype=dtype)
    y, (dx, dgates, dw_down, dw_up) = _grads(
        lambda x, g, wd, wu: ops.peer_experts(x, ids.to(device), g, wd, wu, activation),
        [t.to(device) for t in (x, gates, w_down, w_up)], dy.to(device))
    assert y.shape == (7, 6)
    expected = bounds.experts(x.double(), ids, gates.double(), w_down.double(), w_up.double(), dy.double(), activation)
    bounds.check_all({n: t.cpu() for n, t in dict(y=y, dx=dx, dgates=dgates, dw_down=dw_down, dw_up=dw_up).items()},
                     expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_down_and_mix_are_the_expert_stage_in_two(ops, dtype):
    ops, device = ops
    x, ids, gates, w_down, w_up = _expert_inputs(dtype=dtype)
    dz = torch.randn(7, 2, 3, dtype=dtype)
    z, (dx, dw_down) = _grads(lambda x, wd: ops.peer_down(x, ids.to(device), wd),
                              [x.to(device), w_down.to(device)], dz.to(device))
    assert z.shape == (7, 2, 3) and z.dtype == dz.dtype
    bounds.check_all({n: t.cpu() for n, t in dict(z=z, dx=dx, dw_down=dw_down).items()},
                     bounds.down(x.double(), ids, w_down.double(), dz.double()))
    z64 = z.detach().cpu().double()
    dy = torch.randn(7, 6, dtype=z.dtype)
    y, (dz_out, dgates, dw_up) = _grads(lambda z, g, wu: ops.peer_mix(z, ids.to(device), g, wu, "silu"),
                                        [z.detach(), gates.to(device), w_up.to(device)], dy.to(device))
    assert y.shape == (7, 6) and y.dtype == z.dtype
    bounds.check_all({n: t.cpu() for n, t in dict(y=y, dz=dz_out, dgates=dgates, dw_up=dw_up).items()},
                     bounds.mix(z64, ids, gates.double(), w_up.double(), dy.double(), "silu"))


# ---- sparse table gradients -------------------------------------------------------------------------

def _touched(ids, rows):
    return torch.unique(ids.reshape(-1) % rows)


def _touched_rows_of(grad):
    """The rows of a sparse table gradient, checked unique and ascending: the backward produces it
    coalesced (torch's gradient accumulation may drop the flag when it stores it in .grad; PEER
    with sparse_grad=True puts it back, tests/test_module.py)."""
    assert grad.is_sparse
    rows = grad._indices()[0].cpu()
    assert (rows.diff() > 0).all()
    return rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sparse_table_gradients_of_the_expert_op(ops, dtype):
    """Coalesced sparse COO gradients holding exactly the touched rows (duplicates across heads and
    tokens summed), equal to the oracle's dense gradients there."""
    ops, device = ops
    x, ids, gates, w_down, w_up = _expert_inputs(dtype=dtype)
    dy = torch.randn(7, 6, dtype=dtype)
    leaves = [t.to(device).requires_grad_() for t in (x, gates, w_down, w_up)]
    y = ops.peer_experts(leaves[0], ids.to(device), leaves[1], leaves[2], leaves[3], "gelu", sparse_grad=True)
    y.backward(dy.to(device))
    expected = bounds.experts(x.double(), ids, gates.double(), w_down.double(), w_up.double(), dy.double(), "gelu")
    touched = _touched(ids, w_down.shape[0])
    for name, table in (("dw_down", leaves[2]), ("dw_up", leaves[3])):
        grad = table.grad
        assert grad.shape == table.shape and grad.dtype == dtype
        assert torch.equal(_touched_rows_of(grad), touched)
        exact, magnitude = expected[name]
        bounds.check(name, grad._values().cpu(), exact[touched], magnitude[touched])
    for name, leaf in (("dx", leaves[0]), ("dgates", leaves[1])):
        bounds.check(name, leaf.grad.cpu(), *expected[name])


def test_sparse_gradients_of_the_fused_op_with_separate_embeddings(ops):
    """Head h owns rows [h*n*n, (h+1)*n*n): the touched rows are the ids offset per head."""
    ops, device = ops
    T, h, n, dk, d, k = 9, 3, 4, 5, 8, 3
    inputs = [torch.randn(T, d, dtype=torch.float64), torch.randn(T, h, 2, dk, dtype=torch.float64),
              torch.randn(1, n, 2, dk, dtype=torch.float64), torch.randn(h * n * n, d, dtype=torch.float64),
              torch.randn(h * n * n, d, dtype=torch.float64)]
    leaves = [t.to(device).requires_grad_() for t in inputs]
    ops.peer_fused(*leaves, k, k, separate_embed_per_head=True, sparse_grad=True).sum().backward()
    dense = [t.detach().clone().requires_grad_() for t in inputs]
    reference.peer_fused(*dense, k, k, separate_embed_per_head=True).sum().backward()
    _, ids = reference.product_key_topk(inputs[1], inputs[2], k, k)
    touched = torch.unique(reference.head_offsets(ids, n * n))
    for sparse, full in zip(leaves[3:], dense[3:]):
        assert torch.equal(_touched_rows_of(sparse.grad), touched)
        torch.testing.assert_close(sparse.grad.to_dense().cpu(), full.grad, rtol=1e-10, atol=1e-10)


def test_sparse_gradients_accumulate_over_micro_batches(ops):
    """Two backward passes add sparse to sparse; coalesced, the sum is the dense sum."""
    ops, device = ops
    first, second = _expert_inputs(), _expert_inputs()
    w_down = first[3].to(device).requires_grad_()
    w_up = first[4].to(device).requires_grad_()
    for x, ids, gates, _, _ in (first, second):
        ops.peer_experts(x.to(device), ids.to(device), gates.to(device), w_down, w_up, sparse_grad=True).sum().backward()
    dense_down, dense_up = first[3].detach().clone().requires_grad_(), first[4].detach().clone().requires_grad_()
    for x, ids, gates, _, _ in (first, second):
        reference.peer_experts(x, ids, gates, dense_down, dense_up).sum().backward()
    for sparse, dense in ((w_down, dense_down), (w_up, dense_up)):
        assert sparse.grad.is_sparse
        torch.testing.assert_close(sparse.grad.coalesce().to_dense().cpu(), dense.grad, rtol=1e-4, atol=1e-4)


def test_sparse_adam_on_sparse_gradients_is_lazy_adam(ops):
    """torch.optim.SparseAdam takes the sparse gradients as they are and updates only the touched
    rows, by the Adam formulas (a hand transcription here)."""
    ops, device = ops
    x, ids, gates, w_down, w_up = _expert_inputs(dtype=torch.float64)
    table = w_up.to(device).requires_grad_()
    optimizer = torch.optim.SparseAdam([table], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    ops.peer_experts(x.to(device), ids.to(device), gates.to(device), w_down.to(device), table, sparse_grad=True).sum().backward()
    grad = table.grad.coalesce().to_dense().cpu()
    before = table.detach().cpu().clone()
    optimizer.step()
    rows = _touched(ids, w_up.shape[0])
    m, v = 0.1 * grad[rows], 0.01 * grad[rows] ** 2       # one step: (1 - beta) g, (1 - beta2) g**2
    expected = before.clone()
    expected[rows] -= 0.1 * 0.01 ** 0.5 / 0.1 * m / (v.sqrt() + 1e-8)   # lr sqrt(1 - b2) / (1 - b1)
    torch.testing.assert_close(table.detach().cpu(), expected, rtol=1e-12, atol=1e-12)
