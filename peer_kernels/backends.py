"""Backend selection. A backend is a module exposing the three ops of SPEC section 2 with the
reference's signatures: `product_key_topk`, `peer_experts` and `peer_fused`.

- "reference": `peer_kernels.reference` (any device, autograd, float64).
- "triton": `peer_kernels.ops` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
- "cpp": `peer_kernels.csrc`, the JIT-built csrc_reference/ extension (CPU tensors).
- "auto": triton for CUDA tensors, cpp for CPU tensors when it builds, else the reference.
"""
import functools
import importlib
import os

from ._checks import BACKENDS, check_choice

_MODULES = {"reference": "peer_kernels.reference", "triton": "peer_kernels.ops", "cpp": "peer_kernels.csrc"}


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cpp_available():
    """True when the C++ extension is built (or builds now); warns once and says False otherwise."""
    try:
        csrc = importlib.import_module(_MODULES["cpp"])
    except ImportError:
        return False
    return csrc.available()


def resolve(backend, device):
    """The concrete backend name for `backend` on tensors of `device`."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and cpp_available():
        return "cpp"
    return "reference"


def get(backend, device):
    """The op namespace of `backend` for tensors on `device`, or a ValueError saying why not."""
    name = resolve(backend, device)
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got device {device}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got device {device}")
    return importlib.import_module(_MODULES[name])
