"""The oracle against a second, independently written version: plain Python loops over tokens,
heads and candidates (sorting lists, no topk, no einsum, no gather), in float64."""
import math

import pytest
import torch

from peer_kernels import reference


def _act(z, activation):
    if activation == "relu":
        return max(z, 0.0)
    if activation == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if activation == "silu":
        return z / (1.0 + math.exp(-z))
    return z  # identity


def _gates(scores, gating):
    if gating == "softmax":
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        return [v / sum(e) for v in e]
    if gating == "sigmoid":
        return [1.0 / (1.0 + math.exp(-s)) for s in scores]
    return [max(s, 0.0) for s in scores]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def loop_retrieval(queries, keys, k, k_sub):
    """Per token and head: list of (score, expert id), best first."""
    T, h, _, _ = queries.shape
    n = keys.shape[1]
    q, kk = queries.tolist(), keys.tolist()
    out = []
    for t in range(T):
        per_head = []
        for head in range(h):
            kh = kk[0 if keys.shape[0] == 1 else head]
            s1 = [_dot(q[t][head][0], kh[i][0]) for i in range(n)]
            s2 = [_dot(q[t][head][1], kh[i][1]) for i in range(n)]
            best1 = sorted(range(n), key=lambda i: -s1[i])[:k_sub]
            best2 = sorted(range(n), key=lambda i: -s2[i])[:k_sub]
            candidates = sorted(((s1[a] + s2[b], a * n + b) for a in best1 for b in best2), key=lambda c: -c[0])
            per_head.append(candidates[:k])
        out.append(per_head)
    return out


def loop_layer(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate):
    n = keys.shape[1]
    xs, wd, wu = x.tolist(), w_down.tolist(), w_up.tolist()
    y = [[0.0] * x.shape[1] for _ in range(x.shape[0])]
    for t, per_head in enumerate(loop_retrieval(queries, keys, k, k_sub)):
        for head, picks in enumerate(per_head):
            gates = _gates([s for s, _ in picks], gating)
            for g, (_, e) in zip(gates, picks):
                e += head * n * n if separate else 0
                a = _act(_dot(wd[e], xs[t]), activation)
                y[t] = [acc + g * a * v for acc, v in zip(y[t], wu[e])]
    return torch.tensor(y, dtype=torch.float64)


def _inputs(T, d, h, n, dk, shared=False, separate=False):
    f64 = torch.float64
    rows = (h if separate else 1) * n * n
    return (torch.randn(T, d, dtype=f64), torch.randn(T, h, 2, dk, dtype=f64),
            torch.randn(1 if shared else h, n, 2, dk, dtype=f64),
            torch.randn(rows, d, dtype=f64) / math.sqrt(d), torch.randn(rows, d, dtype=f64))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("k,k_sub", [(1, 1), (5, 3), (4, 7), (9, 3)])
def test_retrieval_matches_loops(shared, k, k_sub):
    _, queries, keys, _, _ = _inputs(T=6, d=4, h=3, n=7, dk=5, shared=shared)
    scores, ids = reference.product_key_topk(queries, keys, k, k_sub)
    assert scores.dtype == torch.float64 and ids.dtype == torch.int64 and scores.shape == (6, 3, k)
    expected = loop_retrieval(queries, keys, k, k_sub)
    exp_scores = torch.tensor([[[s for s, _ in head] for head in tok] for tok in expected], dtype=torch.float64)
    exp_ids = torch.tensor([[[e for _, e in head] for head in tok] for tok in expected])
    torch.testing.assert_close(scores, exp_scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(ids, exp_ids)  # random float64 scores: no ties, so the order is unique


@pytest.mark.parametrize("gating", reference.GATINGS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_layer_matches_loops(gating, activation):
    x, queries, keys, w_down, w_up = _inputs(T=5, d=6, h=3, n=5, dk=4)
    y = reference.peer_fused(x, queries, keys, w_down, w_up, 5, 3, gating, activation)
    expected = loop_layer(x, queries, keys, w_down, w_up, 5, 3, gating, activation, separate=False)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_layer_matches_loops_separate_embeds_shared_keys():
    x, queries, keys, w_down, w_up = _inputs(T=4, d=5, h=2, n=4, dk=3, shared=True, separate=True)
    y = reference.peer_fused(x, queries, keys, w_down, w_up, 3, 2, "softmax", "gelu", separate_embed_per_head=True)
    expected = loop_layer(x, queries, keys, w_down, w_up, 3, 2, "softmax", "gelu", separate=True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_half_precision_is_computed_in_float32():
    x, queries, keys, w_down, w_up = (t.float() for t in _inputs(T=8, d=16, h=2, n=6, dk=8))
    y32 = reference.peer_fused(x, queries, keys, w_down, w_up, 4)
    bf = [t.bfloat16() for t in (x, queries, keys, w_down, w_up)]
    y16 = reference.peer_fused(*bf, 4)
    assert y16.dtype == torch.bfloat16
    scores, _ = reference.product_key_topk(bf[1], bf[2], 4)
    assert scores.dtype == torch.float32
    err = ((y16.double() - y32.double()).norm() / y32.double().norm()).item()
    assert err < 5e-2


@pytest.mark.parametrize("gating", reference.GATINGS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_gradcheck_layer(gating, activation):
    # relu gating has a kink at 0 and relu activation at 0; random float64 inputs stay clear of them.
    x, queries, keys, w_down, w_up = (t.requires_grad_() for t in _inputs(T=3, d=4, h=2, n=4, dk=3))

    def layer(*tensors):
        return reference.peer_fused(*tensors, 3, 2, gating, activation)

    assert torch.autograd.gradcheck(layer, (x, queries, keys, w_down, w_up))


def test_gradcheck_retrieval_and_experts():
    _, queries, keys, _, _ = _inputs(T=3, d=4, h=2, n=5, dk=3, shared=True)
    queries.requires_grad_(), keys.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, kk: reference.product_key_topk(q, kk, 4, 3)[0], (queries, keys))
    x, _, _, w_down, w_up = (t.requires_grad_() for t in _inputs(T=3, d=4, h=2, n=3, dk=3))
    ids = torch.tensor([[[8, 8]], [[0, 8]], [[3, 3]]])  # duplicates within a token and across tokens
    gates = torch.rand(3, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: reference.peer_experts(t[0], ids, t[1], t[2], t[3], "silu"), (x, gates, w_down, w_up))
