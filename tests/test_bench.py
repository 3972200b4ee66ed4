"""bench/ end to end on its tiny preset, on the CPU: every CPU provider passes its check against the
reference and gets its rows, and the result files carry what bench/results/README.md promises.
Without peer-pytorch (the GPU image lacks it unless its wheels are carried) its rows are skipped
with the reason. And bench/gpu_session.py's plan: within the lease, each bench command one that
bench takes."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ["reference", "csrc", "embedding_bag", "peer-pytorch", "adamw", "sparse-adamw", "rowwise-adagrad",
             "torch-sparse-adam"]
STEP_PROVIDERS = ["peer-pytorch", "adamw", "sparse-adamw", "rowwise-adagrad", "torch-sparse-adam"]
HAS_PEER_PYTORCH = importlib.util.find_spec("PEER_pytorch") is not None


def _bench(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = _bench("--preset", "smoke", "--device", "cpu", "--providers", *PROVIDERS, "--out", str(out), "--no-plots")
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.glob("smoke-*.json")
    return done.stdout, json.loads(result.read_text()), result


def test_every_provider_is_checked_and_timed(smoke_run):
    stdout, result, _ = smoke_run
    rows = result["rows"]
    expected_ops = {"reference": {"retrieval", "experts", "fused", "layer"}, "csrc": {"retrieval", "experts", "fused", "layer"},
                    "embedding_bag": {"experts"}, "peer-pytorch": {"layer"}}
    step_providers = set(STEP_PROVIDERS)
    if not any(r["provider"] == "csrc" for r in rows):  # no compiler: csrc must then say why it was skipped
        assert any(s["provider"] == "csrc" for s in result["skipped"])
        expected_ops.pop("csrc")
    if not HAS_PEER_PYTORCH:
        assert not any(r["provider"] == "peer-pytorch" for r in rows)
        assert {s["op"] for s in result["skipped"] if s["provider"] == "peer-pytorch"} == {"layer", "step"}
        assert all("PEER_pytorch" in s["reason"] for s in result["skipped"] if s["provider"] == "peer-pytorch")
        expected_ops.pop("peer-pytorch")
        step_providers.discard("peer-pytorch")
    for provider, ops in expected_ops.items():
        for op in ops:
            modes = {r["mode"] for r in rows if r["provider"] == provider and r["op"] == op}
            assert modes == {"forward", "backward", "forward+backward"}, (provider, op)
    steps = {r["provider"]: r for r in rows if r["op"] == "step"}
    assert set(steps) == step_providers and all(r["mode"] == "step" for r in steps.values())
    # the step's peak holds the parameters and the optimizer state: AdamW's two moments per value
    # make it the largest, row-wise Adagrad's one float per row the smallest of this package's
    assert steps["rowwise-adagrad"]["peak_bytes"] < steps["sparse-adamw"]["peak_bytes"]
    assert steps["rowwise-adagrad"]["peak_bytes"] < steps["adamw"]["peak_bytes"]
    for row in rows:
        assert row["median_ms"] > 0 and len(row["times_ms"]) == row["reps"] >= 1
        assert row["error"] < 1e-3, row  # fp32 against the reference
    assert "layer" in stdout and "peer-pytorch" in stdout  # the table is printed


def test_result_metadata(smoke_run):
    _, result, path = smoke_run
    meta = result["meta"]
    for key in ("device_name", "torch", "triton", "git_commit", "copy_gbps", "matmul_tflops", "matmul_dtype", "date"):
        assert meta[key], key
    assert meta["matmul_dtype"] == "float32"  # a CPU run
    for row in result["rows"]:  # the smoke preset's rows are float32: their share of the matmul rate
        assert row["compute_fraction"] == pytest.approx(row["tflops"] / meta["matmul_tflops"])
    assert path.with_suffix(".csv").exists()


def test_compare_two_results(smoke_run):
    _, _, path = smoke_run
    done = _bench("--compare", str(path), str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reference" in done.stdout


def test_profile_prints_the_layers_kernels():
    done = _bench("--preset", "smoke", "--device", "cpu", "--profile")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forward+backward steps of PEER" in done.stdout and "Self CPU" in done.stdout


def test_distributed_mode(tmp_path):
    """Two gloo processes under torchrun: a row per rank, checked against the single-process layer,
    and the bytes its collectives moved equal to the byte model's count for column sharding."""
    done = _bench("--distributed", "2", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("distributed2-smoke-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["rank"], r["ranks"]) for r in rows] == [(0, 2), (1, 2)]
    for row in rows:
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["error"] < 1e-3, row
        assert {name: c["count"] for name, c in row["collectives"].items()} == {
            "allreduce_": 2, "all_gather_into_tensor": 2, "broadcast_": 2}, row["collectives"]
        assert row["sent_bytes"] == pytest.approx(row["column_model_bytes"], rel=1e-12)
    assert "MB sent" in done.stdout


def test_quantized_providers_and_generate_rows():
    """bench/serving.py: the int8 and fp8 providers time the layer's forward (inference only) and
    report their quantization error, within its tolerance; generate() rows for each model variant."""
    import torch

    from bench import cases, providers, run, serving

    _, rows, skipped = run.run(cases.PRESETS["smoke"], "smoke", torch.device("cpu"), ("layer",), ("forward",),
                               ["int8", "fp8"], {}, lambda *_: None, log=lambda *_: None)
    assert {(r["provider"], r["mode"]) for r in rows} == {("int8", "forward"), ("fp8", "forward")} and not skipped
    for row in rows:
        assert 0 < row["error"] < providers.QUANTIZED_TOLERANCE[{"int8": torch.int8, "fp8": torch.float8_e4m3fn}[row["provider"]]]

    case = serving.GenerateCase(hidden=32, intermediate=64, layers=2, vocab=64, prompt=4, new_tokens=3,
                                num_experts=8 ** 2, peer_heads=2, experts_per_head=2, dim_key=8)
    generated = serving.generate_rows(torch.device("cpu"), "none", case, log=lambda *_: None)
    assert [r["variant"] for r in generated] == list(serving.VARIANTS)
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in generated)


def test_gpu_session_plan_fits_the_lease(tmp_path):
    """bench/gpu_session.py --plan: the stages it would start end within the budget by their
    estimates, the gpu tests and the paper preset among them; and with the time for all of them,
    every bench command of every stage is one that bench's command line takes."""
    from bench import __main__ as bench_main

    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "bench" / "gpu_session.py")
    gpu_session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_session)
    session = gpu_session.Session(gpu_session.parse(["--plan", "--out", str(tmp_path)]))
    session.main()
    names = [stage.name for stage in session.started]
    assert names[:3] == ["env", "tests", "paper"], names
    assert sum(stage.estimate_s for stage in session.started) <= session.args.budget_s == 480
    unbounded = gpu_session.Session(gpu_session.parse(["--plan", "--budget-s", "1e6", "--out", str(tmp_path)]))
    unbounded.main()
    assert [stage.name for stage in unbounded.started] == ["env", "tests", "paper", "decode", "profile", "sweep"]
    for stage in unbounded.started:
        for argv in stage.commands:
            if argv[1:3] == ["-m", "bench"]:
                bench_main.parse(argv[3:])


def test_cold_timing_flushes_the_cache_before_each_timed_iteration(monkeypatch):
    """timing.measure(cold=True), the decode op's: before each timed iteration, outside its time, a
    buffer of twice the last-level cache is read (so the step reads its bytes from memory); the
    untimed first call and a measure without cold read none."""
    import torch

    from bench import timing

    events, sizes = [], []

    class Buffer:
        def zero_(self):
            return self

        def sum(self):
            events.append("flush")

    def empty(shape, *, dtype, device):
        sizes.append(shape[0] * dtype.itemsize)
        return Buffer()

    monkeypatch.setattr(timing._memory, "empty", empty)
    cpu = torch.device("cpu")
    timing.measure(cpu, [None, None], [lambda item: events.append("call")], cold=True)
    assert sizes == [2 * timing.last_level_cache_bytes(cpu)] and sizes[0] >= 2 << 20
    assert events[0] == "call" and events[1:] == ["flush", "call"] * ((len(events) - 1) // 2) and len(events) >= 7
    events.clear()
    timing.measure(cpu, [None], [lambda item: events.append("call")])
    assert "flush" not in events and len(sizes) == 1


def test_rows_count_work_only_for_providers_of_the_op():
    """A decode row's GB/s and TFLOP/s are the step's bytes and flops over its time, and its shares of
    the run's copy bandwidth and matmul rate; a stand-in of another function (dense-ffn, unchecked)
    gets none, and a row in another dtype than the matmul's no compute share."""
    import dataclasses

    from bench import cases, run

    shape = dataclasses.replace(cases.PRESETS["decode"].shapes[0], dtype="float32")  # as a CPU runs it
    meta = {"copy_gbps": 40.0, "matmul_tflops": 0.2, "matmul_dtype": "float32"}
    row = run.make_row("decode", "forward", shape, "decode", [2.0, 1.0, 3.0], 0, 1e-7, "float32", meta)
    assert row["median_ms"] == 2.0
    assert row["gbps"] == pytest.approx(cases.decode_floor_bytes(shape) / 2e-3 / 1e9)
    assert row["copy_fraction"] == pytest.approx(row["gbps"] / 40.0)
    assert row["tflops"] == pytest.approx(cases.flops("decode", shape, "forward") / 2e-3 / 1e12)
    assert row["compute_fraction"] == pytest.approx(row["tflops"] / 0.2)
    bf16 = dataclasses.replace(shape, dtype="bfloat16")
    assert run.make_row("decode", "forward", bf16, "decode", [2.0], 0, 1e-3, "bfloat16", meta)["compute_fraction"] is None
    stand_in = run.make_row("decode", "forward", shape, "dense-ffn", [0.5], 0, None, "float32", meta, unchecked=True)
    assert [stand_in[key] for key in ("gbps", "copy_fraction", "tflops", "compute_fraction")] == [None] * 4
