"""peer_kernels.quantize_: expert tables stored in int8 / float8_e4m3fn with a float32 scale per row,
for inference, on every backend.

What is checked: the representation (symmetric absmax per row, the per-value error of each dtype);
the conversion of every layer of a model in place; the refusal to train; each backend's expert
stage on quantized tables against the float64 oracle on the dequantized tables (bounds.py: the
rounding of what is summed); the output error of a quantized layer against the float layer, within
a bound derived from the per-row quantization steps; saving and loading; and, statically, that the
Triton gather reads half of bf16's bytes per row (AOT-compiled SASS for sm_90 and sm_80).
"""
import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

import aot
import bounds
import configs
from conftest import DEVICE, device_for
from peer_kernels import PEER, _checks, _device, _library, backends, quantize, quantize_, reference, tuning, warmup
from peer_kernels.quantize import LARGEST, quantize_rows
from utils import random_ids, untie_layer

DTYPES = [torch.int8, torch.float8_e4m3fn]
DTYPE_IDS = ["int8", "fp8"]
BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])
# float8_e4m3fn keeps 3 mantissa bits: a value's rounding error is at most 2**-4 of it, and below the
# smallest normal (2**-6) at most half the subnormal spacing 2**-9 (in units of the row's scale)
FP8_RELATIVE, FP8_ABSOLUTE = 2.0 ** -4, 2.0 ** -10
# max |act'(z)| over z: GELU's slope peaks at 1.129 (z = 1.414), SiLU's at 1.100 (z = 2.40)
SLOPE = {"relu": 1.0, "gelu": 1.13, "gelu_tanh": 1.13, "silu": 1.1, "identity": 1.0}


def quantization_error_bound(table, values, scale):
    """Elementwise bound on |table - values * scale| that the dtype guarantees."""
    step = scale.double()[:, None]
    if values.dtype == torch.int8:
        return 0.5 * step.expand(table.shape)
    return FP8_RELATIVE * table.double().abs() + FP8_ABSOLUTE * step


def bits(t):
    """t, with float8 as its bytes (torch.equal has no float8 kernel on a CPU)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def dequantized(values, scale):
    """The float64 table a quantized one stands for (tests only: no op ever builds it)."""
    return values.double() * scale.double()[:, None]


def tables(rows, d, dtype, device=DEVICE):
    """A float table with rows of very different sizes, a zero row and a row with one outlier,
    and its quantized form."""
    table = torch.randn(rows, d, device=device) * torch.logspace(-3, 1, rows, device=device)[:, None]
    table[1] = 0
    table[2, 3] = 50.0
    return table, *quantize_rows(table, dtype)


# ---- the representation ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_keep_their_absmax_and_the_dtypes_error_bound(dtype, source):
    table, values, scale = tables(37, 24, dtype)
    table = table.to(source)
    values, scale = quantize_rows(table, dtype)
    assert values.dtype == dtype and values.shape == table.shape
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    absmax = table.double().abs().amax(1)
    torch.testing.assert_close(scale.double(), absmax / LARGEST[dtype], rtol=2 ** -23, atol=0)
    # each nonzero row's largest value maps to the dtype's largest: its full precision is used
    assert torch.equal(values.float().abs().amax(1)[absmax > 0], torch.full_like(absmax[absmax > 0], LARGEST[dtype]).float())
    assert not values[1].float().any() and scale[1] == 0          # a zero row stays exact
    error = (table.double() - dequantized(values, scale)).abs()
    allowed = quantization_error_bound(table, values, scale) * (1 + 1e-6)  # fp32 division rounding
    assert (error <= allowed).all(), (error / allowed).max()


def test_large_tables_are_quantized_in_chunks_alike(monkeypatch):
    table = torch.randn(50, 16)
    whole = quantize_rows(table, torch.int8)
    monkeypatch.setattr(quantize, "_VALUES_PER_CHUNK", 7 * 16)
    chunked = quantize_rows(table, torch.int8)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("arch", [0, 80, 86, 89, 90])
def test_float8_tables_need_sm_89_for_triton(arch):
    """Triton before sm_89 has no float8_e4m3fn (compiling for sm_80 raises "type fp8e4nv not
    supported in this architecture"): the launchers say so and name the way out; int8 runs
    everywhere, and off CUDA (arch 0: the interpreter) so does fp8."""
    fp8, int8 = torch.zeros(2, 4, dtype=torch.float8_e4m3fn), torch.zeros(2, 4, dtype=torch.int8)
    _checks.check_table_arch("w_up", int8, arch)
    if 0 < arch < 89:
        with pytest.raises(TypeError, match=rf"w_up: float8_e4m3fn tables need .* sm_89 .* this one is sm_{arch}.*int8"):
            _checks.check_table_arch("w_up", fp8, arch)
    else:
        _checks.check_table_arch("w_up", fp8, arch)


def test_non_finite_rows_and_other_dtypes_raise():
    table = torch.randn(6, 4)
    table[4, 1] = float("inf")
    with pytest.raises(ValueError, match="table: row 4 is not finite"):
        quantize_rows(table, torch.int8)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        quantize_rows(torch.randn(3, 4), torch.float16)


# ---- quantize_ on layers and models ----------------------------------------------------------------------

def _layer(d=24, **options):
    options = dict(dict(heads=2, num_experts=36, num_experts_per_head=3, dim_key=8, query_norm="layernorm"), **options)
    return PEER(d, device=DEVICE, **options).eval()


def test_quantize_converts_every_layer_of_a_model_in_place():
    model = nn.ModuleDict({"first": _layer(), "mlp": nn.Linear(24, 24), "deep": nn.Sequential(_layer())})
    names = [name for name, _ in model.named_parameters()]
    assert quantize_(model) is model
    assert [name for name, _ in model.named_parameters()] == names
    for layer in (model["first"], model["deep"][0]):
        assert layer.w_down.dtype == layer.w_up.dtype == torch.int8
        assert not layer.w_down.requires_grad and not layer.w_up.requires_grad
        assert layer.w_down_scale.shape == layer.w_up_scale.shape == (36,)
        assert layer.to_queries.weight.requires_grad and layer.keys.dtype == torch.float32   # the rest stays
        assert "quantized=torch.int8" in repr(layer)
    tables = model["first"].w_down
    quantize_(model, torch.int8)                 # already int8: left as it is
    assert model["first"].w_down is tables
    with pytest.raises(ValueError, match="quantized to torch.int8 already"):
        quantize_(model, torch.float8_e4m3fn)


@pytest.mark.parametrize("module, error, match", [
    (nn.Linear(3, 3), ValueError, "module: no peer_kernels.PEER layer in this Linear"),
    ("layer", TypeError, "module: expected a torch.nn.Module"),
])
def test_quantize_needs_peer_layers(module, error, match):
    with pytest.raises(error, match=match):
        quantize_(module)


def test_quantize_refuses_other_dtypes_and_meta_tables():
    with pytest.raises(ValueError, match="dtype: expected one of"):
        quantize_(_layer(), torch.bfloat16)
    with pytest.raises(ValueError, match="meta device"):
        quantize_(PEER(8, heads=1, num_experts=4, num_experts_per_head=1, dim_key=4, device="meta"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dtype_casts_keep_the_quantized_tables(dtype):
    """module.to(dtype) / .half() cast every floating tensor; the tables and their scales keep
    theirs, and the layer runs in the new dtype."""
    layer = quantize_(_layer(), dtype)
    tables = {name: getattr(layer, name).clone() for name in ("w_down", "w_up", "w_down_scale", "w_up_scale")}
    layer.to(torch.bfloat16)
    assert layer.keys.dtype == torch.bfloat16
    for name, before in tables.items():
        assert torch.equal(bits(getattr(layer, name)), bits(before)), name
    assert isinstance(layer.w_down, nn.Parameter) and not layer.w_down.requires_grad
    with torch.no_grad():
        assert layer(torch.randn(3, 24, device=DEVICE, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_custom_expert_stage_refuses_quantized_tables():
    """An expert_stage (the seam peer_kernels.distributed uses) takes float tables."""
    layer = quantize_(_layer())
    layer.expert_stage = lambda *args: pytest.fail("the stage must not run")
    with torch.no_grad(), pytest.raises(ValueError, match="expert_stage: a custom expert stage"):
        layer(torch.randn(3, 24, device=DEVICE))


def test_warmup_runs_quantized_layers():
    """peer_kernels.warmup feeds a layer input of its float parameters' dtype, not its tables'."""
    layer = quantize_(PEER(24, heads=2, num_experts=8 ** 2, num_experts_per_head=4, dim_key=8,
                           backend="reference").eval())
    assert warmup(layer, tokens=(1, 3)) is layer


def test_grow_refuses_quantized_tables():
    with pytest.raises(ValueError, match="layer: its tables are quantized"):
        quantize_(_layer()).grow(49)


# ---- inference only ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_layer_refuses_training(backend):
    layer = quantize_(_layer(backend=backend).to(device_for(backend)), torch.float8_e4m3fn)
    x = torch.randn(5, 24, device=device_for(backend))
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    with pytest.raises(ValueError, match=r"queries: requires a gradient, but the expert tables are quantized "
                                         r"\(peer_kernels.quantize_\), which is for inference only"):
        layer(x)                                  # the query projection's weight requires grad
    layer.requires_grad_(False)
    layer(x)                                      # nothing needs a gradient: runs with grad enabled
    with pytest.raises(ValueError, match="x: requires a gradient"):
        layer(x.requires_grad_())
    layer.w_up.requires_grad_()                   # float8 can require grad; the forward still refuses
    with pytest.raises(ValueError, match="w_up: requires a gradient"):
        layer(x.detach())
    with pytest.raises(RuntimeError, match="floating point"):
        quantize_(_layer()).w_down.requires_grad_()   # int8 cannot require grad at all


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_the_ops_autograd_refuses_quantized_tables(backend):
    """Called directly (past the public functions' checks), a forward op given scales refuses to
    record a backward: no backward op takes them."""
    if backend == "triton" and backend not in BACKENDS:
        pytest.skip("the Triton ops need CUDA or TRITON_INTERPRET=1")
    device = device_for(backend)
    _, w_down, down_scale = tables(9, 8, torch.int8, device)
    _, w_up, up_scale = tables(9, 8, torch.int8, device)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    ids, gates = random_ids(3, 2, 2, 9, device=device), torch.rand(3, 2, 2, device=device)
    with pytest.raises(ValueError, match="experts_forward's inputs: requires a gradient"):
        _library.experts_forward(backend, x, ids, gates, w_down, w_up, "gelu", True, False, down_scale, up_scale)
    with pytest.raises(ValueError, match="down_forward's inputs: requires a gradient"):
        _library.down_forward(backend, x, ids, w_down, True, False, down_scale)


# ---- every backend against the oracle on the dequantized tables -------------------------------------------------

def _expert_inputs(dtype, x_dtype, device, T=6, h=3, k=5, d=75, rows=23):
    # d = 75: whole vectors of 8, a tail of 3, and more than one block of 64 values (the C++ rows).
    # h * k = 15 slots: a group of 8 rows read side by side and 7 alone, per token.
    x = torch.randn(T, d, device=device).to(x_dtype)
    ids = random_ids(T, h, k, rows, device=device)
    ids[0, 1, 2] = ids[0, 0, 0]                   # one expert twice in a token
    gates = torch.rand(T, h, k, device=device) + 0.1
    _, w_down, down_scale = tables(rows, d, dtype, device)
    _, w_up, up_scale = tables(rows, d, dtype, device)
    return x, ids, gates, (w_down, down_scale), (w_up, up_scale)


@pytest.mark.parametrize("schedule", ["decode", "token_tiles"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "xbf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_stage_reads_rows_times_their_scales(backend, dtype, x_dtype, schedule):
    """peer_experts, peer_down and peer_mix on quantized tables equal the float64 oracle on the
    tables they stand for, within the rounding of what is summed (the scale's multiply included),
    on both schedules of the expert stage (tuning.token_schedule: few tokens, or token tiles)."""
    if backend == "reference" and schedule == "token_tiles":
        pytest.skip("the reference has one schedule")
    ops, device = backends.get(backend, device_for(backend)), device_for(backend)
    x, ids, gates, (w_down, down_scale), (w_up, up_scale) = _expert_inputs(dtype, x_dtype, device)
    down64, up64 = dequantized(w_down, down_scale), dequantized(w_up, up_scale)
    dy = torch.randn(x.shape, dtype=torch.float64)
    exact = bounds.experts(x.double().cpu(), ids.cpu(), gates.double().cpu(), down64.cpu(), up64.cpu(), dy, "silu")
    decode_tokens = x.shape[0] if schedule == "decode" else 0
    with torch.no_grad(), tuning.overrides(decode_tokens=decode_tokens):
        y = ops.peer_experts(x, ids, gates, w_down, w_up, "silu", w_down_scale=down_scale, w_up_scale=up_scale)
        z = ops.peer_down(x, ids, w_down, w_down_scale=down_scale)
        mixed = ops.peer_mix(z, ids, gates, w_up, "silu", w_up_scale=up_scale)
    assert y.dtype == x_dtype
    bounds.check("y", y.cpu(), *exact["y"])
    z_exact, z_magnitude = bounds.down(x.double().cpu(), ids.cpu(), down64.cpu(), torch.zeros(ids.shape, dtype=torch.float64))["z"]
    bounds.check("z", z.cpu(), z_exact, z_magnitude)
    mix_exact = bounds.mix(z.double().cpu(), ids.cpu(), gates.double().cpu(), up64.cpu(), dy, "silu")["y"]
    bounds.check("mix", mixed.cpu(), *mix_exact)


def _fused_inputs(layer, T=7):
    x = untie_layer(layer, torch.randn(T, layer.dim, device=layer.w_down.device, dtype=torch.float64)).float()
    with torch.no_grad():
        queries = layer.queries(x)
    return x, queries


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_on_quantized_tables(backend, dtype):
    """The whole op after the query projection, on every schedule the backend has (Triton: one
    pass, two kernels, overlapped), separate tables per head included."""
    device = device_for(backend)
    ops = backends.get(backend, device)
    schedules = [dict(one_pass=True), dict(overlap=False), dict(overlap=True)] if backend == "triton" else [{}]
    for separate in (False, True):
        layer = quantize_(_layer(separate_embed_per_head=separate).to(device), dtype)
        x, queries = _fused_inputs(layer)
        x64, q64 = x.double().cpu(), queries.double().cpu()
        exact = bounds.fused(x64, torch.zeros_like(x64), q64, torch.zeros_like(q64), layer.keys.double().cpu(),
                             dequantized(layer.w_down, layer.w_down_scale).cpu(),
                             dequantized(layer.w_up, layer.w_up_scale).cpu(), torch.zeros_like(x64),
                             torch.zeros_like(x64), 3, 3, "softmax", "gelu", separate)
        for schedule in schedules:
            with torch.no_grad():
                y = ops.peer_fused(x, queries, layer.keys, layer.w_down, layer.w_up, 3, 3, "softmax", "gelu", separate,
                                   w_down_scale=layer.w_down_scale, w_up_scale=layer.w_up_scale, **schedule)
            bounds.check(f"y {schedule}", y.cpu(), *exact["y"])


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_layer_output_error_is_within_the_quantization_bound(backend, dtype, activation):
    """The quantized layer (float32, on each backend) against the exact float layer on the same
    inputs. The retrieval does not read the tables, so both pick the same experts with the same
    gates g; a row's values move by at most e (the dtype's bound: half the row's step for int8),
    so z = u . x moves by dz <= sum_i e_u,i |x_i|, act(z) by at most L dz (L = max |act'|), and

        |y'_c - y_c| <= sum_j g_j (L dz_j |v'_j,c| + |act(z_j)| e_v,j,c),

    plus the float32 rounding of the quantized layer's own sums (bounds.py's C eps S)."""
    device = device_for(backend)
    float_layer = _layer(d=32, activation=activation, backend=backend).to(device)
    layer = quantize_(copy.deepcopy(float_layer), dtype)
    x = untie_layer(float_layer, torch.randn(9, 32, dtype=torch.float64, device=device)).float()
    with torch.no_grad():
        y = layer(x).double().cpu()
        exact_float = copy.deepcopy(float_layer).double()
        exact_float.backend = "reference"
        y_float = exact_float(x.double()).cpu()
        scores, ids = reference.product_key_topk(exact_float.queries(x.double()), exact_float.keys, 3, 3)
    gates, ids = torch.softmax(scores, -1).reshape(9, -1).cpu(), ids.reshape(9, -1).cpu()
    u, v = float_layer.w_down.detach().double().cpu()[ids], float_layer.w_up.detach().double().cpu()[ids]  # (T, S, d)
    down64, up64 = dequantized(layer.w_down, layer.w_down_scale).cpu(), dequantized(layer.w_up, layer.w_up_scale).cpu()
    e_u = quantization_error_bound(float_layer.w_down.detach().cpu(), layer.w_down.cpu(), layer.w_down_scale.cpu())[ids]
    e_v = quantization_error_bound(float_layer.w_up.detach().cpu(), layer.w_up.cpu(), layer.w_up_scale.cpu())[ids]
    x64 = x.double().cpu()
    dz = torch.einsum("tsd,td->ts", e_u, x64.abs())
    a = reference.activate(torch.einsum("tsd,td->ts", u, x64), activation)
    allowed = torch.einsum("ts,tsd->td", gates * SLOPE[activation] * dz, up64[ids].abs()) + \
        torch.einsum("ts,tsd->td", gates * a.abs(), e_v)
    rounding = bounds.experts(x64, ids.view(9, 2, 3), gates.view(9, 2, 3), down64, up64,
                              torch.zeros_like(x64), activation)["y"][1]
    error = (y - y_float).abs()
    assert (error <= allowed + bounds.C * bounds.unit(torch.float32) * rounding).all(), \
        (error / (allowed + 1e-30)).max()
    assert error.max() > 0                        # the tables were quantized: the bound is not vacuous


# ---- saving and loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dict_round_trip_into_a_fresh_float_layer(dtype):
    layer = quantize_(_layer(), dtype)
    state = layer.state_dict()
    assert state["w_down"].dtype == state["w_up"].dtype == dtype
    assert state["w_down_scale"].dtype == torch.float32 and state["w_up_scale"].shape == (36,)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _layer()                               # float tables: loading the checkpoint quantizes them
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.w_down.dtype == dtype and not fresh.w_down.requires_grad
    x = torch.randn(4, 24, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    other = quantize_(_layer(), torch.float8_e4m3fn if dtype == torch.int8 else torch.int8)
    other.load_state_dict(state)                   # another quantized dtype: the checkpoint's wins
    assert other.w_up.dtype == dtype
    with torch.no_grad():
        assert torch.equal(other(x), layer(x))


def test_meta_layer_loads_a_quantized_checkpoint_by_assignment():
    layer = quantize_(_layer())
    skeleton = PEER(24, heads=2, num_experts=36, num_experts_per_head=3, dim_key=8, query_norm="layernorm",
                    device="meta").eval()
    skeleton.load_state_dict(layer.state_dict(), assign=True)
    assert skeleton.w_down.device == layer.w_down.device and skeleton.w_down.dtype == torch.int8
    x = torch.randn(4, 24, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(skeleton(x), layer(x))


def test_float_checkpoint_into_a_quantized_layer_raises():
    state = _layer().state_dict()
    with pytest.raises(ValueError, match="state_dict: w_down is a torch.float32 table without its scale, but this "
                                         "layer's tables are quantized"):
        quantize_(_layer()).load_state_dict(state)


# ---- the Triton gather's bytes, from the SASS ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aot_gather():
    """The paper-shape expert forward with bf16, int8 and fp8 tables (fp8 needs sm_89+: sm_90 only),
    the persistent whole-SM variant and the one-pass kernel with quantized tables."""
    def paper(table):
        return dataclasses.replace(configs.PAPER, table_dtype=table)

    forwards = [(table, 90) for table in (torch.bfloat16, *DTYPES)] + [(torch.bfloat16, 80), (torch.int8, 80)]
    jobs = [job for table, arch in forwards for job in configs.experts_forward(paper(table), arch)]
    jobs += [job for table in DTYPES for job in configs.experts_forward(paper(table), 90, persistent=True)]
    jobs += [dict(configs.one_pass(paper(table), arch), disassemble=False)
             for table, arch in [(table, 90) for table in DTYPES] + [(torch.int8, 80)]]
    return list(zip(jobs, aot.compile_report(jobs)))


@pytest.mark.aot
def test_aot_quantized_tables_compile_without_spills(aot_gather):
    assert len(aot_gather) == 10
    for job, stats in aot_gather:
        assert stats["local_bytes"] == 0 and stats.get("stl", 0) == stats.get("ldl", 0) == 0, (aot.describe(job), stats)
        assert 0 < stats["registers"] <= 255, aot.describe(job)


@pytest.mark.aot
def test_aot_quantized_gather_reads_half_the_bytes_of_bf16(aot_gather):
    """Per table row, from the SASS: the up pass's loop reads nothing but w_up rows, each thread its
    share of a (BLOCK_T, BLOCK_S, BLOCK_D) tile per iteration in 128-bit loads (LDG.E.128); so its
    LDG.E.128 per iteration x 16 B x threads x D / BLOCK_D iterations / (BLOCK_T x BLOCK_S) rows is
    the bytes read per row: 2 D for bf16, D for int8 and fp8. The down pass reads as many w_down
    bytes, plus the x chunk (also 128-bit loads; one token per tile at these shapes)."""
    per_row = {}
    for job, stats in aot_gather:
        c = job["constexprs"]
        if job["kernel"] != "experts_fwd_kernel" or c["PERSISTENT"]:
            continue
        threads = 32 * job["num_warps"]
        down, up = [loop for loop in stats["loops"] if loop["instructions"] > 1]
        iterations, rows = c["D_IN"] // c["BLOCK_D"], c["BLOCK_T"] * c["BLOCK_S"]
        itemsize = 2 if job["signature"]["w_down_ptr"] == "*bf16" else 1
        assert up["ldg128"] * 16 * threads * iterations == rows * c["D_OUT"] * itemsize, (aot.describe(job), up)
        assert down["ldg128"] * 16 * threads * iterations >= rows * c["D_IN"] * itemsize, (aot.describe(job), down)
        per_row[job["signature"]["w_down_ptr"], job["arch"]] = up["ldg128"] * 16 * threads * iterations // rows
    assert per_row == {("*bf16", 90): 2048, ("*i8", 90): 1024, ("*fp8e4nv", 90): 1024, ("*bf16", 80): 2048,
                       ("*i8", 80): 1024}
