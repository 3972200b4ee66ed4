"""The PEER module: options, bad input, state_dict, and parity with peer-pytorch."""
import io
import math

import pytest
import torch
from torch import nn

import bounds
import peer_kernels
from peer_kernels import _device, backends, reference
from utils import untie, untie_layer

PEER_pytorch = pytest.importorskip("PEER_pytorch")

SMALL = dict(heads=3, num_experts=49, num_experts_per_head=5, dim_key=8)


def _layer(dim=32, **overrides):
    return peer_kernels.PEER(dim, **{**SMALL, "backend": "reference", **overrides})


# ---- bad input -------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(num_experts=50), "num_experts", "perfect square"),
    (dict(num_experts_per_head=0), "num_experts_per_head", ">= 1"),
    (dict(product_key_topk=8), "product_key_topk", "<= n"),
    (dict(num_experts_per_head=10, product_key_topk=3), "num_experts_per_head",
     "expected <= product_key_topk**2 = 9 candidates, got 10"),
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
    with pytest.raises(TypeError, match="x: float64 mixes with no other dtype.*torch.float32"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 32])
    with pytest.raises(ValueError, match="x: expected a tensor with data.*meta"):
        layer(torch.randn(4, 32, device="meta"))


def test_errors_name_what_the_user_passed():
    with pytest.raises(ValueError, match=r"num_experts_per_head .*: expected <= n = sqrt\(num_experts\) = 7"):
        _layer(num_experts_per_head=10 ** 6)
    with pytest.raises(ValueError, match=r"product_key_topk: expected <= n = sqrt\(num_experts\) = 7 .*, got 8"):
        _layer(product_key_topk=8)


def test_one_token_in_training_with_batchnorm_is_a_clear_error():
    layer = _layer(query_norm="batchnorm").train()
    with pytest.raises(ValueError, match=r"x: got shape \(1, 1, 32\), 1 token; query_norm='batchnorm'.*cannot "
                                         r"normalise 1 token.*layernorm"):
        layer(torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match=r"x: got shape \(32,\), 1 token"):  # a 1-D input is one token
        layer(torch.randn(32))
    assert layer.eval()(torch.randn(1, 1, 32)).shape == (1, 1, 32)
    assert _layer(query_norm="layernorm").train()(torch.randn(1, 32)).shape == (1, 32)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_non_finite_token_in_training_with_batchnorm_is_a_clear_error(backend):
    """Before: batch norm folded the NaN into its running statistics, and every later eval output
    was NaN. After: a ValueError naming x before the statistics change (CPU tensors; on a GPU a
    device assert, which no CPU test can trigger); eval mode and per-token norms give NaN for that
    token only."""
    layer = _layer(query_norm="batchnorm", backend=backend).train()
    statistics = {name: value.clone() for name, value in layer.query_norm.named_buffers()}
    x = torch.randn(6, 32)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match="x: a token's query features are not finite .* query_norm='batchnorm'"):
        layer(x)
    for name, value in layer.query_norm.named_buffers():
        assert torch.equal(value, statistics[name]), name
    for layer in (layer.eval(), _layer(query_norm="layernorm", backend=backend).train()):
        y = layer(x)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("query_norm", ["layernorm", None])
def test_leak_free_query_norms_in_training(query_norm):
    """A causal LM needs token t's output to depend on tokens <= t only. Per-token query norms
    give that in training mode; batchnorm (documented) does not."""
    x = torch.randn(2, 9, 32)
    changed = x.clone()
    changed[:, -1] = torch.randn(2, 32)
    layer = _layer(query_norm=query_norm).train()
    assert torch.equal(layer(x)[:, :-1], layer(changed)[:, :-1])
    leaky = _layer(query_norm="batchnorm").train()
    assert not torch.equal(leaky(x)[:, :-1], leaky(changed)[:, :-1])


@pytest.mark.parametrize("options", [dict(), dict(pre_rmsnorm=True, query_norm="layernorm")])
def test_meta_device_then_reset_parameters(options):
    """The FSDP2 pattern: build on meta, allocate with to_empty, initialise with reset_parameters.
    Every parameter and buffer must be set: the result equals a layer reset from the same seed."""
    meta = _layer(device="meta", **options)
    with pytest.raises(ValueError, match="meta device.*to_empty.*reset_parameters"):
        meta(torch.randn(2, 32))
    meta.to_empty(device="cpu")
    for t in meta.state_dict().values():   # whatever to_empty left there: make it visible if kept
        if t.is_floating_point():
            t.fill_(float("nan"))
    torch.manual_seed(3)
    meta.reset_parameters()
    reference_layer = _layer(**options)
    with torch.no_grad():
        for t in reference_layer.state_dict().values():
            t.fill_(7)
    torch.manual_seed(3)
    reference_layer.reset_parameters()
    for name, value in reference_layer.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    x = torch.randn(3, 32)
    assert torch.isfinite(meta(x)).all()


def test_resolved_backend_says_where_forward_runs():
    assert _layer(backend="reference").resolved_backend == "reference"
    auto = peer_kernels.PEER(32, **SMALL)
    assert auto.resolved_backend == ("cpp" if peer_kernels.csrc.available() else "reference")
    assert auto.resolved_backend == backends.resolve("auto", torch.device("cpu"))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_device, "INTERPRETED", False)
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        _layer(backend="triton")(torch.randn(2, 32))


def test_auto_backend_on_cpu_is_cpp_or_reference():
    name = backends.resolve("auto", torch.device("cpu"))
    assert name == ("cpp" if peer_kernels.csrc.available() else "reference")
    assert backends.resolve("auto", torch.device("cuda")) == "triton"


def test_query_projection_takes_the_cpp_op_only_for_a_plain_linear(monkeypatch):
    """On the C++ backend the layer projects its queries by _library.project when to_queries is a
    plain bias-free Linear with no hook, outside autocast, and the output is the Linear's; a hook
    on to_queries (which the op would skip), autocast or another backend call to_queries itself."""
    if not peer_kernels.csrc.available():
        pytest.skip("the C++ extension did not build")
    from peer_kernels import _library

    calls = []
    run = _library.run

    def spy(op, *args):
        if op is _library.project:
            calls.append(args[0])
        return run(op, *args)

    monkeypatch.setattr(_library, "run", spy)
    layer = _layer(backend="cpp", query_norm=None).eval()
    x = untie_layer(layer, torch.randn(9, 32, dtype=torch.float64)).float()
    calls.clear()
    with torch.no_grad():
        y = layer(x)
        assert calls == ["cpp"]
        torch.testing.assert_close(layer.queries(x), layer.to_queries(x).view(9, 2, 3, 8).transpose(1, 2))
        seen = []
        handle = layer.to_queries.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
        torch.testing.assert_close(layer(x), y)
        handle.remove()
        assert seen == [(9, 48)] and len(calls) == 2  # the forward's and queries()'s
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        reference_layer = _layer(backend="reference", query_norm=None).eval()
        reference_layer.load_state_dict(layer.state_dict())
        torch.testing.assert_close(reference_layer(x), y)
    assert len(calls) == 2
    y = layer(x)  # with gradients too, through the op's autograd
    y.square().sum().backward()
    assert len(calls) == 3 and layer.to_queries.weight.grad is not None


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", PARITY_CONFIGS)
def test_peer_pytorch_parity(config, dtype):
    """The same weights give the same outputs and gradients: ours and peer-pytorch's, each within the
    bound of tests/bounds.py of the float64 oracle."""
    theirs = _peer_pytorch(dtype, **config)
    ours = peer_kernels.PEER.from_peer_pytorch(theirs, backend="reference")
    x = untie_layer(ours, torch.randn(2, 5, 24, dtype=dtype))
    dy = torch.randn(2, 5, 24, dtype=dtype)
    expected = bounds.expected_layer(ours, x, dy)
    bounds.check_all(bounds.layer_results(ours, x, dy), expected)
    names = {"y": "y", "x": "x", "to_queries.0.weight": "to_queries.weight", "keys": "keys",
             "weight_down_embed.weight": "w_down", "weight_up_embed.weight": "w_up", "norm.gamma": "norm.gamma"}
    theirs_results = bounds.layer_results(theirs, x, dy)
    bounds.check_all({names[n]: t for n, t in theirs_results.items()}, expected)


# what a PEER_pytorch.PEER's weights do not say, as its constructor's defaults
NOT_IN_THE_WEIGHTS = dict(non_competing_scores=True, num_experts_per_head=16, activation=nn.GELU)


@pytest.mark.parametrize("config", PARITY_CONFIGS)
def test_from_state_dict_and_back(config):
    """The state_dict form with what the weights do not say, shapes read from the weights (or given,
    agreeing), equals the module form."""
    theirs = _peer_pytorch(torch.float64, **config)
    told = {**NOT_IN_THE_WEIGHTS, "num_experts_per_head": PARITY_SHAPE["num_experts_per_head"], **config}
    for shapes in ({}, PARITY_SHAPE):
        ours = peer_kernels.PEER.from_peer_pytorch(theirs.state_dict(), **{**shapes, **told})
        back = ours.to_peer_pytorch()
        x = torch.randn(7, 24, dtype=torch.float64)
        y = theirs(x[None])[0]
        torch.testing.assert_close(ours(x), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(back(x[None])[0], y, rtol=0, atol=0)


def test_from_state_dict_refuses_to_guess():
    """Before: gating, k and the activation defaulted to peer-pytorch's, whatever the module was
    built with, and a softmax k=4 module loaded as relu k=1 (other outputs, silently)."""
    theirs = _peer_pytorch(torch.float64, non_competing_scores=False, activation=nn.ReLU)
    state = theirs.state_dict()
    with pytest.raises(TypeError, match="weights do not say non_competing_scores, num_experts_per_head, activation"):
        peer_kernels.PEER.from_peer_pytorch(state, dim=24, heads=3, num_experts=36, dim_key=6)
    told = dict(non_competing_scores=False, num_experts_per_head=4, activation=nn.ReLU)
    for name in told:
        with pytest.raises(TypeError, match=f"weights do not say {name};"):
            peer_kernels.PEER.from_peer_pytorch(state, **{k: v for k, v in told.items() if k != name})
    with pytest.raises(ValueError, match="dim: the state_dict's weights say 24, got 32"):
        peer_kernels.PEER.from_peer_pytorch(state, dim=32, **told)
    with pytest.raises(ValueError, match="pre_rmsnorm: the state_dict's weights say False, got True"):
        peer_kernels.PEER.from_peer_pytorch(state, pre_rmsnorm=True, **told)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['heeds'\]"):
        peer_kernels.PEER.from_peer_pytorch(state, heeds=3, **told)
    x = torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(peer_kernels.PEER.from_peer_pytorch(state, **told)(x), theirs(x[None])[0],
                               rtol=1e-12, atol=1e-12)


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


# ---- mixed precision -------------------------------------------------------------------------------

def _backend_params():
    from conftest import DEVICE
    triton_ok = DEVICE.type == "cuda" or _device.INTERPRETED
    return ["reference", "cpp"] + (["triton"] if triton_ok else [])


class _TableCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every dtype conversion of a tensor shaped like an expert table."""

    def __init__(self, table_shape):
        super().__init__()
        self.table_shape, self.casts = tuple(table_shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_) and tuple(args[0].shape) == \
                self.table_shape and isinstance(out, torch.Tensor) and out.dtype != args[0].dtype:
            self.casts.append(str(func))
        return out


@pytest.mark.parametrize("backend", _backend_params())
def test_autocast_bf16_against_the_float64_oracle(backend):
    """fp32 parameters under torch.autocast(bfloat16): the output is bf16; the layer's own op sees
    bf16 tokens, queries and keys (cast like an autocast Linear's weight) and the fp32 tables as
    stored, and its results are within the fp32 bound of the float64 oracle on those very values,
    plus the final bf16 rounding. No expert table is ever cast."""
    layer = peer_kernels.PEER(32, heads=2, num_experts=49, num_experts_per_head=4, dim_key=8, query_norm="layernorm",
                              backend=backend)
    x = torch.randn(3, 6, 32)

    def bf16_queries(tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer.queries(tokens.bfloat16())

    untie(x.view(-1, 32), bf16_queries, layer.keys.bfloat16(), 4, 4)
    captured = {}

    def capture(module, inputs, output):
        captured["queries"] = output.detach()
        output.register_hook(lambda grad: captured.__setitem__("dqueries", grad))

    layer.query_norm.register_forward_hook(capture)
    dy = torch.randn(3, 6, 32, dtype=torch.bfloat16)
    with _TableCasts(layer.w_down.shape) as casts:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)   # outside the autocast region, as torch.amp recommends
    assert casts.casts == []
    assert y.dtype == torch.bfloat16 and captured["queries"].dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    T = 18
    queries = captured["queries"].double().view(T, 2, 2, 8).transpose(1, 2)
    tokens = x.reshape(T, 32).bfloat16().double()
    expected = bounds.fused(tokens, torch.zeros_like(tokens), queries, torch.zeros_like(queries),
                            layer.keys.detach().bfloat16().double(), layer.w_down.detach().double(),
                            layer.w_up.detach().double(), dy.reshape(T, 32).double(), torch.zeros(T, 32), 4, 4,
                            "softmax", "gelu", False)
    bounds.check("y", y.reshape(T, 32), *expected["y"])
    bounds.check("w_down", layer.w_down.grad, *expected["dw_down"])
    bounds.check("w_up", layer.w_up.grad, *expected["dw_up"])
    # keys were cast to bf16 for the op, so their gradient comes back rounded to bf16
    bounds.check("keys", layer.keys.grad.bfloat16(), *expected["dkeys"])
    dqueries = captured["dqueries"].view(T, 2, 2, 8).transpose(1, 2)
    bounds.check("dqueries", dqueries, *expected["dqueries"])


def test_bf16_input_into_an_fp32_layer():
    """Outside autocast a bf16 x works too: the query path runs in the parameters' dtype, the
    expert op on bf16 tokens and the fp32 tables, and y comes back in x's dtype."""
    layer = peer_kernels.PEER(32, **SMALL, query_norm=None, backend="reference")
    x = untie_layer(layer, torch.randn(5, 32).bfloat16().float()).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    queries = layer.queries(x.float()).double()
    expected = bounds.fused(x.double(), torch.zeros(5, 32, dtype=torch.float64), queries, torch.zeros_like(queries),
                            layer.keys.detach().double(), layer.w_down.detach().double(), layer.w_up.detach().double(),
                            torch.zeros(5, 32, dtype=torch.float64), torch.zeros(5, 32, dtype=torch.float64), 5, 5,
                            "softmax", "gelu", False)
    bounds.check("y", y, *expected["y"])


# ---- sparse table gradients ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backend_params())
def test_sparse_grad_with_pytorchs_sparse_optimizers(backend):
    """sparse_grad=True: w_down.grad / w_up.grad are coalesced sparse COO tensors of the touched
    rows, equal to the dense gradients there (which are zero elsewhere), and torch.optim.SparseAdam,
    SGD and Adagrad step on them unchanged."""
    torch.manual_seed(0)
    sparse = peer_kernels.PEER(16, **SMALL, sparse_grad=True, backend=backend, query_norm="layernorm")
    dense = peer_kernels.PEER(16, **SMALL, backend=backend, query_norm="layernorm")
    dense.load_state_dict(sparse.state_dict())
    x = untie_layer(dense, torch.randn(2, 5, 16))
    dy = torch.randn(2, 5, 16)
    expected = bounds.expected_layer(dense, x, dy)
    for layer in (sparse, dense):
        (layer(x) * dy).sum().backward()
    for name in ("w_down", "w_up"):
        grad, full = sparse.get_parameter(name).grad, dense.get_parameter(name).grad
        assert grad.is_sparse and grad.is_coalesced() and grad.shape == full.shape
        rows = grad.indices()[0]
        untouched = torch.ones(full.shape[0], dtype=torch.bool)
        untouched[rows] = False
        assert not full[untouched].any()
        exact, magnitude = expected[name]
        bounds.check(name, grad.values(), exact[rows], magnitude[rows])
    for optimizer in (torch.optim.SparseAdam([sparse.w_down, sparse.w_up]),
                      torch.optim.SGD([sparse.w_down, sparse.w_up], lr=0.1),
                      torch.optim.Adagrad([sparse.w_down, sparse.w_up])):
        before = sparse.w_down.detach().clone()
        optimizer.step()
        changed = (sparse.w_down != before).any(dim=1)
        assert torch.equal(changed.nonzero()[:, 0], sparse.w_down.grad.indices()[0])
