"""The decode path (a few tokens per step) on every backend, against the float64 oracle and against
the path larger batches take: the Triton launchers' decode schedules (the retrieval's key rows
split over programs, one token's expert rows split over programs; peer_kernels.tuning
.token_schedule picks them by the token count), the C++ backend's direct sub-key scan and its gather
split over rows and columns; and what inference promises: nothing saved for a backward, no buffer
the size of a table, and on a GPU a decode step that a CUDA graph captures after one warm-up call.

The two Triton paths are forced with tuning.overrides(decode_tokens=...). Picks are compared
bitwise on inputs clear of near-ties (utils.untie) and on exact ties; values against tests/bounds.py.
Interpreter shapes stay tiny. test_aot_* compiles the decode kernels at the paper's
shapes at one token for sm_80 / sm_90 (PEER_AOT_TRITON picks the Triton, tests/aot.py) and checks
grids, spills and loads.
"""
import dataclasses

import pytest
import torch

import aot
import bounds
import configs
import peer_kernels
from conftest import DEVICE, device_for
from peer_kernels import _device, _library, csrc, reference, tuning
from utils import no_host_sync, poison_empty, random_ids, untie

TRITON = DEVICE.type == "cuda" or _device.INTERPRETED
PATHS = {"decode": dict(decode_tokens=1 << 30), "token_tiles": dict(decode_tokens=0)}


def _skip_unavailable(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("the Triton ops need CUDA or TRITON_INTERPRET=1")
    if backend == "cpp" and not csrc.available():
        pytest.skip("the C++ extension did not build")


def _device_of(backend):
    _skip_unavailable(backend)
    return device_for(backend)


def untied(T, h, key_heads, n, dk, k, k_sub, dtype, device):
    """Queries in the module's (T, 2, h, dk) -> (T, h, 2, dk) layout, clear of near-ties, and keys."""
    keys = torch.randn(key_heads, n, 2, dk, device=device, dtype=dtype)
    projection = torch.randn(T, 2 * h * dk, device=device, dtype=dtype)

    def as_queries(t):
        return t.view(T, 2, h, dk).transpose(1, 2)

    untie(projection, as_queries, keys, k, k_sub)
    return as_queries(projection), keys


def retrieve_on_both_paths(queries, keys, k, k_sub, gating="softmax", id_head_offset=0):
    """{path: (scores, ids, gates)} of the Triton retrieve op."""
    out = {}
    for path, overrides in PATHS.items():
        with tuning.overrides(**overrides):
            out[path] = _library.retrieve("triton", queries, keys, k, k_sub, gating, id_head_offset)
    return out


# (T, h, key heads, n, dk, k, k_sub, dtype): n = 37 is three key slices of 16 rows (the last of 5),
# 3 heads, k = 5; shared keys with k = k_sub**2 in float64; k_sub = n = 13 (a list longer than n)
RETRIEVAL_CASES = [
    (3, 3, 3, 37, 20, 5, 7, torch.float32),
    (1, 2, 1, 40, 24, 9, 3, torch.float64),
    (2, 3, 3, 13, 12, 5, 13, torch.float32),
]


@pytest.mark.parametrize("case", RETRIEVAL_CASES, ids=lambda c: "T{}-h{}-kh{}-n{}-dk{}-k{}-ks{}-{}".format(*c))
def test_triton_decode_retrieval_picks_what_token_tiles_pick(case, monkeypatch):
    T, h, key_heads, n, dk, k, k_sub, dtype = case
    queries, keys = untied(T, h, key_heads, n, dk, k, k_sub, dtype, DEVICE)
    _, expected_ids = reference.product_key_topk(queries.double(), keys.double(), k, k_sub)
    poison_empty(monkeypatch)
    out = retrieve_on_both_paths(queries, keys, k, k_sub)
    for scores, ids, gates in out.values():
        assert torch.equal(ids, expected_ids)
        bounds.check("scores", scores, *bounds.pick_scores(queries, keys, ids))
        torch.testing.assert_close(gates, reference.gate(scores, "softmax"))


def test_triton_decode_retrieval_bfloat16_picks_bitwise():
    """16-bit inputs select on floored int32 keys, slice by slice; the merge must give the token-tile
    path's lists exactly: the same ids and the same (re-scored) scores."""
    queries, keys = untied(2, 2, 2, 40, 32, 5, 6, torch.bfloat16, DEVICE)
    out = retrieve_on_both_paths(queries, keys, 5, 6)
    assert torch.equal(out["decode"][1], out["token_tiles"][1])
    assert torch.equal(out["decode"][0], out["token_tiles"][0])
    bounds.check("scores", out["decode"][0], *bounds.pick_scores(queries, keys, out["decode"][1]))


def test_exact_ties_across_slices_break_by_index_on_every_path():
    """Sub-keys 2, 20 and 33 (three key slices) are one vector, as are the queries of both heads on
    shared keys: equal scores everywhere, which the tie rule orders by index, and the same experts
    for both heads (duplicates across heads, for the expert stage below)."""
    n, dk, k, k_sub = 37, 16, 6, 4
    keys = torch.randn(1, n, 2, dk, device=DEVICE, dtype=torch.float64)
    keys[:, [20, 33]] = keys[:, [2]]
    half_queries = torch.randn(2, 1, 2, dk, device=DEVICE, dtype=torch.float64)
    queries = half_queries.expand(2, 3, 2, dk).contiguous()
    queries[:, :, 0] = keys[0, 2, 0] * 3    # sub-key 2 (and 20, 33) tops the first half
    _, expected_ids = reference.product_key_topk(queries, keys, k, k_sub)
    out = retrieve_on_both_paths(queries, keys, k, k_sub)
    for _, ids, _ in out.values():
        assert torch.equal(ids, expected_ids)
    assert torch.equal(expected_ids[:, 0], expected_ids[:, 1])
    assert (expected_ids[..., :3] // n == torch.tensor([2, 20, 33], device=DEVICE)).any()
    if csrc.available():
        assert torch.equal(csrc.product_key_topk(queries.cpu(), keys.cpu(), k, k_sub)[1], expected_ids.cpu())


def test_decode_retrieval_offsets_and_relu_gating():
    queries, keys = untied(2, 3, 3, 13, 12, 5, 5, torch.float32, DEVICE)
    out = retrieve_on_both_paths(queries, keys, 5, 5, gating="relu", id_head_offset=169)
    assert all(torch.equal(a, b) for a, b in zip(out["decode"], out["token_tiles"]))


# ---- the expert stage -----------------------------------------------------------------------------------

def expert_inputs(T, h, k, d_in, d_out, rows, dtype, device):
    """x, ids (duplicates across heads, the last row among them), gates and tables."""
    ids = random_ids(T, h, k, rows, device=device)
    ids[:, 1] = ids[:, 0]                 # head 1 picks head 0's experts
    x = torch.randn(T, d_in, device=device, dtype=dtype)
    gates = torch.rand(T, h, k, device=device, dtype=dtype)
    w_down = torch.randn(rows, d_in, device=device, dtype=dtype) / d_in ** 0.5
    w_up = torch.randn(rows, d_out, device=device, dtype=dtype)
    return x, ids, gates, w_down, w_up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("T", [1, 3])
def test_triton_decode_experts_match_the_oracle(T, dtype, monkeypatch):
    """d = 48 is two column blocks of 32 fp32 (16 fp64) values, h*k = 15 slots several slot blocks
    (the interpreter's grids are sized for tuning.INTERPRETED_SMS): every partial sum combined."""
    x, ids, gates, w_down, w_up = expert_inputs(T, 3, 5, 48, 48, 169, dtype, DEVICE)
    dy = torch.randn(T, 48, device=DEVICE, dtype=dtype)
    expected = bounds.experts(*(t.double().cpu() if t.is_floating_point() else t.cpu()
                                for t in (x, ids, gates, w_down, w_up, dy)), "gelu")
    leaves = [t.clone().requires_grad_() for t in (x, gates, w_down, w_up)]
    poison_empty(monkeypatch)
    with tuning.overrides(**PATHS["decode"]):
        y = peer_kernels.ops.peer_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], "gelu")
        z = _library.down_forward("triton", x, ids, w_down, True, False)
        y_mix = _library.mix_forward("triton", z, ids, gates, w_up, "gelu", True, False)
    grads = torch.autograd.grad(y, leaves, dy)
    actual = dict(zip(("y", "dx", "dgates", "dw_down", "dw_up"), (y, *grads)))
    bounds.check_all({name: t.cpu() for name, t in actual.items()}, expected)
    z_exact = bounds.down(x.double().cpu(), ids.cpu(), w_down.double().cpu(), torch.zeros(T, 3, 5, dtype=torch.float64))
    bounds.check("z", z.cpu(), *z_exact["z"])
    mix_exact = bounds.mix(z.double().cpu(), ids.cpu(), gates.double().cpu(), w_up.double().cpu(),
                           torch.zeros(T, 48, dtype=torch.float64), "gelu")
    bounds.check("y", y_mix.cpu(), *mix_exact["y"])


def test_triton_decode_experts_with_two_widths():
    """Rank-1 adapters (compat.PEERLora): d_in = 40, d_out = 20, the identity activation."""
    x, ids, gates, w_down, w_up = expert_inputs(2, 2, 3, 40, 20, 25, torch.float32, DEVICE)
    out = {}
    for path, overrides in PATHS.items():
        with tuning.overrides(**overrides):
            out[path] = _library.experts_forward("triton", x, ids, gates, w_down, w_up, "identity", True, False)
    expected = reference.peer_experts(x.double(), ids, gates.double(), w_down.double(), w_up.double(), "identity")
    for y, z in out.values():
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["decode"][1], out["token_tiles"][1], rtol=1e-6, atol=1e-6)


# ---- the threshold, the fused op and the layer -----------------------------------------------------

def test_the_threshold_is_per_architecture():
    for arch in (0, 80, 90):
        last = tuning.tiles(arch).decode_tokens
        assert tuning.token_schedule(num_tokens=last, arch=arch) == "decode"
        assert tuning.token_schedule(num_tokens=last + 1, arch=arch) == "token_tiles"
    # the interpreter's threshold is small, so that these tests straddle it
    assert tuning.tiles(0).decode_tokens <= 8


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fused_op_on_both_sides_of_the_threshold(backend):
    """The layer's fused op at the last decode token count and one past it, on the threshold of
    the tensors' architecture (the GPU's; off a GPU, the interpreter's and the C++ backend's)."""
    device = _device_of(backend)
    ops = peer_kernels.backends.get(backend, device)
    last = tuning.tiles(_device.cuda_arch(device)).decode_tokens
    for T in (last, last + 1):
        queries, keys = untied(T, 3, 3, 13, 12, 5, 6, torch.float64, device)
        x = torch.randn(T, 24, device=device, dtype=torch.float64)
        w_down = torch.randn(169, 24, device=device, dtype=torch.float64) / 24 ** 0.5
        w_up = torch.randn(169, 24, device=device, dtype=torch.float64)
        y = ops.peer_fused(x, queries, keys, w_down, w_up, 5, 6)
        _, ids = reference.product_key_topk(queries, keys, 5, 6)
        exact = bounds.fused(x.cpu(), torch.zeros_like(x).cpu(), queries.cpu(), torch.zeros_like(queries).cpu(),
                             keys.cpu(), w_down.cpu(), w_up.cpu(), torch.zeros_like(x).cpu(), torch.zeros_like(x).cpu(),
                             5, 6, "softmax", "gelu", False, ids=ids.cpu())
        bounds.check("y", y.cpu(), *exact["y"])


def test_triton_fused_gradcheck_at_decode_size():
    """The decode forward saves what the backward needs (z among it): gradcheck through it."""
    _skip_unavailable("triton")
    queries, keys = untied(2, 2, 2, 5, 4, 3, 3, torch.float64, DEVICE)
    inputs = [queries.detach().clone(), keys] + [torch.randn(rows, 6, device=DEVICE, dtype=torch.float64)
                                                  for rows in (2, 25, 25)]
    for t in inputs:
        t.requires_grad_()

    def fused(q, kk, x, w_down, w_up):
        return peer_kernels.ops.peer_fused(x, q, kk, w_down, w_up, 3, 3)

    with tuning.overrides(**PATHS["decode"]):
        assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_layer_at_one_token_matches_the_oracle(backend):
    """A layer with 3 heads and odd sizes at T = 1, against the float64 oracle's layer."""
    device = _device_of(backend)
    layer = peer_kernels.PEER(48, heads=3, num_experts=13 ** 2, num_experts_per_head=5, dim_key=12,
                              product_key_topk=7, backend=backend, device=device, dtype=torch.float64).eval()
    x = torch.randn(1, 1, 48, device=device, dtype=torch.float64)
    oracle = peer_kernels.PEER(48, heads=3, num_experts=13 ** 2, num_experts_per_head=5, dim_key=12,
                               product_key_topk=7, backend="reference", device=device, dtype=torch.float64).eval()
    oracle.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), oracle(x), rtol=1e-10, atol=1e-10)


# ---- inference ----------------------------------------------------------------------------------------

def _small_layer(backend, device):
    return peer_kernels.PEER(32, heads=2, num_experts=16 ** 2, num_experts_per_head=4, dim_key=16, backend=backend,
                             device=device).eval()


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_inference_saves_nothing_and_allocates_no_table_sized_buffer(backend):
    device = _device_of(backend)
    layer = _small_layer(backend, device)
    x = torch.randn(4, 32, device=device)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    for context in (torch.no_grad, torch.inference_mode):
        with context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
    assert saved == []
    if device.type == "cpu":
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                     profile_memory=True) as profile:
            layer(x)
        largest = max(event.cpu_memory_usage for event in profile.events())
        assert 0 < largest < layer.w_down.nbytes, largest


def decode_steps_in_a_graph(layer, tokens):
    """Eager decode steps of `layer` and the same steps replayed from one CUDA graph captured after
    peer_kernels.warmup, with the CUDA sync debug mode raising on any host sync; off a GPU (the dry
    run of the harness) the "replays" are eager calls. Returns [(eager, replayed)] for 3 inputs."""
    peer_kernels.warmup(layer, tokens=tokens)
    device = layer.w_down.device
    static_x = torch.randn(tokens, layer.dim, device=device)
    results = []
    with torch.no_grad():
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with no_host_sync(device), torch.cuda.graph(graph):
                static_y = layer(static_x)
        for _ in range(3):
            x = torch.randn(tokens, layer.dim, device=device)
            static_x.copy_(x)
            if device.type == "cuda":
                graph.replay()
                replayed = static_y.clone()
            else:
                replayed = layer(static_x)
            results.append((layer(x), replayed))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8])
def test_decode_step_is_cuda_graph_capturable(tokens):
    layer = _small_layer("triton", DEVICE).to(torch.bfloat16)
    for eager, replayed in decode_steps_in_a_graph(layer, tokens):
        assert torch.equal(eager, replayed)      # the decode kernels sum in one fixed order


def test_warmup_changes_no_state():
    layer = peer_kernels.PEER(32, heads=2, num_experts=16 ** 2, num_experts_per_head=4, dim_key=16,
                              backend="reference").train()
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), layer)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert peer_kernels.warmup(model, tokens=(1, 3)) is model
    assert layer.training
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


# ---- the benchmark's decode op ---------------------------------------------------------------------------

def test_bench_decode_op_on_the_cpu():
    """bench's decode op (python -m bench --preset decode) at smoke sizes, on both sides of the C++
    threshold: each provider of the layer's function is checked and timed, the dense feed-forward
    timed unchecked, the int8 row checked within its quantization error, and every row's bytes are
    the step's floor (its share of the copy bandwidth: its share of the floor) and its flops the
    step's, at the matmul rate; the dense feed-forward's (another function's) are not counted."""
    import dataclasses

    from bench import cases, providers, run

    smoke = cases.PRESETS["smoke"].shapes[0]
    preset = cases.Preset(shapes=tuple(dataclasses.replace(smoke, T=T, dtype="bfloat16") for T in (1, 9)),
                          ops=("decode",), modes=("forward",), cpu_dtype="float32")
    names = ["reference", "decode", "token-tiles", "peer-pytorch", "dense-ffn", "int8"]
    meta, rows, skipped = run.run(preset, "decode", torch.device("cpu"), preset.ops, preset.modes, names, {},
                                  lambda *_: None, log=lambda *_: None)
    timed = {(r["shape_T"], r["provider"]) for r in rows}
    for T in (1, 9):
        assert {name for t, name in timed if t == T} >= {"reference", "decode", "token-tiles", "dense-ffn"}
    # int8 is checked against its quantization error, an RMS over the outputs: at 9 tokens it holds;
    # one token's 32 values are one noisy sample of it, which the check may refuse, saying so
    assert (9, "int8") in timed
    assert all(s["provider"] == "peer-pytorch" or (s["provider"], s["shape"].split()[0]) == ("int8", "T=1")
               and s["reason"].startswith("wrong outputs: relative RMS error") for s in skipped), skipped
    for row in rows:
        assert row["shape_dtype"] == "float32" and row["mode"] == "forward"
        stand_in = row["provider"] == "dense-ffn"
        floor_bytes = cases.decode_floor_bytes(dataclasses.replace(smoke, T=row["shape_T"]))
        assert row["gather_bytes"] == (None if stand_in else floor_bytes)
        assert (row["compute_fraction"] is None) == stand_in and (row["tflops"] is None) == stand_in
        assert (row["error"] is None) == (row["provider"] == "dense-ffn"), row
        if row["provider"] == "int8":
            assert 0 < row["error"] < providers.QUANTIZED_TOLERANCE[torch.int8], row
        else:
            assert row["error"] is None or row["error"] < 1e-5, row


def test_peer_pytorch_on_the_layers_own_tensors():
    """What the decode op's peer-pytorch rows run (8 GB of fp32 tables at the paper's shapes): the
    converted module on the layer's tensors, no copy, the same outputs."""
    pytest.importorskip("PEER_pytorch")
    layer = peer_kernels.PEER(32, heads=2, num_experts=64, num_experts_per_head=4, dim_key=16, query_norm=None,
                              backend="reference").eval()
    theirs = layer.to_peer_pytorch(share_weights=True).eval()
    assert theirs.weight_down_embed.weight is layer.w_down and theirs.keys is layer.keys
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), layer(x))


# ---- ahead-of-time compilation for real GPUs ------------------------------------------------------------

ONE_TOKEN = dataclasses.replace(configs.PAPER, T=1)


def decode_jobs(arch, case):
    """The fused op's decode launches at the case's shapes (configs: ops/retrieval.py's key slices and
    merge, ops/experts.py's decode kernels), each with its grid ("programs") and what a program
    loads of keys or rows at once ("row_bytes")."""
    jobs = configs.retrieval_forward(case, arch, case.gating) + configs.experts_forward(case, arch)
    return [dict(job, disassemble=True, **_grid(job, case)) for job in jobs]


def _grid(job, case):
    c, ints, itemsize = job["constexprs"], job["ints"], case.dtype.itemsize
    tiles = tuning.cdiv(case.T, c.get("BLOCK_T", 1))
    if job["kernel"] == "key_slice_topk_kernel":
        return dict(programs=tiles * case.h * 2 * ints["slices"], row_bytes=ints["slice_rows"] * case.dk * itemsize)
    if job["kernel"] == "merge_key_slices_kernel":
        return dict(programs=tiles * case.h, row_bytes=0)
    if job["kernel"] == "sum_parts_kernel":
        return dict(programs=case.T * tuning.cdiv(c["W"], c["BLOCK_W"]), row_bytes=0)
    return dict(programs=case.T * tuning.cdiv(case.slots, c["BLOCK_S"]) * tuning.cdiv(case.d, c["BLOCK_D"]),
                row_bytes=c["BLOCK_S"] * c["BLOCK_D"] * case.tables.itemsize)


@pytest.fixture(scope="module")
def paper_decode():
    """The decode kernels at the paper's shapes: bf16 tables on both archs, int8 tables on both and
    fp8 on sm_90 (quantized tables change the expert kernels only)."""
    jobs = [job for arch in aot.ARCHS for job in decode_jobs(arch, ONE_TOKEN)]
    jobs += [job for arch, tables in ((80, torch.int8), (90, torch.int8), (90, torch.float8_e4m3fn))
             for job in decode_jobs(arch, dataclasses.replace(ONE_TOKEN, table_dtype=tables))
             if job["kernel"].startswith("experts_decode")]
    return list(zip(jobs, aot.compile_report(jobs)))


def global_load_bytes(stats, num_warps):
    """Bytes one program asks of global memory at once, from the SASS: every LDG and LDGSTS
    (cp.async) by its width, times the threads (a load issued once per thread)."""
    per_thread = 16 * (stats["ldg128"] + stats["ldgsts128"]) + 8 * stats["ldg64"]
    return per_thread * 32 * num_warps


@pytest.mark.aot
def test_aot_decode_kernels_at_one_token(paper_decode):
    """Paper shapes (bf16, n = 1024, dk = 128, h = 8, k = k' = 16, d = 1024) at T = 1 on sm_80 and
    sm_90: the grids that read keys or expert rows cover every SM, nothing spills, the rows come
    in 128-bit loads, a program's loads (from the SASS) cover its whole share of the keys or rows at
    once, and every program of a grid is resident at once: all of a decode step's bytes are in
    flight together."""
    for job, stats in paper_decode:
        label = aot.describe(job)
        assert stats["stl"] == 0 and stats["ldl"] == 0 and stats["local_bytes"] == 0, (label, stats)
        if not job["row_bytes"]:
            continue
        assert job["programs"] >= configs.SMS[job["arch"]], (label, job["programs"])
        assert stats["ldg128"] + stats["ldgsts128"] > 0, (label, stats)
        assert global_load_bytes(stats, job["num_warps"]) >= job["row_bytes"], (label, stats, job["row_bytes"])
        assert resident_programs(job, stats) * configs.SMS[job["arch"]] >= job["programs"], (label, stats)


# Shared memory per SM (sm_80: A100, sm_90: H100)
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def resident_programs(job, stats):
    """Programs of a kernel one SM holds at once, by registers, warps and shared memory."""
    by_shared = SHARED_PER_SM[job["arch"]] // max(1, stats["shared_bytes"])
    return min(aot.ctas_per_sm(stats["registers"], job["num_warps"]), by_shared)


@pytest.mark.aot
def test_aot_decode_kernels_at_odd_shapes():
    """n = 13, dk = 24, k = 5, k' = 7, 3 heads, d = 48: fp32 with relu gating and silu on both
    archs, fp64 (gradcheck on a GPU) at 8 tokens on sm_90: every kernel compiles, nothing spills."""
    odd = configs.Case(T=1, h=3, n=13, dk=24, k=5, k_sub=7, d=48, dtype=torch.float32, gating="relu",
                       activation="silu")
    jobs = [job for arch in aot.ARCHS for job in decode_jobs(arch, odd)]
    jobs += decode_jobs(90, dataclasses.replace(odd, T=8, dtype=torch.float64, gating="softmax", activation="gelu"))
    for job, stats in zip(jobs, aot.compile_report(jobs)):
        assert stats["instructions"] > 0 and stats["local_bytes"] == 0, (aot.describe(job), stats)
