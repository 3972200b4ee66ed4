"""The expert stage: launchers, autograd and torch.library registration of kernels/experts.py.

peer_experts(x, ids, gates, w_down, w_up) = peer_mix(peer_down(x, ids, w_down), ids, gates, w_up):
one launch does both halves; the halves apart are for tables sharded by columns, whose partial
down-dots z must be summed across shards before the activation (peer_kernels.distributed).

Forward saves x, expert_ids, gates and z = w_down[e] . x (T, h, k): O(T*(d + h*k)), never the
gathered (T, h, k, d) rows. Backward re-reads the rows token-major for dx and dgates; the table
gradients are dense like nn.Embedding's and come from either
- deterministic=True (default): the slots sorted by table row (int32 keys, stable) and a segmented
  reduction over that order (kernels/experts.table_grad_kernel): a few thousand programs walk runs
  of equal rows, each run summed by one program in one order, no atomics: bitwise reproducible; the
  untouched rows are zeroed by one fill, only touched rows are written; or
- deterministic=False: fp32 atomic adds fused into the token-major pass, one read of the rows in all;
  16-bit tables accumulate in an fp32 scratch that is cast at the end.
Why the sorted pass is the default: byte counts at the paper's shapes (no GPU has timed both yet).
Atomics need a 2 x (E, d) fp32 scratch for 16-bit tables (8.6 GB there) that is zeroed,
read-modify-written and cast, about 30 GB of traffic; the sorted pass reads x / dy rows (32 MB, L2
resident) and writes each touched row once (2.7 GB) after a 4.3 GB fill.
"""
import torch
import triton

from .. import _checks, _library
from ..kernels import experts as kernels
from . import _launch


def _slots(expert_ids):
    return expert_ids.shape[1] * expert_ids.shape[2]


def _acc(t):
    return _checks.compute_dtype(t.dtype)


def _launchable(t, kernel):
    _launch.check_launchable(t, kernel)


def _checked_ids(expert_ids, rows):
    """Ids no kernel can read or write out of a table with: checked on the host for CPU tensors (a
    ValueError); on a GPU without a host sync (which would cost a round trip per call and rule out
    CUDA-graph capture): an asynchronous device assert, which fails the next synchronisation with
    the message, and ids clamped into [0, rows) until then."""
    if not expert_ids.is_cuda:
        _checks.check_expert_ids(expert_ids, rows)
        return expert_ids
    torch._assert_async(((expert_ids >= 0) & (expert_ids < rows)).all(),
                        f"expert_ids: expected values in [0, {rows}) (rows of the expert tables)")
    return expert_ids.clamp(0, rows - 1)


# ---- forward ------------------------------------------------------------------------------------

def _forward(x, expert_ids, gates, w_down, w_up, z, y, activation, down, up, programs=None):
    """One launch of experts_fwd_kernel over the token tiles; x / gates / tables may be stand-ins
    (z) where the half that reads them is off. programs: a persistent grid of that many 16-warp
    programs with whole-SM tiles (_launch.gather_tile(whole_sm=True)) instead of one per tile."""
    T = expert_ids.shape[0]
    S = _slots(expert_ids)
    d_in = w_down.shape[1] if down else 1
    d_out = w_up.shape[1] if up else 1
    block_t, block_s, block_d, num_warps = _launch.gather_tile(T, S, max(d_in, d_out), z.dtype,
                                                               whole_sm=programs is not None)
    tiles = triton.cdiv(T, block_t)
    kernels.experts_fwd_kernel[(min(tiles, programs or tiles),)](
        x, expert_ids, gates, w_down, w_up, y, z, T,
        D_IN=d_in, D_OUT=d_out, S=S, ACTIVATION=_launch.activation_id(activation),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, DOWN=down, UP=up, PERSISTENT=programs is not None,
        num_warps=num_warps)


def forward_outputs(x, expert_ids, d_out):
    """Unwritten y (T, d_out) in x's dtype and z (T, h, k) in the accumulation dtype."""
    return (_library.empty((x.shape[0], d_out), x),
            _library.empty(expert_ids.shape, x, _acc(x)))


def launch_forward(x, expert_ids, gates, w_down, w_up, activation, out=None, programs=None):
    """(y, z) of the whole stage, into `out` = (y, z) when given; inputs contiguous. programs: see
    _forward."""
    y, z = out if out is not None else forward_outputs(x, expert_ids, w_up.shape[1])
    if x.shape[0] and _slots(expert_ids):
        _forward(x, expert_ids, gates, w_down, w_up, z, y, activation, True, True, programs)
    elif x.shape[0]:
        y.zero_()
    return y, z


def launch_down(x, expert_ids, w_down):
    """z (T, h, k) = w_down[e] . x in the accumulation dtype; inputs contiguous."""
    z = _library.empty(expert_ids.shape, x, _acc(x))
    if z.numel():
        _forward(x, expert_ids, z, w_down, z, z, z, "identity", True, False)
    return z


def launch_mix(z, expert_ids, gates, w_up, activation):
    """y (T, d_out) = sum g act(z) w_up[e] in z's dtype; inputs contiguous."""
    y = _library.empty((z.shape[0], w_up.shape[1]), z)
    if z.numel():
        _forward(z, expert_ids, gates, z, w_up, z, y, activation, False, True)
    elif z.shape[0]:
        y.zero_()
    return y


# ---- backward -----------------------------------------------------------------------------------

def _tokens_backward(dy, x, expert_ids, gates, z, dz, w_down, w_up, dx, dgates, ga, acc_down, acc_up, activation,
                     up, down):
    """One launch of experts_bwd_tokens_kernel; acc_down / acc_up (fp32 scratch) only with atomics."""
    T = expert_ids.shape[0]
    S = _slots(expert_ids)
    atomic = acc_down is not None or acc_up is not None
    d_in = w_down.shape[1] if down else 1
    d_out = w_up.shape[1] if up else 1
    block_t, block_s, block_d, num_warps = _launch.gather_tile(T, S, max(d_in, d_out), dz.dtype, atomic=atomic)
    # tensors a disabled half never touches stand in for its pointers
    kernels.experts_bwd_tokens_kernel[(triton.cdiv(T, block_t),)](
        x if down else dz, dy if up else dz, expert_ids, gates if up else dz, z if up else dz,
        w_down if down else dz, w_up if up else dz, dx if down else dz, dgates if up else dz, dz,
        ga if ga is not None else dz, acc_down if acc_down is not None else dz,
        acc_up if acc_up is not None else dz, T,
        D_IN=d_in, D_OUT=d_out, S=S, ACTIVATION=_launch.activation_id(activation), BLOCK_T=block_t,
        BLOCK_S=block_s, BLOCK_D=block_d, UP=up, DOWN=down, ATOMIC=atomic, num_warps=num_warps)


def sorted_slots(expert_ids, rows):
    """(sorted table rows, slot at each sorted position) of the flattened slots: a stable sort, so
    equal rows keep slot order and each row's sum has one order, run to run. Keys are int32 when the
    rows fit (the sort then makes half the passes)."""
    keys = expert_ids.reshape(-1)
    keys = keys.to(torch.int32) if rows <= 2 ** 31 - 1 else keys.long()
    return torch.sort(keys, stable=True)


def reduce_table_grad(src, weights, sorted_ids, order, out_rows, out, S):
    """out[out_rows[run]] = sum over each run of equal sorted ids of weight * src[token], by
    table_grad_kernel; src (T, D), weights (T*S,) accumulation dtype; out written at runs only."""
    n = sorted_ids.numel()
    if n == 0:
        return out
    D = src.shape[1]
    block_n, block_d, chunk, num_warps = _launch.table_grad_tile(D, n, src.device)
    kernels.table_grad_kernel[(triton.cdiv(n, chunk), triton.cdiv(D, block_d))](
        src, weights, sorted_ids, order, out_rows, out, n, chunk,
        D=D, S=S, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return out


def table_grads(pairs, expert_ids, sparse):
    """pairs: (src, weights, table) -> ([gradient per table], rows), from one sort of the slots.
    Dense: each gradient like its table, zeros but for the touched rows; rows empty. Sparse: the
    touched rows (U,) int64 ascending, and each gradient their values (U, d). Sparse results have a
    data-dependent size, read back to the host once (as nn.Embedding(sparse=True) does)."""
    table = pairs[0][2]
    sorted_ids, order = sorted_slots(expert_ids, table.shape[0])
    S = _slots(expert_ids)
    if not sparse:
        rows = _no_rows(table)
        return [reduce_table_grad(src, weights.reshape(-1), sorted_ids, order, sorted_ids, torch.zeros_like(t), S)
                for src, weights, t in pairs], rows
    begins = torch.ones_like(sorted_ids, dtype=torch.bool)
    begins[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_index = torch.cumsum(begins, 0) - 1         # each sorted position's run: its row in the values
    rows = sorted_ids[begins].long()
    return [reduce_table_grad(src, weights.reshape(-1), sorted_ids, order, run_index,
                              _library.empty((rows.shape[0], t.shape[1]), t), S)
            for src, weights, t in pairs], rows


def _atomic_scratch(table):
    """The zeroed accumulator the atomics add into: fp32 (fp64) whatever the table's dtype."""
    return torch.zeros(table.shape, dtype=_acc(table), device=table.device)


def _no_rows(like):
    return torch.empty((0,), dtype=torch.int64, device=like.device)


def _no_slots_grads(sparse, *tables):
    """The table gradients when no slot touches a table: zeros, or no rows at all."""
    if not sparse:
        return (*(torch.zeros_like(t) for t in tables), _no_rows(tables[0]))
    return (*(t.new_empty((0, t.shape[1])) for t in tables), _no_rows(tables[0]))


def launch_backward(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse):
    """(dx, dgates, dw_down, dw_up, rows) in the dtypes of (x, gates, w_down, w_up), the table
    gradients as table_grads gives them; inputs contiguous."""
    dx, dgates = _library.empty(x.shape, x), _library.empty(gates.shape, gates)
    if x.shape[0] == 0 or _slots(expert_ids) == 0:
        return (dx.zero_(), dgates, *_no_slots_grads(sparse, w_down, w_up))
    dz = _library.empty(z.shape, z)
    if not (deterministic or sparse):
        acc_down, acc_up = _atomic_scratch(w_down), _atomic_scratch(w_up)
        _tokens_backward(dy, x, expert_ids, gates, z, dz, w_down, w_up, dx, dgates, None, acc_down, acc_up,
                         activation, True, True)
        return dx, dgates, acc_down.to(w_down.dtype), acc_up.to(w_up.dtype), _no_rows(w_down)
    ga = _library.empty(z.shape, z)
    _tokens_backward(dy, x, expert_ids, gates, z, dz, w_down, w_up, dx, dgates, ga, None, None, activation,
                     True, True)
    (dw_down, dw_up), rows = table_grads([(x, dz, w_down), (dy, ga, w_up)], expert_ids, sparse)
    return dx, dgates, dw_down, dw_up, rows


def launch_down_backward(dz, x, expert_ids, w_down, deterministic, sparse):
    """(dx, dw_down, rows) of z = w_down[e] . x; inputs contiguous."""
    dx = _library.empty(x.shape, x)
    if dz.numel() == 0:
        return (dx.zero_(), *_no_slots_grads(sparse, w_down))
    if not (deterministic or sparse):
        acc_down = _atomic_scratch(w_down)
        _tokens_backward(dz, x, expert_ids, dz, dz, dz, w_down, dz, dx, None, None, acc_down, None, "identity",
                         False, True)
        return dx, acc_down.to(w_down.dtype), _no_rows(w_down)
    _tokens_backward(dz, x, expert_ids, dz, dz, dz, w_down, dz, dx, None, None, None, None, "identity", False, True)
    (dw_down,), rows = table_grads([(x, dz, w_down)], expert_ids, sparse)
    return dx, dw_down, rows


def launch_mix_backward(dy, z, expert_ids, gates, w_up, activation, deterministic, sparse):
    """(dz, dgates, dw_up, rows) of y = sum g act(z) w_up[e]; inputs contiguous."""
    dz, dgates = _library.empty(z.shape, z), _library.empty(gates.shape, gates)
    if z.numel() == 0:
        return (dz, dgates, *_no_slots_grads(sparse, w_up))
    if not (deterministic or sparse):
        acc_up = _atomic_scratch(w_up)
        _tokens_backward(dy, dz, expert_ids, gates, z, dz, dz, w_up, None, dgates, None, None, acc_up, activation,
                         True, False)
        return dz, dgates, acc_up.to(w_up.dtype), _no_rows(w_up)
    ga = _library.empty(z.shape, z)
    _tokens_backward(dy, dz, expert_ids, gates, z, dz, dz, w_up, None, dgates, ga, None, None, activation, True,
                     False)
    (dw_up,), rows = table_grads([(dy, ga, w_up)], expert_ids, sparse)
    return dz, dgates, dw_up, rows


# ---- torch.library ops ----------------------------------------------------------------------------

@_library.custom_op("experts_forward")
def experts_forward(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                    w_up: torch.Tensor, activation: str, deterministic: bool, sparse_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z); `deterministic` and `sparse_grad` only travel to the backward. Inputs are validated."""
    _launchable(x, kernels.experts_fwd_kernel)
    # Here rather than in peer_experts: this runs eagerly even inside a torch.compile'd graph.
    expert_ids = _checked_ids(expert_ids, w_down.shape[0])
    return launch_forward(*_launch.contiguous(x, expert_ids, gates, w_down, w_up), activation)


@experts_forward.register_fake
def _(x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad):
    return forward_outputs(x, expert_ids, w_up.shape[1])


@_library.custom_op("experts_backward")
def experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                     z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str,
                     deterministic: bool, sparse_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgates, dw_down, dw_up, rows): dense table gradients and no rows, or with sparse_grad
    the touched rows and their values."""
    # autograd hands over broadcast or strided gradients (e.g. from .sum())
    expert_ids = _checked_ids(expert_ids, w_down.shape[0])
    return launch_backward(*_launch.contiguous(dy, x, expert_ids, gates, z, w_down, w_up), activation, deterministic,
                           sparse_grad)


@experts_backward.register_fake
def _(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse_grad):
    return (_library.empty(x.shape, x), _library.empty(gates.shape, gates),
            *_library.fake_table_grads(sparse_grad, w_down, w_up))


def _experts_setup(ctx, inputs, output):
    x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad = inputs
    ctx.save_for_backward(x, expert_ids, gates, output[1], w_down, w_up)
    ctx.options = (activation, deterministic, sparse_grad)
    ctx.mark_non_differentiable(output[1])


def _experts_backward(ctx, dy, _dz):
    x, expert_ids, gates, z, w_down, w_up = ctx.saved_tensors
    dx, dgates, dw_down, dw_up, rows = experts_backward(dy, x, expert_ids, gates, z, w_down, w_up, *ctx.options)
    dw_down, dw_up = _library.table_gradients(rows, ctx.options[2], (dw_down, dw_up), (w_down, w_up))
    return dx, None, dgates, dw_down, dw_up, None, None, None


experts_forward.register_autograd(_experts_backward, setup_context=_experts_setup)


@_library.custom_op("down_forward")
def down_forward(x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor, deterministic: bool,
                 sparse_grad: bool) -> torch.Tensor:
    _launchable(x, kernels.experts_fwd_kernel)
    return launch_down(*_launch.contiguous(x, _checked_ids(expert_ids, w_down.shape[0]), w_down))


@down_forward.register_fake
def _(x, expert_ids, w_down, deterministic, sparse_grad):
    return _library.empty(expert_ids.shape, x, _acc(x))


@_library.custom_op("down_backward")
def down_backward(dz: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor,
                  deterministic: bool, sparse_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    expert_ids = _checked_ids(expert_ids, w_down.shape[0])
    return launch_down_backward(*_launch.contiguous(dz, x, expert_ids, w_down), deterministic, sparse_grad)


@down_backward.register_fake
def _(dz, x, expert_ids, w_down, deterministic, sparse_grad):
    return (_library.empty(x.shape, x), *_library.fake_table_grads(sparse_grad, w_down))


def _down_setup(ctx, inputs, output):
    x, expert_ids, w_down, deterministic, sparse_grad = inputs
    ctx.save_for_backward(x, expert_ids, w_down)
    ctx.options = (deterministic, sparse_grad)


def _down_backward(ctx, dz):
    x, expert_ids, w_down = ctx.saved_tensors
    dx, dw_down, rows = down_backward(dz.to(_acc(x)), x, expert_ids, w_down, *ctx.options)
    return dx, None, *_library.table_gradients(rows, ctx.options[1], (dw_down,), (w_down,)), None, None


down_forward.register_autograd(_down_backward, setup_context=_down_setup)


@_library.custom_op("mix_forward")
def mix_forward(z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_up: torch.Tensor,
                activation: str, deterministic: bool, sparse_grad: bool) -> torch.Tensor:
    _launchable(z, kernels.experts_fwd_kernel)
    return launch_mix(*_launch.contiguous(z, _checked_ids(expert_ids, w_up.shape[0]), gates, w_up), activation)


@mix_forward.register_fake
def _(z, expert_ids, gates, w_up, activation, deterministic, sparse_grad):
    return _library.empty((z.shape[0], w_up.shape[1]), z)


@_library.custom_op("mix_backward")
def mix_backward(dy: torch.Tensor, z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                 w_up: torch.Tensor, activation: str, deterministic: bool, sparse_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    expert_ids = _checked_ids(expert_ids, w_up.shape[0])
    return launch_mix_backward(*_launch.contiguous(dy, z, expert_ids, gates, w_up), activation, deterministic,
                               sparse_grad)


@mix_backward.register_fake
def _(dy, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad):
    return (_library.empty(z.shape, z), _library.empty(gates.shape, gates),
            *_library.fake_table_grads(sparse_grad, w_up))


def _mix_setup(ctx, inputs, output):
    z, expert_ids, gates, w_up, activation, deterministic, sparse_grad = inputs
    ctx.save_for_backward(z, expert_ids, gates, w_up)
    ctx.options = (activation, deterministic, sparse_grad)


def _mix_backward(ctx, dy):
    z, expert_ids, gates, w_up = ctx.saved_tensors
    dz, dgates, dw_up, rows = mix_backward(dy.to(z.dtype), z, expert_ids, gates, w_up, *ctx.options)
    return dz, None, dgates, *_library.table_gradients(rows, ctx.options[2], (dw_up,), (w_up,)), None, None, None


mix_forward.register_autograd(_mix_backward, setup_context=_mix_setup)


# ---- the public functions ---------------------------------------------------------------------------

def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", deterministic=True, sparse_grad=False):
    """Fused single-neuron expert mixing, same contract as peer_kernels.reference.peer_experts.

    x (T, d_in), expert_ids (T, h, k) int32/int64, gates (T, h, k) any float dtype, w_down (E, d_in) and
    w_up (E, d_out) in one float dtype (read as stored; float64 only with a float64 x) -> y (T, d_out)
    in x's dtype. deterministic=True (default) makes the table gradients bitwise reproducible
    (sorted, atomic-free reduction); False accumulates them with fp32 atomics. sparse_grad=True gives
    the tables coalesced sparse COO gradients of the touched rows (sorted reduction).
    """
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=False)
    return experts_forward(x, expert_ids, gates, w_down, w_up, activation, bool(deterministic), bool(sparse_grad))[0]


def peer_down(x, expert_ids, w_down, sparse_grad=False, deterministic=True):
    """z = w_down[e] . x: the same contract as peer_kernels.reference.peer_down."""
    _checks.check_down(x, expert_ids, w_down, check_range=False)
    return down_forward(x, expert_ids, w_down, bool(deterministic), bool(sparse_grad))


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", sparse_grad=False, deterministic=True):
    """y = sum g act(z) w_up[e]: the same contract as peer_kernels.reference.peer_mix."""
    _checks.check_mix(z, expert_ids, gates, w_up, activation, check_range=False)
    return mix_forward(z, expert_ids, gates, w_up, activation, bool(deterministic), bool(sparse_grad))
