"""Test setup shared by every test module.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
triton is first imported; so this happens here, before any test module imports peer_kernels.

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

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "install: builds the wheel and installs it into a fresh environment "
                                       "(about a minute; -m 'not install' deselects it)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("PEER_TEST_SEED", "0")))
