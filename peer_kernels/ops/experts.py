"""Launchers of the expert-stage kernels (kernels/experts.py): they validate, allocate, pick tiles
(peer_kernels.tuning) and launch; peer_kernels._library declares the ops they fill (experts,
down, mix).

peer_experts(x, ids, gates, w_down, w_up) = peer_mix(peer_down(x, ids, w_down), ids, gates, w_up):
one launch does both halves; the halves apart are for tables sharded by columns, whose partial
down-dots z must be summed across shards before the activation (peer_kernels.distributed).

The forward runs by one of two schedules, by the token count (tuning.token_schedule): "token_tiles",
a program per tile of tokens walking its rows column block by column block; or for a few tokens
(a decode step) "decode", whose programs each take one (token, block of slots, block of columns)
and load that whole row tile at once, so that every row of the step is in flight together; their
partial sums are added in a fixed order by the next kernel (no atomics). The two give the same z
and y up to the order of the sums.

Forward saves x, expert_ids, gates and z = w_down[e] . x (T, h, k): O(T*(d + h*k)), never the
gathered (T, h, k, d) rows. Backward re-reads the rows token-major for dx and dgates; the table
gradients are dense like nn.Embedding's and come from one of two modes:
- "sorted" (deterministic=True, the default, and every sparse gradient): the slots sorted by table
  row (int32 keys, stable) and a segmented reduction over that order
  (kernels/experts.table_grad_kernel): each program sums one chunk of sorted positions, runs of
  equal rows inside it stored directly, the parts of runs crossing its ends combined in chunk order
  by a second small kernel (table_grad_combine_kernel); every sum in one fixed order, no atomics:
  bitwise reproducible, and no program walks a long run (collapsed routing) alone; the untouched
  rows are zeroed by one fill, only touched rows are written;
- "atomic" (deterministic=False): fp32 atomic adds fused into the token-major pass, one read of the
  rows in all; 16-bit tables accumulate in an fp32 scratch that is cast at the end.
Why "sorted" is the default: byte counts at the paper's shapes (no GPU has timed both yet). Atomics
need a 2 x (E, d) fp32 scratch for 16-bit tables (8.6 GB there) that is zeroed,
read-modify-written and cast, about 30 GB of traffic; the sorted pass reads x / dy rows (32 MB, L2
resident) and writes each touched row once (2.7 GB) after a 4.3 GB fill.
"""
import torch
import triton

from .. import _checks, _device, _library, tuning
from ..kernels import experts as kernels

# Which halves of the expert stage a launch computes: "down" z = w_down[e] . x, "up" the mix
# y = sum g act(z) w_up[e] (from a given z when "down" is off).
HALVES = {"both": (True, True), "down": (True, False), "up": (False, True)}


def activation_id(activation):
    """The ACTIVATION constexpr of the kernels: the index in _checks.ACTIVATIONS."""
    return _checks.ACTIVATIONS.index(activation)


def _slots(expert_ids):
    return expert_ids.shape[1] * expert_ids.shape[2]


def _tile(expert_ids, dim, acc_dtype, device, **options):
    return tuning.gather_tile(num_tokens=expert_ids.shape[0], slots=_slots(expert_ids), dim=dim, acc_dtype=acc_dtype,
                              arch=_device.cuda_arch(device), **options)


# ---- forward ------------------------------------------------------------------------------------

def _launch_forward(*, halves, expert_ids, z, activation="identity", x=None, gates=None, w_down=None, w_up=None,
                    w_down_scale=None, w_up_scale=None, y=None, programs=None):
    """The forward of `halves` into z and y, inputs contiguous; the tensors of a half that is off
    may be None, and so are the scales of float tables. For few tokens (tuning.token_schedule) the
    decode kernels; else one launch of experts_fwd_kernel over the token tiles, or with `programs`
    a persistent grid of that many 16-warp programs with whole-SM tiles
    (tuning.gather_tile(whole_sm=True))."""
    T = expert_ids.shape[0]
    if programs is None and tuning.token_schedule(num_tokens=T, arch=_device.cuda_arch(z.device)) == "decode":
        _launch_decode(halves=halves, expert_ids=expert_ids, z=z, activation=activation, x=x, gates=gates,
                       w_down=w_down, w_up=w_up, w_down_scale=w_down_scale, w_up_scale=w_up_scale, y=y)
        return
    down, up = HALVES[halves]
    d_in = w_down.shape[1] if down else 1
    d_out = w_up.shape[1] if up else 1
    block_t, block_s, block_d, num_warps = _tile(expert_ids, max(d_in, d_out), z.dtype, z.device,
                                                 whole_sm=programs is not None)
    tiles = triton.cdiv(T, block_t)
    # z stands in for the pointers of a half that is off: the kernel never reads them
    kernels.experts_fwd_kernel[(min(tiles, programs or tiles),)](
        x_ptr=z if x is None else x, expert_ids_ptr=expert_ids, gates_ptr=z if gates is None else gates,
        w_down_ptr=z if w_down is None else w_down, w_up_ptr=z if w_up is None else w_up,
        w_down_scale_ptr=w_down_scale, w_up_scale_ptr=w_up_scale, y_ptr=z if y is None else y, z_ptr=z, T=T,
        D_IN=d_in, D_OUT=d_out, S=_slots(expert_ids),
        ACTIVATION=activation_id(activation), BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, DOWN=down, UP=up,
        PERSISTENT=programs is not None, num_warps=num_warps)


def _decode_tile(expert_ids, table):
    return tuning.decode_gather_tile(num_tokens=expert_ids.shape[0], slots=_slots(expert_ids), dim=table.shape[1],
                                     itemsize=table.element_size(), arch=_device.cuda_arch(table.device),
                                     sms=tuning.decode_sms(table.device))


def sum_parts(parts, *, out):
    """out (R, W) = parts (R, P, W) summed over P in a fixed order (kernels/experts.sum_parts_kernel)."""
    rows, count, width = parts.shape
    parts_pad, block_w, num_warps = tuning.sum_parts_tile(parts=count, width=width)
    kernels.sum_parts_kernel[(rows, triton.cdiv(width, block_w))](
        parts_ptr=parts, out_ptr=out, PARTS=count, W=width, PARTS_PAD=parts_pad, BLOCK_W=block_w, num_warps=num_warps)


def _launch_decode(*, halves, expert_ids, z, activation, x, gates, w_down, w_up, w_down_scale, w_up_scale, y):
    """The decode schedule of _launch_forward (kernels/experts.py): z as the sum of its column
    blocks' shares ("down": written by sum_parts; "both": summed by the up kernel, which writes
    it), then y as the sum of its slot blocks' shares; every share has its own program."""
    down, up = HALVES[halves]
    T, S = expert_ids.shape[0], _slots(expert_ids)
    if down:
        d_in = w_down.shape[1]
        block_s, block_d, num_warps = _decode_tile(expert_ids, w_down)
        z_parts = _library.empty((T, triton.cdiv(d_in, block_d), S), z)
        kernels.experts_decode_down_kernel[(T * triton.cdiv(S, block_s), triton.cdiv(d_in, block_d))](
            x_ptr=x, expert_ids_ptr=expert_ids, w_down_ptr=w_down, w_down_scale_ptr=w_down_scale, z_parts_ptr=z_parts,
            T=T, D_IN=d_in, S=S,
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps)
    else:
        z_parts = z.view(T, 1, S)
    if not up:
        sum_parts(z_parts, out=z.view(T, S))
        return
    d_out = w_up.shape[1]
    block_s, block_d, num_warps = _decode_tile(expert_ids, w_up)
    slot_blocks = triton.cdiv(S, block_s)
    y_parts = _library.empty((T, slot_blocks, d_out), z)
    kernels.experts_decode_up_kernel[(T * slot_blocks, triton.cdiv(d_out, block_d))](
        z_parts_ptr=z_parts, expert_ids_ptr=expert_ids, gates_ptr=gates, w_up_ptr=w_up, w_up_scale_ptr=w_up_scale,
        z_ptr=z, y_parts_ptr=y_parts,
        T=T, D_OUT=d_out, S=S, Z_PARTS=z_parts.shape[1], ACTIVATION=activation_id(activation),
        PARTS_PAD=tuning.next_power_of_2(z_parts.shape[1]), BLOCK_S=block_s, BLOCK_D=block_d, WRITE_Z=down,
        num_warps=num_warps)
    sum_parts(y_parts, out=y)


def launch_forward(*, x, expert_ids, gates, w_down, w_up, activation, w_down_scale=None, w_up_scale=None, out=None,
                   programs=None):
    """(y, z) of the whole stage, into `out` = (y, z) when given; inputs contiguous, ids in range;
    the scales of quantized tables, or None. programs: see _launch_forward."""
    y, z = out if out is not None else _library.experts_outputs(x, expert_ids, w_up.shape[1])
    if x.shape[0] and _slots(expert_ids):
        _launch_forward(halves="both", x=x, expert_ids=expert_ids, gates=gates, w_down=w_down, w_up=w_up,
                        w_down_scale=w_down_scale, w_up_scale=w_up_scale, z=z, y=y, activation=activation,
                        programs=programs)
    elif x.shape[0]:
        y.zero_()
    return y, z


def _ready(t, expert_ids, table, *inputs, table_name="w_down"):
    """The inputs of a launch: launchable, contiguous (None stays None: a float table's scale), the
    ids checked against the table `table_name`, whose dtype this GPU's Triton reads."""
    _checks.check_launchable("x", t)
    _checks.check_table_arch(table_name, table, _device.cuda_arch(t.device))
    return (_checks.checked_expert_ids(expert_ids.contiguous(), table.shape[0]),
            *(None if i is None else i.contiguous() for i in inputs))


def experts(*, x, expert_ids, gates, w_down, w_up, activation, w_down_scale, w_up_scale):
    """The experts op's forward: (y, z)."""
    expert_ids, x, gates, w_down, w_up, w_down_scale, w_up_scale = _ready(x, expert_ids, w_down, x, gates, w_down,
                                                                          w_up, w_down_scale, w_up_scale)
    return launch_forward(x=x, expert_ids=expert_ids, gates=gates, w_down=w_down, w_up=w_up, activation=activation,
                          w_down_scale=w_down_scale, w_up_scale=w_up_scale)


def down(*, x, expert_ids, w_down, w_down_scale):
    """z (T, h, k) = w_down[e] . x in the accumulation dtype."""
    expert_ids, x, w_down, w_down_scale = _ready(x, expert_ids, w_down, x, w_down, w_down_scale)
    z = _library.empty(expert_ids.shape, x, _library.acc(x))
    if z.numel():
        _launch_forward(halves="down", x=x, expert_ids=expert_ids, w_down=w_down, w_down_scale=w_down_scale, z=z)
    return z


def mix(*, z, expert_ids, gates, w_up, activation, w_up_scale):
    """y (T, d_out) = sum g act(z) w_up[e] in z's dtype."""
    expert_ids, z, gates, w_up, w_up_scale = _ready(z, expert_ids, w_up, z, gates, w_up, w_up_scale,
                                                    table_name="w_up")
    y = _library.empty((z.shape[0], w_up.shape[1]), z)
    if z.numel():
        _launch_forward(halves="up", expert_ids=expert_ids, gates=gates, w_up=w_up, w_up_scale=w_up_scale, z=z, y=y,
                        activation=activation)
    elif z.shape[0]:
        y.zero_()
    return y


# ---- backward -----------------------------------------------------------------------------------

def table_grad_mode(deterministic, sparse_grad):
    """"sorted" (bitwise reproducible; the only one that gives sparse gradients) or "atomic"."""
    return "sorted" if deterministic or sparse_grad else "atomic"


def _launch_tokens_backward(*, halves, table_grads, expert_ids, dz, activation="identity", dy=None, x=None,
                            gates=None, z=None, w_down=None, w_up=None, dx=None, dgates=None, ga=None, acc_down=None,
                            acc_up=None):
    """One launch of experts_bwd_tokens_kernel, inputs contiguous. "up" reads dy, gates, z, w_up and
    writes dgates, dz (and ga, the dw_up weights, in "sorted" mode); "down" reads dz, w_down and
    writes dx. In "atomic" mode the table gradients are added into acc_down / acc_up (fp32 scratch);
    the tensors of a half that is off may be None."""
    down, up = HALVES[halves]
    atomic = table_grads == "atomic"
    d_in = w_down.shape[1] if down else 1
    d_out = w_up.shape[1] if up else 1
    block_t, block_s, block_d, num_warps = _tile(expert_ids, max(d_in, d_out), dz.dtype, dz.device, atomic=atomic)

    def pointer(t):  # dz stands in for what the kernel never reads or writes in this mode
        return dz if t is None else t

    kernels.experts_bwd_tokens_kernel[(triton.cdiv(expert_ids.shape[0], block_t),)](
        x_ptr=pointer(x), dy_ptr=pointer(dy), expert_ids_ptr=expert_ids, gates_ptr=pointer(gates), z_ptr=pointer(z),
        w_down_ptr=pointer(w_down), w_up_ptr=pointer(w_up), dx_ptr=pointer(dx), dgates_ptr=pointer(dgates), dz_ptr=dz,
        ga_ptr=pointer(ga), dw_down_ptr=pointer(acc_down), dw_up_ptr=pointer(acc_up), T=expert_ids.shape[0],
        D_IN=d_in, D_OUT=d_out, S=_slots(expert_ids), ACTIVATION=activation_id(activation), BLOCK_T=block_t,
        BLOCK_S=block_s, BLOCK_D=block_d, UP=up, DOWN=down, ATOMIC=atomic, num_warps=num_warps)


def sorted_slots(expert_ids, rows):
    """(sorted table rows, slot at each sorted position) of the flattened slots: a stable sort, so
    equal rows keep slot order and each row's sum has one order, run to run. Keys are int32 when the
    rows fit (the sort then makes half the passes)."""
    keys = expert_ids.reshape(-1)
    keys = keys.to(torch.int32) if rows <= 2 ** 31 - 1 else keys.long()
    return torch.sort(keys, stable=True)


def reduce_table_grad(*, src, weights, sorted_ids, order, out_rows, out, slots):
    """out[out_rows[run]] = sum over each run of equal sorted ids of weight * src[token]; src (T, D),
    weights (T*slots,) accumulation dtype; out written at runs only. table_grad_kernel sums each
    chunk of sorted positions alone (runs inside it to out, the parts of runs that cross its ends to
    a (chunks, 2, D) partials buffer); table_grad_combine_kernel adds the parts of the runs that span
    chunks. No program's work grows with a run's length: a run of every slot costs what any other
    routing does."""
    n = sorted_ids.numel()
    if n == 0:
        return out
    D = src.shape[1]
    block_n, block_d, chunk, num_warps = tuning.table_grad_tile(dim=D, slots=n, device=src.device)
    chunks = triton.cdiv(n, chunk)
    # uninitialized: the combine reads only the parts the first kernel wrote (the tests NaN-poison it)
    partials = _library.empty((chunks, 2, D), weights)
    kernels.table_grad_kernel[(chunks, triton.cdiv(D, block_d))](
        src_ptr=src, weights_ptr=weights, sorted_ids_ptr=sorted_ids, order_ptr=order, out_rows_ptr=out_rows,
        out_ptr=out, partials_ptr=partials, n=n, chunk=chunk, D=D, S=slots, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps)
    if chunks > 1:
        block_c, block_d, num_warps = tuning.table_grad_combine_tile(dim=D, device=src.device)
        kernels.table_grad_combine_kernel[(triton.cdiv(D, block_d),)](
            partials_ptr=partials, sorted_ids_ptr=sorted_ids, out_rows_ptr=out_rows, out_ptr=out, n=n, chunk=chunk,
            chunks=chunks, D=D, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps)
    return out


def table_grads(pairs, expert_ids, sparse):
    """pairs: (src, weights, table) -> ([gradient per table], rows), from one sort of the slots.
    Dense: each gradient like its table, zeros but for the touched rows; rows empty. Sparse: the
    touched rows (U,) int64 ascending, and each gradient their values (U, d). Sparse results have a
    data-dependent size, read back to the host once (as nn.Embedding(sparse=True) does)."""
    table = pairs[0][2]
    sorted_ids, order = sorted_slots(expert_ids, table.shape[0])
    slots = _slots(expert_ids)
    if not sparse:
        return [reduce_table_grad(src=src, weights=weights.reshape(-1), sorted_ids=sorted_ids, order=order,
                                  out_rows=sorted_ids, out=torch.zeros_like(t), slots=slots)
                for src, weights, t in pairs], _no_rows(table)
    begins = torch.ones_like(sorted_ids, dtype=torch.bool)
    begins[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_index = torch.cumsum(begins, 0) - 1         # each sorted position's run: its row in the values
    rows = sorted_ids[begins].long()
    return [reduce_table_grad(src=src, weights=weights.reshape(-1), sorted_ids=sorted_ids, order=order,
                              out_rows=run_index, out=_library.empty((rows.shape[0], t.shape[1]), t), slots=slots)
            for src, weights, t in pairs], rows


def _atomic_scratch(table):
    """The zeroed accumulator the atomics add into: fp32 (fp64) whatever the table's dtype."""
    return torch.zeros(table.shape, dtype=_library.acc(table), device=table.device)


def _no_rows(like):
    return torch.empty((0,), dtype=torch.int64, device=like.device)


def _no_slots_grads(sparse, *tables):
    """The table gradients when no slot touches a table: zeros, or no rows at all."""
    if not sparse:
        return (*(torch.zeros_like(t) for t in tables), _no_rows(tables[0]))
    return (*(t.new_empty((0, t.shape[1])) for t in tables), _no_rows(tables[0]))


def launch_backward(*, dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse_grad):
    """(dx, dgates, dw_down, dw_up, rows) in the dtypes of (x, gates, w_down, w_up), the table
    gradients as table_grads gives them; inputs contiguous."""
    dx, dgates = _library.empty(x.shape, x), _library.empty(gates.shape, gates)
    if x.shape[0] == 0 or _slots(expert_ids) == 0:
        return (dx.zero_(), dgates, *_no_slots_grads(sparse_grad, w_down, w_up))
    dz = _library.empty(z.shape, z)
    tensors = dict(dy=dy, x=x, expert_ids=expert_ids, gates=gates, z=z, w_down=w_down, w_up=w_up, dx=dx,
                   dgates=dgates, dz=dz, activation=activation)
    if table_grad_mode(deterministic, sparse_grad) == "atomic":
        acc_down, acc_up = _atomic_scratch(w_down), _atomic_scratch(w_up)
        _launch_tokens_backward(halves="both", table_grads="atomic", acc_down=acc_down, acc_up=acc_up, **tensors)
        return dx, dgates, acc_down.to(w_down.dtype), acc_up.to(w_up.dtype), _no_rows(w_down)
    ga = _library.empty(z.shape, z)
    _launch_tokens_backward(halves="both", table_grads="sorted", ga=ga, **tensors)
    (dw_down, dw_up), rows = table_grads([(x, dz, w_down), (dy, ga, w_up)], expert_ids, sparse_grad)
    return dx, dgates, dw_down, dw_up, rows


def experts_backward(*, dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse_grad):
    """The experts op's backward (autograd hands over broadcast or strided gradients, e.g. from
    .sum(), hence the contiguous copies)."""
    expert_ids, dy, x, gates, z, w_down, w_up = _ready(x, expert_ids, w_down, dy, x, gates, z, w_down, w_up)
    return launch_backward(dy=dy, x=x, expert_ids=expert_ids, gates=gates, z=z, w_down=w_down, w_up=w_up,
                           activation=activation, deterministic=deterministic, sparse_grad=sparse_grad)


def down_backward(*, dz, x, expert_ids, w_down, deterministic, sparse_grad):
    """(dx, dw_down, rows) of z = w_down[e] . x."""
    expert_ids, dz, x, w_down = _ready(x, expert_ids, w_down, dz, x, w_down)
    dx = _library.empty(x.shape, x)
    if dz.numel() == 0:
        return (dx.zero_(), *_no_slots_grads(sparse_grad, w_down))
    tensors = dict(dz=dz, expert_ids=expert_ids, w_down=w_down, dx=dx)
    if table_grad_mode(deterministic, sparse_grad) == "atomic":
        acc_down = _atomic_scratch(w_down)
        _launch_tokens_backward(halves="down", table_grads="atomic", x=x, acc_down=acc_down, **tensors)
        return dx, acc_down.to(w_down.dtype), _no_rows(w_down)
    _launch_tokens_backward(halves="down", table_grads="sorted", **tensors)
    (dw_down,), rows = table_grads([(x, dz, w_down)], expert_ids, sparse_grad)
    return dx, dw_down, rows


def mix_backward(*, dy, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad):
    """(dz, dgates, dw_up, rows) of y = sum g act(z) w_up[e]."""
    expert_ids, dy, z, gates, w_up = _ready(z, expert_ids, w_up, dy, z, gates, w_up, table_name="w_up")
    dz, dgates = _library.empty(z.shape, z), _library.empty(gates.shape, gates)
    if z.numel() == 0:
        return (dz, dgates, *_no_slots_grads(sparse_grad, w_up))
    tensors = dict(dy=dy, z=z, expert_ids=expert_ids, gates=gates, w_up=w_up, dgates=dgates, dz=dz,
                   activation=activation)
    if table_grad_mode(deterministic, sparse_grad) == "atomic":
        acc_up = _atomic_scratch(w_up)
        _launch_tokens_backward(halves="up", table_grads="atomic", acc_up=acc_up, **tensors)
        return dz, dgates, acc_up.to(w_up.dtype), _no_rows(w_up)
    ga = _library.empty(z.shape, z)
    _launch_tokens_backward(halves="up", table_grads="sorted", ga=ga, **tensors)
    (dw_up,), rows = table_grads([(dy, ga, w_up)], expert_ids, sparse_grad)
    return dz, dgates, dw_up, rows


_library.implement("experts", "triton", forward=experts, backward=experts_backward)
_library.implement("down", "triton", forward=down, backward=down_backward)
_library.implement("mix", "triton", forward=mix, backward=mix_backward)
