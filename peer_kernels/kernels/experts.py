"""Triton kernels of the expert stage (the mix of the retrieved experts) and its backward.

Token t mixes S = h*k single-neuron experts ("slots"): y[t] = sum_s g[t,s] act(w_down[e] . x[t])
w_up[e] with e = expert_ids[t, s]; x and w_down have D_IN columns, y and w_up D_OUT (equal in the
PEER layer; rank-1 adapters, peer_kernels.compat.PEERLora, have two widths and the identity
activation). Ids are spread over ~1M rows, so no table row is reused across the tokens of a tile:
this is a pure gather, bound by memory bandwidth. The kernels therefore use no tensor cores; what
matters is many 128-bit row loads in flight per thread (D chunks of 8+ contiguous half-precision
elements, alignment known from the constexpr widths) and registers that never spill.

Layouts (all contiguous): x, dx (T, D_IN); y, dy (T, D_OUT); expert_ids, gates, dgates and per-slot
scalars (T, S), the (h, k) dims flattened; tables w_down (E, D_IN), w_up (E, D_OUT) and their
gradients alike. Row offsets are int64: E * D reaches 2**31 for a 1024**2 x 4096 table. Accumulation
is in fp32, or fp64 for fp64 inputs (the per-slot scalar buffers carry that accumulation dtype).

Quantized tables (forward only; peer_kernels.quantize_): int8 or fp8 e4m3 rows with one fp32 scale
per row (E,), a row being its values times its scale. gather_rows, through which every forward
kernel reads rows (token tiles, the one-pass kernel, the decode kernels), reads them at 1 byte per
value (half a bf16 row's bytes) and converts in registers; the row's scale is common to its terms,
so it multiplies the row's dot product (down) or its coefficient (up), one multiply per row instead
of one per value. A float table passes None for its scale pointer (a constexpr: the kernel compiles
without the scale load).
"""
import triton
import triton.language as tl

# ACTIVATION constexpr ids, in the order of peer_kernels.reference.ACTIVATIONS.
RELU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
SILU = tl.constexpr(3)
IDENTITY = tl.constexpr(4)


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
    elif ACTIVATION == SILU:
        a = z * _sigmoid(z)
    else:
        a = z
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
    elif ACTIVATION == SILU:
        sig = _sigmoid(z)
        a = z * sig
        da = sig * (1.0 + z * (1.0 - sig))
    else:
        a = z
        da = tl.full(z.shape, 1.0, z.dtype)
    return a, da


@triton.jit
def mix_experts(x_ptr, y_ptr, w_down_ptr, w_up_ptr, w_down_scale_ptr, w_up_scale_ptr, expert_ids, gates, offs_t,
                slot_mask, T, D_IN: tl.constexpr, D_OUT: tl.constexpr, ACTIVATION: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Writes y for a tile of tokens whose ids / gates are already in registers; returns z.

    x_ptr (T, D_IN), y_ptr (T, D_OUT); w_down_ptr (E, D_IN), w_up_ptr (E, D_OUT), and their scales
    (E,) if quantized, else None; expert_ids (BLOCK_T, BLOCK_S) any int; gates (BLOCK_T, BLOCK_S)
    in the accumulation dtype, 0 where slot_mask is off; offs_t (BLOCK_T,) token indices. Returns
    z = w_down[e] . x[t], (BLOCK_T, BLOCK_S). Shared with the one-pass fused kernel, which computes
    ids and gates itself.
    """
    # Two streaming passes: the activation needs the full down-dot before any up row is useful,
    # and holding all S rows of a token across D would not fit in registers.
    z = down_project(x_ptr, w_down_ptr, w_down_scale_ptr, expert_ids, offs_t, slot_mask, T, gates.dtype, D_IN,
                     BLOCK_D)
    mix_up(y_ptr, w_up_ptr, w_up_scale_ptr, expert_ids, gates * activate(z, ACTIVATION), offs_t, slot_mask, T,
           D_OUT, BLOCK_D)
    return z


@triton.jit
def gather_rows(table_ptr, expert_ids, slot_mask, offs_d, D: tl.constexpr, acc_dtype: tl.constexpr):
    """Columns offs_d (BLOCK_D,) of the rows expert_ids (BLOCK_T, BLOCK_S) of table_ptr (E, D):
    (BLOCK_T, BLOCK_S, BLOCK_D) in acc_dtype, zero where slot_mask is off or past D. Every forward
    kernel reads the tables through here (token tiles, the one-pass kernel, the decode kernels): the
    one place where stored values become compute values (a quantized row's scale is applied by the
    caller, once per row: row_scales)."""
    rows = table_ptr + expert_ids.to(tl.int64)[:, :, None] * D + offs_d[None, None, :]
    values = tl.load(rows, mask=slot_mask[:, :, None] & (offs_d < D)[None, None, :], other=0.0)
    return values.to(acc_dtype)


@triton.jit
def down_chunk(x_ptr, w_down_ptr, expert_ids, offs_t, slot_mask, offs_d, T, acc_dtype: tl.constexpr,
               D_IN: tl.constexpr):
    """The columns offs_d's share of z = w_down[e] . x[t]: (BLOCK_T, BLOCK_S) for x_ptr (T, D_IN),
    w_down_ptr (E, D_IN)."""
    x_chunk = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * D_IN + offs_d[None, :],
                      mask=(offs_t < T)[:, None] & (offs_d < D_IN)[None, :], other=0.0)
    u = gather_rows(w_down_ptr, expert_ids, slot_mask, offs_d, D_IN, acc_dtype)
    return tl.sum(u * x_chunk.to(acc_dtype)[:, None, :], axis=2)


@triton.jit
def up_chunk(w_up_ptr, expert_ids, coef, slot_mask, offs_d, D_OUT: tl.constexpr):
    """Columns offs_d of sum_s coef[t, s] w_up[e]: (BLOCK_T, BLOCK_D) in coef's dtype, for w_up_ptr
    (E, D_OUT) and coef (BLOCK_T, BLOCK_S)."""
    v = gather_rows(w_up_ptr, expert_ids, slot_mask, offs_d, D_OUT, coef.dtype)
    return tl.sum(coef[:, :, None] * v, axis=1)


@triton.jit
def row_scales(scale_ptr, expert_ids, slot_mask, acc_dtype: tl.constexpr):
    """The scales (BLOCK_T, BLOCK_S) of the rows expert_ids of a quantized table (scale_ptr (E,) fp32)."""
    return tl.load(scale_ptr + expert_ids, mask=slot_mask, other=0.0).to(acc_dtype)


@triton.jit
def down_project(x_ptr, w_down_ptr, w_down_scale_ptr, expert_ids, offs_t, slot_mask, T, acc_dtype: tl.constexpr,
                 D_IN: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = w_down[e] . x[t] (BLOCK_T, BLOCK_S) for x_ptr (T, D_IN), w_down_ptr (E, D_IN); times
    w_down_scale[e] for a quantized table (w_down_scale_ptr (E,) fp32, else None)."""
    z = tl.zeros(expert_ids.shape, acc_dtype)
    for d0 in range(0, D_IN, BLOCK_D):
        z += down_chunk(x_ptr, w_down_ptr, expert_ids, offs_t, slot_mask, d0 + tl.arange(0, BLOCK_D), T, acc_dtype,
                        D_IN)
    if w_down_scale_ptr is not None:
        z *= row_scales(w_down_scale_ptr, expert_ids, slot_mask, acc_dtype)
    return z


@triton.jit
def mix_up(y_ptr, w_up_ptr, w_up_scale_ptr, expert_ids, coef, offs_t, slot_mask, T, D_OUT: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """y[t] = sum_s coef[t, s] w_up[e] for y_ptr (T, D_OUT), w_up_ptr (E, D_OUT); coef (BLOCK_T, BLOCK_S);
    w_up[e] times w_up_scale[e] for a quantized table (w_up_scale_ptr (E,) fp32, else None)."""
    if w_up_scale_ptr is not None:
        coef *= row_scales(w_up_scale_ptr, expert_ids, slot_mask, coef.dtype)
    token_rows = offs_t.to(tl.int64)[:, None] * D_OUT
    token_mask = (offs_t < T)[:, None]
    for d0 in range(0, D_OUT, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        y = up_chunk(w_up_ptr, expert_ids, coef, slot_mask, offs_d, D_OUT)
        tl.store(y_ptr + token_rows + offs_d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=token_mask & (offs_d < D_OUT)[None, :])


@triton.jit
def _load_slots(expert_ids_ptr, tile, T, S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """Token tile `tile`: (offs_t, flat slot index, slot mask, expert ids)."""
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    slots = offs_t.to(tl.int64)[:, None] * S + offs_s[None, :]
    slot_mask = (offs_t[:, None] < T) & (offs_s[None, :] < S)
    expert_ids = tl.load(expert_ids_ptr + slots, mask=slot_mask, other=0)
    return offs_t, slots, slot_mask, expert_ids


@triton.jit
def _forward_tile(x_ptr, expert_ids_ptr, gates_ptr, w_down_ptr, w_up_ptr, w_down_scale_ptr, w_up_scale_ptr, y_ptr,
                  z_ptr, tile, T, D_IN: tl.constexpr, D_OUT: tl.constexpr, S: tl.constexpr, ACTIVATION: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOWN: tl.constexpr,
                  UP: tl.constexpr):
    acc_dtype: tl.constexpr = z_ptr.dtype.element_ty
    offs_t, slots, slot_mask, expert_ids = _load_slots(expert_ids_ptr, tile, T, S, BLOCK_T, BLOCK_S)
    if DOWN:
        z = down_project(x_ptr, w_down_ptr, w_down_scale_ptr, expert_ids, offs_t, slot_mask, T, acc_dtype, D_IN,
                         BLOCK_D)
        tl.store(z_ptr + slots, z, mask=slot_mask)
    else:
        z = tl.load(z_ptr + slots, mask=slot_mask, other=0.0)
    if UP:
        gates = tl.load(gates_ptr + slots, mask=slot_mask, other=0.0).to(acc_dtype)
        mix_up(y_ptr, w_up_ptr, w_up_scale_ptr, expert_ids, gates * activate(z, ACTIVATION), offs_t, slot_mask, T,
               D_OUT, BLOCK_D)


@triton.jit
def experts_fwd_kernel(
    x_ptr,            # (T, D_IN), read when DOWN
    expert_ids_ptr,   # (T, S) int32 | int64
    gates_ptr,        # (T, S) any float dtype, read when UP
    w_down_ptr,       # (E, D_IN), read when DOWN: float, or int8 | fp8e4nv with w_down_scale_ptr
    w_up_ptr,         # (E, D_OUT), read when UP: float, or int8 | fp8e4nv with w_up_scale_ptr
    w_down_scale_ptr,  # (E,) fp32 for a quantized w_down, else None
    w_up_scale_ptr,    # (E,) fp32 for a quantized w_up, else None
    y_ptr,            # (T, D_OUT) out when UP, x's dtype
    z_ptr,            # (T, S) accumulation dtype: out when DOWN (saved for backward), in otherwise
    T,
    D_IN: tl.constexpr, D_OUT: tl.constexpr, S: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOWN: tl.constexpr, UP: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """The expert stage, or one half of it: DOWN computes z = w_down[e] . x, UP mixes
    y = sum g act(z) w_up[e] (from this z, or from z_ptr). Both: peer_experts; DOWN alone and UP
    alone: the split that column-sharded tables need (peer_kernels.distributed).
    PERSISTENT: a grid smaller than the token tiles, each program striding over them: the
    overlapped fused forward (ops/fused.py) holds a few whole SMs this way and leaves the others to
    the retrieval kernel beside it. Otherwise one tile per program, with no loop around it (the
    loop costs the 4-warp tile a register spill on sm_90)."""
    if PERSISTENT:
        for tile in range(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
            _forward_tile(x_ptr, expert_ids_ptr, gates_ptr, w_down_ptr, w_up_ptr, w_down_scale_ptr, w_up_scale_ptr,
                          y_ptr, z_ptr, tile, T, D_IN, D_OUT, S, ACTIVATION, BLOCK_T, BLOCK_S, BLOCK_D, DOWN, UP)
    else:
        _forward_tile(x_ptr, expert_ids_ptr, gates_ptr, w_down_ptr, w_up_ptr, w_down_scale_ptr, w_up_scale_ptr,
                      y_ptr, z_ptr, tl.program_id(0), T, D_IN, D_OUT, S, ACTIVATION, BLOCK_T, BLOCK_S, BLOCK_D, DOWN,
                      UP)


# ---- decode: one token's rows spread over many programs -----------------------------------------------
# For few tokens the token-tile grid above has a program per token, each walking its h*k rows column
# block by column block, one dependent round trip after another. The decode kernels give every
# (token, block of BLOCK_S slots, block of BLOCK_D columns) a program that loads its rows at once,
# and combine the partial sums in a fixed order in later kernels (no atomics: bitwise reproducible):
#   experts_decode_down_kernel  each column block's share of z (T, column blocks, S)
#   experts_decode_up_kernel    z as the sum of those shares, then each slot block's share of y
#                               (T, slot blocks, D_OUT)
#   sum_parts_kernel            y as the sum of those shares (or z, for the down half alone)


@triton.jit
def _decode_slots(expert_ids_ptr, S: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (token * slot blocks + slot block, column block) of the decode grid: (offs_t (1,),
    slot block, offs_s (BLOCK_S,), slot mask and expert ids (1, BLOCK_S))."""
    SLOT_BLOCKS: tl.constexpr = (S + BLOCK_S - 1) // BLOCK_S
    slot_block = tl.program_id(0) % SLOT_BLOCKS
    offs_t = tl.program_id(0) // SLOT_BLOCKS + tl.arange(0, 1)
    offs_s = slot_block * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_mask = (offs_s < S)[None, :]
    expert_ids = tl.load(expert_ids_ptr + offs_t.to(tl.int64)[:, None] * S + offs_s[None, :], mask=slot_mask, other=0)
    return offs_t, slot_block, offs_s, slot_mask, expert_ids


@triton.jit
def experts_decode_down_kernel(
    x_ptr,            # (T, D_IN)
    expert_ids_ptr,   # (T, S) int32 | int64
    w_down_ptr,       # (E, D_IN)
    w_down_scale_ptr, # (E,) fp32 for a quantized table, else None
    z_parts_ptr,      # (T, cdiv(D_IN, BLOCK_D), S) accumulation dtype out: each column block's share of z
    T,
    D_IN: tl.constexpr, S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (T * cdiv(S, BLOCK_S), cdiv(D_IN, BLOCK_D)): the share of z = w_down[e] . x[t] that
    columns [c * BLOCK_D, (c + 1) * BLOCK_D) give a block of one token's slots."""
    acc_dtype: tl.constexpr = z_parts_ptr.dtype.element_ty
    COLUMN_BLOCKS: tl.constexpr = (D_IN + BLOCK_D - 1) // BLOCK_D
    offs_t, _, offs_s, slot_mask, expert_ids = _decode_slots(expert_ids_ptr, S, BLOCK_S)
    column_block = tl.program_id(1)
    offs_d = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    z_part = down_chunk(x_ptr, w_down_ptr, expert_ids, offs_t, slot_mask, offs_d, T, acc_dtype, D_IN)
    if w_down_scale_ptr is not None:
        z_part *= row_scales(w_down_scale_ptr, expert_ids, slot_mask, acc_dtype)
    parts = (offs_t.to(tl.int64)[:, None] * COLUMN_BLOCKS + column_block) * S + offs_s[None, :]
    tl.store(z_parts_ptr + parts, z_part, mask=slot_mask)


@triton.jit
def experts_decode_up_kernel(
    z_parts_ptr,      # (T, Z_PARTS, S) accumulation dtype: z is their sum (Z_PARTS = 1: z itself);
                      # PARTS_PAD: Z_PARTS rounded up to a power of two
    expert_ids_ptr,   # (T, S) int32 | int64
    gates_ptr,        # (T, S) any float dtype
    w_up_ptr,         # (E, D_OUT)
    w_up_scale_ptr,   # (E,) fp32 for a quantized table, else None
    z_ptr,            # (T, S) accumulation dtype out, when WRITE_Z
    y_parts_ptr,      # (T, cdiv(S, BLOCK_S), D_OUT) accumulation dtype out: each slot block's share of y
    T,
    D_OUT: tl.constexpr, S: tl.constexpr, Z_PARTS: tl.constexpr, ACTIVATION: tl.constexpr,
    PARTS_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_Z: tl.constexpr,
):
    """Grid (T * cdiv(S, BLOCK_S), cdiv(D_OUT, BLOCK_D)): columns [c * BLOCK_D, (c + 1) * BLOCK_D) of
    sum over a block of one token's slots of g act(z) w_up[e]. Every column block sums the same z
    shares in the same order; the first one writes z."""
    acc_dtype: tl.constexpr = y_parts_ptr.dtype.element_ty
    SLOT_BLOCKS: tl.constexpr = (S + BLOCK_S - 1) // BLOCK_S
    offs_t, slot_block, offs_s, slot_mask, expert_ids = _decode_slots(expert_ids_ptr, S, BLOCK_S)
    column_block = tl.program_id(1)
    slots = offs_t.to(tl.int64)[:, None] * S + offs_s[None, :]
    offs_p = tl.arange(0, PARTS_PAD)
    parts = offs_t.to(tl.int64)[:, None] * (Z_PARTS * S) + offs_p[:, None] * S + offs_s[None, :]
    shares = tl.load(z_parts_ptr + parts, mask=(offs_p < Z_PARTS)[:, None] & slot_mask, other=0.0)
    z = tl.sum(shares, axis=0)[None, :]
    if WRITE_Z:
        if column_block == 0:
            tl.store(z_ptr + slots, z, mask=slot_mask)
    gates = tl.load(gates_ptr + slots, mask=slot_mask, other=0.0).to(acc_dtype)
    offs_d = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
    coef = gates * activate(z, ACTIVATION)
    if w_up_scale_ptr is not None:
        coef *= row_scales(w_up_scale_ptr, expert_ids, slot_mask, acc_dtype)
    y_part = up_chunk(w_up_ptr, expert_ids, coef, slot_mask, offs_d, D_OUT)
    parts = (offs_t.to(tl.int64)[:, None] * SLOT_BLOCKS + slot_block) * D_OUT + offs_d[None, :]
    tl.store(y_parts_ptr + parts, y_part, mask=(offs_d < D_OUT)[None, :])


@triton.jit
def sum_parts_kernel(
    parts_ptr,        # (R, PARTS, W) accumulation dtype
    out_ptr,          # (R, W) out, in its own dtype
    PARTS: tl.constexpr, W: tl.constexpr, PARTS_PAD: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Grid (R, cdiv(W, BLOCK_W)): out[r] = the sum over p of parts[r, p], in one fixed order
    (PARTS_PAD: PARTS rounded up to a power of two)."""
    row = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, PARTS_PAD)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_mask = offs_w < W
    shares = tl.load(parts_ptr + row * (PARTS * W) + offs_p[:, None] * W + offs_w[None, :],
                     mask=(offs_p < PARTS)[:, None] & w_mask[None, :], other=0.0)
    tl.store(out_ptr + row * W + offs_w, tl.sum(shares, axis=0).to(out_ptr.dtype.element_ty), mask=w_mask)


@triton.jit
def experts_bwd_tokens_kernel(
    x_ptr,                     # (T, D_IN), read when DOWN and ATOMIC
    dy_ptr,                    # (T, D_OUT), read when UP
    expert_ids_ptr,            # (T, S) int32 | int64
    gates_ptr, z_ptr,          # (T, S), read when UP; z in the accumulation dtype, from the forward
    w_down_ptr,                # (E, D_IN), read when DOWN
    w_up_ptr,                  # (E, D_OUT), read when UP
    dx_ptr,                    # (T, D_IN) out when DOWN, x's dtype
    dgates_ptr,                # (T, S) out when UP, gates' dtype
    dz_ptr,                    # (T, S) accumulation dtype: out when UP (d loss / d z), in otherwise
    ga_ptr,                    # (T, S) out when UP and not ATOMIC: g act(z), the weights of dw_up
    dw_down_ptr, dw_up_ptr,    # (E, D_IN), (E, D_OUT) fp32 | fp64 zero-initialised, used only if ATOMIC
    T,
    D_IN: tl.constexpr, D_OUT: tl.constexpr, S: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    UP: tl.constexpr, DOWN: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Token-major backward. UP: w = w_up[e] . dy, dgates = act(z) w, dz = g act'(z) w, and dw_up by
    atomics or its per-slot weights ga = g act(z) for the sorted pass. DOWN: dx = sum dz w_down[e],
    and dw_down by atomics (its weights are dz, for the sorted pass)."""
    acc_dtype: tl.constexpr = dz_ptr.dtype.element_ty
    offs_t, slots, slot_mask, expert_ids = _load_slots(expert_ids_ptr, tl.program_id(0), T, S, BLOCK_T, BLOCK_S)
    token_mask = (offs_t < T)[:, None]
    row_mask = slot_mask[:, :, None]
    if UP:
        gates = tl.load(gates_ptr + slots, mask=slot_mask, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + slots, mask=slot_mask, other=0.0)
        a, da = activate_with_grad(z, ACTIVATION)
        ga = gates * a
        token_rows = offs_t.to(tl.int64)[:, None] * D_OUT
        expert_rows = expert_ids.to(tl.int64)[:, :, None] * D_OUT
        w = tl.zeros(expert_ids.shape, acc_dtype)                  # w_up[e] . dy[t]
        for d0 in range(0, D_OUT, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D_OUT
            dy_chunk = tl.load(dy_ptr + token_rows + offs_d[None, :], mask=token_mask & d_mask[None, :],
                               other=0.0).to(acc_dtype)
            v = tl.load(w_up_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                        other=0.0)
            w += tl.sum(v.to(acc_dtype) * dy_chunk[:, None, :], axis=2)
            if ATOMIC:
                # relaxed: only the sum matters, not ordering against other memory
                tl.atomic_add(dw_up_ptr + expert_rows + offs_d[None, None, :],
                              ga[:, :, None] * dy_chunk[:, None, :], mask=row_mask & d_mask[None, None, :],
                              sem="relaxed")
        tl.store(dgates_ptr + slots, (a * w).to(dgates_ptr.dtype.element_ty), mask=slot_mask)
        dz = gates * w * da
        tl.store(dz_ptr + slots, dz, mask=slot_mask)
        if not ATOMIC:
            tl.store(ga_ptr + slots, ga, mask=slot_mask)
    else:
        dz = tl.load(dz_ptr + slots, mask=slot_mask, other=0.0)
    if DOWN:
        token_rows = offs_t.to(tl.int64)[:, None] * D_IN
        expert_rows = expert_ids.to(tl.int64)[:, :, None] * D_IN
        for d0 in range(0, D_IN, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D_IN
            u = tl.load(w_down_ptr + expert_rows + offs_d[None, None, :], mask=row_mask & d_mask[None, None, :],
                        other=0.0)
            dx = tl.sum(dz[:, :, None] * u.to(acc_dtype), axis=1)
            tl.store(dx_ptr + token_rows + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=token_mask & d_mask[None, :])
            if ATOMIC:
                x_chunk = tl.load(x_ptr + token_rows + offs_d[None, :], mask=token_mask & d_mask[None, :],
                                  other=0.0).to(acc_dtype)
                tl.atomic_add(dw_down_ptr + expert_rows + offs_d[None, None, :],
                              dz[:, :, None] * x_chunk[:, None, :], mask=row_mask & d_mask[None, None, :],
                              sem="relaxed")


@triton.jit
def _segmented_add(flag_a, sum_a, flag_b, sum_b):
    # b starts a new run: its sum restarts; else it continues a's run
    return flag_a | flag_b, tl.where(flag_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def table_grad_kernel(
    src_ptr,          # (T, D): the rows the slots' weights multiply (x for dw_down, dy for dw_up)
    weights_ptr,      # (T*S,) accumulation dtype: each slot's weight (dz for dw_down, g act(z) for dw_up)
    sorted_ids_ptr,   # (n,) int32 | int64: every slot's table row, sorted stably (n = T*S)
    order_ptr,        # (n,) int64: the slot at each sorted position
    out_rows_ptr,     # (n,) int: where each sorted position's run goes in out (its table row, or its run's rank)
    out_ptr,          # (rows, D): written at the out rows of the runs that begin and end in one chunk
    partials_ptr,     # (cdiv(n, chunk), 2, D) accumulation dtype: per chunk, its head part and its tail part
    n, chunk,
    D: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Table gradient as a segmented reduction over the slots sorted by row, first phase: out[out_rows[run]]
    = sum over the run's slots of weight * src[token]. Program (p, c) sums columns c * BLOCK_D.. of
    the sorted positions [p * chunk, (p + 1) * chunk) and nothing else, BLOCK_N slots at a time with
    a segmented scan: cdiv(chunk, BLOCK_N) windows whatever the runs' lengths (a run of a million
    slots, collapsed routing, is split over every program instead of walked by one). Runs that begin
    and end in the chunk are stored to out; the part of a run that began before the chunk (its head
    part: the whole chunk when the run spans it) goes to partials[p, 0], the part of a run still open
    at the chunk's end that began in it (its tail part) to partials[p, 1]; table_grad_combine_kernel
    adds those in chunk order. Every sum has one fixed order: no atomics, bitwise reproducible, and
    only touched rows are written."""
    acc_dtype: tl.constexpr = weights_ptr.dtype.element_ty
    p = tl.program_id(0).to(tl.int64)
    chunk_start = p * chunk
    chunk_end = tl.minimum(chunk_start + chunk, n)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lane = tl.arange(0, BLOCK_N)
    # sorted ids: the positions of the chunk that equal the one before it continue that run (the head)
    head_id = tl.load(sorted_ids_ptr + chunk_start - 1, mask=chunk_start > 0, other=-1)
    head_ptrs = partials_ptr + (2 * p) * D + offs_d[None, :]
    carry = tl.zeros((BLOCK_D,), acc_dtype)
    for pos in range(chunk_start, chunk_end, BLOCK_N):
        offs = pos + lane
        valid = offs < chunk_end
        ids = tl.load(sorted_ids_ptr + offs, mask=valid, other=-1)
        previous = tl.load(sorted_ids_ptr + offs - 1, mask=valid & (offs > 0), other=-2)
        following = tl.load(sorted_ids_ptr + offs + 1, mask=valid & (offs + 1 < n), other=-3)
        begins = valid & ((offs == 0) | (ids != previous))
        ends = valid & (ids != following)
        in_head = valid & (ids == head_id)
        chunk_last = offs == chunk_end - 1
        slots = tl.load(order_ptr + offs, mask=valid, other=0)
        weights = tl.load(weights_ptr + slots, mask=valid, other=0.0)
        rows = tl.load(src_ptr + (slots // S)[:, None] * D + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                       other=0.0)
        terms = weights[:, None] * rows.to(acc_dtype) + tl.where(lane[:, None] == 0, carry[None, :], 0.0)
        flags = tl.broadcast_to(begins[:, None].to(tl.int32), (BLOCK_N, BLOCK_D))
        _, sums = tl.associative_scan((flags, terms), 0, _segmented_add)
        # at most one position each: the head part's end (its run's end, or the chunk's), the open tail
        to_head = in_head & (ends | chunk_last)
        to_tail = chunk_last & ~ends & ~in_head
        out_rows = tl.load(out_rows_ptr + offs, mask=ends & ~in_head, other=0).to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], sums.to(out_ptr.dtype.element_ty),
                 mask=(ends & ~in_head)[:, None] & d_mask[None, :])
        tl.store(head_ptrs + lane[:, None] * 0, sums, mask=to_head[:, None] & d_mask[None, :])
        tl.store(head_ptrs + D + lane[:, None] * 0, sums, mask=to_tail[:, None] & d_mask[None, :])
        # the next window's first position continues the last one's run unless that run ended here
        last = lane == BLOCK_N - 1
        carry = tl.sum(tl.where((last & ~ends)[:, None], sums, 0.0), axis=0)


@triton.jit
def table_grad_combine_kernel(
    partials_ptr,     # (chunks, 2, D) accumulation dtype: table_grad_kernel's head and tail parts
    sorted_ids_ptr,   # (n,) int32 | int64: every slot's table row, sorted
    out_rows_ptr,     # (n,) int: where each sorted position's run goes in out
    out_ptr,          # (rows, D): written at the out rows of the runs that span chunks
    n, chunk, chunks,
    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Second phase of the table gradient: each run that spans chunks is the tail part of the chunk
    it begins in plus the head parts of the chunks after it, up to the one it ends in. Program c
    takes columns c * BLOCK_D.. of every chunk in order, BLOCK_C chunks at a time, with a segmented
    scan over chunks whose segments start at the chunk after a tail part: cdiv(chunks, BLOCK_C)
    windows whatever the runs, in one fixed order (bitwise reproducible). A chunk's boundary ids say
    which parts it has (sorted ids: equal ids across a boundary are one run)."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lane = tl.arange(0, BLOCK_C)
    carry = tl.zeros((BLOCK_D,), partials_ptr.dtype.element_ty)
    for c0 in range(0, chunks, BLOCK_C):
        q = (c0 + lane).to(tl.int64)
        valid = q < chunks
        start = q * chunk
        end = tl.minimum(start + chunk, n)
        first = tl.load(sorted_ids_ptr + start, mask=valid, other=-1)
        before = tl.load(sorted_ids_ptr + start - 1, mask=valid & (q > 0), other=-2)
        after = tl.load(sorted_ids_ptr + end, mask=valid & (end < n), other=-3)
        # the id before the previous chunk: whether the run entering this chunk began in that chunk
        earlier = tl.load(sorted_ids_ptr + start - chunk - 1, mask=valid & (q > 1), other=-4)
        # every chunk's out row with its ids (masked by head_ends instead, triton 3.6's layout pass crashes)
        out_rows = tl.load(out_rows_ptr + start, mask=valid, other=0).to(tl.int64)
        has_head = valid & (first == before)
        head_ends = has_head & (after != first)
        opens = has_head & (earlier != first)       # the previous chunk holds this run's tail part
        head = tl.load(partials_ptr + (2 * q)[:, None] * D + offs_d[None, :],
                       mask=has_head[:, None] & d_mask[None, :], other=0.0)
        tail = tl.load(partials_ptr + (2 * q - 1)[:, None] * D + offs_d[None, :],
                       mask=opens[:, None] & d_mask[None, :], other=0.0)
        terms = head + tail + tl.where(lane[:, None] == 0, carry[None, :], 0.0)
        flags = tl.broadcast_to(opens[:, None].to(tl.int32), (BLOCK_C, BLOCK_D))
        _, sums = tl.associative_scan((flags, terms), 0, _segmented_add)
        tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], sums.to(out_ptr.dtype.element_ty),
                 mask=head_ends[:, None] & d_mask[None, :])
        # a run still open after the window's last chunk (that chunk is all of it) carries into the next
        last = lane == BLOCK_C - 1
        carry = tl.sum(tl.where((last & has_head & ~head_ends)[:, None], sums, 0.0), axis=0)
