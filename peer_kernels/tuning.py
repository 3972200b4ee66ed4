"""Every tile choice of the Triton launchers, in one place: one table per architecture (sm_90,
sm_80, and a fallback for other GPUs and the interpreter) and the pickers that read it.

The launchers (peer_kernels/ops) ask the pickers here and nothing else chooses a block size or a
warp count. The tables hold what a GPU run can re-tune; the pickers hold the rules that make a
config valid (powers of two, tl.dot's 16-wide minimum, register budgets). The numbers come from the
compiled SASS of the kernels at the paper's shapes (tests/test_*.py assert the register, spill and
instruction counts that justify them, per Triton version); none has been timed on a GPU yet.

`overrides(**fields)` replaces table fields for a block of code (the benchmark's variants and tile
sweeps use it), e.g. `with tuning.overrides(level_select=False): ...`.
"""
import contextlib
import dataclasses
import functools

import torch

from . import _device


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One architecture's tile choices (see the pickers below for what each one sizes)."""
    # retrieval (kernels/retrieval.py): tokens per program share each key tile read. With int32
    # selection keys (16-bit inputs) 64 tokens; with int64 keys (fp32 inputs) 32, since 64 tokens
    # x 64 keys of int64 spill on sm_90 (thousands of STL under triton 3.6 and 3.9, 120 with 32-key
    # tiles), while 32 x 64 at 8 warps compiles without spills on sm_80 and sm_90 under both
    retrieval_tokens: int = 64
    retrieval_tokens_int64: int = 32
    # key rows per tile: with int32 selection keys, with int64 keys
    key_tile_int32: int = 64
    key_tile_int64: int = 64
    # shared memory one program may use, in bytes (the device's opt-in maximum per block); the
    # key tile shrinks, then the pipeline, then the token tile, until the retrieval fits it
    shared_bytes: int = 166912
    # sm_90's 16-bit tl.dot (wgmma) reads its operands from shared memory: the compiled retrieval
    # keeps num_stages key tiles there (at least 2), where sm_80 and fp32 keep num_stages - 1
    shared_dot_operands: bool = False
    # level selection (kernels/retrieval.level_topk) where it applies (use_level_select)
    level_select: bool = True
    # one-pass kernel (kernels/fused.py): tokens per program, warps, key tile
    one_pass_tokens: int = 32
    one_pass_warps: int = 8
    one_pass_key_tile: int = 64
    # expert gather (kernels/experts.py): fp32 values of a 4-warp (tokens, slots, columns) row tile
    gather_values: int = 8192
    # table-gradient segmented reduction: fp32 values per window, programs per SM per column block
    table_grad_values: int = 2048
    table_grad_programs_per_sm: int = 4
    # its combine of the parts of runs that span chunks: columns per program (narrow, so that the
    # few chunk-order scans of a paper-shape gradient, d / columns of them, spread over the SMs)
    table_grad_combine_columns: int = 32
    # retrieval backward: tokens per program
    retrieval_backward_tokens: int = 16
    # row-sparse optimizers: columns per program
    optim_columns: int = 1024
    # decode (few tokens per step): up to this many tokens the retrieval splits the key rows over
    # programs and the expert stage one token's rows (token_schedule). The estimate, not yet timed:
    # the token-tile expert grid has one program per token at h*k >= 64 slots, each walking its rows
    # one column block after another; with fewer than about two such programs per SM the SMs keep
    # too few row loads in flight (issue 15: >= 32 KB per SM), while the decode grid has them all
    # in flight at once and pays for it with its partial sums (at the paper's shapes in bf16, 32 KB
    # written and read per token beside 512 KB of rows).
    # The token-tile retrieval leaves SMs idle longer still (a program per 64 tokens and head).
    decode_tokens: int = 192
    # decode expert kernels: the largest (slots, columns) row tile of a program, in values
    decode_gather_values: int = 4096


SM80 = Tiles()
# sm_90: 128-key tiles with int32 keys spend fewer instructions per score than 64 (sm_80 spills at
# 128 under triton 3.6), and make level selection applicable; 132 SMs take 256 decode tokens at
# two per SM (sm_80's 108, 192 at 1.8).
SM90 = dataclasses.replace(SM80, key_tile_int32=128, decode_tokens=256, shared_bytes=232448,
                           shared_dot_operands=True)
# Other GPUs, the interpreter and the C++ backend on a CPU (whose tensors have no CUDA arch): at
# most 8 tokens decode, which the interpreter's tests straddle; on 2 CPU cores the C++ direct sub-key
# scan ran as fast as its matmuls at about 8 tokens (1 thread, fp32, the paper's shapes).
# Their shared memory: sm_86 / sm_89's 99 KB.
FALLBACK = dataclasses.replace(SM80, decode_tokens=8, shared_bytes=101376)
TABLES = {"sm_90": SM90, "sm_80": SM80, "fallback": FALLBACK}

# The retrieval's shared memory beside its key and query tiles (the selection's layout conversions):
# at most 8 KB in the compiled kernels (triton 3.6 and 3.9; tests/test_retrieval.py compiles them).
SELECTION_SCRATCH_BYTES = 8192

# The (tokens, keys, dk) terms of an fp32 key tile's scores one retrieval program may hold: 32 x 64
# x 128 (1024 a thread at 8 warps) compiles without spills on sm_80 and sm_90 under triton 3.6 and
# 3.9, while 32 x 32 x 512 spills on sm_90 under 3.6 (tests/test_retrieval.py compiles both widths).
FMA_DOT_VALUES = 1 << 18

# The interpreter (whose sorts cost Python time per element) and float64 get small tiles whatever
# the architecture: 16 tokens and 16 keys, tl.dot's minimum.
SMALL_TILE = 16
# The interpreter sizes its decode grids as for a GPU with this many SMs: enough that the tests'
# small shapes split into several key slices and row blocks, as large ones do on a GPU.
INTERPRETED_SMS = 8

_OVERRIDES = {}


def table_name(arch):
    """The table of a CUDA architecture (see _device.cuda_arch; 0 off CUDA)."""
    return "sm_90" if arch >= 90 else "sm_80" if arch >= 80 else "fallback"


def tiles(arch):
    """The tile table for `arch`, with any overrides() in force."""
    table = TABLES[table_name(arch)]
    return dataclasses.replace(table, **_OVERRIDES) if _OVERRIDES else table


@contextlib.contextmanager
def overrides(**fields):
    """Replaces these fields of every table until the block ends (unknown names raise)."""
    for name in fields:
        if name not in Tiles.__dataclass_fields__:
            raise TypeError(f"overrides: Tiles has no field {name!r}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(fields)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def next_power_of_2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a, b):
    return -(-a // b)


def previous_power_of_2(x):
    return 1 << max(0, int(x).bit_length() - 1)


def _pow2(x, minimum):
    return max(minimum, next_power_of_2(x))


# ---- retrieval -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def admissible_pairs(k, k_sub):
    """Ranks (i, j) of the candidate pairs that can reach the top k (kernels/retrieval.py: pair (i,
    j) is beaten by the (i+1)(j+1) - 1 pairs of lower ranks in both halves), in lexicographic
    order: (i+1)*(j+1) <= k, i, j < k_sub."""
    return tuple((i, j) for i in range(k_sub) for j in range(k_sub) if (i + 1) * (j + 1) <= k)


# int32 selection keys for 16-bit inputs keep 32 - INDEX_BITS bits of the score's image: at this
# many sub-keys per half (12 index bits) that is 11 mantissa bits, no fewer than fp16's inputs have.
MAX_N_INT32_KEYS = 4096


def select_index_bits(n, dtype):
    """INDEX_BITS of kernels/retrieval.half_topk: 0 selects on exact int64 keys (fp32 / fp64
    inputs, or more than MAX_N_INT32_KEYS sub-keys); else the bits of the int32 key's index field."""
    if dtype in (torch.float16, torch.bfloat16) and n <= MAX_N_INT32_KEYS:
        return max(1, (n - 1).bit_length())
    return 0


# level_topk keeps 3 keys per column of the key tile and re-runs the sorting network for a token
# tile in which some row's column held 4 of the row's top k': per row about C(k', 4) / BLOCK_N**3
# on independent scores, 9e-4 at k' = 16 and 128-key tiles (~5% of 64-token tiles), but 0.017 at
# k' = 32 and 0.007 at k' = 16 with 64-key tiles.
MAX_LEVEL_SELECT_K_SUB = 16


def use_level_select(*, n, ks_pad, block_n, index_bits):
    """Whether the retrieval selects by level_topk: int32 keys (index_bits), k' <= 16, and 128-key
    tiles (where 3 levels rarely fall back) or at most 3 key tiles, which no column can overflow
    (small n, and the interpreter's 16-key tiles)."""
    return bool(index_bits) and ks_pad <= MAX_LEVEL_SELECT_K_SUB and (block_n >= 128 or n <= 3 * block_n)


def retrieval_config(*, n, dk, k, k_sub, dtype, arch, interpreted=_device.INTERPRETED, one_pass=False):
    """(constexprs, launch options) of the retrieval kernel, or of the one-pass kernel's retrieval
    part (one_pass=True: its own token tile and key tile, and no level selection, whose 3 levels of
    keys on top of the gather's state spill). dtype: the queries' (and keys') dtype.

    tl.dot needs every tile dim >= 16; tl.topk / tl.sort need powers of two (>= 2: a length-1
    top-k is a different code path in older Triton). BLOCK_N: each key tile's top k' is merged into
    a running list, so wider tiles spend fewer instructions per score.
    """
    table = tiles(arch)
    ks_pad = _pow2(k_sub, 2)
    k_pad = _pow2(k, 2)
    dk_pad = _pow2(dk, 16)
    index_bits = select_index_bits(n, dtype)
    small = interpreted or dtype == torch.float64
    if small:
        block_t, block_n = SMALL_TILE, max(ks_pad, SMALL_TILE)
    else:
        if one_pass:
            block_t, wide = table.one_pass_tokens, table.one_pass_key_tile
        elif index_bits:
            block_t, wide = table.retrieval_tokens, table.key_tile_int32
        else:
            block_t, wide = table.retrieval_tokens_int64, table.key_tile_int64
        block_n = max(ks_pad, 16, min(wide, _pow2(n, 16)))
    if dtype == torch.float32 and not small:
        # fp32 scores are FMA dot products (ieee, not tf32) whose (tokens, keys, dk) terms are live
        # in registers: past FMA_DOT_VALUES sm_90 spills thousands of values under triton 3.6
        while block_t * block_n * dk_pad > FMA_DOT_VALUES and block_n > max(ks_pad, 16):
            block_n //= 2
        while block_t * block_n * dk_pad > FMA_DOT_VALUES and block_t > SMALL_TILE:
            block_t //= 2
    row_bytes, key_bytes = dk_pad * dtype.itemsize, 4 if index_bits else 8

    # the bytes of the key tiles in flight, the query tile and the selection's scratch
    def shared_bytes(block_t, block_n, num_stages):
        if table.shared_dot_operands and dtype.itemsize == 2:
            key_buffers = max(2, num_stages)
        else:
            key_buffers = max(1, num_stages - 1)
        return (key_buffers * block_n + block_t) * row_bytes + SELECTION_SCRATCH_BYTES

    # level selection holds 3 levels of key tiles and pipelines 2 key tiles, not 3 (at 3 it spills);
    # a key tile that shrinks for shared memory below level selection's goes back to the network
    level_select = (table.level_select and not one_pass
                    and use_level_select(n=n, ks_pad=ks_pad, block_n=block_n, index_bits=index_bits))
    block_t, block_n, num_stages = fit_shared_memory(
        shared_bytes, block_t=block_t, block_n=block_n, num_stages=2 if level_select else 3,
        minimum_block_n=max(ks_pad, 16), budget=table.shared_bytes)
    if level_select and not use_level_select(n=n, ks_pad=ks_pad, block_n=block_n, index_bits=index_bits):
        level_select = False
        if shared_bytes(block_t, block_n, 3) <= table.shared_bytes:
            num_stages = 3
    constexprs = dict(
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        DK_PAD=dk_pad,
        KS_PAD=ks_pad,
        P_PAD=_pow2(len(admissible_pairs(k, k_sub)), k_pad),
        K_PAD=k_pad,
        INPUT_PRECISION="ieee",  # fp32 scores must match the reference, not be tf32-rounded
        # the interpreter's 16-bit tl.dot is wrong (triton 3.9): feed it fp32 operands (exact products)
        UPCAST_DOT=interpreted and dtype in (torch.float16, torch.bfloat16),
        INDEX_BITS=index_bits,
        LEVEL_SELECT=level_select,
        EXACT=dtype == torch.float64,
    )
    # 8 warps where the (tokens, keys) selection keys take 16 KB or more (64 x 64 int32, 32 x 64
    # int64), or the query tile 32 KB (wide keys: at 4 warps it alone takes 64 registers a thread)
    wide_state = block_t * block_n * key_bytes >= 16384 or block_t * row_bytes >= 32768
    launch = dict(num_warps=8 if wide_state else 4, num_stages=num_stages)
    return constexprs, launch


def fit_shared_memory(shared_bytes, *, block_t, block_n, num_stages, minimum_block_n, budget):
    """(block_t, block_n, num_stages) whose shared_bytes(block_t, block_n, num_stages) is within
    `budget`: the key tile halves first (down to minimum_block_n), then the pipeline drops to one
    tile in flight, then the token tile halves (down to 16, tl.dot's minimum). Wide fp32 keys (dk
    of 256 and more) need it."""
    while shared_bytes(block_t, block_n, num_stages) > budget and block_n > minimum_block_n:
        block_n //= 2
    if shared_bytes(block_t, block_n, num_stages) > budget:
        num_stages = 2
    while shared_bytes(block_t, block_n, num_stages) > budget and block_t > SMALL_TILE:
        block_t //= 2
    return block_t, block_n, num_stages


def retrieval_backward_config(*, dk, k, arch):
    """(constexprs, launch options) of the retrieval backward: a token tile x dk per step keeps the
    gathered key rows and the dq accumulator in registers; one step per pick bounds the live state."""
    block_t = tiles(arch).retrieval_backward_tokens
    return dict(BLOCK_T=block_t, DK_PAD=_pow2(dk, 16), K_PAD=_pow2(k, 2)), dict(num_warps=4)


# ---- experts ---------------------------------------------------------------------------------------

def gather_tile(*, num_tokens, slots, dim, acc_dtype, arch, atomic=False, whole_sm=False):
    """(BLOCK_T, BLOCK_S, BLOCK_D, num_warps) for kernels that gather `slots` table rows per token.

    A program covers BLOCK_T tokens x all their slots, so every row is loaded once; BLOCK_T grows
    only when h*k is small, to keep >= 64 rows per program. The (BLOCK_T, BLOCK_S, BLOCK_D) row
    tile holds up to gather_values fp32 values at 4 warps: eight 128-bit loads in flight per thread
    for 16-bit tables. fp64 halves it, and atomics (one 64-bit address per 4 values, live until the
    atomic issues) quarter it, so that nothing spills. whole_sm=True: four times the tile at 16
    warps, the same values per thread, for a persistent grid that takes whole SMs (the overlapped
    forward).
    """
    scale = 4 if whole_sm else 1
    budget = scale * tiles(arch).gather_values * 4 // acc_dtype.itemsize // (4 if atomic else 1)
    block_s = next_power_of_2(slots)
    block_t = min(next_power_of_2(num_tokens), max(1, 64 // block_s))
    block_d = min(next_power_of_2(dim), max(16, budget // (block_t * block_s)))
    num_warps = min(16, scale * max(4, block_t * block_s * block_d // budget * 4))
    return block_t, block_s, block_d, num_warps


def table_grad_tile(*, dim, slots, device):
    """(BLOCK_N, BLOCK_D, chunk, num_warps) of kernels/experts.table_grad_kernel: windows of
    BLOCK_N sorted slots x BLOCK_D columns (the segmented scan's working set, 16 values per thread
    at 4 warps), and chunks of sorted positions per program: table_grad_programs_per_sm programs
    per SM per column block on a GPU, a few windows per chunk elsewhere."""
    table = tiles(_device.cuda_arch(device))
    block_d = min(next_power_of_2(dim), 256)
    block_n = max(2, table.table_grad_values // block_d)
    sms = _device.sm_count(device) if device.type == "cuda" else 1
    programs = table.table_grad_programs_per_sm * sms
    chunk = max(block_n, cdiv(cdiv(slots, programs), block_n) * block_n)
    return block_n, block_d, chunk, 4


def table_grad_combine_tile(*, dim, device):
    """(BLOCK_C, BLOCK_D, num_warps) of kernels/experts.table_grad_combine_kernel: windows of BLOCK_C
    chunks x BLOCK_D columns, table_grad_values of them (16 per thread at 4 warps, as the main
    kernel's): at the paper's shapes (about 4 programs per SM, so a few hundred chunks) a handful of
    windows per program."""
    table = tiles(_device.cuda_arch(device))
    block_d = min(next_power_of_2(dim), table.table_grad_combine_columns)
    return max(2, table.table_grad_values // block_d), block_d, 4


# ---- the fused op --------------------------------------------------------------------------------------

def one_pass_config(*, num_tokens, heads, d, n, dk, k, k_sub, dtype, arch, interpreted=_device.INTERPRETED):
    """(constexprs, launch options) of kernels/fused.peer_fused_kernel: the retrieval's tiles
    (retrieval_config(one_pass=True)) and the expert gather's (gather_tile), whose token count
    MIX_T must divide the retrieval tile. dtype: the queries' dtype, which sets the accumulation
    dtype too (float64 mixes with no other, so x accumulates alike)."""
    config, launch = retrieval_config(n=n, dk=dk, k=k, k_sub=k_sub, dtype=dtype, arch=arch, interpreted=interpreted,
                                      one_pass=True)
    mix_t, block_s, block_d, _ = gather_tile(num_tokens=num_tokens, slots=heads * k, dim=d,
                                             acc_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                             arch=arch)
    config.update(MIX_T=min(mix_t, config["BLOCK_T"]), BLOCK_S=block_s, BLOCK_D=block_d)
    return config, dict(launch, num_warps=tiles(arch).one_pass_warps)


def overlap_schedule(*, heads, block_t, sms):
    """(tokens per chunk, expert programs) of the overlapped forward on `sms` SMs.

    The SMs are split in space, not by dispatch order: the persistent expert kernel takes half of
    them, one 16-warp CTA each (too many registers for two), and a chunk's retrieval grid, block_t
    tokens x one head per program and one program per SM, fits the other half. Each stream runs its
    kernels in order, so at any time one retrieval and one expert kernel run, and together they fit
    the device whichever the block scheduler starts first."""
    programs = max(1, sms // 2)
    return block_t * max(1, (sms - programs) // heads), programs


# ---- decode --------------------------------------------------------------------------------------------

def token_schedule(*, num_tokens, arch):
    """The grids the retrieval and expert launchers use for `num_tokens` tokens: "decode" (key rows,
    or one token's rows, split over programs) for at most the table's decode_tokens, else
    "token_tiles" (programs over tiles of tokens)."""
    return "decode" if num_tokens <= tiles(arch).decode_tokens else "token_tiles"


def decode_sms(device):
    """The SMs the decode grids are sized for: the device's, or INTERPRETED_SMS off a GPU."""
    return _device.sm_count(device) if device.type == "cuda" else INTERPRETED_SMS


def key_slices(*, num_tokens, heads, n, block_t, block_n, ks_pad, sms):
    """(BLOCK_N, rows per slice, slices) of kernels/retrieval.key_slice_topk_kernel, whose grid is
    token tiles (block_t tokens) x heads x 2 halves x slices: the fewest slices of a half's n key
    rows that give the grid >= `sms` programs, each slice whole key tiles of BLOCK_N rows, the
    token-tile kernel's block_n or, where slices are shorter, a smaller power of two (no less than
    the list's ks_pad and tl.dot's 16)."""
    rows = max(1, n // cdiv(sms, cdiv(num_tokens, block_t) * heads * 2))
    block_n = max(ks_pad, 16, min(block_n, previous_power_of_2(rows)))
    slice_rows = max(block_n, rows // block_n * block_n)
    return block_n, slice_rows, cdiv(n, slice_rows)


def decode_gather_tile(*, num_tokens, slots, dim, itemsize, arch, sms):
    """(BLOCK_S, BLOCK_D, num_warps) of the decode expert kernels (kernels/experts.py), whose grid
    has a program per (token, BLOCK_S slots, BLOCK_D columns) and which load their whole row tile at
    once. BLOCK_D spans 128 bytes of a row (a whole line: four 32-byte sectors); BLOCK_S is the
    largest power of two (the tile at most decode_gather_values) that leaves >= `sms` programs, so
    that at one token every SM has rows to load; the warps are as many as give each thread one
    16-byte load per table (1 to 4; at 4 a thread loads more)."""
    block_d = min(next_power_of_2(dim), max(1, 128 // itemsize))
    block_s = min(next_power_of_2(slots), max(1, tiles(arch).decode_gather_values // block_d))
    while block_s > 1 and num_tokens * cdiv(slots, block_s) * cdiv(dim, block_d) < sms:
        block_s //= 2
    return block_s, block_d, min(4, max(1, block_s * block_d * itemsize // (16 * 32)))


def sum_parts_tile(*, parts, width):
    """(PARTS_PAD, BLOCK_W, num_warps) of kernels/experts.sum_parts_kernel: all `parts` shares of
    BLOCK_W columns per 4-warp program, about 2048 values."""
    parts_pad = next_power_of_2(parts)
    return parts_pad, min(next_power_of_2(width), max(16, 2048 // parts_pad)), 4


# ---- optimizers ------------------------------------------------------------------------------------------

def optim_block(*, dim, arch):
    """(BLOCK_D, num_warps) of the row-sparse optimizer kernels: one program per (row, column block)."""
    return min(next_power_of_2(dim), tiles(arch).optim_columns), 4
