"""peer_experts: launchers, autograd and torch.library registration of the fused expert kernels.

Forward saves x, expert_ids, gates and z = w_down[e] . x (T, h*k): O(T*(d + h*k)), never the gathered
(T, h, k, d) rows. Backward re-reads the rows token-major for dx and dgates; the table gradients are
dense (E, d) like nn.Embedding's and come from either
- deterministic=True (default): slots are stably sorted by expert id and one program per (row, d chunk)
  sums its slots in that order with no atomics on gradient data: bitwise reproducible run to run; or
- deterministic=False: fp32 atomic adds fused into the token-major pass, one read of the rows in all;
  16-bit tables accumulate in an fp32 (E, d) scratch that is cast at the end.
Why the sorted pass is the default: byte counts at the paper's shapes (no GPU has timed both yet).
Atomics need a 2 x (E, d) fp32 scratch for 16-bit tables (8.6 GB there) that is zeroed,
read-modify-written and cast, about 30 GB of traffic; the sorted pass reads x / dy rows (32 MB, L2
resident) and writes each table row once (4.3 GB). bench/ times both (`triton` vs `triton-atomic`).
"""
import torch
import triton

from .. import _checks, _library
from ..kernels import experts as kernels
from . import _launch


def _slots(expert_ids):
    return expert_ids.shape[1] * expert_ids.shape[2]


def forward_outputs(x, expert_ids):
    """Unwritten y (T, d) in x's dtype and z (T, h*k) in the accumulation dtype."""
    return (_library.empty(x.shape, x),
            _library.empty((x.shape[0], _slots(expert_ids)), x, _checks.compute_dtype(x.dtype)))


def backward_outputs(x, gates, w_down, w_up):
    """Unwritten dx, dgates, dw_down, dw_up, each like its input (dtype and shape), contiguous."""
    return tuple(_library.empty(t.shape, t) for t in (x, gates, w_down, w_up))


def launch_forward(x, expert_ids, gates, w_down, w_up, activation):
    """y (T, d) in x's dtype and z (T, h*k) in the accumulation dtype; inputs contiguous."""
    T, D = x.shape
    S = _slots(expert_ids)
    y, z = forward_outputs(x, expert_ids)
    if T == 0:
        return y, z
    if S == 0:
        return y.zero_(), z
    block_t, block_s, block_d, num_warps = _launch.gather_tile(T, S, D, z.dtype)
    kernels.experts_fwd_kernel[(triton.cdiv(T, block_t),)](
        x, expert_ids, gates, w_down, w_up, y, z, T,
        D=D, S=S, ACTIVATION=_launch.activation_id(activation),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps)
    return y, z


def launch_backward(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic):
    """(dx, dgates, dw_down, dw_up) in the dtypes of (x, gates, w_down, w_up); inputs contiguous."""
    T, D = x.shape
    S = _slots(expert_ids)
    E = w_down.shape[0]
    dx, dgates, dw_down, dw_up = backward_outputs(x, gates, w_down, w_up)
    if T == 0 or S == 0:
        return dx.zero_(), dgates, dw_down.zero_(), dw_up.zero_()
    acc_dtype = z.dtype
    block_t, block_s, block_d, num_warps = _launch.gather_tile(T, S, D, acc_dtype, atomic=not deterministic)
    tokens_kernel = kernels.experts_bwd_tokens_kernel[(triton.cdiv(T, block_t),)]
    meta = dict(D=D, S=S, ACTIVATION=_launch.activation_id(activation), BLOCK_T=block_t, BLOCK_S=block_s,
                BLOCK_D=block_d, num_warps=num_warps)
    if not deterministic:
        # fp32 (fp64) accumulators; for 16-bit tables they are cast into the outputs at the end
        acc_down = torch.zeros((E, D), dtype=acc_dtype, device=x.device)
        acc_up = torch.zeros((E, D), dtype=acc_dtype, device=x.device)
        # dz / ga are not written with ATOMIC: z stands in for their pointers
        tokens_kernel(x, dy, expert_ids, gates, z, w_down, w_up, dx, dgates, z, z, acc_down, acc_up, T,
                      ATOMIC=True, **meta)
        return dx, dgates, dw_down.copy_(acc_down), dw_up.copy_(acc_up)

    dz = _library.empty(z.shape, z)
    ga = _library.empty(z.shape, z)
    # the accumulators are not touched without ATOMIC: w_down / w_up stand in for their pointers
    tokens_kernel(x, dy, expert_ids, gates, z, w_down, w_up, dx, dgates, dz, ga, w_down, w_up, T,
                  ATOMIC=False, **meta)
    # A stable sort fixes the order of each row's slots, hence the summation order, run to run.
    sorted_ids, slot_order = torch.sort(expert_ids.reshape(-1).long(), stable=True)
    row_starts = torch.searchsorted(sorted_ids, torch.arange(E + 1, device=x.device))
    block_n, block_rd, row_warps = _launch.row_tile(D, T * S / E)
    kernels.experts_bwd_rows_kernel[(E, triton.cdiv(D, block_rd))](
        x, dy, dz, ga, slot_order, row_starts, dw_down, dw_up,
        D=D, S=S, BLOCK_N=block_n, BLOCK_D=block_rd, num_warps=row_warps)
    return dx, dgates, dw_down, dw_up


@_library.custom_op("experts_forward")
def experts_forward(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                    w_up: torch.Tensor, activation: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z); `deterministic` only travels to the backward. Inputs are validated and contiguous."""
    _launch.check_launchable(x, kernels.experts_fwd_kernel)
    # Here rather than in peer_experts: this runs eagerly even inside a torch.compile'd graph.
    _checks.check_expert_ids(expert_ids, w_down.shape[0])
    # no-ops after peer_experts; they guard direct callers of the op
    return launch_forward(*_launch.contiguous(x, expert_ids, gates, w_down, w_up), activation)


@experts_forward.register_fake
def _experts_forward_fake(x, expert_ids, gates, w_down, w_up, activation, deterministic):
    return forward_outputs(x, expert_ids)


@_library.custom_op("experts_backward")
def experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                     z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # autograd hands over broadcast or strided gradients (e.g. from .sum())
    return launch_backward(*_launch.contiguous(dy, x, expert_ids, gates, z, w_down, w_up), activation, deterministic)


@experts_backward.register_fake
def _experts_backward_fake(dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic):
    return backward_outputs(x, gates, w_down, w_up)


def _setup_context(ctx, inputs, output):
    x, expert_ids, gates, w_down, w_up, activation, deterministic = inputs
    z = output[1]
    ctx.save_for_backward(x, expert_ids, gates, z, w_down, w_up)
    ctx.activation, ctx.deterministic = activation, deterministic
    ctx.mark_non_differentiable(z)


def _backward_rule(ctx, dy, _dz):
    x, expert_ids, gates, z, w_down, w_up = ctx.saved_tensors
    dx, dgates, dw_down, dw_up = experts_backward(dy, x, expert_ids, gates, z, w_down, w_up, ctx.activation,
                                                  ctx.deterministic)
    return dx, None, dgates, dw_down, dw_up, None, None


experts_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", deterministic=True):
    """Fused single-neuron expert mixing, same contract as peer_kernels.reference.peer_experts.

    x (T, d), expert_ids (T, h, k) int32/int64, gates (T, h, k) any float dtype, w_down / w_up (E, d)
    in any float dtype (read as stored; float64 only with a float64 x) -> y (T, d) in x's dtype. deterministic=True (default) makes the table gradients
    bitwise reproducible (sorted, atomic-free reduction); False accumulates them with fp32 atomics.
    """
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=False)
    x, expert_ids, gates, w_down, w_up = _launch.contiguous(x, expert_ids, gates, w_down, w_up)
    return experts_forward(x, expert_ids, gates, w_down, w_up, activation, bool(deterministic))[0]
