"""Comparisons with the float64 oracle whose tolerance scales with what was summed.

A result computed in float32 (or from 16-bit inputs with float32 accumulation) differs from the
exact value by rounding, and how much depends on the computation, not on the result: a sum of
terms of size 10 that cancels to 0.01 carries the rounding of the terms. So every comparison here is

    |actual - exact| <= C * eps * S    elementwise,

with exact the float64 oracle on the same inputs, eps the unit of the accumulation dtype, and S the
sum of the absolute values of the terms that make the result, plus the rounding the terms carry in
from earlier steps (the inner dot products, an activation's or a normalisation's own rounding).
S is built here step by step, as a running error bound: each step maps (value, S) of its inputs to
(value, S) of its outputs, following the layer's forward and backward formulas, in float64.
Results stored in 16 bits add their final rounding, one unit of that dtype times |exact|.

C = 16: over 200 seeds the kernels' worst ratio |actual - exact| / (eps * S) was 1.6 and the fp32
reference's 4.5, while one wrong expert row gives ~1e5 and a gate off by 1e-3 ~1e3
(tests/test_bounds.py plants such errors and checks they are caught).

The same formulas give the values too; `check_layer` compares them with the oracle's autograd
values (to 1e-9), so the bounds are derived from formulas that are themselves checked.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from peer_kernels import reference

C = 16.0


def unit(dtype):
    """eps of the accumulation dtype of a result of `dtype`."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def ratio(actual, exact, magnitude):
    """Elementwise |actual - exact| / (eps * S + final rounding), float64; 0 where both are NaN,
    inf where only one is."""
    a, e = actual.detach().double(), exact.detach().double()
    allowed = unit(actual.dtype) * magnitude
    if actual.dtype in (torch.float16, torch.bfloat16):
        allowed = allowed + torch.finfo(actual.dtype).eps * e.abs()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    out = (a - e).abs() / allowed.clamp_min(torch.finfo(torch.float64).tiny)
    out = torch.where(nan_a & nan_e, torch.zeros_like(out), out)
    return torch.where(nan_a ^ nan_e, torch.full_like(out, math.inf), out)


def check(name, actual, exact, magnitude, rows=None, c=C):
    """Asserts the bound elementwise, naming the worst element on failure. The oracle's device
    decides: actual is brought to it. rows: exact covers only these rows of a table gradient
    (touched_rows); the other rows of actual must be exactly zero."""
    if rows is not None:
        untouched = actual.detach().index_fill(0, rows.to(actual.device), 0)
        assert not untouched.any(), f"{name}: rows no slot touched are not zero"
        actual = actual[rows.to(actual.device)]
    actual = actual.detach().to(exact.device)
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if actual.numel() == 0:
        return
    r = ratio(actual, exact, magnitude)
    worst = int(r.reshape(-1).argmax())
    if not r.reshape(-1)[worst] <= c:
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), r.shape))
        raise AssertionError(
            f"{name}: |actual - exact| = {r.reshape(-1)[worst].item():.3g} * eps * S > {c} * eps * S at {where}: "
            f"actual {actual.reshape(-1)[worst].item()!r}, exact {exact.reshape(-1)[worst].item()!r}, "
            f"S {magnitude.reshape(-1)[worst].item():.4g} ({int((r > c).sum())} of {r.numel()} elements over)")


def check_all(actual, expected, c=C):
    """actual: name -> tensor; expected: name -> (exact, S), or (exact, S, rows) for a table
    gradient on the touched rows only (check)."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, value in actual.items():
        check(name, value, *expected[name], c=c)


def touched_rows(rows, *tables):
    """For an oracle that reads only the table rows a step touches (a million-row table needs no
    float64 copy): the touched rows (U,) ascending, `rows` renumbered into them (same shape), and
    each table's (U, d) rows, on the tables' device."""
    used = rows.unique()
    return used, torch.searchsorted(used, rows), [t[used.to(t.device)] for t in tables]


# ---- steps: (value, S) in, (value, S) out; everything float64 -----------------------------------

def _derivatives(z, activation):
    """act(z), act'(z), act''(z) by autograd on the oracle's own activation, and the own rounding
    of act and act' (eps units). The usual formulas cancel: GELU's 0.5 z (1 + erf(.)) and
    0.5 z (1 + tanh(.)) for negative z (an error of about eps |z| however small the result), the
    tanh form's slope in 1 - tanh**2 (times its z (1 + 3 * 0.044715 z**2) factor), SiLU's slope
    in 1 - sigmoid(z) (times z); what does not cancel has a relative error."""
    z = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        a = reference.activate(z, activation)
        d1, = torch.autograd.grad(a.sum(), z, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else torch.zeros_like(z)
    a, d1, z = a.detach(), d1.detach(), z.detach()
    own_a, own_d1 = a.abs(), d1.abs()
    if activation in ("gelu", "gelu_tanh"):
        own_a = own_a + z.abs()
        own_d1 = own_d1 + 1
    if activation == "gelu_tanh":
        own_d1 = own_d1 + z.abs() * (1 + 0.134145 * z * z)
    if activation == "silu":
        own_d1 = own_d1 + z.abs()
    return a, d1, d2.detach(), own_a, own_d1


def experts_forward(x, ex, rows, gates, eg, w_down, w_up, activation):
    """x, ex (T, d); rows, gates, eg (T, S) -> y, ey (T, d) and what the backward needs."""
    U, V = w_down[rows], w_up[rows]                               # (T, S, d)
    z = torch.einsum("tsd,td->ts", U, x)
    ez = torch.einsum("tsd,td->ts", U.abs(), x.abs() + ex)
    a, da, dda, own_a, own_da = _derivatives(z, activation)
    ea = da.abs() * ez + own_a
    coef = gates * a
    ecoef = gates.abs() * ea + a.abs() * eg + coef.abs()
    y = torch.einsum("ts,tsd->td", coef, V)
    ey = torch.einsum("ts,tsd->td", ecoef + coef.abs(), V.abs())
    saved = dict(x=x, ex=ex, rows=rows, gates=gates, eg=eg, U=U, V=V, ez=ez, a=a, ea=ea, da=da, dda=dda,
                 own_da=own_da, coef=coef, ecoef=ecoef, down_shape=w_down.shape, up_shape=w_up.shape)
    return y, ey, saved


def _scatter_rows(rows, values, shape):
    """sum of values (T, S, d) into the table rows they came from."""
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(
        0, rows.reshape(-1), values.reshape(-1, shape[1]))


def experts_backward(s, dy, edy):
    """-> name -> (value, S) for dx, dgates (T, S), dw_down, dw_up."""
    w = torch.einsum("tsd,td->ts", s["V"], dy)
    ew = torch.einsum("tsd,td->ts", s["V"].abs(), dy.abs() + edy)
    a, da, g = s["a"], s["da"], s["gates"]
    dgates = a * w
    edg = a.abs() * ew + w.abs() * s["ea"] + dgates.abs()
    eda = s["dda"].abs() * s["ez"] + s["own_da"]
    dz = g * w * da
    edz = (g * w).abs() * eda + (g * da).abs() * ew + (w * da).abs() * s["eg"] + dz.abs()
    dx = torch.einsum("ts,tsd->td", dz, s["U"])
    edx = torch.einsum("ts,tsd->td", edz + dz.abs(), s["U"].abs())
    x, ex, coef = s["x"][:, None], s["ex"][:, None], s["coef"][..., None]
    rows, down_shape, up_shape = s["rows"], s["down_shape"], s["up_shape"]
    dw_down = _scatter_rows(rows, dz[..., None] * x, down_shape)
    edw_down = _scatter_rows(rows, edz[..., None] * x.abs() + dz.abs()[..., None] * (x.abs() + ex), down_shape)
    dyr, edyr = dy[:, None], edy[:, None]
    dw_up = _scatter_rows(rows, coef * dyr, up_shape)
    edw_up = _scatter_rows(rows, s["ecoef"][..., None] * dyr.abs() + coef.abs() * (dyr.abs() + edyr), up_shape)
    return dict(dx=(dx, edx), dgates=(dgates, edg), dw_down=(dw_down, edw_down), dw_up=(dw_up, edw_up))


def retrieval_forward(queries, eq, keys, ids):
    """Scores of the given picks: queries, eq (T, h, 2, dk), keys (h or 1, n, 2, dk), ids (T, h, k)."""
    T, h, _, dk = queries.shape
    n = keys.shape[1]
    key_head = (torch.arange(h, device=queries.device) if keys.shape[0] > 1
                else torch.zeros(h, dtype=torch.long, device=queries.device))
    halves = []
    for half, sub in ((0, ids // n), (1, ids % n)):
        K = keys[key_head[None, :, None], sub, half]                  # (T, h, k, dk)
        q, e = queries[:, :, half], eq[:, :, half]
        s = torch.einsum("thd,thkd->thk", q, K)
        es = torch.einsum("thd,thkd->thk", q.abs() + e, K.abs())
        halves.append(dict(K=K, sub=sub, q=q, eq=e, s=s, es=es))
    scores = halves[0]["s"] + halves[1]["s"]
    escores = halves[0]["es"] + halves[1]["es"] + halves[0]["s"].abs() + halves[1]["s"].abs()
    return scores, escores, dict(halves=halves, key_head=key_head, keys_shape=keys.shape)


def pick_scores(queries, keys, ids):
    """(exact scores, S) of the picks ids (T, h, k) of queries and keys in any float dtype: float64,
    on their device."""
    q = queries.detach().double()
    scores, magnitude, _ = retrieval_forward(q, torch.zeros_like(q), keys.detach().double(), ids)
    return scores, magnitude


def retrieval_backward(s, dscores, eds):
    """-> name -> (value, S) for dqueries and dkeys."""
    dq, edq = [], []
    key_heads, n, _, dk = s["keys_shape"]
    dkeys = torch.zeros(key_heads * n * 2, dk, dtype=dscores.dtype, device=dscores.device)
    edkeys = torch.zeros_like(dkeys)
    for half, part in enumerate(s["halves"]):
        dq.append(torch.einsum("thk,thkd->thd", dscores, part["K"]))
        edq.append(torch.einsum("thk,thkd->thd", dscores.abs() + eds, part["K"].abs()))
        row = ((s["key_head"][None, :, None] * n + part["sub"]) * 2 + half).reshape(-1)
        q, e = part["q"][:, :, None], part["eq"][:, :, None]
        dkeys.index_add_(0, row, (dscores[..., None] * q).reshape(-1, dk))
        edkeys.index_add_(0, row, (eds[..., None] * q.abs() + dscores.abs()[..., None] * (q.abs() + e)).reshape(-1, dk))
    shape = s["keys_shape"]
    return dict(dqueries=(torch.stack(dq, 2), torch.stack(edq, 2)),
                dkeys=(dkeys.view(shape), edkeys.view(shape)))


def gate_forward(scores, es, gating):
    if gating == "softmax":
        g = torch.softmax(scores, -1)
        return g, g * (es + (g * es).sum(-1, keepdim=True)) + g
    if gating == "sigmoid":
        g = torch.sigmoid(scores)
        return g, g * (1 - g) * es + g
    on = (scores > 0).double()
    return scores * on, es * on


def gate_backward(scores, g, eg, dg, edg, gating):
    if gating == "softmax":
        inner = (g * dg).sum(-1, keepdim=True)
        ds = g * (dg - inner)
        carried = (g.abs() * edg + eg * dg.abs() + (g * dg).abs()).sum(-1, keepdim=True)
        return ds, g * (edg + carried) + eg * (dg - inner).abs() + ds.abs() + (g * dg).abs()
    if gating == "sigmoid":
        ds = dg * g * (1 - g)
        return ds, (g * (1 - g)).abs() * edg + dg.abs() * (1 - 2 * g).abs() * eg + ds.abs()
    on = (scores > 0).double()
    return dg * on, edg * on


def fused(x, ex, queries, eq, keys, w_down, w_up, dy, edy, k, k_sub, gating, activation, separate, ids=None,
          rows=None):
    """The fused op forward and backward: name -> (value, S) for y, dx, dqueries, dkeys, dw_down, dw_up.
    The picks are the float64 oracle's, or `ids` (T, h, k) (e.g. a backend's own, near ties).
    rows: the table row of each pick, when the tables given are only the touched rows (touched_rows)."""
    T = x.shape[0]
    if ids is None:
        _, ids = reference.product_key_topk(queries, keys, k, k_sub)
    scores, es, r_saved = retrieval_forward(queries, eq, keys, ids)
    g, eg = gate_forward(scores, es, gating)
    if rows is None:
        rows = reference.head_offsets(ids, keys.shape[1] ** 2) if separate else ids
    y, ey, e_saved = experts_forward(x, ex, rows.reshape(T, -1), g.reshape(T, -1), eg.reshape(T, -1),
                                     w_down, w_up, activation)
    out = experts_backward(e_saved, dy, edy)
    dg, edg = (t.view(g.shape) for t in out.pop("dgates"))
    ds, eds = gate_backward(scores, g, eg, dg, edg, gating)
    out.update(retrieval_backward(r_saved, ds, eds), y=(y, ey))
    return out


def experts(x, expert_ids, gates, w_down, w_up, dy, activation):
    """The expert op on exact inputs: name -> (value, S) for y, dx, dgates, dw_down, dw_up."""
    T = x.shape[0]
    y, ey, saved = experts_forward(x, torch.zeros_like(x), expert_ids.reshape(T, -1).long(), gates.reshape(T, -1),
                                   torch.zeros_like(gates).reshape(T, -1), w_down, w_up, activation)
    out = experts_backward(saved, dy, torch.zeros_like(dy))
    out["dgates"] = tuple(t.view(gates.shape) for t in out["dgates"])
    out["y"] = (y, ey)
    return out


def down(x, expert_ids, w_down, dz):
    """z = w_down[e] . x on exact inputs, and its backward for the output gradient dz:
    name -> (value, S) for z, dx, dw_down."""
    T = x.shape[0]
    rows = expert_ids.reshape(T, -1).long()
    U = w_down[rows]
    z = torch.einsum("tsd,td->ts", U, x)
    ez = torch.einsum("tsd,td->ts", U.abs(), x.abs())
    dzs = dz.reshape(T, -1)
    dx = torch.einsum("ts,tsd->td", dzs, U)
    edx = torch.einsum("ts,tsd->td", dzs.abs(), U.abs())
    dw = _scatter_rows(rows, dzs[..., None] * x[:, None], w_down.shape)
    edw = _scatter_rows(rows, dzs.abs()[..., None] * x.abs()[:, None], w_down.shape)
    return dict(z=(z.view(dz.shape), ez.view(dz.shape)), dx=(dx, edx), dw_down=(dw, edw))


def mix(z, expert_ids, gates, w_up, dy, activation):
    """y = sum g act(z) w_up[e] on exact inputs (z given), and its backward for dy:
    name -> (value, S) for y, dz, dgates, dw_up."""
    T = z.shape[0]
    rows = expert_ids.reshape(T, -1).long()
    zs, g = z.reshape(T, -1), gates.reshape(T, -1)
    V = w_up[rows]
    a, da, dda, own_a, own_da = _derivatives(zs, activation)
    coef, ecoef = g * a, g.abs() * own_a + (g * a).abs()
    y = torch.einsum("ts,tsd->td", coef, V)
    ey = torch.einsum("ts,tsd->td", ecoef + coef.abs(), V.abs())
    w = torch.einsum("tsd,td->ts", V, dy)
    ew = torch.einsum("tsd,td->ts", V.abs(), dy.abs())
    dgates, dz = a * w, g * w * da
    edg = a.abs() * ew + w.abs() * own_a + dgates.abs()
    edz = (g * w).abs() * own_da + (g * da).abs() * ew + dz.abs()
    dw = _scatter_rows(rows, coef[..., None] * dy[:, None], w_up.shape)
    edw = _scatter_rows(rows, ecoef[..., None] * dy.abs()[:, None] + coef.abs()[..., None] * dy.abs()[:, None],
                        w_up.shape)
    return dict(y=(y, ey), dz=(dz.view(z.shape), edz.view(z.shape)), dgates=(dgates.view(z.shape), edg.view(z.shape)),
                dw_up=(dw, edw))


def retrieval(queries, keys, k, k_sub, dscores):
    """The retrieval op on exact inputs: name -> (value, S) for scores, dqueries, dkeys."""
    _, ids = reference.product_key_topk(queries, keys, k, k_sub)
    scores, es, saved = retrieval_forward(queries, torch.zeros_like(queries), keys, ids)
    out = retrieval_backward(saved, dscores, torch.zeros_like(dscores))
    out["scores"] = (scores, es)
    return out


# ---- row functions (normalisations), by autograd on each row -------------------------------------

class RowFunction:
    """out_row = f(in_row, stats(in_row), *params), rows independent, params shared or one row of
    params per row. stats are a normalisation's statistics of the row (norm; mean and 1/std), or
    None. Keeping them apart keeps the terms that cancel in the Jacobian visible in S: with
    J = D + A B (D = df/din at fixed stats, A = df/dstats, B = dstats/din),

    forward   S_out = |D| (S_in + |in|) + |A| |B| (S_in + |in|) + |out|;
    backward  g = dloss/dout: d_in = J^T g, S = |D|^T (|g| + S_g) + |B|^T |A|^T (|g| + S_g)
              + |H_g| S_in + |d_in|, with H_g the Hessian of g . f in the input (its rounding
              moves J itself); the parameters' gradients likewise, summed over rows.
    """

    def __init__(self, f, stats, params, per_row=False):
        self.f, self.params, self.per_row = f, params, per_row
        self.stats = stats or (lambda row: row[:0])
        self.dims = (0,) + ((0 if per_row else None),) * len(params)

    def composite(self, row, *params):
        return self.f(row, self.stats(row), *params)

    def _parts(self, row, *params):
        s = self.stats(row)
        return (jacrev(self.f, argnums=0)(row, s, *params), jacrev(self.f, argnums=1)(row, s, *params),
                jacrev(self.stats)(row))

    def _param_factor_jacobian(self, i):
        """d/din of d f / d param_i, with the stats held fixed: (m, p, m) per row."""
        def factor(row, *params):
            stats = self.stats(row).detach()
            return jacrev(lambda r, *p: jacrev(self.f, argnums=2 + i)(r, stats, *p))(row, *params)
        return factor

    def forward(self, inputs, e_inputs):
        self.inputs, self.e_inputs = inputs, e_inputs
        out = vmap(self.composite, in_dims=self.dims)(inputs, *self.params)
        self.direct, self.through, self.stat_jac = vmap(self._parts, in_dims=self.dims)(inputs, *self.params)
        carried = e_inputs + inputs.abs()
        spread = torch.einsum("ris,rsj,rj->ri", self.through.abs(), self.stat_jac.abs(), carried)
        return out, torch.einsum("rij,rj->ri", self.direct.abs(), carried) + spread + out.abs()

    def backward(self, grad, e_grad):
        """-> (d_in, S), [(d_param, S) for each param]."""
        def loss(row, g, *params):
            return (g * self.composite(row, *params)).sum()

        dims = (0, 0) + self.dims[1:]
        args = (self.inputs, grad, *self.params)
        jac = self.direct + torch.einsum("ris,rsj->rij", self.through, self.stat_jac)
        d_in = torch.einsum("rij,ri->rj", jac, grad)
        weight = grad.abs() + e_grad
        hessian = vmap(jacrev(jacrev(loss, argnums=0), argnums=0), in_dims=dims)(*args)       # (R, m, m)
        e_in = (torch.einsum("rij,ri->rj", self.direct.abs(), weight)
                + torch.einsum("rsj,ris,ri->rj", self.stat_jac.abs(), self.through.abs(), weight)
                + torch.einsum("rij,rj->ri", hessian.abs(), self.e_inputs) + d_in.abs())
        param_grads = []
        carried = self.e_inputs + self.inputs.abs()
        for i in range(len(self.params)):
            jac_p = vmap(jacrev(self.composite, argnums=1 + i), in_dims=self.dims)(self.inputs, *self.params)
            mixed = vmap(jacrev(jacrev(loss, argnums=2 + i), argnums=0), in_dims=dims)(*args)   # (R, p, m)
            # the rounding of what multiplies g (e.g. layer norm's (x - mean) / std, whose own error
            # is relative to |x| + |mean|, not to the difference): at fixed stats, per input element
            own = vmap(self._param_factor_jacobian(i), in_dims=self.dims)(self.inputs, *self.params)  # (R, m, p, m)
            d_p = torch.einsum("rip,ri->rp", jac_p, grad)
            e_p = (torch.einsum("rip,ri->rp", jac_p.abs(), weight)
                   + torch.einsum("rpj,rj->rp", mixed.abs(), self.e_inputs)
                   + torch.einsum("ripj,ri,rj->rp", own.abs(), grad.abs(), carried))
            if not self.per_row:
                d_p, e_p = d_p.sum(0), e_p.sum(0)
            param_grads.append((d_p, e_p + d_p.abs()))
        return (d_in, e_in), param_grads


def _rms_norm(scale, gamma):
    """peer_kernels.module.RMSNorm on one row: F.normalize's x / max(|x|, 1e-12), scaled."""
    return RowFunction(lambda row, norm, gamma: row / norm[0] * scale * (gamma + 1),
                       lambda row: torch.linalg.vector_norm(row).clamp_min(1e-12)[None], [gamma])


def _standardise(eps):
    """stats (mean, 1/std) with the biased variance, as layer norm and training batch norm use."""
    return lambda row: torch.stack([row.mean(), torch.rsqrt(row.var(unbiased=False) + eps)])


def _affine(row, stats, weight, bias):
    return (row - stats[0]) * stats[1] * weight + bias


def _linear_forward(x, ex, weight):
    y = x @ weight.T
    return y, (x.abs() + ex) @ weight.abs().T


def _linear_backward(x, ex, weight, dy, edy):
    """-> (dx, S), (dweight, S) of y = x @ weight.T."""
    dx = dy @ weight
    dweight = dy.T @ x
    return ((dx, (dy.abs() + edy) @ weight.abs() + dx.abs()),
            (dweight, (dy.abs() + edy).T @ x.abs() + dy.abs().T @ ex + dweight.abs()))


def layer_bounds(layer64, x, dy):
    """A PEER layer (float64 copy, reference backend) on x (T, dim) with output gradient dy:
    name -> (value, S) for "y", "x" (its gradient) and every parameter's gradient by name."""
    T, dim = x.shape
    h, dk = layer64.heads, layer64.dim_key
    zero_x = torch.zeros_like(x)
    params = dict(layer64.named_parameters())
    out = {}
    if layer64.pre_rmsnorm:
        rms = _rms_norm(layer64.norm.scale, params["norm.gamma"])
        xn, exn = rms.forward(x, zero_x)
    else:
        xn, exn = x, zero_x
    W = params["to_queries.weight"]
    q, eq = _linear_forward(xn, exn, W)                                   # (T, 2*h*dk) as (half, head, dk)
    kind = layer64.query_norm_kind
    norm = layer64.query_norm
    if kind == "layernorm":
        ln = RowFunction(_affine, _standardise(norm.eps), [norm.weight, norm.bias])
        qn, eqn = (t.reshape(T, -1) for t in ln.forward(q.reshape(-1, dk), eq.reshape(-1, dk)))
    elif kind == "batchnorm":
        # one row per query feature, over the tokens; each row's parameters as (1,) vectors
        if layer64.training:  # batch statistics
            cols = [norm.weight, norm.bias]
            batch = RowFunction(_affine, _standardise(norm.eps), [c.detach()[:, None] for c in cols], per_row=True)
        else:
            def running(col, _, weight, bias, mean, var):
                return (col - mean) * torch.rsqrt(var + norm.eps) * weight + bias
            cols = [norm.weight, norm.bias, norm.running_mean, norm.running_var]
            batch = RowFunction(running, None, [c.detach()[:, None] for c in cols], per_row=True)
        qn, eqn = (t.T for t in batch.forward(q.T.contiguous(), eq.T.contiguous()))
    else:
        qn, eqn = q, eq

    def as_queries(t):
        return t.reshape(T, 2, h, dk).transpose(1, 2)

    rows = layer64.w_down
    stage = fused(xn, exn, as_queries(qn), as_queries(eqn), params["keys"], rows, params["w_up"], dy,
                  torch.zeros_like(dy), layer64.num_experts_per_head, layer64.product_key_topk, layer64.gating,
                  layer64.activation, layer64.separate_embed_per_head)
    out["y"] = stage["y"]
    for name in ("dkeys", "dw_down", "dw_up"):
        out[name[1:]] = stage[name]
    dq, edq = (t.transpose(1, 2).reshape(T, -1) for t in stage["dqueries"])
    if kind == "layernorm":
        (dq, edq), ((dw, edw), (db, edb)) = ln.backward(dq.reshape(-1, dk), edq.reshape(-1, dk))
        dq, edq = dq.reshape(T, -1), edq.reshape(T, -1)
        out["query_norm.weight"], out["query_norm.bias"] = (dw, edw), (db, edb)
    elif kind == "batchnorm":
        (dq, edq), grads = batch.backward(dq.T.contiguous(), edq.T.contiguous())
        dq, edq = dq.T, edq.T
        out["query_norm.weight"], out["query_norm.bias"] = [(d[:, 0], e[:, 0]) for d, e in grads[:2]]
    (dxn_q, edxn_q), out["to_queries.weight"] = _linear_backward(xn, exn, W, dq, edq)
    dxn_e, edxn_e = stage["dx"]
    dxn = dxn_e + dxn_q
    edxn = edxn_e + edxn_q + dxn.abs()
    if layer64.pre_rmsnorm:
        out["x"], ((dgamma, edgamma),) = rms.backward(dxn, edxn)
        out["norm.gamma"] = (dgamma, edgamma)
    else:
        out["x"] = (dxn, edxn)
    return out


# ---- the oracle and the comparison for a whole layer -------------------------------------------

def layer_oracle(layer, x, dy):
    """A float64 copy of `layer` on the reference backend (same mode), run on x (..., dim) with
    output gradient dy: name -> float64 value for "y", "x" and every parameter's gradient."""
    import copy

    layer64 = copy.deepcopy(layer).double()
    layer64.backend = "reference"
    x64 = x.detach().double().requires_grad_()
    y = layer64(x64)
    names = [name for name, p in layer64.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x64] + [dict(layer64.named_parameters())[n] for n in names], dy.double(),
                                allow_unused=True)
    exact = {"y": y.detach(), "x": grads[0]}
    exact.update({n: g for n, g in zip(names, grads[1:])})
    return layer64, exact


def expected_layer(layer, x, dy):
    """name -> (exact float64 value, S) for the layer's output and every gradient; the bound
    formulas' own values are checked against the oracle's autograd first."""
    import copy

    before = copy.deepcopy(layer).double()  # the oracle's forward updates batchnorm's running stats
    before.backend = "reference"
    _, exact = layer_oracle(layer, x, dy)
    T = exact["y"].reshape(-1, layer.dim).shape[0]
    formulas = layer_bounds(before, x.detach().double().reshape(T, -1), dy.double().reshape(T, -1))
    out = {}
    for name, value in exact.items():
        if value is None:
            continue
        mine, magnitude = formulas[name]
        torch.testing.assert_close(mine.reshape(value.shape), value, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"bound formulas disagree with the oracle on {name}: {m}")
        out[name] = (value, magnitude.reshape(value.shape))
    return out


def layer_results(layer, x, dy):
    """Runs `layer` itself on x with output gradient dy: name -> its output and gradients."""
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params.values()], dy.to(y.dtype), allow_unused=True)
    out = {"y": y.detach(), "x": grads[0]}
    out.update({n: g for n, g in zip(params, grads[1:]) if g is not None})
    return out
