"""Fault injection: what an operator meets when things go wrong, each case ending in a correct result
or a clear error, never in lost data, a crash or a hang.

- Resume: a training run interrupted by torch.save / torch.load of the model and of its optimizers
  continues bit for bit as the uninterrupted run, for every table dtype, both row-sparse optimizers
  and both of their step paths (the PyTorch steps of CPU tensors, the Triton kernels under the
  interpreter); the kernels refuse optimizer state of another dtype than float32.
- The C++ extension's cache: a build killed midway, a cached library truncated (4, 50, 200 KB: a
  SIGBUS before), a read-only cache, no compiler: each ends in a working extension or the
  reference, with at most one warning.
- PEERParallel with a peer rank killed or stuck: the others end within the process group's
  timeout, with an error naming the collective and the timeout.

Bounded in time: 78 s of CPU, about two minutes on 2 cores shared with other work (CI runs it
with the rest of tests/); the C++ cases build only the tiny extension of tests/data, twice.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peer_kernels
from peer_kernels import csrc, optim

# ---- resume: optimizer and model state through torch.save / torch.load ------------------------------

TABLE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_SPARSE_OPTIMIZERS = {"SparseAdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                         "RowwiseAdagrad": dict(lr=0.1, eps=1e-8, weight_decay=0.01)}
STEPS_BEFORE, STEPS_AFTER = 1, 2


@pytest.fixture(params=["pytorch", "kernels"])
def step_path(request, monkeypatch):
    """The optimizers' two step paths on CPU tensors: the PyTorch steps, and the Triton kernels under
    the interpreter (so a machine with a GPU, where the interpreter is off, runs the first only: the
    Triton layer's GPU backward sums with atomics, and a bitwise comparison needs a deterministic
    one)."""
    if request.param == "pytorch":
        monkeypatch.setattr(optim, "_kernels_for", lambda param: None)
    elif optim._kernels_for(torch.zeros(1)) is None:
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return request.param


def _training(dtype, optimizer_name, seed):
    """A small PEER (the C++ backend where it builds) with sparse table gradients in `dtype`, a
    row-sparse optimizer on its tables and SGD with momentum on the rest (torch's AdamW writes NaN
    into fp16 parameters: its eps rounds to 0 in fp16)."""
    torch.manual_seed(seed)
    layer = peer_kernels.PEER(16, heads=2, num_experts=64, num_experts_per_head=2, dim_key=8, sparse_grad=True,
                              dtype=dtype)
    tables = [layer.w_down, layer.w_up]
    rest = [p for name, p in layer.named_parameters() if name not in ("w_down", "w_up")]
    optimizers = [getattr(optim, optimizer_name)(tables, **ROW_SPARSE_OPTIMIZERS[optimizer_name]),
                  torch.optim.SGD(rest, lr=1e-2, momentum=0.9)]
    return layer, optimizers


def _train(layer, optimizers, steps):
    for step in steps:
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(layer.w_down.dtype)
        layer(x).float().square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def _state_tensors(layer, optimizers):
    """Every entry of the model's and the optimizers' state, by name."""
    tensors = {f"model {name}": value for name, value in layer.state_dict().items()}
    for i, optimizer in enumerate(optimizers):
        for param_id, entry in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer {i} param {param_id} {key}": value for key, value in entry.items()})
    return tensors


@pytest.mark.parametrize("optimizer_name", ROW_SPARSE_OPTIMIZERS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(step_path, dtype, optimizer_name):
    """Before: torch.optim's load_state_dict cast the fp32 state to a 16-bit table's dtype; the
    PyTorch steps then trained differently and the kernels read the 16-bit state as fp32 (NaN)."""
    layer, optimizers = _training(dtype, optimizer_name, seed=0)
    _train(layer, optimizers, range(STEPS_BEFORE + STEPS_AFTER))
    expected = _state_tensors(layer, optimizers)

    layer, optimizers = _training(dtype, optimizer_name, seed=0)
    _train(layer, optimizers, range(STEPS_BEFORE))
    checkpoint = io.BytesIO()
    torch.save({"model": layer.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}, checkpoint)
    del layer, optimizers
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    layer, optimizers = _training(dtype, optimizer_name, seed=1)  # other weights until loaded
    layer.load_state_dict(saved["model"])
    for optimizer, state in zip(optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    _train(layer, optimizers, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))

    actual = _state_tensors(layer, optimizers)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[name].dtype == value.dtype, (name, actual[name].dtype, value.dtype)
            assert torch.isfinite(value).all(), name
            assert torch.equal(actual[name], value), f"{name}: the resumed run differs"
        else:  # SparseAdamW's step count
            assert actual[name] == value, name


@pytest.mark.parametrize("optimizer_name, state_name", [("SparseAdamW", "exp_avg_sq"), ("RowwiseAdagrad", "sum")])
def test_optimizer_state_of_another_dtype_is_refused(step_path, optimizer_name, state_name):
    """The steps read and write their state as float32: state of another dtype is an error naming it,
    not memory read as the wrong type."""
    table = torch.nn.Parameter(torch.randn(6, 8).bfloat16())
    optimizer = getattr(optim, optimizer_name)([table])
    for _ in range(2):
        table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 8).bfloat16(), (6, 8)).coalesce()
        if optimizer.state:
            optimizer.state[table][state_name] = optimizer.state[table][state_name].bfloat16()
            with pytest.raises(TypeError, match=f"{state_name}: expected float32 optimizer state"):
                optimizer.step()
        else:
            optimizer.step()


# ---- the C++ extension's cache: killed builds, damaged and read-only caches, no compiler -------------

DATA = Path(__file__).resolve().parent / "data"
TINY = ("peer_kernels_test_tiny", ("tiny_extension.cpp",))
# A child process that loads the tiny extension (tests/data, seconds to build) through peer_kernels.csrc's
# loader and prints whether it works; its build directory goes to stdout first. TORCH_EXTENSIONS_DIR
# is the cache; PEER_TEST_READ_ONLY=1 makes every write under it fail with EROFS, as on a read-only
# mount (an audit hook: permission bits do not stop root, who runs CI containers).
LOADER = f"""
import errno, os, sys
from pathlib import Path
if os.environ.get("PEER_TEST_READ_ONLY"):
    cache = os.environ["TORCH_EXTENSIONS_DIR"]
    mutating = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "shutil.rmtree")
    def read_only(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
        elif event in mutating:
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(cache):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
    sys.addaudithook(read_only)
from peer_kernels.csrc import build
build._EXTENSIONS["cpu"] = base, files = {TINY!r}
build.sources_dir = lambda: Path({str(DATA)!r})
print(build._build_root() / build._versioned_name("cpu", base, build.sources_dir(), files), flush=True)
extension = build._extension("cpu")
print(extension is not None and extension.answer() == 42, flush=True)
"""
NO_COMPILER = {"CXX": "/nonexistent/c++"}


def _child_env(cache, **extra):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_loader(cache, timeout=300, **extra):
    return subprocess.run([sys.executable, "-c", LOADER], env=_child_env(cache, **extra), capture_output=True,
                          text=True, timeout=timeout)


def _warnings(stderr):
    return [line for line in stderr.splitlines() if "Warning:" in line]


@pytest.fixture(scope="module")
def killed_then_built(tmp_path_factory):
    """A tiny build killed midway (SIGKILL: no cleanup, torch's lock file and the objects left
    behind), then the next process's build: (its cache, that process). Other tests copy the cache."""
    cache = tmp_path_factory.mktemp("extensions")
    child = subprocess.Popen([sys.executable, "-c", LOADER], env=_child_env(cache), stdout=subprocess.PIPE, text=True)
    build_dir = Path(child.stdout.readline().strip())
    deadline = time.monotonic() + 120
    while not list(build_dir.rglob("lock")):  # torch's lock file: the compiler is about to start
        assert child.poll() is None and time.monotonic() < deadline, "the build finished before it could be killed"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return cache, build_dir, _run_loader(cache)


def _copy_of(cache, tmp_path):
    copy = tmp_path / "extensions"
    shutil.copytree(cache, copy)
    return copy


def test_a_build_killed_midway_is_cleaned_up_and_built_again(killed_then_built):
    """Before and after: the next process neither hangs on the stale lock nor uses the half-built
    objects; it says it removes them, builds, and loads (one warning)."""
    _, build_dir, done = killed_then_built
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "True"
    assert "removing the leftovers of an interrupted build" in done.stderr
    assert len(_warnings(done.stderr)) == 1, done.stderr
    assert "building the C++ cpu backend on first use" in done.stderr
    assert not list(build_dir.glob("building-*")), "a build's private folder was left behind"


def test_a_read_only_cache_with_a_complete_build_is_used(killed_then_built, tmp_path):
    """Before: the loader opened its lock file for writing first (EROFS) and fell back to the
    reference. After: a verified build loads without the lock, silently, with no compiler either."""
    cache = _copy_of(killed_then_built[0], tmp_path)
    for path in [cache, *cache.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        done = _run_loader(cache, PEER_TEST_READ_ONLY="1", PATH="/nonexistent", **NO_COMPILER)
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "True", done.stderr[-3000:]
    assert done.stderr == "", done.stderr


def test_a_damaged_cached_build_is_rebuilt(killed_then_built, tmp_path):
    """Before: importing the truncated library killed the process (SIGBUS, exit 135) and every
    later one. After: its digest differs from the recorded one, so it is never mapped; it is built
    again, said so once, and loads."""
    cache = _copy_of(killed_then_built[0], tmp_path)
    (library,) = cache.glob("*/*.so")
    with open(library, "r+b") as handle:
        handle.truncate(50 * 1024)
    done = _run_loader(cache)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert done.stdout.split()[-1] == "True"
    assert "building the C++ cpu backend again: the cached one is unusable (damaged" in done.stderr
    assert _warnings(done.stderr) == [], done.stderr
    again = _run_loader(cache)  # the rebuilt library and its record are in place
    assert again.stdout.split()[-1] == "True" and again.stderr == "", again.stderr


# A child process that, for each cache folder in argv, makes a PEER with backend="cpp" and reports
# what ran (resolved_backend), the warnings, and whether the output is the reference's.
FALLBACK = """
import copy, json, os, sys, warnings
import torch
import peer_kernels
from peer_kernels.csrc import build
results = []
for cache in sys.argv[1:]:
    os.environ["TORCH_EXTENSIONS_DIR"] = cache
    build._extension.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        layer = peer_kernels.PEER(8, heads=2, num_experts=16, num_experts_per_head=2, dim_key=4, query_norm=None,
                                  backend="cpp")
        resolved = layer.resolved_backend
        x = torch.randn(5, 8)
        y = layer(x)
    oracle = copy.deepcopy(layer)
    oracle.backend = "reference"
    results.append(dict(resolved=resolved, warnings=[str(w.message) for w in caught], correct=torch.equal(y, oracle(x))))
print(json.dumps(results))
"""


def test_without_a_compiler_an_empty_or_damaged_cache_falls_back_with_one_warning(tmp_path):
    """An empty cache, and the C++ backend's own build truncated to 4, 50 and 200 KB (where it is
    built), with no compiler to build it again. Before: the first truncated library killed the
    process (SIGBUS, exit 135). After: each is skipped with one warning that says why,
    backend="cpp" runs the reference and resolved_backend says so (the latter since the one-house
    refactor, which fixed issue 25's item 4)."""
    caches = [tmp_path / "empty"]
    caches[0].mkdir()
    base, files = csrc.build._EXTENSIONS["cpu"]
    name = csrc.build._versioned_name("cpu", base, csrc.sources_dir(), files)
    built = csrc.build._build_root() / name
    for kilobytes in (4, 50, 200) if csrc.available() else ():
        caches.append(tmp_path / f"truncated-{kilobytes}k")
        shutil.copytree(built, caches[-1] / name, ignore=shutil.ignore_patterns("*.flock"))
        with open(caches[-1] / name / f"{name}.so", "r+b") as handle:
            handle.truncate(kilobytes * 1024)
    done = subprocess.run([sys.executable, "-c", FALLBACK, *map(str, caches)], env=_child_env(tmp_path, **NO_COMPILER),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    for cache, result in zip(caches, json.loads(done.stdout.splitlines()[-1]), strict=True):
        assert result["resolved"] == "reference" and result["correct"], (cache.name, result)
        assert len(result["warnings"]) == 1, (cache.name, result["warnings"])
        (warning,) = result["warnings"]
        assert "no C++ compiler found" in warning and "falling back to peer_kernels.reference" in warning, warning
        assert ("not built yet" if cache.name == "empty" else "damaged") in warning, warning


# ---- a dead or stuck peer under PEERParallel: a clear error within the process group's timeout -------

PEER_TIMEOUT_SECONDS = 10
# Rank argv[1] of 2 gloo processes (rendezvous file argv[2]) with a PEERParallel layer on a process
# group whose timeout is PEER_TIMEOUT_SECONDS; after one step together, rank 1 dies (argv[3] "killed":
# SIGKILL) or stops taking part ("stuck"), and rank 0 prints what its next step raised, and when.
PEER = f"""
import datetime, json, os, signal, sys, time
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module
import peer_kernels
from peer_kernels.distributed import PEERParallel
rank, rendezvous, fault = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
# The rendezvous with a long timeout (the ranks' imports may end seconds apart on a loaded machine),
# the layer's mesh on a group with the short one.
dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=300))
group = dist.new_group(timeout=datetime.timedelta(seconds={PEER_TIMEOUT_SECONDS}))
torch.manual_seed(0)
layer = parallelize_module(peer_kernels.PEER(12, heads=2, num_experts=16, num_experts_per_head=2, dim_key=4,
                                             backend="reference"), DeviceMesh.from_group(group, "cpu"), PEERParallel())
layer(torch.randn(6, 12)).sum().backward()
dist.barrier()
if rank == 1:
    if fault == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)
start = time.monotonic()
try:
    layer(torch.randn(6, 12))
    error = None
except Exception as raised:
    error = f"{{type(raised).__name__}}: {{raised}}"
print(json.dumps(dict(seconds=time.monotonic() - start, error=error)), flush=True)
os._exit(0)
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("fault", ["killed", "stuck"])
def test_a_dead_or_stuck_peer_is_a_clear_error_within_the_timeout(tmp_path, fault):
    """Before: the wait was the process group's, torch's default 30 minutes, and gloo's error named
    no collective. After: PEERParallel documents the timeout (the bench uses 120 s), and its error
    says which collective failed and what bounds the wait."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    ranks = [subprocess.Popen([sys.executable, "-c", PEER, str(rank), str(tmp_path / "rendezvous"), fault], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        out, err = ranks[0].communicate(timeout=180)
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["error"] is not None, "the step with a dead or stuck peer did not fail"
    assert result["error"].startswith("RuntimeError: PEERParallel: the all-reduce of z over the tensor-parallel group "
                                      "failed: a peer rank died, or did not join within the process group's "
                                      "timeout"), result["error"]
    assert result["seconds"] < PEER_TIMEOUT_SECONDS + 20, result
