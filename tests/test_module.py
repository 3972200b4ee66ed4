"""The PEER module: options, bad input, state_dict, and parity with peer-pytorch."""
import io
import math

import pytest
import torch
from torch import nn

import peer_kernels
from peer_kernels import backends, reference

PEER_pytorch = pytest.importorskip("PEER_pytorch")

SMALL = dict(heads=3, num_experts=49, num_experts_per_head=5, dim_key=8)


def _layer(dim=32, **overrides):
    return peer_kernels.PEER(dim, **{**SMALL, "backend": "reference", **overrides})


# ---- bad input -------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(num_experts=50), "num_experts", "perfect square"),
    (dict(num_experts_per_head=0), "num_experts_per_head", ">= 1"),
    (dict(product_key_topk=8), "product_key_topk", "<= n"),
    (dict(num_experts_per_head=10, product_key_topk=3), "num_experts_per_head", "<= k_sub**2"),
    (dict(activation="tanh"), "activation", "'tanh'"),
    (dict(gating="softplus"), "gating", "'softplus'"),
    (dict(query_norm="rmsnorm"), "query_norm", "'rmsnorm'"),
    (dict(backend="cuda"), "backend", "'cuda'"),
    (dict(heads=0), "heads", ">= 1"),
    (dict(dim_key=0), "dim_key", ">= 1"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(dropout=-0.1), "dropout", "[0, 1)"),
]


@pytest.mark.parametrize("overrides,argument,expected", BAD_CONFIGS)
def test_bad_constructor_arguments(overrides, argument, expected):
    with pytest.raises(ValueError) as error:
        _layer(**overrides)
    message = str(error.value)
    assert argument in message and expected in message


def test_bad_forward_input():
    layer = _layer()
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., dim\) with dim = 32, got \(4, 31\)"):
        layer(torch.randn(4, 31))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        layer(torch.ones(4, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point.*torch.bool"):
        layer(torch.ones(4, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="parameters' dtype torch.float32, got torch.float64"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 32])


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "TRITON_INTERPRETED", False)
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        _layer(backend="triton")(torch.randn(2, 32))


def test_auto_backend_on_cpu_is_cpp_or_reference():
    name = backends.resolve("auto", torch.device("cpu"))
    assert name == ("cpp" if peer_kernels.csrc.available() else "reference")
    assert backends.resolve("auto", torch.device("cuda")) == "triton"


# ---- shapes and options ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32,), (5, 32), (2, 3, 32), (2, 1, 2, 32)])
def test_any_leading_shape(shape):
    layer = _layer().eval()
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 32), layer(x.reshape(-1, 32)))


def test_empty_batch():
    layer = _layer()
    x = torch.randn(0, 7, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 7, 32)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("options", [
    dict(query_norm="batchnorm"), dict(query_norm="layernorm"), dict(query_norm=None),
    dict(pre_rmsnorm=True), dict(shared_keys=True), dict(separate_embed_per_head=True),
    dict(gating="sigmoid", activation="silu"), dict(gating="relu", activation="gelu_tanh"),
])
def test_options_match_the_reference_composition(options):
    """The module is the reference layer applied to its own queries; recompute it by hand."""
    layer = _layer(**options).double().eval()
    x = torch.randn(6, 32, dtype=torch.float64)
    xn = layer.norm(x)
    q = layer.to_queries(xn)
    if layer.query_norm_kind == "batchnorm":
        bn = layer.query_norm
        q = (q - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    elif layer.query_norm_kind == "layernorm":
        q = nn.functional.layer_norm(q.view(6, 6, 8), (8,), layer.query_norm.weight, layer.query_norm.bias)
    queries = q.reshape(6, 2, 3, 8).permute(0, 2, 1, 3)
    expected = reference.peer_fused(xn, queries, layer.keys, layer.w_down, layer.w_up, 5, 5, layer.gating,
                                    layer.activation, layer.separate_embed_per_head)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.keys.shape == ((1 if layer.shared_keys else 3), 7, 2, 8)
    assert layer.w_down.shape == ((3 if layer.separate_embed_per_head else 1) * 49, 32)


def test_dropout_is_dropout_on_the_activations():
    layer = _layer(dropout=0.4, query_norm=None).double().train()
    x = torch.randn(6, 32, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x)
    queries = layer.queries(x)
    scores, ids = reference.product_key_topk(queries, layer.keys, 5)
    a = reference.activate(torch.einsum("thkd,td->thk", layer.w_down[ids], x), "gelu")
    torch.manual_seed(123)
    a = nn.functional.dropout(a, 0.4)
    expected = torch.einsum("thk,thkd->td", torch.softmax(scores, -1) * a, layer.w_up[ids])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, layer.eval()(x))


def test_state_dict_round_trip():
    layer = _layer(pre_rmsnorm=True, query_norm="layernorm")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    other = _layer(pre_rmsnorm=True, query_norm="layernorm")
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), other(x))
    assert set(layer.state_dict()) == {"norm.gamma", "to_queries.weight", "query_norm.weight", "query_norm.bias",
                                       "keys", "w_down", "w_up"}


def test_initialisation_scales():
    layer = peer_kernels.PEER(256, heads=2, num_experts=64 ** 2, num_experts_per_head=4, dim_key=64)
    assert abs(layer.w_down.std().item() - 1 / 16) < 2e-3
    assert abs(layer.w_up.std().item() - 1 / 16) < 2e-3
    assert abs(layer.keys.std().item() - 1 / 8) < 5e-3


# ---- peer-pytorch parity ---------------------------------------------------------------------------

PARITY_CONFIGS = [
    dict(),  # peer-pytorch's defaults: non_competing_scores=True (relu gates, k=1), GELU
    dict(non_competing_scores=False),
    dict(non_competing_scores=False, separate_embed_per_head=True),
    dict(non_competing_scores=False, pre_rmsnorm=True, activation=nn.ReLU),
    dict(non_competing_scores=True, pre_rmsnorm=True, separate_embed_per_head=True, product_key_topk=3),
]
PARITY_SHAPE = dict(dim=24, heads=3, num_experts=36, num_experts_per_head=4, dim_key=6)


def _peer_pytorch(dtype, **config):
    theirs = PEER_pytorch.PEER(**PARITY_SHAPE, **config).to(dtype)
    with torch.no_grad():  # move every parameter off its special initial value (gamma = 0, ...)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return theirs


def _outputs_and_grads(layer, x, names):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(7)))
    params = dict(layer.named_parameters())
    return [y, x.grad] + [params[name].grad for name in names]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", PARITY_CONFIGS)
def test_peer_pytorch_parity(config, dtype, tol):
    theirs = _peer_pytorch(dtype, **config)
    ours = peer_kernels.PEER.from_peer_pytorch(theirs, backend="reference")
    x = torch.randn(2, 5, 24, dtype=dtype)
    names = [(mine, their) for mine, their in [("to_queries.weight", "to_queries.0.weight"), ("keys", "keys"),
             ("w_down", "weight_down_embed.weight"), ("w_up", "weight_up_embed.weight"),
             ("norm.gamma", "norm.gamma")] if their in dict(theirs.named_parameters())]
    got = _outputs_and_grads(ours, x, [m for m, _ in names])
    expected = _outputs_and_grads(theirs, x, [t for _, t in names])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("config", PARITY_CONFIGS[:3])
def test_from_state_dict_and_back(config):
    theirs = _peer_pytorch(torch.float64, **config)
    ours = peer_kernels.PEER.from_peer_pytorch(theirs.state_dict(), **PARITY_SHAPE, **config)
    back = ours.to_peer_pytorch()
    x = torch.randn(7, 24, dtype=torch.float64)
    y = theirs(x[None])[0]
    torch.testing.assert_close(ours(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back(x[None])[0], y, rtol=0, atol=0)


def test_to_peer_pytorch_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="query_norm"):
        _layer().to_peer_pytorch()
    with pytest.raises(ValueError, match="shared_keys"):
        _layer(query_norm=None, shared_keys=True).to_peer_pytorch()
    with pytest.raises(ValueError, match="gating='sigmoid'"):
        _layer(query_norm=None, gating="sigmoid").to_peer_pytorch()
    with pytest.raises(ValueError, match="activation"):
        peer_kernels.PEER.from_peer_pytorch(PEER_pytorch.PEER(8, heads=1, num_experts=16, num_experts_per_head=2,
                                                               activation=nn.Tanh))


def test_unit_rms_pre_norm_matches_peer_pytorch_formula():
    x = torch.randn(3, 24, dtype=torch.float64)
    ours = peer_kernels.module.RMSNorm(24).double()
    torch.testing.assert_close(ours(x).norm(dim=-1), torch.full((3,), math.sqrt(24), dtype=torch.float64))
