"""Every torch.library op of the package (peer_kernels/_library.py, declared once and filled by the
Triton launchers of peer_kernels/ops and the C++ ones of peer_kernels/csrc) passes
torch.library.opcheck on every backend, forward and backward ops alike, with non-contiguous and
transposed inputs: schema, fake implementation (sizes, strides and dtypes equal to the real op's),
autograd registration and AOT dispatch."""
import pytest
import torch

from conftest import DEVICE, device_for
from peer_kernels import _device, _library, csrc
from peer_kernels.quantize import quantize_rows

T, H, N, DK, D, K, K_SUB = 6, 2, 5, 8, 12, 3, 3
TRITON = DEVICE.type == "cuda" or _device.INTERPRETED


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


def _device_of(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("the Triton ops need CUDA or TRITON_INTERPRET=1")
    if backend == "cpp" and not csrc.available():
        pytest.skip("the C++ extension did not build")
    return device_for(backend)


# each backend's schedules of the fused op: (schedule, sparse table gradients, tables per head)
SCHEDULES = {"triton": (("one_pass", False, True), ("two_kernel", False, False), ("overlap", False, False),
                        ("one_pass", True, False)),
             "cpp": (("two_kernel", False, True), ("two_kernel", True, False))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_ops(backend, dtype):
    device = _device_of(backend)
    x, queries, keys, w_down, w_up, dy = inputs(dtype, device)
    for gating, offset in (("softmax", 0), ("none", 0), ("relu", N * N)):
        torch.library.opcheck(_library.retrieve, (backend, queries, keys, K, K_SUB, gating, offset))
    scores, ids, gates = _library.retrieve(backend, queries, keys, K, K_SUB, "softmax", 0)
    dscores = column_major(torch.randn(T, H * K, dtype=scores.dtype, device=device)).view(T, H, K)
    torch.library.opcheck(_library.retrieve_backward,
                          detached(backend, dscores, dscores.clone(), queries, keys, ids, scores, gates, "softmax", 0))
    torch.library.opcheck(_library.retrieve_backward,
                          detached(backend, dscores, None, queries, keys, ids, scores, gates, "none", 0))
    ids_t = ids.transpose(1, 2).contiguous().transpose(1, 2)
    for deterministic, sparse in ((True, False), (False, False), (True, True)):
        gates_s = strided_gates(ids, dtype, device)
        torch.library.opcheck(_library.experts_forward,
                              (backend, x, ids_t, gates_s, w_down, w_up, "silu", deterministic, sparse))
        _, z = _library.experts_forward(backend, x, ids, gates_s, w_down, w_up, "silu", deterministic, sparse)
        torch.library.opcheck(_library.experts_backward,
                              detached(backend, dy, x, ids_t, gates_s, column_major(z.reshape(T, -1)).view(z.shape),
                                       w_down, w_up, "gelu_tanh", deterministic, sparse))
        torch.library.opcheck(_library.down_forward, (backend, x, ids_t, w_down, deterministic, sparse))
        z = _library.down_forward(backend, x, ids, w_down, deterministic, sparse)
        dz = column_major(torch.randn(T, H * K, dtype=z.dtype, device=device)).view(T, H, K)
        torch.library.opcheck(_library.down_backward, detached(backend, dz, x, ids_t, w_down, deterministic, sparse))
        torch.library.opcheck(_library.mix_forward, (backend, z.detach().requires_grad_(), ids_t, gates_s, w_up, "relu",
                                                     deterministic, sparse))
        torch.library.opcheck(_library.mix_backward, detached(backend, dy, z, ids_t, gates_s, w_up, "identity",
                                                              deterministic, sparse))
    rows = (H * N * N, D)
    separate = (torch.randn(rows, dtype=dtype, device=device).requires_grad_(),
                column_major(torch.randn(rows, dtype=dtype, device=device)).requires_grad_())
    for schedule, sparse, per_head in SCHEDULES[backend]:
        tables, offset = (separate, N * N) if per_head else ((w_down, w_up), 0)
        args = (backend, x, queries, keys, *tables, K, K_SUB, "sigmoid", "gelu", offset, schedule, True, sparse)
        torch.library.opcheck(_library.fused_forward, args)
        _, scores, ids, gates, z = _library.fused_forward(*args)
        torch.library.opcheck(_library.fused_backward, detached(
            backend, dy, x, queries, keys, *tables, scores, ids, gates, z, "sigmoid", "gelu", offset, True, sparse))


@pytest.mark.parametrize("table_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_forward_ops_with_quantized_tables(backend, table_dtype):
    """The forward ops' scale arguments: quantized tables (column-major, like the float ones above)
    with their scales; inference only, so no input requires grad. opcheck's schema check compares
    the inputs before and after with torch.allclose, which float8 tensors lack on a CPU: the schema
    (no input mutated) is checked with the int8 tables."""
    device = _device_of(backend)
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") + \
        (("test_schema",) if table_dtype == torch.int8 else ())

    def opcheck(op, args):
        torch.library.opcheck(op, args, test_utils=checks)

    x, queries, keys, w_down, w_up, _ = detached(*inputs(torch.float32, device))
    tables = [column_major(quantize_rows(t, table_dtype)[0]) for t in (w_down, w_up)]
    scales = [quantize_rows(t, table_dtype)[1] for t in (w_down, w_up)]
    scores, ids, gates = _library.retrieve(backend, queries, keys, K, K_SUB, "softmax", 0)
    ids_t = ids.transpose(1, 2).contiguous().transpose(1, 2)
    gates_s = strided_gates(ids, torch.float32, device).detach()
    opcheck(_library.experts_forward, (backend, x, ids_t, gates_s, *tables, "silu", True, False, *scales))
    opcheck(_library.down_forward, (backend, x, ids_t, tables[0], True, False, scales[0]))
    z = _library.down_forward(backend, x, ids, tables[0], True, False, scales[0])
    opcheck(_library.mix_forward, (backend, z, ids_t, gates_s, tables[1], "relu", True, False, scales[1]))
    for schedule in dict.fromkeys(schedule for schedule, _, _ in SCHEDULES[backend]):
        opcheck(_library.fused_forward, (backend, x, queries, keys, *tables, K, K_SUB, "sigmoid", "gelu", 0, schedule,
                                         True, False, *scales))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_project(dtype):
    """The query projection (the C++ backend's only): a transposed x and a weight of several blocks
    of output features (kProjectColumns = 64 in csrc_reference/peer_cpu.cpp), gradients to both."""
    device = _device_of("cpp")
    x = column_major(torch.randn(T, 150, dtype=dtype, device=device)).requires_grad_()
    weight = torch.randn(300, 150, dtype=dtype, device=device).requires_grad_()
    torch.library.opcheck(_library.project, ("cpp", x, weight))
    torch.library.opcheck(_library.project, ("cpp", x.detach(), weight.detach()))
    if dtype == torch.float64:
        torch.autograd.gradcheck(lambda x, weight: _library.project("cpp", x, weight), (x[:, :20], weight[:70, :20]))


def test_run_calls_the_body_directly_only_in_eager_inference(monkeypatch):
    """_library.run skips torch.library's dispatch only where that changes nothing but its cost:
    gradients off, not compiling, no profiler, no dispatch mode, plain tensors. Elsewhere the op
    is dispatched: its autograd, its fake, the profiler's record of it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    _, queries, keys, *_ = inputs(device=_device_of("cpp"))
    args = ("cpp", queries, keys, K, K_SUB, "softmax", 0)
    direct = []
    body = _library._BODIES[_library.retrieve]
    monkeypatch.setitem(_library._BODIES, _library.retrieve, lambda *a: direct.append(a[0]) or body(*a))
    expected = _library.retrieve(*args)
    assert _library.run(_library.retrieve, *args)[0].grad_fn is not None and not direct
    with torch.no_grad():
        for got, want in zip(_library.run(_library.retrieve, *args), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert direct == ["cpp"]
        with torch.profiler.profile() as profile:
            _library.run(_library.retrieve, *args)
        assert any(event.name == "peer_kernels::retrieve" for event in profile.events())
        with FlopCounterMode(display=False):
            _library.run(_library.retrieve, *args)

        class Marked(torch.Tensor):
            pass

        _library.run(_library.retrieve, "cpp", queries.detach().as_subclass(Marked), keys, K, K_SUB, "softmax", 0)
        with FakeTensorMode() as fake:
            fake_ids = _library.run(_library.retrieve, "cpp", fake.from_tensor(queries), fake.from_tensor(keys), K,
                                    K_SUB, "softmax", 0)[1]
        assert fake_ids.shape == expected[1].shape
        compiled = torch.compile(lambda q, k: _library.run(_library.retrieve, "cpp", q, k, K, K_SUB, "softmax", 0),
                                 fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(queries, keys)[0], expected[0], rtol=0, atol=0)
    assert direct == ["cpp"]


def test_every_registered_op_is_checked():
    """A new op must be added to the opchecks above: the namespace holds exactly these."""
    checked = {"experts_forward", "experts_backward", "down_forward", "down_backward", "mix_forward", "mix_backward",
               "retrieve", "retrieve_backward", "fused_forward", "fused_backward", "project"}
    registered = {name for name in dir(torch.ops.peer_kernels) if not name.startswith("_")} - {"name"}
    assert registered == checked
