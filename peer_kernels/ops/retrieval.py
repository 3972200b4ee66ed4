"""Launchers of the product-key retrieval kernels (kernels/retrieval.py): they validate, allocate,
pick tiles (peer_kernels.tuning) and launch; peer_kernels._library declares the op they fill.

Ties (the reference leaves them to the implementation; this is ours, deterministic): each half
keeps its top k' sub-keys ranked by (score desc, sub-key index asc); the k'*k' candidates are
ranked by (s1 + s2 desc, rank of a asc, rank of b asc). Scores are computed in fp32 (tl.dot, fp32
accumulation) and returned in fp32; float64 inputs are selected on fp32-rounded scores and their
returned scores recomputed exactly in float64 (gradcheck), so near-ties within fp32 rounding may
come out in a different order than a float64 sort would give. bf16/fp16 inputs with n <=
tuning.MAX_N_INT32_KEYS rank each half on int32 keys, i.e. on scores floored to 32 - INDEX_BITS
bits of their fp32 image (kernels/retrieval.py), then re-rank the k' survivors on exact fp32
scores: a half's pick can differ from the exact one only among scores within that floor (2**-13
relative at n = 1024), and the scores returned are always the exact scores of the ids returned.

Forward schedules, by the token count (tuning.token_schedule): "token_tiles", a program per (token
tile, head) streaming all n key rows of both halves; or for a few tokens (a decode step) "decode",
a program per (token tile, head, half, slice of key rows) and a merge of the slices' lists per
(token tile, head): the same selection keys and merges, hence the same picks and scores.

Backward: one program per (token tile, head). dqueries is token-major and written once; dkeys is
accumulated with fp32 (fp64) atomics: the n sub-keys of a half receive T*h*k updates in all (2M at
the paper's shapes, for 1024 rows per head), and a sort-based reduction would cost more than the
retrieval itself. Hence dkeys is not bitwise reproducible.
"""
import torch
import triton

from .. import _checks, _device, _library, tuning
from ..kernels import retrieval as kernels

GATING_CODES = {"none": kernels.GATING_NONE.value, "softmax": kernels.GATING_SOFTMAX.value,
                "sigmoid": kernels.GATING_SIGMOID.value, "relu": kernels.GATING_RELU.value}

_PAIR_TABLES = {}


def pair_table(*, k, k_sub, p_pad, device):
    """(2, p_pad) int32 device tensor of the admissible pair ranks (tuning.admissible_pairs), -1
    padded; cached per device."""
    key = (k, k_sub, p_pad, str(device))
    if key not in _PAIR_TABLES:
        table = torch.full((2, p_pad), -1, dtype=torch.int32)
        pairs = tuning.admissible_pairs(k, k_sub)
        table[:, :len(pairs)] = torch.tensor(pairs, dtype=torch.int32).T
        _PAIR_TABLES[key] = table.to(device)
    return _PAIR_TABLES[key]


def key_head_stride(keys):
    """Elements between two heads' keys; 0 for keys shared by every head."""
    return keys.stride(0) if keys.shape[0] > 1 else 0


def query_strides(queries):
    """queries with unit stride in dk (the module's are a transposed view of the projection, read
    through their strides), and their (token, head, half) strides."""
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    return queries, queries.stride()[:3]


def launch_retrieve(*, queries, keys, k, k_sub, gating, id_head_offset, out=None):
    """scores (T, h, k) fp32/fp64 descending, ids (T, h, k) int64, gates (T, h, k) or (0,); into
    `out` = (scores, ids, gates), contiguous, when given. For few tokens (tuning.token_schedule) the
    key rows are split over programs (_launch_key_slices), else a program per token tile and head;
    the picks are the same."""
    _checks.check_launchable("queries", queries)
    T, h, _, dk = queries.shape
    n = keys.shape[1]
    scores, ids, gates = out if out is not None else _library.retrieve_outputs(queries, k, gating)
    if T == 0:
        return scores, ids, gates
    queries, (stride_t, stride_h, stride_p) = query_strides(queries)
    keys = keys.contiguous()
    arch = _device.cuda_arch(queries.device)
    config, launch = tuning.retrieval_config(n=n, dk=dk, k=k, k_sub=k_sub, dtype=queries.dtype, arch=arch)
    pairs = pair_table(k=k, k_sub=k_sub, p_pad=config["P_PAD"], device=queries.device)
    arguments = dict(queries_ptr=queries, keys_ptr=keys, pairs_ptr=pairs, scores_ptr=scores, ids_ptr=ids,
                     gates_ptr=gates if gating != "none" else scores, T=T, heads=h, n=n, dk=dk, k=k,
                     stride_t=stride_t, stride_h=stride_h, stride_p=stride_p, key_head_stride=key_head_stride(keys),
                     id_head_offset=id_head_offset, GATING=GATING_CODES[gating])
    if tuning.token_schedule(num_tokens=T, arch=arch) == "decode":
        _launch_key_slices(config=config, num_warps=launch["num_warps"], **arguments)
    else:
        kernels.product_key_topk_kernel[(triton.cdiv(T, config["BLOCK_T"]), h)](**arguments, **launch, **config)
    return scores, ids, gates


def _launch_key_slices(*, config, num_warps, queries_ptr, keys_ptr, pairs_ptr, scores_ptr, ids_ptr, gates_ptr, T,
                       heads, n, dk, k, stride_t, stride_h, stride_p, key_head_stride, id_head_offset, GATING):
    """The decode retrieval (kernels/retrieval.py): each slice of a half's key rows selects its top
    k' on its own program, then one program per token tile and head merges the slices' lists and
    finishes. Token tiles and selection keys as the token-tile kernel's (`config`, without level
    selection), key tiles and slices from tuning.key_slices."""
    block_t, ks_pad = config["BLOCK_T"], config["KS_PAD"]
    block_n, slice_rows, slices = tuning.key_slices(num_tokens=T, heads=heads, n=n, block_t=block_t,
                                                    block_n=config["BLOCK_N"], ks_pad=ks_pad,
                                                    sms=tuning.decode_sms(queries_ptr.device))
    lists = torch.empty((T, heads, 2, slices, ks_pad), device=queries_ptr.device,
                        dtype=torch.int32 if config["INDEX_BITS"] else torch.int64)
    tiles = triton.cdiv(T, block_t)
    shared = dict(queries_ptr=queries_ptr, keys_ptr=keys_ptr, lists_ptr=lists, T=T, n=n, dk=dk, stride_t=stride_t,
                  stride_h=stride_h, stride_p=stride_p, key_head_stride=key_head_stride, slices=slices,
                  BLOCK_T=block_t, DK_PAD=config["DK_PAD"], KS_PAD=ks_pad, INDEX_BITS=config["INDEX_BITS"],
                  num_warps=num_warps)
    kernels.key_slice_topk_kernel[(tiles, 2 * heads, slices)](
        slice_rows=slice_rows, BLOCK_N=block_n, INPUT_PRECISION=config["INPUT_PRECISION"],
        UPCAST_DOT=config["UPCAST_DOT"], **shared)
    kernels.merge_key_slices_kernel[(tiles, heads)](
        pairs_ptr=pairs_ptr, scores_ptr=scores_ptr, ids_ptr=ids_ptr, gates_ptr=gates_ptr, heads=heads, k=k,
        id_head_offset=id_head_offset, P_PAD=config["P_PAD"], K_PAD=config["K_PAD"], GATING=GATING,
        EXACT=config["EXACT"], **shared)


def launch_retrieve_backward(*, dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset):
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
    config, launch = tuning.retrieval_backward_config(dk=dk, k=k, arch=_device.cuda_arch(queries.device))
    # scores stand in for the tensors a disabled input (HAS_DSCORES / GATING) never reads
    kernels.product_key_topk_backward_kernel[(triton.cdiv(T, config["BLOCK_T"]), h)](
        queries_ptr=queries, keys_ptr=keys, ids_ptr=ids, scores_ptr=scores, gates_ptr=gates if use_gates else scores,
        dscores_ptr=dscores.contiguous() if dscores is not None else scores,
        dgates_ptr=dgates.contiguous() if use_gates else scores, dqueries_ptr=dqueries, dkeys_ptr=dkeys,
        T=T, heads=h, n=keys.shape[1], dk=dk, k=k, stride_t=stride_t, stride_h=stride_h, stride_p=stride_p,
        key_head_stride=key_head_stride(keys), id_head_offset=id_head_offset,
        GATING=GATING_CODES[gating if use_gates else "none"], HAS_DSCORES=dscores is not None, **launch, **config)
    return dqueries.to(queries.dtype), dkeys.to(keys.dtype)


_library.implement("retrieve", "triton", forward=launch_retrieve, backward=launch_retrieve_backward)
