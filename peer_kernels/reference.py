"""The naive PyTorch oracle: SPEC section 1 written as plainly as possible.

Every backend (Triton, C++, CUDA) is tested against these functions. They favour clarity over
speed and memory: the gathered `(T, h, k, d)` expert rows are materialized, all sub-key scores are
computed, and gradients come from ordinary autograd. They run in any float dtype; half-precision
inputs are computed in float32 and the result is cast back, float64 stays float64 (gradcheck).

Shapes: T tokens, d model dim, h heads, n sub-keys per half (N = n*n experts), dk sub-key dim,
k experts per head, k_sub (k') sub-keys kept per half.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
GATINGS = ("softmax", "sigmoid", "relu")


def compute_dtype(dtype):
    """The dtype the oracle computes in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(z, activation):
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def gate(scores, gating):
    """scores (..., k) -> gates (..., k); softmax normalizes over the k experts of one head."""
    if gating == "softmax":
        return torch.softmax(scores, dim=-1)
    if gating == "sigmoid":
        return torch.sigmoid(scores)
    if gating == "relu":
        return F.relu(scores)
    raise ValueError(f"gating: expected one of {GATINGS}, got {gating!r}")


def sub_key_scores(queries, keys):
    """queries (T, h, 2, dk), keys (h or 1, n, 2, dk) -> sub_scores (T, h, 2, n).

    keys with a leading 1 are shared by every head (the paper's setting) and broadcast.
    """
    dtype = compute_dtype(queries.dtype)
    heads = queries.shape[1]
    keys = keys.to(dtype).expand(heads, -1, -1, -1)
    return torch.einsum("thpd,hnpd->thpn", queries.to(dtype), keys)


def product_key_topk(queries, keys, k, k_sub=None):
    """Product-key retrieval: queries (T, h, 2, dk), keys (h or 1, n, 2, dk).

    Returns scores (T, h, k) in float32 (float64 for float64 inputs), sorted descending, and
    expert ids (T, h, k) int64 in [0, n*n): id = a*n + b for sub-key a of the first half and b of
    the second. Gradients flow to queries and keys through the picks made.
    """
    n = keys.shape[1]
    k_sub = k if k_sub is None else k_sub
    sub_scores = sub_key_scores(queries, keys)
    top1, idx1 = sub_scores[:, :, 0].topk(k_sub, dim=-1)  # (T, h, k_sub)
    top2, idx2 = sub_scores[:, :, 1].topk(k_sub, dim=-1)
    candidate_scores = (top1[..., :, None] + top2[..., None, :]).flatten(-2)  # (T, h, k_sub**2)
    candidate_ids = (idx1[..., :, None] * n + idx2[..., None, :]).flatten(-2)
    scores, pick = candidate_scores.topk(k, dim=-1)
    return scores, candidate_ids.gather(-1, pick)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu"):
    """Single-neuron expert mixing: y[t] = sum_{h,j} gates[t,h,j] * act(u_e . x[t]) * v_e.

    x (T, d), expert_ids (T, h, k) indexing rows of w_down / w_up (E, d), gates (T, h, k).
    Returns y (T, d) in x's dtype.
    """
    dtype = compute_dtype(x.dtype)
    ids = expert_ids.long()
    down_rows = w_down.to(dtype)[ids]  # (T, h, k, d): the tensor the fused kernels never build
    up_rows = w_up.to(dtype)[ids]
    z = torch.einsum("thkd,td->thk", down_rows, x.to(dtype))
    a = activate(z, activation)
    y = torch.einsum("thk,thkd->td", gates.to(dtype) * a, up_rows)
    return y.to(x.dtype)


def head_offsets(expert_ids, num_experts):
    """Shift head h's ids by h*num_experts: each head owns its own block of the expert tables."""
    heads = expert_ids.shape[1]
    offsets = torch.arange(heads, device=expert_ids.device, dtype=expert_ids.dtype) * num_experts
    return expert_ids + offsets[:, None]


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False):
    """Everything after the query projection: retrieval, gating and expert mixing.

    x (T, d), queries (T, h, 2, dk), keys (h or 1, n, 2, dk), w_down / w_up (S*n*n, d) with S = h
    when separate_embed_per_head else 1. Returns y (T, d).
    """
    scores, expert_ids = product_key_topk(queries, keys, k, k_sub)
    if separate_embed_per_head:
        expert_ids = head_offsets(expert_ids, keys.shape[1] ** 2)
    return peer_experts(x, expert_ids, gate(scores, gating), w_down, w_up, activation)
