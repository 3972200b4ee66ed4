"""Input checks shared by the module, every op and every backend.

Each check raises before any work is done, and its message names the argument, what was expected
and what was given. Nothing is silently cast, truncated or wrapped around.
"""
import math

import torch

from .reference import ACTIVATIONS, GATINGS

QUERY_NORMS = ("batchnorm", "layernorm", None)
BACKENDS = ("auto", "triton", "cpp", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_topk(k, k_sub, n):
    """k experts per head from k_sub sub-keys per half of n: 1 <= k_sub <= n, 1 <= k <= k_sub**2."""
    check_int("k (num_experts_per_head)", k, 1)
    check_int("k_sub (product_key_topk)", k_sub, 1)
    if k_sub > n:
        raise ValueError(f"k_sub (product_key_topk): expected <= n = sqrt(num_experts) = {n}, got {k_sub}")
    if k > k_sub * k_sub:
        raise ValueError(
            f"k (num_experts_per_head): expected <= k_sub**2 = {k_sub * k_sub} candidates, got {k}")


def sub_keys_per_half(num_experts):
    """n such that n*n == num_experts, or a ValueError."""
    check_int("num_experts", num_experts, 1)
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        raise ValueError(f"num_experts: expected a perfect square (n*n), got {num_experts}")
    return n


def check_config(*, dim, heads, num_experts, num_experts_per_head, dim_key, product_key_topk,
                 activation, gating, query_norm, backend, dropout):
    """Validates the PEER constructor; returns (n, k_sub)."""
    check_int("dim", dim, 1)
    check_int("heads", heads, 1)
    check_int("dim_key", dim_key, 1)
    n = sub_keys_per_half(num_experts)
    k_sub = num_experts_per_head if product_key_topk is None else product_key_topk
    check_topk(num_experts_per_head, k_sub, n)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("gating", gating, GATINGS)
    check_choice("query_norm", query_norm, QUERY_NORMS)
    check_choice("backend", backend, BACKENDS)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
    return n, k_sub


def check_tensor(name, t, shape=None, dtypes=FLOAT_DTYPES, device=None):
    """shape: a tuple of ints or None (any size) per dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def check_retrieval(queries, keys, k, k_sub):
    """queries (T, h, 2, dk), keys (h or 1, n, 2, dk); returns the resolved k_sub."""
    check_tensor("queries", queries, (None, None, 2, None))
    T, h, _, dk = queries.shape
    check_tensor("keys", keys, (None, None, 2, dk), dtypes=(queries.dtype,), device=queries.device)
    if keys.shape[0] not in (1, h):
        raise ValueError(f"keys: expected {h} heads (or 1 for shared keys) in dim 0, got {keys.shape[0]}")
    k_sub = k if k_sub is None else k_sub
    check_topk(k, k_sub, keys.shape[1])
    return k_sub


def check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=True):
    """x (T, d), expert_ids (T, h, k) int32/int64, gates (T, h, k), w_down / w_up (E, d).

    Ids are checked against the table size on the host (one reduction): a kernel must never read
    out of bounds. check_range=False leaves that to check_expert_ids (for code traced by
    torch.compile, where reading a value back to the host is a graph break).
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("x", x, (None, None))
    T, d = x.shape
    check_tensor("expert_ids", expert_ids, (T, None, None), dtypes=ID_DTYPES, device=x.device)
    check_tensor("gates", gates, tuple(expert_ids.shape), device=x.device)
    check_tensor("w_down", w_down, (None, d), dtypes=(x.dtype,), device=x.device)
    check_tensor("w_up", w_up, tuple(w_down.shape), dtypes=(x.dtype,), device=x.device)
    if check_range:
        check_expert_ids(expert_ids, w_down.shape[0])


def check_expert_ids(expert_ids, rows):
    """Every id in [0, rows)."""
    if expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"expert_ids: expected values in [0, {rows}) (rows of w_down), got [{lo}, {hi}]")


def check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head):
    """The fused op's arguments; returns the resolved k_sub."""
    check_choice("gating", gating, GATINGS)
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("x", x, (None, None))
    k_sub = check_retrieval(queries, keys, k, k_sub)
    T, h = queries.shape[:2]
    if queries.shape[0] != x.shape[0]:
        raise ValueError(f"queries: expected {x.shape[0]} tokens (x's dim 0) in dim 0, got {queries.shape[0]}")
    check_tensor("queries", queries, dtypes=(x.dtype,), device=x.device)
    rows = (h if separate_embed_per_head else 1) * keys.shape[1] ** 2
    check_tensor("w_down", w_down, (rows, x.shape[1]), dtypes=(x.dtype,), device=x.device)
    check_tensor("w_up", w_up, (rows, x.shape[1]), dtypes=(x.dtype,), device=x.device)
    return k_sub
