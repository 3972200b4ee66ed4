"""The naive PyTorch oracle: the PEER layer's math (arXiv 2407.04153) written as plainly as possible.

Every backend (Triton, C++, CUDA) is tested against these functions. They favour clarity over
speed and memory: the gathered `(T, h, k, d)` expert rows are materialized, all sub-key scores are
computed, and gradients come from ordinary autograd. They take the same arguments, with the same
checks (peer_kernels._checks), as every other backend. They compute in float64 for float64 inputs
and in float32 otherwise, and return results in the dtype of x (retrieval scores in the compute
dtype); expert rows are gathered first and cast after, so no whole table is ever copied. Quantized
tables (int8 / float8_e4m3fn with a float32 scale per row, peer_kernels.quantize_) are read the same
way: the gathered rows are cast and multiplied by their scales, then the same math follows.

Tie rule (the same on every backend): each half ranks its sub-keys by (score descending, sub-key
index ascending); the k'*k' candidate pairs are ranked by (s1 + s2 descending, rank of a in the
first half ascending, rank of b in the second ascending). NaN ranks above every number (as in
torch.sort), so a NaN score is always picked and NaN in gives NaN out.

Shapes: T tokens, d model dim, h heads, n sub-keys per half (N = n*n experts), dk sub-key dim,
k experts per head, k_sub (k') sub-keys kept per half.
"""
import math

import torch

from ._checks import (ACTIVATIONS, GATINGS, check_down, check_experts, check_fused, check_mix, check_retrieval,
                      compute_dtype)
from ._math import activate, autocast_off, gate, head_offsets

__all__ = ["product_key_topk", "peer_experts", "peer_down", "peer_mix", "peer_fused", "sub_key_scores",
           "routing_margin", "activate", "gate", "head_offsets", "ACTIVATIONS", "GATINGS"]


def sub_key_scores(queries, keys):
    """queries (T, h, 2, dk), keys (h or 1, n, 2, dk) -> sub_scores (T, h, 2, n).

    keys with a leading 1 are shared by every head (the paper's setting) and broadcast.
    """
    dtype = compute_dtype(queries.dtype)
    heads = queries.shape[1]
    keys = keys.to(dtype).expand(heads, -1, -1, -1)
    with autocast_off(queries):
        return torch.einsum("thpd,hnpd->thpn", queries.to(dtype), keys)


def _top(scores, k):
    """The k best along the last dim under the tie rule: a stable descending sort keeps equal
    scores in index order, and puts NaN first."""
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], order[..., :k]


def product_key_topk(queries, keys, k, k_sub=None):
    """Product-key retrieval: queries (T, h, 2, dk), keys (h or 1, n, 2, dk).

    Returns scores (T, h, k) in float32 (float64 for float64 inputs), sorted descending, and
    expert ids (T, h, k) int64 in [0, n*n): id = a*n + b for sub-key a of the first half and b of
    the second. Gradients flow to queries and keys through the picks made.
    """
    k_sub = check_retrieval(queries, keys, k, k_sub)
    n = keys.shape[1]
    sub_scores = sub_key_scores(queries, keys)
    top1, idx1 = _top(sub_scores[:, :, 0], k_sub)  # (T, h, k_sub)
    top2, idx2 = _top(sub_scores[:, :, 1], k_sub)
    # flattened in (rank a, rank b) order, which the stable sort keeps among equal sums
    candidate_scores = (top1[..., :, None] + top2[..., None, :]).flatten(-2)  # (T, h, k_sub**2)
    candidate_ids = (idx1[..., :, None] * n + idx2[..., None, :]).flatten(-2)
    scores, pick = _top(candidate_scores, k)
    return scores, candidate_ids.gather(-1, pick)


class _SparseRows(torch.autograd.Function):
    """table[ids], whose gradient is a coalesced sparse COO tensor of the rows in ids (the
    nn.Embedding(sparse=True) layout, coalesced): the tables' gradients with sparse_grad=True."""

    @staticmethod
    def forward(ctx, table, ids):
        ctx.save_for_backward(ids)
        ctx.shape = table.shape
        return table[ids]

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        rows = torch.sparse_coo_tensor(ids.reshape(1, -1), grad.reshape(-1, grad.shape[-1]), ctx.shape)
        return rows.coalesce(), None


def _rows(table, expert_ids, dtype, sparse_grad, scale=None):
    """The (T, h, k, d) rows the fused kernels never build, in the compute dtype; a quantized
    table's rows times their scales."""
    ids = expert_ids.long()
    rows = (_SparseRows.apply(table, ids) if sparse_grad else table[ids]).to(dtype)
    return rows if scale is None else rows * scale[ids].to(dtype)[..., None]


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", sparse_grad=False, *, w_down_scale=None,
                 w_up_scale=None):
    """Single-neuron expert mixing: y[t] = sum_{h,j} gates[t,h,j] * act(u_e . x[t]) * v_e.

    x (T, d_in), expert_ids (T, h, k) indexing rows of w_down (E, d_in) and w_up (E, d_out), gates
    (T, h, k). Returns y (T, d_out) in x's dtype. d_in != d_out with activation="identity" gives
    retrieved rank-1 adapters (peer_kernels.compat.PEERLora). sparse_grad=True: the tables'
    gradients are coalesced sparse COO tensors of the rows in expert_ids. Quantized tables come with
    their scales w_down_scale, w_up_scale (E,) float32 (inference only).
    """
    check_experts(x, expert_ids, gates, w_down, w_up, activation, w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    z = peer_down(x, expert_ids, w_down, sparse_grad, w_down_scale=w_down_scale)
    return peer_mix(z, expert_ids, gates, w_up, activation, sparse_grad, w_up_scale=w_up_scale).to(x.dtype)


def peer_down(x, expert_ids, w_down, sparse_grad=False, *, w_down_scale=None):
    """The experts' down projections z[t,h,j] = u_e . x[t]: x (T, d), expert_ids (T, h, k),
    w_down (E, d) -> z (T, h, k) in the compute dtype. With peer_mix, the expert stage split where a
    column-sharded table needs a sum of z over its shards (peer_kernels.distributed)."""
    check_down(x, expert_ids, w_down, w_down_scale=w_down_scale)
    down_rows = _rows(w_down, expert_ids, compute_dtype(x.dtype), sparse_grad, w_down_scale)
    with autocast_off(x):
        return torch.einsum("thkd,td->thk", down_rows, x.to(down_rows.dtype))


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", sparse_grad=False, *, w_up_scale=None):
    """y[t] = sum_{h,j} gates[t,h,j] * act(z[t,h,j]) * v_e: z, expert_ids, gates (T, h, k), w_up
    (E, d_out) -> y (T, d_out) in z's dtype (the compute dtype)."""
    check_mix(z, expert_ids, gates, w_up, activation, w_up_scale=w_up_scale)
    up_rows = _rows(w_up, expert_ids, z.dtype, sparse_grad, w_up_scale)
    with autocast_off(z):
        return torch.einsum("thk,thkd->td", gates.to(z.dtype) * activate(z, activation), up_rows)


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False, sparse_grad=False, *, w_down_scale=None, w_up_scale=None):
    """Everything after the query projection: retrieval, gating and expert mixing.

    x (T, d), queries (T, h, 2, dk), keys (h or 1, n, 2, dk), w_down / w_up (S*n*n, d) with S = h
    when separate_embed_per_head else 1. Returns y (T, d). sparse_grad and the scales as in
    peer_experts.
    """
    k_sub = check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
                        w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    scores, expert_ids = product_key_topk(queries, keys, k, k_sub)
    if separate_embed_per_head:
        expert_ids = head_offsets(expert_ids, keys.shape[1] ** 2)
    return peer_experts(x, expert_ids, gate(scores, gating), w_down, w_up, activation, sparse_grad,
                        w_down_scale=w_down_scale, w_up_scale=w_up_scale)


def routing_margin(queries, keys, k, k_sub=None):
    """(T,) per token, the smallest gap over its heads between the last score kept and the first
    dropped at each top-k of the retrieval (each half's top-k' sub-keys, then the top-k pairs).

    Two correct implementations that sum in different orders may pick differently where a gap is
    within their rounding; tests and the benchmark keep their inputs clear of such near-ties.
    """
    k_sub = check_retrieval(queries, keys, k, k_sub)
    n = keys.shape[1]
    with torch.no_grad():
        gaps = [torch.full(queries.shape[:2], math.inf, device=queries.device)]
        if k_sub < n:
            top = _top(sub_key_scores(queries, keys), k_sub + 1)[0]  # (T, h, 2, k_sub+1)
            gaps.append((top[..., k_sub - 1] - top[..., k_sub]).amin(dim=-1).to(gaps[0].dtype))
        if k < k_sub * k_sub:
            scores, _ = product_key_topk(queries, keys, k + 1, k_sub)
            gaps.append((scores[..., k - 1] - scores[..., k]).to(gaps[0].dtype))
        return torch.stack(gaps).amin(dim=0).amin(dim=-1)
