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


# ---- forward ------------------------------------------------------------------------------------

def _forward(x, expert_ids, gates, w_down, w_up, z, y, activation, down, up):
    """One launch of experts_fwd_kernel over the token tiles; x / gates / tables may be stand-ins
    (z) where the half that reads them is off."""
    T = expert_ids.shape[0]
    S = _slots(expert_ids)
    d_in = w_down.shape[1] if down else 1
    d_out = w_up.shape[1] if up else 1
    block_t, block_s, block_d, num_warps = _launch.gather_tile(T, S, max(d_in, d_out), z.dtype)
    kernels.experts_fwd_kernel[(triton.cdiv(T, block_t),)](
        x, expert_ids, gates, w_down, w_up, y, z, T,
        D_IN=d_in, D_OUT=d_out, S=S, ACTIVATION=_launch.activation_id(activation),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, DOWN=down, UP=up, num_warps=num_warps)


def forward_outputs(x, expert_ids, d_out):
    """Unwritten y (T, d_out) in x's dtype and z (T, h, k) in the accumulation dtype."""
    return (_library.empty((x.shape[0], d_out), x),
            _library.empty(expert_ids.shape, x, _acc(x)))


def launch_forward(x, expert_ids, gates, w_down, w_up, activation):
    """(y, z) of the whole stage; inputs contiguous."""
    y, z = forward_outputs(x, expert_ids, w_up.shape[1])
    if x.shape[0] and _slots(expert_ids):
        _forward(x, expert_ids, gates, w_down, w_up, z, y, activation, True, True)
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


def _dense_table_grads(pairs, expert_ids):
    """pairs: (src, weights, table) -> dense gradients (zeros but for the touched rows), one sort."""
    sorted_ids, order = sorted_slots(expert_ids, pairs[0][2].shape[0])
    S = _slots(expert_ids)
    return [reduce_table_grad(src, weights.reshape(-1), sorted_ids, order, sorted_ids,
                              torch.zeros(table.shape, dtype=table.dtype, device=table.device), S)
            for src, weights, table in pairs]


def _atomic_scratch(table):
    """The zeroed accumulator the atomics add into: fp32 (fp64) whatever the table's dtype."""
    return torch.zeros(table.shape, dtype=_acc(table), device=table.device)


def launch_backward(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic):
    """(dx, dgates, dw_down, dw_up) in the dtypes of (x, gates, w_down, w_up); inputs contiguous."""
    dx, dgates = _library.empty(x.shape, x), _library.empty(gates.shape, gates)
    if x.shape[0] == 0 or _slots(expert_ids) == 0:
        return dx.zero_(), dgates, torch.zeros_like(w_down), torch.zeros_like(w_up)
    dz = _library.empty(z.shape, z)
    if not deterministic:
        acc_down, acc_up = _atomic_scratch(w_down), _atomic_scratch(w_up)
        _tokens_backward(dy, x, expert_ids, gates, z, dz, w_down, w_up, dx, dgates, None, acc_down, acc_up,
                         activation, True, True)
        return dx, dgates, acc_down.to(w_down.dtype), acc_up.to(w_up.dtype)
    ga = _library.empty(z.shape, z)
    _tokens_backward(dy, x, expert_ids, gates, z, dz, w_down, w_up, dx, dgates, ga, None, None, activation,
                     True, True)
    dw_down, dw_up = _dense_table_grads([(x, dz, w_down), (dy, ga, w_up)], expert_ids)
    return dx, dgates, dw_down, dw_up


def launch_down_backward(dz, x, expert_ids, w_down, deterministic):
    """(dx, dw_down) of z = w_down[e] . x; inputs contiguous."""
    dx = _library.empty(x.shape, x)
    if dz.numel() == 0:
        return dx.zero_(), torch.zeros_like(w_down)
    if not deterministic:
        acc_down = _atomic_scratch(w_down)
        _tokens_backward(dz, x, expert_ids, dz, dz, dz, w_down, dz, dx, None, None, acc_down, None, "identity",
                         False, True)
        return dx, acc_down.to(w_down.dtype)
    _tokens_backward(dz, x, expert_ids, dz, dz, dz, w_down, dz, dx, None, None, None, None, "identity", False, True)
    return dx, _dense_table_grads([(x, dz, w_down)], expert_ids)[0]


def launch_mix_backward(dy, z, expert_ids, gates, w_up, activation, deterministic):
    """(dz, dgates, dw_up) of y = sum g act(z) w_up[e]; inputs contiguous."""
    dz, dgates = _library.empty(z.shape, z), _library.empty(gates.shape, gates)
    if z.numel() == 0:
        return dz, dgates, torch.zeros_like(w_up)
    if not deterministic:
        acc_up = _atomic_scratch(w_up)
        _tokens_backward(dy, dz, expert_ids, gates, z, dz, dz, w_up, None, dgates, None, None, acc_up, activation,
                         True, False)
        return dz, dgates, acc_up.to(w_up.dtype)
    ga = _library.empty(z.shape, z)
    _tokens_backward(dy, dz, expert_ids, gates, z, dz, dz, w_up, None, dgates, ga, None, None, activation, True,
                     False)
    return dz, dgates, _dense_table_grads([(dy, ga, w_up)], expert_ids)[0]


# ---- torch.library ops ----------------------------------------------------------------------------

@_library.custom_op("experts_forward")
def experts_forward(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                    w_up: torch.Tensor, activation: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z); `deterministic` only travels to the backward. Inputs are validated."""
    _launchable(x, kernels.experts_fwd_kernel)
    # Here rather than in peer_experts: this runs eagerly even inside a torch.compile'd graph.
    _checks.check_expert_ids(expert_ids, w_down.shape[0])
    return launch_forward(*_launch.contiguous(x, expert_ids, gates, w_down, w_up), activation)


@experts_forward.register_fake
def _(x, expert_ids, gates, w_down, w_up, activation, deterministic):
    return forward_outputs(x, expert_ids, w_up.shape[1])


@_library.custom_op("experts_backward")
def experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                     z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # autograd hands over broadcast or strided gradients (e.g. from .sum())
    return launch_backward(*_launch.contiguous(dy, x, expert_ids, gates, z, w_down, w_up), activation, deterministic)


@experts_backward.register_fake
def _(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic):
    return tuple(_library.empty(t.shape, t) for t in (x, gates, w_down, w_up))


def _experts_setup(ctx, inputs, output):
    x, expert_ids, gates, w_down, w_up, activation, deterministic = inputs
    ctx.save_for_backward(x, expert_ids, gates, output[1], w_down, w_up)
    ctx.activation, ctx.deterministic = activation, deterministic
    ctx.mark_non_differentiable(output[1])


def _experts_backward(ctx, dy, _dz):
    x, expert_ids, gates, z, w_down, w_up = ctx.saved_tensors
    dx, dgates, dw_down, dw_up = experts_backward(dy, x, expert_ids, gates, z, w_down, w_up, ctx.activation,
                                                  ctx.deterministic)
    return dx, None, dgates, dw_down, dw_up, None, None


experts_forward.register_autograd(_experts_backward, setup_context=_experts_setup)


@_library.custom_op("down_forward")
def down_forward(x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor, deterministic: bool) -> torch.Tensor:
    _launchable(x, kernels.experts_fwd_kernel)
    _checks.check_expert_ids(expert_ids, w_down.shape[0])
    return launch_down(*_launch.contiguous(x, expert_ids, w_down))


@down_forward.register_fake
def _(x, expert_ids, w_down, deterministic):
    return _library.empty(expert_ids.shape, x, _acc(x))


@_library.custom_op("down_backward")
def down_backward(dz: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_down_backward(*_launch.contiguous(dz, x, expert_ids, w_down), deterministic)


@down_backward.register_fake
def _(dz, x, expert_ids, w_down, deterministic):
    return _library.empty(x.shape, x), _library.empty(w_down.shape, w_down)


def _down_setup(ctx, inputs, output):
    x, expert_ids, w_down, deterministic = inputs
    ctx.save_for_backward(x, expert_ids, w_down)
    ctx.deterministic = deterministic


def _down_backward(ctx, dz):
    x, expert_ids, w_down = ctx.saved_tensors
    dx, dw_down = down_backward(dz.to(_acc(x)), x, expert_ids, w_down, ctx.deterministic)
    return dx, None, dw_down, None


down_forward.register_autograd(_down_backward, setup_context=_down_setup)


@_library.custom_op("mix_forward")
def mix_forward(z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_up: torch.Tensor,
                activation: str, deterministic: bool) -> torch.Tensor:
    _launchable(z, kernels.experts_fwd_kernel)
    _checks.check_expert_ids(expert_ids, w_up.shape[0])
    return launch_mix(*_launch.contiguous(z, expert_ids, gates, w_up), activation)


@mix_forward.register_fake
def _(z, expert_ids, gates, w_up, activation, deterministic):
    return _library.empty((z.shape[0], w_up.shape[1]), z)


@_library.custom_op("mix_backward")
def mix_backward(dy: torch.Tensor, z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                 w_up: torch.Tensor, activation: str, deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_mix_backward(*_launch.contiguous(dy, z, expert_ids, gates, w_up), activation, deterministic)


@mix_backward.register_fake
def _(dy, z, expert_ids, gates, w_up, activation, deterministic):
    return _library.empty(z.shape, z), _library.empty(gates.shape, gates), _library.empty(w_up.shape, w_up)


def _mix_setup(ctx, inputs, output):
    z, expert_ids, gates, w_up, activation, deterministic = inputs
    ctx.save_for_backward(z, expert_ids, gates, w_up)
    ctx.activation, ctx.deterministic = activation, deterministic


def _mix_backward(ctx, dy):
    z, expert_ids, gates, w_up = ctx.saved_tensors
    dz, dgates, dw_up = mix_backward(dy.to(z.dtype), z, expert_ids, gates, w_up, ctx.activation, ctx.deterministic)
    return dz, None, dgates, dw_up, None, None


mix_forward.register_autograd(_mix_backward, setup_context=_mix_setup)


# ---- the public functions ---------------------------------------------------------------------------

def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", deterministic=True):
    """Fused single-neuron expert mixing, same contract as peer_kernels.reference.peer_experts.

    x (T, d_in), expert_ids (T, h, k) int32/int64, gates (T, h, k) any float dtype, w_down (E, d_in) and
    w_up (E, d_out) in one float dtype (read as stored; float64 only with a float64 x) -> y (T, d_out)
    in x's dtype. deterministic=True (default) makes the table gradients bitwise reproducible
    (sorted, atomic-free reduction); False accumulates them with fp32 atomics.
    """
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=False)
    return experts_forward(x, expert_ids, gates, w_down, w_up, activation, bool(deterministic))[0]


def peer_down(x, expert_ids, w_down, deterministic=True):
    """z = w_down[e] . x: the same contract as peer_kernels.reference.peer_down."""
    _checks.check_down(x, expert_ids, w_down, check_range=False)
    return down_forward(x, expert_ids, w_down, bool(deterministic))


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", deterministic=True):
    """y = sum g act(z) w_up[e]: the same contract as peer_kernels.reference.peer_mix."""
    _checks.check_mix(z, expert_ids, gates, w_up, activation, check_range=False)
    return mix_forward(z, expert_ids, gates, w_up, activation, bool(deterministic))
