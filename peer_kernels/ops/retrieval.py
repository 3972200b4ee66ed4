"""Product-key retrieval as a torch.library op: launchers, autograd and the public function.

`product_key_topk(queries, keys, k, k_sub=None) -> (scores, ids)` has the reference's signature
and semantics (peer_kernels.reference.product_key_topk). `retrieve(...)` is the internal variant the
fused op uses: it also applies the gating in the kernel's epilogue and offsets each head's ids.

Ties (SPEC leaves them to the implementation; this is ours, deterministic): each half keeps its
top k' sub-keys ranked by (score desc, sub-key index asc); the k'*k' candidates are ranked by
(s1 + s2 desc, rank of a asc, rank of b asc). Scores are computed in fp32 (tl.dot, fp32
accumulation) and returned in fp32; float64 inputs are selected on fp32-rounded scores and their
returned scores recomputed exactly in float64 (gradcheck), so near-ties within fp32 rounding may
come out in a different order than a float64 sort would give. bf16/fp16 inputs with n <=
MAX_N_INT32_KEYS rank each half on int32 keys, i.e. on scores floored to 32 - INDEX_BITS bits of
their fp32 image (kernels/retrieval.py), then re-rank the k' survivors on exact fp32 scores: a
half's pick can differ from the exact one only among scores within that floor (2**-13 relative at
n = 1024), and the scores returned are always the exact scores of the ids returned.

Backward: a Triton kernel, one program per (token tile, head). dqueries is token-major and
written once; dkeys is accumulated with fp32 (fp64) atomics: the n sub-keys of a half receive
T*h*k updates in all (2M at the paper's shapes, for 1024 rows per head), and a sort-based
reduction would cost more than the retrieval itself. Hence dkeys is not bitwise reproducible.
Plain gather/index_add in PyTorch would materialise (T, h, k, dk) temporaries (0.5 GB fp32 at the
paper shapes), which the fused layer's memory budget cannot afford.
"""
import functools
from typing import Optional

import torch
import triton

from .. import _checks, _library
from ..kernels import retrieval as kernels
from . import _launch

# Under TRITON_INTERPRET=1 (read when triton defines the kernels) @triton.jit gives no JITFunction.
INTERPRETED = not isinstance(kernels.product_key_topk_kernel, triton.runtime.JITFunction)

GATING_CODES = {"none": kernels.GATING_NONE.value, "softmax": kernels.GATING_SOFTMAX.value,
                "sigmoid": kernels.GATING_SIGMOID.value, "relu": kernels.GATING_RELU.value}


def _pow2(x, minimum):
    return max(minimum, triton.next_power_of_2(x))


@functools.lru_cache(maxsize=None)
def admissible_pairs(k, k_sub):
    """Ranks (i, j) of the candidate pairs that can reach the top k (see kernels/retrieval.py),
    in lexicographic order: (i+1)*(j+1) <= k, i, j < k_sub."""
    return tuple((i, j) for i in range(k_sub) for j in range(k_sub) if (i + 1) * (j + 1) <= k)


_PAIR_TABLES = {}


def pair_table(k, k_sub, p_pad, device):
    """(2, p_pad) int32 device tensor of admissible pair ranks, -1 padded; cached per device."""
    key = (k, k_sub, p_pad, str(device))
    if key not in _PAIR_TABLES:
        table = torch.full((2, p_pad), -1, dtype=torch.int32)
        pairs = admissible_pairs(k, k_sub)
        table[:, :len(pairs)] = torch.tensor(pairs, dtype=torch.int32).T
        _PAIR_TABLES[key] = table.to(device)
    return _PAIR_TABLES[key]


# int32 selection keys for 16-bit inputs keep 32 - INDEX_BITS bits of the score's image: at this
# many sub-keys per half (12 index bits) that is 11 mantissa bits, no fewer than fp16's inputs have.
MAX_N_INT32_KEYS = 4096


def select_index_bits(n, dtype):
    """INDEX_BITS of kernels/retrieval.half_topk: 0 selects on exact int64 keys (fp32 / fp64
    inputs, or more than MAX_N_INT32_KEYS sub-keys); else the bits of the int32 key's index field."""
    if dtype in (torch.float16, torch.bfloat16) and n <= MAX_N_INT32_KEYS:
        return max(1, (n - 1).bit_length())
    return 0


# level_topk (kernels/retrieval.py) keeps 3 keys per column of the key tile and re-runs the sorting
# network for a token tile in which some row's column held 4 of the row's top k': per row about
# C(k', 4) / BLOCK_N**3 on independent scores, 9e-4 at k' = 16 and 128-key tiles (~5% of 64-token
# tiles), but 0.017 at k' = 32 and 0.007 at k' = 16 with 64-key tiles.
MAX_LEVEL_SELECT_K_SUB = 16


def use_level_select(n, ks_pad, block_n, index_bits):
    """Whether the retrieval selects by level_topk: int32 keys (index_bits), k' <= 16, and 128-key
    tiles (sm_90's retrieval kernel; sm_80 takes 64, where 3 levels would fall back for a third of
    the token tiles and 4 levels spill) or at most 3 key tiles, which no
    column can overflow (small n, and the interpreter's 16-key tiles). On sm_90 at the paper's shapes
    its key-tile loop spends ~19-20 instructions per score against the network's 52-64 (triton
    3.9 / 3.6; tests/test_retrieval.py asserts it)."""
    return bool(index_bits) and ks_pad <= MAX_LEVEL_SELECT_K_SUB and (block_n >= 128 or n <= 3 * block_n)


def retrieval_config(n, dk, k, k_sub, dtype, arch, interpreted=INTERPRETED, block_t=64, max_block_n=128,
                     allow_level_select=True):
    """(constexprs, launch options) of the retrieval kernels: block sizes, padded extents, num_warps.

    tl.dot needs every tile dim >= 16; tl.topk/tl.sort need powers of two (>= 2: a length-1 top-k
    is a different code path in older Triton). On a GPU, block_t = 64 tokens share each key tile
    read (the keys are re-read once per token tile) and 8 warps hold the packed (64, BLOCK_N) key
    tiles in registers without spilling at the paper's shapes (tests/test_retrieval.py checks the
    SASS); 16 tokens take 4 warps. BLOCK_N: each tile's top-k' is merged into the running list,
    so wider tiles spend fewer instructions per score: on sm_90 (arch, see _launch.cuda_arch) 128
    keys take 12-16% fewer than 64 at the paper's shapes (SASS of triton 3.6 / 3.9, int32 keys);
    on sm_80 they save 0-7% and spill under triton 3.6, so sm_80 keeps 64, as do int64 keys. A key tile stays within 16K elements so that the pipelined key tiles and the
    queries fit an A100's shared memory at dk=512. The interpreter, whose sorts cost Python time
    per element, and float64 get 16 tokens and 16 keys per tile.

    LEVEL_SELECT: see use_level_select; off without allow_level_select. Its kernel holds 3 levels
    of (64, 128) keys and pipelines 2 key tiles, not 3: at 3 it spills more outside the loop and its
    loop grows by ~0.4 instructions per score (sm_90 SASS, triton 3.6 / 3.9).
    """
    ks_pad = _pow2(k_sub, 2)
    k_pad = _pow2(k, 2)
    dk_pad = _pow2(dk, 16)
    index_bits = select_index_bits(n, dtype)
    small = interpreted or dtype == torch.float64
    block_t = 16 if small else block_t
    wide = max_block_n if index_bits and arch >= 90 else 64
    block_n = max(ks_pad, 16, 16 if small else min(wide, _pow2(n, 16), 16384 // dk_pad))
    level_select = allow_level_select and use_level_select(n, ks_pad, block_n, index_bits)
    return dict(
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        DK_PAD=dk_pad,
        KS_PAD=ks_pad,
        P_PAD=_pow2(len(admissible_pairs(k, k_sub)), k_pad),
        K_PAD=k_pad,
        INPUT_PRECISION="ieee",  # fp32 scores must match the reference, not be tf32-rounded
        UPCAST_DOT=interpreted and dtype in (torch.float16, torch.bfloat16),
        INDEX_BITS=index_bits,
        LEVEL_SELECT=level_select,
        EXACT=dtype == torch.float64,
    ), dict(num_warps=8 if block_t >= 64 else 4, num_stages=2 if level_select else 3)


def backward_config(dk, k):
    """Constexprs of the backward kernel: 16 tokens x dk per step keeps the gathered key rows and
    the dq accumulator in registers; one step per pick (k steps) bounds the live state."""
    return dict(BLOCK_T=16, DK_PAD=_pow2(dk, 16), K_PAD=_pow2(k, 2))


def key_head_stride(keys):
    """Elements between two heads' keys; 0 for keys shared by every head."""
    return keys.stride(0) if keys.shape[0] > 1 else 0


def query_strides(queries):
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    return queries, queries.stride()[:3]


def retrieve_outputs(queries, k, gating):
    """Unwritten scores (T, h, k) in the accumulation dtype, ids (T, h, k) int64, gates like scores
    (shape (0,) for gating "none")."""
    T, h = queries.shape[:2]
    acc = _checks.compute_dtype(queries.dtype)
    return (_library.empty((T, h, k), queries, acc), _library.empty((T, h, k), queries, torch.int64),
            _library.empty((T, h, k) if gating != "none" else (0,), queries, acc))


def launch_retrieve(queries, keys, k, k_sub, gating, id_head_offset, out=None):
    """scores (T, h, k) fp32/fp64 descending, ids (T, h, k) int64, gates (T, h, k) or (0,); into
    `out` = (scores, ids, gates), contiguous, when given."""
    T, h, _, dk = queries.shape
    n = keys.shape[1]
    scores, ids, gates = out if out is not None else retrieve_outputs(queries, k, gating)
    if T == 0:
        return scores, ids, gates
    queries, (stride_t, stride_h, stride_p) = query_strides(queries)
    keys = keys.contiguous()
    config, launch = retrieval_config(n, dk, k, k_sub, queries.dtype, _launch.cuda_arch(queries.device))
    pairs = pair_table(k, k_sub, config["P_PAD"], queries.device)
    grid = (triton.cdiv(T, config["BLOCK_T"]), h)
    kernels.product_key_topk_kernel[grid](
        queries, keys, pairs, scores, ids, gates if gating != "none" else scores,
        T, h, n, dk, k, stride_t, stride_h, stride_p, key_head_stride(keys), id_head_offset,
        GATING=GATING_CODES[gating], **launch, **config)
    return scores, ids, gates


def launch_retrieve_backward(dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset):
    """(dqueries, dkeys) in the inputs' dtypes; dscores / dgates may be None (no gradient)."""
    T, h, _, dk = queries.shape
    k = ids.shape[-1]
    acc = _checks.compute_dtype(queries.dtype)
    dkeys = torch.zeros(keys.shape, device=keys.device, dtype=acc)
    use_gates = dgates is not None and gating != "none"
    if T == 0 or (dscores is None and not use_gates):
        return _library.empty(queries.shape, queries).zero_(), dkeys.to(keys.dtype)
    dqueries = _library.empty((T, h, 2, dk), queries, acc)
    ids, scores, gates = ids.contiguous(), scores.contiguous(), gates.contiguous()
    queries, (stride_t, stride_h, stride_p) = query_strides(queries)
    keys = keys.contiguous()
    config = backward_config(dk, k)
    kernels.product_key_topk_backward_kernel[(triton.cdiv(T, config["BLOCK_T"]), h)](
        queries, keys, ids, scores, gates if use_gates else scores,
        dscores.contiguous() if dscores is not None else scores,  # unread stand-ins without HAS_*/GATING
        dgates.contiguous() if use_gates else scores, dqueries, dkeys,
        T, h, keys.shape[1], dk, k, stride_t, stride_h, stride_p, key_head_stride(keys), id_head_offset,
        GATING=GATING_CODES[gating if use_gates else "none"],
        HAS_DSCORES=dscores is not None, num_warps=4, **config)
    return dqueries.to(queries.dtype), dkeys.to(keys.dtype)


# ---- torch.library registration ------------------------------------------------------------------

@_library.custom_op("retrieve")
def _retrieve_op(queries: torch.Tensor, keys: torch.Tensor, k: int, k_sub: int, gating: str,
                 id_head_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _launch.check_launchable(queries, kernels.product_key_topk_kernel)
    return launch_retrieve(queries, keys, k, k_sub, gating, id_head_offset)


@_retrieve_op.register_fake
def _(queries, keys, k, k_sub, gating, id_head_offset):
    return retrieve_outputs(queries, k, gating)


@_library.custom_op("retrieve_backward")
def _retrieve_backward_op(dscores: Optional[torch.Tensor], dgates: Optional[torch.Tensor],
                          queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor,
                          scores: torch.Tensor, gates: torch.Tensor, gating: str,
                          id_head_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_retrieve_backward(dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset)


@_retrieve_backward_op.register_fake
def _(dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset):
    return _library.empty(queries.shape, queries), _library.empty(keys.shape, keys)


def _setup_context(ctx, inputs, output):
    queries, keys, _, _, gating, id_head_offset = inputs
    scores, ids, gates = output
    ctx.save_for_backward(queries, keys, ids, scores, gates)
    ctx.gating, ctx.id_head_offset = gating, id_head_offset
    ctx.mark_non_differentiable(ids)


def _backward(ctx, dscores, dids, dgates):
    queries, keys, ids, scores, gates = ctx.saved_tensors
    dqueries, dkeys = _retrieve_backward_op(dscores, dgates if ctx.gating != "none" else None, queries, keys,
                                            ids, scores, gates, ctx.gating, ctx.id_head_offset)
    return dqueries, dkeys, None, None, None, None


_retrieve_op.register_autograd(_backward, setup_context=_setup_context)


def retrieve(queries, keys, k, k_sub, gating, id_head_offset=0):
    """Retrieval with gating fused into the epilogue, arguments already validated.

    Returns scores (T, h, k) fp32 (fp64 for fp64 inputs) descending, ids (T, h, k) int64 =
    a*n + b + head*id_head_offset, gates (T, h, k) = gating(scores) (shape (0,) for "none").
    Differentiable in queries and keys through scores and gates.
    """
    return _retrieve_op(queries, keys, k, k_sub, gating, id_head_offset)


def product_key_topk(queries, keys, k, k_sub=None):
    """Product-key retrieval; same contract as peer_kernels.reference.product_key_topk."""
    k_sub = _checks.check_retrieval(queries, keys, k, k_sub)
    scores, ids, _ = retrieve(queries, keys, k, k_sub, "none")
    return scores, ids
