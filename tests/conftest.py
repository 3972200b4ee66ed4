"""Test setup shared by every test module.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
triton is first imported; so this happens here, before any test module imports peer_kernels.
The gpu-marked tests are skipped there, or with PEER_GPU_DRY_RUN=1 run as a dry run: their whole
harness (inputs, the kernels under the interpreter, the float64 oracle, the comparisons) at the
interpreter's sizes, which each test picks with gpu_sizes(gpu=..., dry=...), so a harness bug shows
up on a CPU and not on a borrowed GPU (bench/gpu_session.py --dry-run runs it, and CI runs that); a
tensor made there without a device lands on the meta device (_no_default_device), so that mixing
the CPU with the device fails here as on a GPU. What only a GPU has (CUDA graphs, the sync debug
mode, 2**31-element tables) is left out; tests/utils.py says where.

PEER_TEST_SEED (default 0) seeds every test: tests/seed_sweep.py runs tests over many seeds.
Hypothesis profiles: "ci" (default; a fixed set of a few dozen examples) and "long" (2,000 random
examples per test: `python -m pytest tests/test_differential.py --hypothesis-profile=long`).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
GPU_DRY_RUN = (not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"
               and os.environ.get("PEER_GPU_DRY_RUN") == "1")


def device_for(backend):
    """Where a backend's tests put their tensors: DEVICE, but the C++ backend runs on CPU tensors only."""
    return torch.device("cpu") if backend == "cpp" else DEVICE


def gpu_sizes(gpu, dry):
    """A gpu-marked test's sizes: `gpu` on a GPU, `dry` (the interpreter's) in the dry run."""
    return dry if GPU_DRY_RUN else gpu


settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; without one skipped, or a dry run at interpreter "
                                       "sizes (PEER_GPU_DRY_RUN=1)")
    config.addinivalue_line("markers", "aot: compiles kernels for sm_80 / sm_90 (tests/aot.py; PEER_AOT_TRITON "
                                       "picks the Triton)")
    # pytest-xdist's (bench/gpu_session.py runs the gpu tests in parallel with --dist loadgroup): the
    # tests of one group run in one process, one after the other
    config.addinivalue_line("markers", "xdist_group(name): with pytest-xdist, run in one process")
    config.addinivalue_line("markers", "install: builds the wheel and installs it into a fresh environment "
                                       "(about a minute; -m 'not install' deselects it)")


def pytest_report_header(config):
    if not HAS_CUDA:
        return "gpu-marked tests: " + ("a dry run on the CPU at interpreter sizes" if GPU_DRY_RUN
                                       else "skipped (no CUDA device; PEER_GPU_DRY_RUN=1 runs their dry run)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or GPU_DRY_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("PEER_TEST_SEED", "0")))


@pytest.fixture(autouse=True)
def _no_default_device(request):
    """In the dry run a gpu-marked test makes its tensors on the meta device unless it names one: on
    a GPU such a tensor would be on the CPU beside CUDA ones, and here it fails as it would there."""
    if GPU_DRY_RUN and "gpu" in request.keywords:
        with torch.device("meta"):
            yield
    else:
        yield
