"""Every torch.library op of the package (peer_kernels/_library.py: the Triton ops of
peer_kernels/ops and the C++ ops of peer_kernels/csrc.py) passes torch.library.opcheck, forward and
backward ops alike, with non-contiguous and transposed inputs: schema, fake implementation (sizes,
strides and dtypes equal to the real op's), autograd registration and AOT dispatch."""
import pytest
import torch

from conftest import DEVICE
from peer_kernels import backends, csrc
from peer_kernels.ops import experts, fused, retrieval

T, H, N, DK, D, K, K_SUB = 6, 2, 5, 8, 12, 3, 3
TRITON = DEVICE.type == "cuda" or backends.TRITON_INTERPRETED


def column_major(t):
    """The same values, transposed in memory: not contiguous."""
    return t.t().contiguous().t()


def inputs(dtype=torch.float32, device=DEVICE):
    """(x, queries, keys, w_down, w_up, dy) with only queries contiguous in dk, as the module gives
    them; the tables' gradients are wanted."""
    x = column_major(torch.randn(T, D, dtype=dtype, device=device)).requires_grad_()
    queries = torch.randn(T, 2, H, DK, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    keys = torch.randn(H, 2, N, DK, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    w_down = torch.randn(N * N, D, dtype=dtype, device=device).requires_grad_()
    w_up = column_major(torch.randn(N * N, D, dtype=dtype, device=device)).requires_grad_()
    dy = column_major(torch.randn(T, D, dtype=dtype, device=device))
    for t in (x, queries, keys, w_up, dy):
        assert not t.is_contiguous()
    return x, queries, keys, w_down, w_up, dy


def detached(*args):
    """Backward ops are not differentiable themselves (no double backward): checked without grads."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def strided_gates(like_ids, dtype, device):
    return torch.rand(*like_ids.shape, 2, dtype=dtype, device=device)[..., 0].requires_grad_()


@pytest.mark.skipif(not TRITON, reason="the Triton ops need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_ops(dtype):
    x, queries, keys, w_down, w_up, dy = inputs(dtype)
    for gating in ("softmax", "none"):
        torch.library.opcheck(retrieval._retrieve_op, (queries, keys, K, K_SUB, gating, 0))
    scores, ids, gates = retrieval._retrieve_op(queries, keys, K, K_SUB, "softmax", 0)
    dscores = column_major(torch.randn(T, H * K, dtype=scores.dtype, device=DEVICE)).view(T, H, K)
    torch.library.opcheck(retrieval._retrieve_backward_op,
                          detached(dscores, dscores.clone(), queries, keys, ids, scores, gates, "softmax", 0))
    torch.library.opcheck(retrieval._retrieve_backward_op,
                          detached(dscores, None, queries, keys, ids, scores, gates, "none", 0))
    ids_t = ids.transpose(1, 2).contiguous().transpose(1, 2)
    for deterministic, sparse in ((True, False), (False, False), (True, True)):
        gates_s = strided_gates(ids, dtype, DEVICE)
        torch.library.opcheck(experts.experts_forward, (x, ids_t, gates_s, w_down, w_up, "silu", deterministic, sparse))
        _, z = experts.experts_forward(x, ids, gates_s, w_down, w_up, "silu", deterministic, sparse)
        torch.library.opcheck(experts.experts_backward,
                              detached(dy, x, ids_t, gates_s, column_major(z.reshape(T, -1)).view(z.shape), w_down,
                                       w_up, "silu", deterministic, sparse))
        torch.library.opcheck(experts.down_forward, (x, ids_t, w_down, deterministic, sparse))
        z = experts.down_forward(x, ids, w_down, deterministic, sparse)
        dz = column_major(torch.randn(T, H * K, dtype=z.dtype, device=DEVICE)).view(T, H, K)
        torch.library.opcheck(experts.down_backward, detached(dz, x, ids_t, w_down, deterministic, sparse))
        torch.library.opcheck(experts.mix_forward, (z.detach().requires_grad_(), ids_t, gates_s, w_up, "relu",
                                                    deterministic, sparse))
        torch.library.opcheck(experts.mix_backward, detached(dy, z, ids_t, gates_s, w_up, "relu", deterministic,
                                                             sparse))
    for schedule, sparse in (("one_pass", False), ("two_kernel", False), ("overlap", False), ("one_pass", True)):
        args = (x, queries, keys, w_down, w_up, K, K_SUB, "sigmoid", "gelu", 0, schedule, True, sparse)
        torch.library.opcheck(fused.fused_forward, args)
        _, scores, ids, gates, z = fused.fused_forward(*args)
        torch.library.opcheck(fused.fused_backward, detached(dy, x, queries, keys, w_down, w_up, scores, ids, gates,
                                                             z, "sigmoid", "gelu", 0, True, sparse))


@pytest.mark.skipif(not csrc.available(), reason="the C++ extension did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_ops(dtype):
    x, queries, keys, w_down, w_up, dy = inputs(dtype, torch.device("cpu"))
    torch.library.opcheck(csrc._retrieve_op, (queries, keys, K, K_SUB))
    scores, ids = csrc._retrieve_op(queries, keys, K, K_SUB)
    dscores = column_major(torch.randn(T, H * K, dtype=scores.dtype)).view(T, H, K)
    torch.library.opcheck(csrc._retrieve_backward_op, detached(dscores, queries, keys, ids))
    ids_t = ids.transpose(1, 2).contiguous().transpose(1, 2)
    gates = strided_gates(ids, dtype, torch.device("cpu"))
    for sparse in (False, True):
        torch.library.opcheck(csrc._experts_op, (x, ids_t, gates, w_down, w_up, "gelu_tanh", sparse))
        _, z = csrc._experts_op(x, ids, gates, w_down, w_up, "gelu_tanh", sparse)
        torch.library.opcheck(csrc._experts_backward_op, detached(dy, x, ids_t, gates, z, w_down, w_up, "gelu_tanh",
                                                                  sparse))
        torch.library.opcheck(csrc._down_op, (x, ids_t, w_down, sparse))
        z = csrc._down_op(x, ids, w_down, sparse)
        torch.library.opcheck(csrc._down_backward_op, detached(column_major(z.reshape(T, -1)).view(T, H, K), x, ids_t,
                                                               w_down, sparse))
        torch.library.opcheck(csrc._mix_op, (z.detach().requires_grad_(), ids_t, gates, w_up, "identity", sparse))
        torch.library.opcheck(csrc._mix_backward_op, detached(dy, z, ids_t, gates, w_up, "identity", sparse))
    rows = (H * N * N, D)
    separate = (x, queries, keys, torch.randn(rows, dtype=dtype).requires_grad_(),
                column_major(torch.randn(rows, dtype=dtype)).requires_grad_())
    for args in ((x, queries, keys, w_down, w_up, K, K_SUB, "relu", "relu", 0, False),
                 (*separate, K, K_SUB, "softmax", "silu", N * N, True)):
        torch.library.opcheck(csrc._fused_op, args)
        _, scores, ids, gates, z = csrc._fused_op(*args)
        torch.library.opcheck(csrc._fused_backward_op, detached(dy, *args[:5], scores, ids, gates, z, *args[7:]))


def test_every_registered_op_is_checked():
    """A new op must be added to the opchecks above: the namespace holds exactly these."""
    checked = {"experts_forward", "experts_backward", "down_forward", "down_backward", "mix_forward", "mix_backward",
               "retrieve", "retrieve_backward", "fused_forward", "fused_backward",
               "cpp_retrieve", "cpp_retrieve_backward", "cpp_experts", "cpp_experts_backward", "cpp_down",
               "cpp_down_backward", "cpp_mix", "cpp_mix_backward", "cpp_fused", "cpp_fused_backward"}
    registered = {name for name in dir(torch.ops.peer_kernels) if not name.startswith("_")} - {"name"}
    assert registered == checked
