"""Backend selection. A backend is a module exposing the ops of SPEC section 2 with the reference's
signatures: `product_key_topk`, `peer_experts` and `peer_fused`, and the expert stage's two halves
`peer_down` and `peer_mix` (for column-sharded tables).

- "reference": `peer_kernels.reference` (any device, autograd, float64).
- "triton": `peer_kernels.ops` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
- "cpp": `peer_kernels.csrc`, the JIT-built csrc_reference/ extension (CPU tensors).
- "auto": triton for CUDA tensors, cpp for CPU tensors when it builds, else the reference.

The backend modules are imported here, once, rather than on first use: `torch.compile` cannot
trace an import, and the module picks its ops inside `forward`. The choice itself is resolved
outside any traced graph (torch.compiler.assume_constant_result), so a compiled model on
backend="auto" never traces the C++ build.
"""
import os

import torch

from . import csrc, reference
from ._checks import BACKENDS, check_choice

try:
    from . import ops as triton_ops
    TRITON_IMPORT_ERROR = None
except ImportError as error:  # no triton on this platform: the other backends still work
    triton_ops, TRITON_IMPORT_ERROR = None, error

# Triton picks the interpreter when kernels are defined, so the setting at import time is the one in force.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_MODULES = {"reference": reference, "triton": triton_ops, "cpp": csrc}


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    # Evaluated once by torch.compile while tracing (it may build the C++ extension), never traced.
    if backend != "auto":
        return backend
    if device_type == "cuda":
        return "triton"
    return "cpp" if csrc.built(device_type) else "reference"


def resolve(backend, device):
    """The concrete backend name for `backend` on tensors of `device`."""
    check_choice("backend", backend, BACKENDS)
    return _resolve(backend, torch.device(device).type)


def get(backend, device):
    """The op namespace of `backend` for tensors on `device`, or an error saying why not."""
    name = resolve(backend, device)
    if name == "triton":
        if triton_ops is None:
            raise ImportError(f"backend: 'triton' is unavailable: {TRITON_IMPORT_ERROR}")
        if device.type != "cuda" and not TRITON_INTERPRETED:
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got device {device}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got device {device}")
    return _MODULES[name]
