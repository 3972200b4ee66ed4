"""Product-key retrieval kernels: sub-key scores, streaming top-k' per half, the k'xk' combine, top-k
and gating, forward and backward (docs/design.md). Pure @triton.jit; launchers live in
peer_kernels/ops/retrieval.py.

Selection works on packed integer keys, so that `tl.sort`/`tl.topk` carry the index along with the
score for free. Exact keys are int64: the high 32 bits are an order-preserving integer image of the
fp32 score, the low 32 bits are (2**31 - 1 - index). One signed int64 comparison therefore orders by
score first and, among exactly equal scores, prefers the SMALLER index, and the score is recovered
bit-exactly from the key.

16-bit inputs stream their sub-key scores through int32 keys instead (INDEX_BITS > 0): the score's
image floored to 32 - INDEX_BITS bits, then (2**INDEX_BITS - 1 - index). Every compare, select and
shuffle of the sorting networks, which are nearly all of the retrieval's instructions, then moves
one 32-bit register instead of two. The floor keeps 13 mantissa bits at n = 1024 (11 at n = 4096,
the launcher's limit), finer than the 8 (bf16) or 11 (fp16) bits of the inputs whose products make
the score. The k' survivors of each half are re-scored exactly in fp32 from their key rows and
re-ranked on int64 keys, so everything after the per-half selection is exact.

Two selections rank those keys. streaming_topk sorts each key tile's top k' into a running list (a
sorting network). level_topk keeps only each tile column's 3 best keys in the key-tile loop (a few
integer min/max per score, well under half the network's instructions: tests/test_retrieval.py
asserts the counts per Triton version), selects among those after the loop and certifies the list; a token tile it cannot certify re-runs streaming_topk, so the picks never
depend on which one ran (tuning.use_level_select says where it is used).

Tie rule (deterministic, documented in ops/retrieval.py): each half ranks its sub-keys by
(score desc, sub-key index asc), on the floored scores when INDEX_BITS > 0; the combine ranks
candidate pairs by (s1 + s2 desc, rank in the first half asc, rank in the second half asc).

The decode kernels at the end split each half's key rows over programs for a few tokens (see
there); product_key_topk_kernel takes tiles of tokens.

Candidate pruning: with both halves sorted, pair (i, j) (ranks) is beaten by every (i', j') with
i' <= i, j' <= j under the tie rule above, i.e. by (i+1)(j+1) - 1 others, so only pairs with
(i+1)(j+1) <= k can be picked. The launcher passes that list of pairs (e.g. 50 instead of 256 for
k = k' = 16) and the kernel never forms the other candidates.
"""
import triton
import triton.language as tl

# GATING constexpr ids (ops/retrieval.GATING_CODES maps the names).
GATING_NONE = tl.constexpr(0)
GATING_SOFTMAX = tl.constexpr(1)
GATING_SIGMOID = tl.constexpr(2)
GATING_RELU = tl.constexpr(3)

_LOW_MAX = tl.constexpr(2147483647)  # the low field holds _LOW_MAX - index, so indices must stay below 2**31


@triton.jit
def _order_key(score):
    """fp32 -> int32 whose signed order is the float order (an involution: it also inverts).
    Every NaN maps to the largest key, so NaN ranks above every number (the tie rule's NaN order);
    on int32 keys (the inverse direction) `score != score` never holds."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(score != score, 0x7FFFFFFF, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack_key(order_key, index):
    return (order_key.to(tl.int64) << 32) | (-index + _LOW_MAX).to(tl.int64)


@triton.jit
def pack(score, index):
    return _pack_key(_order_key(score.to(tl.float32)), index)


@triton.jit
def pack_lowest(index):
    """A key below every real score (and every NaN but the all-ones negative one) that still carries
    a valid index, so whatever is unpacked from a top list can be used as an address."""
    return _pack_key(tl.full(index.shape, -2147483648, tl.int32), index)


@triton.jit
def pack_select(score, index, valid, INDEX_BITS: tl.constexpr):
    """The streaming selection's key: pack / pack_lowest (int64) when INDEX_BITS == 0, else the int32
    key (floored score image | 2**INDEX_BITS - 1 - index); the lowest int32 key is -2**31 | that."""
    if INDEX_BITS == 0:
        return tl.where(valid, pack(score, index), pack_lowest(index))
    else:
        low_max = (1 << INDEX_BITS) - 1
        order = tl.where(valid, _order_key(score.to(tl.float32)), -2147483648)
        # The arithmetic shift floors. For index <= low_max, low_max - index == (index ^ low_max) &
        # low_max; the & keeps the masked rows past n of a key tile out of the score bits.
        return ((order >> INDEX_BITS) << INDEX_BITS) | ((index ^ low_max) & low_max)


@triton.jit
def unpack_select_index(packed, INDEX_BITS: tl.constexpr):
    if INDEX_BITS == 0:
        return unpack_index(packed)
    else:
        low_max = (1 << INDEX_BITS) - 1
        return (packed & low_max) ^ low_max


@triton.jit
def _score_word(packed):
    """The high word of a packed key: its score's order key."""
    return (packed >> 32).to(tl.int32)


@triton.jit
def _word_score(word):
    return _order_key(word).to(tl.float32, bitcast=True)


@triton.jit
def unpack_score(packed):
    return _word_score(_score_word(packed))


@triton.jit
def unpack_index(packed):
    return (-(packed & _LOW_MAX) + _LOW_MAX).to(tl.int32)


@triton.jit
def query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p,
               DK_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr):
    q = load_query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p, 0, DK_PAD)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    return q


@triton.jit
def key_tile_keys(q, keys_ptr, start, n, dk, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr,
                  FULL: tl.constexpr = False):
    """Selection keys (pack_select) of q (BLOCK_T, DK_PAD) against the key rows [start, start +
    BLOCK_N) of keys_ptr (-> (n, 2, dk), this half): (BLOCK_T, BLOCK_N); rows past n get the
    lowest key. FULL promises start + BLOCK_N <= n, which drops the row masks: on int32 keys the
    index field is then low_max - row (equal to pack_select's for rows below 2**INDEX_BITS), one
    integer op per score fewer, and no compare or select."""
    rows = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DK_PAD)
    mask = offs_d[None, :] < dk
    if not FULL:
        mask = mask & (rows[:, None] < n)
    key_tile = tl.load(keys_ptr + rows[:, None].to(tl.int64) * (2 * dk) + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST_DOT:
        key_tile = key_tile.to(tl.float32)
    scores = tl.dot(q, tl.trans(key_tile), input_precision=INPUT_PRECISION)
    if FULL and INDEX_BITS != 0:
        low_max = (1 << INDEX_BITS) - 1
        return (_order_key(scores) & ~low_max) | (low_max - rows)[None, :]
    return pack_select(scores, rows[None, :], rows[None, :] < n, INDEX_BITS)


@triton.jit
def merge_lists(best, other):
    """The top KS_PAD of two (BLOCK_T, KS_PAD) lists sorted descending, descending. The elementwise
    max of one and the other reversed holds the top KS_PAD of their union and is a bitonic sequence,
    which a bitonic merge (log2 KS_PAD compare-exchange rounds, not a full sort's log2 KS_PAD *
    (log2 KS_PAD + 1) / 2) sorts."""
    return tl.bitonic_merge(tl.maximum(best, tl.flip(other, 1)), 1, descending=True)


@triton.jit
def streaming_topk(q, keys_ptr, first, end, dk, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr,
                   KS_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   INDEX_BITS: tl.constexpr):
    """The top KS_PAD keys of the sub-key rows [first, end) of one half by a sorting network over
    every score: each key tile's top KS_PAD (tl.topk) is merged into the running list. (BLOCK_T,
    KS_PAD) descending; the keys carry the rows' indices in the whole half."""
    ranks = tl.arange(0, KS_PAD)
    no_score = tl.full((BLOCK_T, KS_PAD), float("-inf"), tl.float32)
    best = pack_select(no_score, ranks[None, :], ranks[None, :] < 0, INDEX_BITS)
    for start in range(first, end, BLOCK_N):
        keys = key_tile_keys(q, keys_ptr, start, end, dk, BLOCK_N, DK_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS)
        best = merge_lists(best, tl.topk(keys, KS_PAD, dim=1))
    return best


@triton.jit
def _insert_into_levels(levels, keys):
    """levels: tuple of (BLOCK_T, BLOCK_N), per column descending. Returns the levels holding each
    column's best len(levels) of levels and keys, and the key each column evicted. Two integer
    min/max per level and score."""
    out = ()
    for level in tl.static_range(len(levels)):
        out = out + (tl.maximum(levels[level], keys),)
        keys = tl.minimum(levels[level], keys)
    return out, keys


@triton.jit
def _thread_groups(keys, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_T, BLOCK_N) -> (BLOCK_T, 8, BLOCK_N // 8), 8 groups of columns. Column c = 64*b6 +
    8*j + 2*l + e (at BLOCK_N = 128); a group holds one (b6, l), the columns that one thread holds
    of an sm_90 tl.dot result at 8 warps (l: lane % 4, b6: warpgroup), so that sorting or reducing
    along the last axis needs no shuffles. Any grouping would be correct; this one is cheap."""
    grouped = tl.permute(tl.reshape(keys, (BLOCK_T, 2, BLOCK_N // 16, 4, 2)), (0, 1, 3, 2, 4))
    return tl.reshape(grouped, (BLOCK_T, 8, BLOCK_N // 8))


@triton.jit
def _best_dropped(keys, kept):
    """The best of the int32 keys (BLOCK_T, 8, W) below the smallest of kept (BLOCK_T, 8, G), their
    top G: as keys are distinct, the best key the top G left out; -2**31 if G == W."""
    if kept.shape[2] == keys.shape[2]:
        return tl.full((keys.shape[0], keys.shape[1]), -2147483648, tl.int32)
    floor = tl.min(kept, axis=2)
    return tl.max(tl.where(keys < floor[:, :, None], keys, -2147483648), axis=2)


@triton.jit
def level_topk(q, keys_ptr, offs_t, T, n, dk, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               DK_PAD: tl.constexpr, KS_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr):
    """The top KS_PAD keys of one half, and whether they are certainly exact.

    The key-tile loop keeps, per column of the tile (sub-keys c, c + BLOCK_N, ...), that column's 3
    best keys (5 integer min/max per score, a fraction of a sorting network's instructions) and,
    per row, the best key any column evicted. After the loop each of 8 groups of columns keeps its
    best GROUP_KEEP candidates, again noting the best it left out, and the row its best KS_PAD of
    those. Every key that was dropped is below the best one noted, so the list is exact
    when that is below the row's KS_PAD-th pick: `certified`. Otherwise the caller re-runs
    streaming_topk for the token tile. On independent scores a column evicts one of the row's top
    16 when it held 4 of them, C(16, 4) / 128**3 ~ 9e-4 per row, ~5% of 64-token tiles (a 4th
    level would make that ~1e-5 but spills on sm_90 at the paper's shapes).
    Returns ((BLOCK_T, KS_PAD) descending, scalar bool)."""
    # Half the list per group, as 8 groups rarely put more than half of a row's top k' in one (all
    # of it for short lists); no more than a group's columns.
    HALF_LIST: tl.constexpr = KS_PAD if KS_PAD <= 8 else KS_PAD // 2
    GROUP_KEEP: tl.constexpr = HALF_LIST if HALF_LIST < BLOCK_N // 8 else BLOCK_N // 8
    columns = tl.arange(0, BLOCK_N)[None, :]
    lowest = pack_select(tl.full((BLOCK_T, BLOCK_N), float("-inf"), tl.float32), columns, columns < 0, INDEX_BITS)
    levels = (lowest, lowest, lowest)
    evicted = tl.max(lowest, axis=1)
    full_tiles_end = n - n % BLOCK_N
    for start in range(0, full_tiles_end, BLOCK_N):
        keys = key_tile_keys(q, keys_ptr, start, n, dk, BLOCK_N, DK_PAD, INPUT_PRECISION, UPCAST_DOT,
                             INDEX_BITS, True)
        levels, out = _insert_into_levels(levels, keys)
        evicted = tl.maximum(evicted, tl.max(out, axis=1))
    if full_tiles_end < n:
        keys = key_tile_keys(q, keys_ptr, full_tiles_end, n, dk, BLOCK_N, DK_PAD, INPUT_PRECISION,
                             UPCAST_DOT, INDEX_BITS)
        levels, out = _insert_into_levels(levels, keys)
        evicted = tl.maximum(evicted, tl.max(out, axis=1))
    # Level by level, so that each level's registers free up as it is merged.
    level_keys = _thread_groups(levels[0], BLOCK_T, BLOCK_N)
    group_best = tl.topk(level_keys, GROUP_KEEP, dim=2)
    evicted = tl.maximum(evicted, tl.max(_best_dropped(level_keys, group_best), axis=1))
    for level in tl.static_range(1, len(levels)):
        level_keys = _thread_groups(levels[level], BLOCK_T, BLOCK_N)
        level_best = tl.topk(level_keys, GROUP_KEEP, dim=2)
        dropped = tl.maximum(_best_dropped(level_keys, level_best),
                             tl.max(tl.minimum(group_best, tl.flip(level_best, 2)), axis=2))
        evicted = tl.maximum(evicted, tl.max(dropped, axis=1))
        merged = tl.maximum(group_best, tl.flip(level_best, 2))
        group_best = tl.bitonic_merge(merged, 2, descending=True)
    best = tl.topk(tl.reshape(group_best, (BLOCK_T, 8 * GROUP_KEEP)), KS_PAD, dim=1)
    unsure = (evicted >= tl.min(best, axis=1)) & (offs_t < T)
    return best, tl.max(unsure.to(tl.int32), axis=0) == 0


@triton.jit
def half_topk(queries_ptr, keys_ptr, offs_t, half, head, T, n, dk, stride_t, stride_h, stride_p,
              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, KS_PAD: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr,
              LEVEL_SELECT: tl.constexpr):
    """The top KS_PAD sub-keys of one half for a tile of queries, streamed over tiles of keys.

    queries_ptr as in load_query_half; keys_ptr -> (n, 2, dk) rows of this half (row stride 2*dk).
    Returns int64 packed keys (BLOCK_T, KS_PAD) of fp32 scores, sorted descending. The (BLOCK_T, n)
    scores only ever exist one BLOCK_N tile at a time, in registers. UPCAST_DOT feeds tl.dot fp32
    operands (same products, exact in fp32): the Triton interpreter's 16-bit tl.dot is wrong
    (triton 3.9). LEVEL_SELECT selects by level_topk (int32 keys only), falling back to streaming_topk
    for a token tile whose list it cannot certify; both rank by the same keys, so the result does
    not depend on which ran.
    """
    q = query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p, DK_PAD, UPCAST_DOT)
    if LEVEL_SELECT:
        best, exact = level_topk(q, keys_ptr, offs_t, T, n, dk, BLOCK_T, BLOCK_N, DK_PAD, KS_PAD,
                                 INPUT_PRECISION, UPCAST_DOT, INDEX_BITS)
        if not exact:
            best = streaming_topk(q, keys_ptr, 0, n, dk, BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, INPUT_PRECISION,
                                  UPCAST_DOT, INDEX_BITS)
    else:
        best = streaming_topk(q, keys_ptr, 0, n, dk, BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, INPUT_PRECISION,
                              UPCAST_DOT, INDEX_BITS)
    return exact_list(best, queries_ptr, keys_ptr, offs_t, half, head, T, n, dk, stride_t, stride_h, stride_p,
                      DK_PAD, KS_PAD, INDEX_BITS)


@triton.jit
def exact_list(best, queries_ptr, keys_ptr, offs_t, half, head, T, n, dk, stride_t, stride_h, stride_p,
               DK_PAD: tl.constexpr, KS_PAD: tl.constexpr, INDEX_BITS: tl.constexpr):
    """A half's selected list (BLOCK_T, KS_PAD) as exact int64 keys, descending: int32 keys
    (INDEX_BITS > 0) are re-scored exactly in fp32 from their key rows and re-ranked; int64 keys
    are exact already."""
    if INDEX_BITS != 0:
        # Past rank n - 1 (n < KS_PAD) the list holds padding, which must stay below every score.
        ranks = tl.arange(0, KS_PAD)
        index = unpack_select_index(best, INDEX_BITS)
        exact_scores = rescore(queries_ptr, keys_ptr, index, offs_t, half, head, T, n, dk, stride_t, stride_h,
                               stride_p, DK_PAD, False)
        best = tl.sort(pack_select(exact_scores, index, ranks[None, :] < n, 0), 1, descending=True)
    return best


@triton.jit
def _take(values, index):
    """values (BLOCK_T, W) int32 at the columns `index` (BLOCK_T or 1, M), each in [0, W): (BLOCK_T, M).

    tl.gather where one warp can hold whole gather columns at up to 8 warps (W * BLOCK_T >= 8 * 32):
    narrower, triton 3.4-3.6 cannot compile it (TritonGPUOptimizeThreadLocality gives the gather
    axis more than one warp, then asserts the gather is warp-local). There, a one-hot select, cheap
    at such widths: of the W columns only the one named is kept, the others are -2**31, which no
    value is below, so the max is exactly the value taken."""
    BLOCK_T: tl.constexpr = values.shape[0]
    W: tl.constexpr = values.shape[1]
    if W * BLOCK_T >= 256:
        return tl.gather(values, tl.broadcast_to(index, (BLOCK_T, index.shape[1])), 1)
    else:
        columns = tl.arange(0, W)
        hit = index[:, :, None] == columns[None, None, :]
        return tl.max(tl.where(hit, values[:, None, :], -2147483648), axis=2)


@triton.jit
def combine_topk(best_a, best_b, pairs_ptr, BLOCK_T: tl.constexpr, P_PAD: tl.constexpr, K_PAD: tl.constexpr):
    """The top K_PAD of the candidate pairs of two per-half top lists.

    best_a / best_b (BLOCK_T, KS_PAD) packed, descending; pairs_ptr -> (2, P_PAD) int32 ranks (a, b)
    of the admissible pairs in lexicographic order, -1 for padding (read here, from L1, rather than
    held in registers across the one-pass kernel's loop over heads).
    Returns scores (BLOCK_T, K_PAD) fp32 descending and the sub-key indices a, b (BLOCK_T, K_PAD) int32.
    Both selections go through _take (32-bit words), which compiles at any width: the token-tile,
    one-pass and decode merge kernels all combine here, each at its own tile widths.
    """
    offs_p = tl.arange(0, P_PAD)
    pair_rank_a = tl.load(pairs_ptr + offs_p)
    valid = pair_rank_a >= 0
    # the candidates' scores, from the score words of their halves' keys
    word_a = _take(_score_word(best_a), tl.maximum(pair_rank_a, 0)[None, :])
    word_b = _take(_score_word(best_b), tl.maximum(tl.load(pairs_ptr + P_PAD + offs_p), 0)[None, :])
    sums = _word_score(word_a) + _word_score(word_b)
    pair = tl.broadcast_to(offs_p[None, :], (BLOCK_T, P_PAD))
    candidates = tl.where(valid[None, :], pack(sums, pair), pack_lowest(pair))
    top = tl.topk(candidates, K_PAD, dim=1)
    # the ranks of the pairs kept, from the table again, then the sub-keys at those ranks
    top_pair = unpack_index(top)
    index_a = _take(unpack_index(best_a), tl.maximum(tl.load(pairs_ptr + top_pair), 0))
    index_b = _take(unpack_index(best_b), tl.maximum(tl.load(pairs_ptr + P_PAD + top_pair), 0))
    return unpack_score(top), index_a, index_b


@triton.jit
def rescore(queries_ptr, keys_ptr, index, offs_t, half, head, T, n, dk, stride_t, stride_h, stride_p,
            DK_PAD: tl.constexpr, FLOAT64: tl.constexpr):
    """Exact scores of picked sub-keys: index (BLOCK_T, W) int32 rows of keys_ptr (-> (n, 2, dk),
    this half) dotted with this half of the queries, in fp64 when FLOAT64 else fp32: (BLOCK_T, W).

    dk is walked 8 wide (one 16-byte load per bf16 row chunk) in a loop that is not unrolled, so
    that the (BLOCK_T, W, 8) gathered rows add few registers to the one-pass kernel's peak (unrolled,
    it spilled on sm_90 under triton 3.6); the query chunks are re-read from L1 rather than sliced
    out of registers."""
    CHUNK: tl.constexpr = 8
    offs_c = tl.arange(0, CHUNK)
    row_offs = index[:, :, None].to(tl.int64) * (2 * dk)
    row_valid = index[:, :, None] < n
    acc = tl.zeros(index.shape, dtype=tl.float64 if FLOAT64 else tl.float32)
    for d0 in range(0, DK_PAD, CHUNK):
        q = load_query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p, d0, CHUNK)
        rows = tl.load(keys_ptr + row_offs + (d0 + offs_c)[None, None, :],
                       mask=row_valid & ((d0 + offs_c)[None, None, :] < dk), other=0.0)
        acc += tl.sum(rows.to(acc.dtype) * q.to(acc.dtype)[:, None, :], axis=2)
    return acc


@triton.jit
def apply_gating(scores, col_valid, GATING: tl.constexpr):
    """scores (BLOCK_T, K_PAD) -> gates; softmax normalizes over the valid columns."""
    if GATING == GATING_SOFTMAX:
        s = tl.where(col_valid, scores, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        return e / tl.sum(e, axis=1)[:, None]
    elif GATING == GATING_SIGMOID:
        return tl.sigmoid(scores)
    else:
        return tl.where(scores <= 0.0, 0.0, scores)  # NaN in, NaN out (tl.maximum drops it)


@triton.jit
def gating_backward(dgates, gates, scores, col_valid, GATING: tl.constexpr):
    """dgates -> dscores through the gating; zero on invalid columns."""
    dgates = tl.where(col_valid, dgates, 0.0)
    if GATING == GATING_SOFTMAX:
        return gates * (dgates - tl.sum(gates * dgates, axis=1)[:, None])
    elif GATING == GATING_SIGMOID:
        return dgates * gates * (1.0 - gates)
    else:
        return tl.where(scores <= 0.0, 0.0, dgates)  # passes at NaN, as torch's relu backward


@triton.jit
def load_query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p, d0,
                    WIDTH: tl.constexpr):
    """queries (T, heads, 2, dk), unit stride in dk (any other strides: the module's queries are a
    transposed view of the projection) -> columns [d0, d0 + WIDTH) of one half of one head:
    (BLOCK_T, WIDTH), zero past dk."""
    offs_d = d0 + tl.arange(0, WIDTH)
    row = offs_t.to(tl.int64) * stride_t + head * stride_h + half * stride_p
    return tl.load(queries_ptr + row[:, None] + offs_d[None, :],
                   mask=(offs_t[:, None] < T) & (offs_d[None, :] < dk), other=0.0)


@triton.jit
def retrieve_tile(queries_ptr, keys_ptr, pairs_ptr, offs_t, head, T, n, dk,
                  stride_t, stride_h, stride_p, key_head_stride,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr,
                  KS_PAD: tl.constexpr, P_PAD: tl.constexpr, K_PAD: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr,
                  LEVEL_SELECT: tl.constexpr, EXACT: tl.constexpr):
    """Retrieval for a tile of tokens and one head: scores (BLOCK_T, K_PAD) descending (in the
    queries' dtype when EXACT, else fp32) and sub-key indices a, b (BLOCK_T, K_PAD) int32."""
    keys_head = keys_ptr + head * key_head_stride
    best_a = half_topk(queries_ptr, keys_head, offs_t, 0, head, T, n, dk, stride_t, stride_h, stride_p,
                       BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS, LEVEL_SELECT)
    best_b = half_topk(queries_ptr, keys_head + dk, offs_t, 1, head, T, n, dk, stride_t, stride_h, stride_p,
                       BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS, LEVEL_SELECT)
    return picks_of_halves(best_a, best_b, queries_ptr, keys_head, pairs_ptr, offs_t, head, T, n, dk, stride_t,
                           stride_h, stride_p, BLOCK_T, DK_PAD, P_PAD, K_PAD, EXACT)


@triton.jit
def picks_of_halves(best_a, best_b, queries_ptr, keys_head, pairs_ptr, offs_t, head, T, n, dk, stride_t, stride_h,
                    stride_p, BLOCK_T: tl.constexpr, DK_PAD: tl.constexpr, P_PAD: tl.constexpr,
                    K_PAD: tl.constexpr, EXACT: tl.constexpr):
    """The top K_PAD pairs of one head's two exact half lists (exact_list): scores (BLOCK_T, K_PAD)
    descending and sub-key indices a, b. EXACT (float64) re-scores the picks in float64: selection
    and combine ran on fp32 scores."""
    scores, index_a, index_b = combine_topk(best_a, best_b, pairs_ptr, BLOCK_T, P_PAD, K_PAD)
    if EXACT:
        scores = (rescore(queries_ptr, keys_head, index_a, offs_t, 0, head, T, n, dk, stride_t, stride_h,
                          stride_p, DK_PAD, True)
                  + rescore(queries_ptr, keys_head + dk, index_b, offs_t, 1, head, T, n, dk, stride_t,
                            stride_h, stride_p, DK_PAD, True))
    return scores, index_a, index_b


@triton.jit
def store_picks(scores, index_a, index_b, scores_ptr, ids_ptr, gates_ptr, offs_t, head, T, heads, n, k,
                id_head_offset, K_PAD: tl.constexpr, GATING: tl.constexpr):
    """Writes one head's picks of a token tile into (T, heads, k): scores, ids a*n + b +
    head*id_head_offset, and gates (unless GATING_NONE)."""
    offs_k = tl.arange(0, K_PAD)
    out = (offs_t[:, None].to(tl.int64) * heads + head) * k + offs_k[None, :]
    mask = (offs_t[:, None] < T) & (offs_k[None, :] < k)
    tl.store(scores_ptr + out, scores, mask=mask)
    ids = index_a.to(tl.int64) * n + index_b + (head * id_head_offset).to(tl.int64)
    tl.store(ids_ptr + out, ids, mask=mask)
    if GATING != GATING_NONE:
        tl.store(gates_ptr + out, apply_gating(scores, offs_k[None, :] < k, GATING), mask=mask)


@triton.jit
def product_key_topk_kernel(
    queries_ptr,      # (T, heads, 2, dk), strides (stride_t, stride_h, stride_p, 1)
    keys_ptr,         # (heads or 1, n, 2, dk) contiguous; key_head_stride = 0 when shared
    pairs_ptr,        # (2, P_PAD) int32: ranks (a, b) of the admissible pairs, -1 = padding
    scores_ptr,       # (T, heads, k) fp32, or fp64 when EXACT
    ids_ptr,          # (T, heads, k) int64: a*n + b + head*id_head_offset
    gates_ptr,        # (T, heads, k) like scores; untouched when GATING == 0
    T, heads, n, dk, k, stride_t, stride_h, stride_p, key_head_stride, id_head_offset,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, KS_PAD: tl.constexpr,
    P_PAD: tl.constexpr, K_PAD: tl.constexpr, GATING: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr,
    LEVEL_SELECT: tl.constexpr, EXACT: tl.constexpr,
):
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    scores, index_a, index_b = retrieve_tile(
        queries_ptr, keys_ptr, pairs_ptr, offs_t, head, T, n, dk,
        stride_t, stride_h, stride_p, key_head_stride,
        BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, P_PAD, K_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS, LEVEL_SELECT, EXACT)
    store_picks(scores, index_a, index_b, scores_ptr, ids_ptr, gates_ptr, offs_t, head, T, heads, n, k,
                id_head_offset, K_PAD, GATING)


# ---- decode: the key rows split over programs ----------------------------------------------------------
# For few tokens the token-tile grid above has one program per head, each streaming all n key rows of
# both halves alone. Split instead, as flash-decoding splits a KV cache: key_slice_topk_kernel gives
# each (token tile, head, half, slice of key rows) a program that writes its slice's top KS_PAD
# selection keys, and merge_key_slices_kernel merges a head's slice lists per half into the top
# KS_PAD of the whole half, then finishes as the token-tile kernel does (exact re-scoring of int32
# keys, combine, gating). The keys are distinct and totally ordered (score image, then index), so
# the top KS_PAD of the slices' top KS_PAD lists is the whole half's, whatever the split: the picks
# are the token-tile kernel's.

@triton.jit
def key_slice_topk_kernel(
    queries_ptr,      # (T, heads, 2, dk), strides (stride_t, stride_h, stride_p, 1)
    keys_ptr,         # (heads or 1, n, 2, dk) contiguous; key_head_stride = 0 when shared
    lists_ptr,        # (T, heads, 2, slices, KS_PAD) out: int32 selection keys when INDEX_BITS, else int64
    T, n, dk, stride_t, stride_h, stride_p, key_head_stride, slice_rows, slices,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, KS_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_BITS: tl.constexpr,
):
    """Grid (token tiles, heads * 2, slices): the top KS_PAD selection keys (streaming_topk) of key
    rows [slice * slice_rows, (slice + 1) * slice_rows) of one head's half, descending."""
    head_half = tl.program_id(1)
    head = head_half // 2
    half = head_half % 2
    key_slice = tl.program_id(2)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    q = query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p, DK_PAD, UPCAST_DOT)
    first = key_slice * slice_rows
    best = streaming_topk(q, keys_ptr + head * key_head_stride + half * dk, first, tl.minimum(first + slice_rows, n),
                          dk, BLOCK_T, BLOCK_N, DK_PAD, KS_PAD, INPUT_PRECISION, UPCAST_DOT, INDEX_BITS)
    lists = ((offs_t.to(tl.int64) * tl.num_programs(1) + head_half) * slices + key_slice) * KS_PAD
    tl.store(lists_ptr + lists[:, None] + tl.arange(0, KS_PAD)[None, :], best, mask=(offs_t < T)[:, None])


@triton.jit
def _merged_half(lists_ptr, offs_t, head_half, heads, slices, T, KS_PAD: tl.constexpr):
    """The top KS_PAD of a head's half over its slices' lists (key_slice_topk_kernel), descending,
    merged slice by slice in registers. Rows past T hold the first list's load padding."""
    lists = (offs_t.to(tl.int64) * (2 * heads) + head_half) * slices * KS_PAD
    offs = lists[:, None] + tl.arange(0, KS_PAD)[None, :]
    mask = (offs_t < T)[:, None]
    best = tl.load(lists_ptr + offs, mask=mask, other=0)
    for key_slice in range(1, slices):
        best = merge_lists(best, tl.load(lists_ptr + offs + key_slice * KS_PAD, mask=mask, other=0))
    return best


@triton.jit
def merge_key_slices_kernel(
    queries_ptr,      # (T, heads, 2, dk), strides (stride_t, stride_h, stride_p, 1)
    keys_ptr,         # (heads or 1, n, 2, dk) contiguous; key_head_stride = 0 when shared
    lists_ptr,        # (T, heads, 2, slices, KS_PAD): key_slice_topk_kernel's lists
    pairs_ptr,        # (2, P_PAD) int32: ranks (a, b) of the admissible pairs, -1 = padding
    scores_ptr,       # (T, heads, k) fp32, or fp64 when EXACT
    ids_ptr,          # (T, heads, k) int64: a*n + b + head*id_head_offset
    gates_ptr,        # (T, heads, k) like scores; untouched when GATING == 0
    T, heads, n, dk, k, stride_t, stride_h, stride_p, key_head_stride, id_head_offset, slices,
    BLOCK_T: tl.constexpr, DK_PAD: tl.constexpr, KS_PAD: tl.constexpr, P_PAD: tl.constexpr,
    K_PAD: tl.constexpr, GATING: tl.constexpr, INDEX_BITS: tl.constexpr, EXACT: tl.constexpr,
):
    """Grid (token tiles, heads): each half's slice lists merged (_merged_half) and made exact
    (exact_list), then the combine, gating and stores of product_key_topk_kernel."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    keys_head = keys_ptr + head * key_head_stride
    best_a = exact_list(_merged_half(lists_ptr, offs_t, 2 * head, heads, slices, T, KS_PAD), queries_ptr,
                        keys_head, offs_t, 0, head, T, n, dk, stride_t, stride_h, stride_p, DK_PAD, KS_PAD,
                        INDEX_BITS)
    best_b = exact_list(_merged_half(lists_ptr, offs_t, 2 * head + 1, heads, slices, T, KS_PAD), queries_ptr,
                        keys_head + dk, offs_t, 1, head, T, n, dk, stride_t, stride_h, stride_p, DK_PAD, KS_PAD,
                        INDEX_BITS)
    scores, index_a, index_b = picks_of_halves(best_a, best_b, queries_ptr, keys_head, pairs_ptr, offs_t, head, T, n,
                                               dk, stride_t, stride_h, stride_p, BLOCK_T, DK_PAD, P_PAD, K_PAD, EXACT)
    store_picks(scores, index_a, index_b, scores_ptr, ids_ptr, gates_ptr, offs_t, head, T, heads, n, k,
                id_head_offset, K_PAD, GATING)


@triton.jit
def product_key_topk_backward_kernel(
    queries_ptr,      # (T, heads, 2, dk), strides (stride_t, stride_h, stride_p, 1)
    keys_ptr,         # (heads or 1, n, 2, dk) contiguous
    ids_ptr,          # (T, heads, k) int64, as written by the forward (with its head offset)
    scores_ptr,       # (T, heads, k) forward scores (read for relu gating)
    gates_ptr,        # (T, heads, k) forward gates (read when GATING != 0)
    dscores_ptr,      # (T, heads, k) or a dummy when HAS_DSCORES is False
    dgates_ptr,       # (T, heads, k) or a dummy when GATING == 0
    dqueries_ptr,     # (T, heads, 2, dk) contiguous out, fp32 (fp64 for fp64 inputs): the accumulation dtype
    dkeys_ptr,        # (heads or 1, n, 2, dk) like dqueries, zero-initialised
    T, heads, n, dk, k, stride_t, stride_h, stride_p, key_head_stride, id_head_offset,
    BLOCK_T: tl.constexpr, DK_PAD: tl.constexpr, K_PAD: tl.constexpr,
    GATING: tl.constexpr, HAS_DSCORES: tl.constexpr,
):
    """dscores = dscores_in + gating'(dgates); then, along the picks, dq += ds * key row and
    dkeys[row] += ds * q (fp32/fp64 atomics: many tokens pick the same sub-key)."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    offs_d = tl.arange(0, DK_PAD)
    t_valid = offs_t < T
    col_valid = offs_k[None, :] < k
    mask = t_valid[:, None] & col_valid
    out = (offs_t[:, None].to(tl.int64) * heads + head) * k + offs_k[None, :]
    ids = tl.load(ids_ptr + out, mask=mask, other=0) - head.to(tl.int64) * id_head_offset
    ids = tl.where(mask, ids, 0)
    dscores = tl.zeros((BLOCK_T, K_PAD), dtype=dqueries_ptr.dtype.element_ty)
    if HAS_DSCORES:
        dscores += tl.load(dscores_ptr + out, mask=mask, other=0.0)
    if GATING != GATING_NONE:
        gates = tl.load(gates_ptr + out, mask=mask, other=0.0)
        scores = tl.load(scores_ptr + out, mask=mask, other=0.0)
        dgates = tl.load(dgates_ptr + out, mask=mask, other=0.0)
        dscores += gating_backward(dgates, gates, scores, col_valid, GATING)
    dscores = tl.where(mask, dscores, 0.0)
    keys_head = keys_ptr + head * key_head_stride
    dkeys_head = dkeys_ptr + head * key_head_stride
    d_mask = t_valid[:, None] & (offs_d[None, :] < dk)
    for half in tl.static_range(2):
        q = load_query_half(queries_ptr, offs_t, half, head, T, dk, stride_t, stride_h, stride_p,
                            0, DK_PAD).to(dscores.dtype)
        if half == 0:
            sub = ids // n
        else:
            sub = ids % n
        dq = tl.zeros((BLOCK_T, DK_PAD), dtype=dscores.dtype)
        for j in range(k):
            pick = offs_k[None, :] == j
            ds_j = tl.sum(tl.where(pick, dscores, 0.0), axis=1)
            row = tl.sum(tl.where(pick, sub, 0), axis=1) * 2 + half
            key_offs = row[:, None] * dk + offs_d[None, :]
            key_rows = tl.load(keys_head + key_offs, mask=d_mask, other=0.0).to(dscores.dtype)
            dq += ds_j[:, None] * key_rows
            # relaxed: only the sum matters, not ordering against other memory
            tl.atomic_add(dkeys_head + key_offs, ds_j[:, None] * q, mask=d_mask, sem="relaxed")
        q_row = (offs_t.to(tl.int64) * heads + head) * 2 + half
        tl.store(dqueries_ptr + q_row[:, None] * dk + offs_d[None, :], dq, mask=d_mask)
