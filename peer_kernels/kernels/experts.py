"""Triton kernels of the expert stage: SPEC section 1 steps 5-6 and their backward.

Token t mixes S = h*k single-neuron experts ("slots"): y[t] = sum_s g[t,s] act(w_down[e] . x[t]) w_up[e]
with e = expert_ids[t, s]. Ids are spread over ~1M rows, so no table row is reused across the tokens of
a tile: this is a pure gather, bound by memory bandwidth. The kernels therefore use no tensor cores;
what matters is many 128-bit row loads in flight per thread (D chunks of 8+ contiguous half-precision
elements, alignment known from the constexpr D) and registers that never spill.

Layouts (all contiguous): x, y, dy, dx (T, D); expert_ids, gates, dgates and per-slot scalars (T, S),
the (h, k) dims flattened; tables w_down, w_up and their gradients (E, D). Row offsets are int64:
E * D reaches 2**31 for a 1024**2 x 4096 table. Accumulation is in fp32, or fp64 for fp64 inputs (the
per-slot scalar buffers carry that accumulation dtype).
"""
import triton
import triton.language as tl

# ACTIVATION constexpr ids, in the order of peer_kernels.reference.ACTIVATIONS.
RELU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
SILU = tl.constexpr(3)


@triton.jit
def _const(value, like):
    # A float literal in Triton may be rounded to fp32 before meeting an fp64 tensor; building the
    # constant in the tensor's dtype keeps fp64 gradchecks exact.
    return tl.full([], value, like.dtype)


@triton.jit
def _tanh(u):
    # tl.math has no portable tanh; exp of -2|u| never overflows.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _sigmoid(z):
    # exp of -|z| never overflows
    e = tl.exp(-tl.abs(z))
    return tl.where(z < 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _relu(z):
    # NaN in, NaN out: tl.maximum (max.f32) would return the 0 operand for a NaN z.
    return tl.where(z <= 0.0, 0.0, z)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    """act(z), elementwise, in z's dtype."""
    if ACTIVATION == RELU:
        a = _relu(z)
    elif ACTIVATION == GELU:
        a = 0.5 * z * (1.0 + tl.math.erf(z * _const(0.7071067811865476, z)))
    elif ACTIVATION == GELU_TANH:
        u = _const(0.7978845608028654, z) * (z + _const(0.044715, z) * z * z * z)
        a = 0.5 * z * (1.0 + _tanh(u))
    else:
        a = z * _sigmoid(z)
    return a


@triton.jit
def activate_with_grad(z, ACTIVATION: tl.constexpr):
    """(act(z), act'(z)), elementwise, in z's dtype."""
    if ACTIVATION == RELU:
        a = _relu(z)
        da = tl.where(z <= 0.0, 0.0, 1.0).to(z.dtype)  # 1 at NaN, as torch's relu backward
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _const(0.7071067811865476, z)))
        pdf = tl.exp(-0.5 * z * z) * _const(0.3989422804014327, z)
        a = z * cdf
        da = cdf + z * pdf
    elif ACTIVATION == GELU_TANH:
        c = _const(0.7978845608028654, z)
        b = _const(0.044715, z)
        th = _tanh(c * (z + b * z * z * z))
        a = 0.5 * z * (1.0 + th)
        da = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * c * (1.0 + 3.0 * b * z * z)
    else:
        sig = _sigmoid(z)
        a = z * sig
        da = sig * (1.0 + z * (1.0 - sig))
    return a, da


@triton.jit
def mix_experts(x_ptr, y_ptr, w_down_ptr, w_up_ptr, expert_ids, gates, offs_t, slot_mask, T,
                D: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes y for a tile of tokens whose ids / gates are already in registers; returns z.

    x_ptr, y_ptr (T, D); w_down_ptr, w_up_ptr (E, D); expert_ids (BLOCK_T, BLOCK_S) any int;
    gates (BLOCK_T, BLOCK_S) in the accumulation dtype, 0 where slot_mask is off;
    offs_t (BLOCK_T,) token indices. Returns z = w_down[e] . x[t], (BLOCK_T, BLOCK_S).
    Shared with the one-pass fused kernel, which computes ids and gates itself.
    """
    acc_dtype = gates.dtype
    token_rows = offs_t.to(tl.int64)[:, None] * D                 # (BT, 1)
    expert_rows = expert_ids.to(tl.int64)[:, :, None] * D         # (BT, BS, 1)
    token_mask = (offs_t < T)[:, None]
    row_mask = slot_mask[:, :, None]

    # Two streaming passes over D: the activation needs the full down-dot before any up row is useful,
    # and holding all S rows of a token across D would not fit in registers.
    z = tl.zeros(expert_ids.shape, acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x_chunk = tl.load(x_ptr + token_rows + offs_d[None, :], mask=token_mask & d_mask[None, :], other=0.0)
        u = tl.load(w_down_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                    other=0.0)
        z += tl.sum(u.to(acc_dtype) * x_chunk.to(acc_dtype)[:, None, :], axis=2)

    coef = gates * activate(z, ACTIVATION)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        v = tl.load(w_up_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                    other=0.0)
        y = tl.sum(coef[:, :, None] * v.to(acc_dtype), axis=1)
        tl.store(y_ptr + token_rows + offs_d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=token_mask & d_mask[None, :])
    return z


@triton.jit
def _load_slots(expert_ids_ptr, gates_ptr, T, S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                acc_dtype: tl.constexpr):
    """This program's token tile: (offs_t, flat slot index, slot mask, expert ids, gates)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    slots = offs_t.to(tl.int64)[:, None] * S + offs_s[None, :]
    slot_mask = (offs_t[:, None] < T) & (offs_s[None, :] < S)
    expert_ids = tl.load(expert_ids_ptr + slots, mask=slot_mask, other=0)
    gates = tl.load(gates_ptr + slots, mask=slot_mask, other=0.0).to(acc_dtype)
    return offs_t, slots, slot_mask, expert_ids, gates


@triton.jit
def experts_fwd_kernel(
    x_ptr,            # (T, D)
    expert_ids_ptr,   # (T, S) int32 | int64
    gates_ptr,        # (T, S) any float dtype
    w_down_ptr,       # (E, D)
    w_up_ptr,         # (E, D)
    y_ptr,            # (T, D) out, x's dtype
    z_ptr,            # (T, S) out, accumulation dtype: saved for backward
    T,
    D: tl.constexpr, S: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = z_ptr.dtype.element_ty
    offs_t, slots, slot_mask, expert_ids, gates = _load_slots(expert_ids_ptr, gates_ptr, T, S, BLOCK_T, BLOCK_S,
                                                              acc_dtype)
    z = mix_experts(x_ptr, y_ptr, w_down_ptr, w_up_ptr, expert_ids, gates, offs_t, slot_mask, T, D, ACTIVATION,
                    BLOCK_D)
    tl.store(z_ptr + slots, z, mask=slot_mask)


@triton.jit
def experts_bwd_tokens_kernel(
    x_ptr, dy_ptr,             # (T, D)
    expert_ids_ptr,            # (T, S) int32 | int64
    gates_ptr,                 # (T, S)
    z_ptr,                     # (T, S) accumulation dtype, from the forward
    w_down_ptr, w_up_ptr,      # (E, D)
    dx_ptr,                    # (T, D) out, x's dtype
    dgates_ptr,                # (T, S) out, gates' dtype
    dz_ptr, ga_ptr,            # (T, S) out unless ATOMIC: the per-slot weights of the expert-major pass
    dw_down_ptr, dw_up_ptr,    # (E, D) fp32 | fp64 zero-initialized accumulators, used only if ATOMIC
    T,
    D: tl.constexpr, S: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Token-major backward: dx, dgates, and either the table gradients by atomics or the per-slot
    weights dz = g act'(z) (w_up[e] . dy) and ga = g act(z) that the expert-major pass sums."""
    acc_dtype: tl.constexpr = z_ptr.dtype.element_ty
    offs_t, slots, slot_mask, expert_ids, gates = _load_slots(expert_ids_ptr, gates_ptr, T, S, BLOCK_T, BLOCK_S,
                                                              acc_dtype)
    z = tl.load(z_ptr + slots, mask=slot_mask, other=0.0)
    a, da = activate_with_grad(z, ACTIVATION)
    ga = gates * a
    token_rows = offs_t.to(tl.int64)[:, None] * D
    expert_rows = expert_ids.to(tl.int64)[:, :, None] * D
    token_mask = (offs_t < T)[:, None]
    row_mask = slot_mask[:, :, None]

    w = tl.zeros(expert_ids.shape, acc_dtype)                      # w_up[e] . dy[t]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        dy_chunk = tl.load(dy_ptr + token_rows + offs_d[None, :], mask=token_mask & d_mask[None, :],
                           other=0.0).to(acc_dtype)
        v = tl.load(w_up_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                    other=0.0)
        w += tl.sum(v.to(acc_dtype) * dy_chunk[:, None, :], axis=2)
        if ATOMIC:
            # relaxed: only the sum matters, not ordering against other memory
            tl.atomic_add(dw_up_ptr + expert_rows + offs_d[None, None, :], ga[:, :, None] * dy_chunk[:, None, :],
                          mask=row_mask & d_mask[None, None, :], sem="relaxed")

    tl.store(dgates_ptr + slots, (a * w).to(dgates_ptr.dtype.element_ty), mask=slot_mask)
    dz = gates * w * da
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        u = tl.load(w_down_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                    other=0.0)
        dx = tl.sum(dz[:, :, None] * u.to(acc_dtype), axis=1)
        tl.store(dx_ptr + token_rows + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=token_mask & d_mask[None, :])
        if ATOMIC:
            x_chunk = tl.load(x_ptr + token_rows + offs_d[None, :], mask=token_mask & d_mask[None, :],
                              other=0.0).to(acc_dtype)
            tl.atomic_add(dw_down_ptr + expert_rows + offs_d[None, None, :], dz[:, :, None] * x_chunk[:, None, :],
                          mask=row_mask & d_mask[None, None, :], sem="relaxed")
    if not ATOMIC:
        tl.store(dz_ptr + slots, dz, mask=slot_mask)
        tl.store(ga_ptr + slots, ga, mask=slot_mask)


@triton.jit
def experts_bwd_rows_kernel(
    x_ptr, dy_ptr,             # (T, D)
    dz_ptr, ga_ptr,            # (T*S,) per-slot weights, accumulation dtype
    slot_order_ptr,            # (T*S,) int64: slot indices sorted by expert id, stably
    row_starts_ptr,            # (E+1,) int64: expert e's slots are slot_order[row_starts[e]:row_starts[e+1]]
    dw_down_ptr, dw_up_ptr,    # (E, D) out, the tables' dtype; every row is written (zeros if untouched)
    D: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Expert-major deterministic reduction: one program per (table row, D chunk) sums
    dw_down[e] = sum dz[s] x[t(s)] and dw_up[e] = sum ga[s] dy[t(s)] over the row's slots in sorted
    order, with a fixed reduction tree and no atomics: bitwise reproducible."""
    acc_dtype: tl.constexpr = dz_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    start = tl.load(row_starts_ptr + row)
    end = tl.load(row_starts_ptr + row + 1)
    acc_down = tl.zeros((BLOCK_N, BLOCK_D), acc_dtype)
    acc_up = tl.zeros((BLOCK_N, BLOCK_D), acc_dtype)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        slots = tl.load(slot_order_ptr + offs_n, mask=n_mask, other=0)
        dz = tl.load(dz_ptr + slots, mask=n_mask, other=0.0)
        ga = tl.load(ga_ptr + slots, mask=n_mask, other=0.0)
        token_rows = (slots // S)[:, None] * D
        mask = n_mask[:, None] & d_mask[None, :]
        x_rows = tl.load(x_ptr + token_rows + offs_d[None, :], mask=mask, other=0.0)
        dy_rows = tl.load(dy_ptr + token_rows + offs_d[None, :], mask=mask, other=0.0)
        acc_down += dz[:, None] * x_rows.to(acc_dtype)
        acc_up += ga[:, None] * dy_rows.to(acc_dtype)
    out = row * D + offs_d
    tl.store(dw_down_ptr + out, tl.sum(acc_down, axis=0).to(dw_down_ptr.dtype.element_ty), mask=d_mask)
    tl.store(dw_up_ptr + out, tl.sum(acc_up, axis=0).to(dw_up_ptr.dtype.element_ty), mask=d_mask)
