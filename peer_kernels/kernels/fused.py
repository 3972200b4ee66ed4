"""The one-pass PEER kernel: retrieval, gating and expert mixing in one launch (docs/design.md).

One program owns a tile of BLOCK_T tokens. For each head it runs the retrieval of
kernels/retrieval.py in registers (sub-key scores by tl.dot, streaming top-k' per half, pruned
k'xk' combine, top-k, gating) and writes the head's ids, scores and gates: (T, h, k) scalars the
backward needs anyway. After a CTA barrier it mixes the experts of its own tokens, MIX_T tokens at
a time, with the expert kernel's `mix_experts` (kernels/experts.py), which reads those scalars back
from L1/L2. The gathered rows and the (T, h, n) scores never touch memory; y is written once.

Why split the tile for mixing: retrieval wants >= 16 tokens per tl.dot and 64 to amortise each key
tile, while the gather of h*k table rows per token wants few tokens per step to keep its
(tokens, slots, BLOCK_D) row tile in registers.
"""
import triton
import triton.language as tl

from .experts import mix_experts
from .retrieval import retrieve_tile, store_picks


@triton.jit
def peer_fused_kernel(
    x_ptr,            # (T, D)
    queries_ptr,      # (T, heads, 2, dk), strides (stride_t, stride_h, stride_p, 1)
    keys_ptr,         # (heads or 1, n, 2, dk) contiguous; key_head_stride = 0 when shared
    pairs_ptr,        # (2, P_PAD) int32 admissible pair ranks (ops/retrieval.pair_table)
    w_down_ptr,       # (E, D): float, or int8 | fp8e4nv with w_down_scale_ptr
    w_up_ptr,         # (E, D): float, or int8 | fp8e4nv with w_up_scale_ptr
    w_down_scale_ptr,  # (E,) fp32 for a quantized w_down, else None
    w_up_scale_ptr,    # (E,) fp32 for a quantized w_up, else None
    y_ptr,            # (T, D) out, x's dtype
    scores_ptr,       # (T, heads, k) out, accumulation dtype
    ids_ptr,          # (T, heads, k) out int64, with the per-head offset of separate embeddings
    gates_ptr,        # (T, heads, k) out, accumulation dtype
    z_ptr,            # (T, heads*k) out, accumulation dtype: w_down[e] . x, saved for backward
    T, heads, n, dk, k, stride_t, stride_h, stride_p, key_head_stride, id_head_offset,
    D: tl.constexpr, ACTIVATION: tl.constexpr, GATING: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, KS_PAD: tl.constexpr,
    P_PAD: tl.constexpr, K_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INDEX_BITS: tl.constexpr, LEVEL_SELECT: tl.constexpr, EXACT: tl.constexpr,
    MIX_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype: tl.constexpr = z_ptr.dtype.element_ty
    tile_start = tl.program_id(0) * BLOCK_T
    offs_t = tile_start + tl.arange(0, BLOCK_T)
    for head in range(heads):
        scores, index_a, index_b = retrieve_tile(
            queries_ptr, keys_ptr, pairs_ptr, offs_t, head, T, n, dk,
            stride_t, stride_h, stride_p, key_head_stride,
            BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, P_PAD, K_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS, LEVEL_SELECT, EXACT)
        store_picks(scores, index_a, index_b, scores_ptr, ids_ptr, gates_ptr, offs_t, head, T, heads, n, k,
                    id_head_offset, K_PAD, GATING)
    # The mixing below reads ids / gates written by other threads of this CTA.
    tl.debug_barrier()

    S = heads * k
    offs_s = tl.arange(0, BLOCK_S)
    for t0 in range(0, BLOCK_T, MIX_T):
        offs_mix = tile_start + t0 + tl.arange(0, MIX_T)
        slots = offs_mix.to(tl.int64)[:, None] * S + offs_s[None, :]
        slot_mask = (offs_mix[:, None] < T) & (offs_s[None, :] < S)
        expert_ids = tl.load(ids_ptr + slots, mask=slot_mask, other=0)
        gates = tl.load(gates_ptr + slots, mask=slot_mask, other=0.0)
        z = mix_experts(x_ptr, y_ptr, w_down_ptr, w_up_ptr, w_down_scale_ptr, w_up_scale_ptr, expert_ids, gates,
                        offs_mix, slot_mask, T, D, D, ACTIVATION, BLOCK_D)
        tl.store(z_ptr + slots, z.to(acc_dtype), mask=slot_mask)
