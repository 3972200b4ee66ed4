"""Backend choice. A backend is a module of functions with the reference's signatures:
`product_key_topk`, `peer_experts`, `peer_fused`, and the expert stage's two halves `peer_down` and
`peer_mix` (for column-sharded tables).

- "reference": `peer_kernels.reference` (any device, autograd, float64).
- "triton": `peer_kernels.ops` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
- "cpp": `peer_kernels.csrc`, the JIT-built csrc_reference/ extension (CPU tensors).
- "auto": triton for CUDA tensors, cpp for CPU tensors, the reference for any other device.

Where the C++ extension cannot be built, "cpp" (asked for, or chosen by "auto") resolves to
"reference", here and only here, after one warning that says why: `resolve` names the backend that
really runs. The backend modules are imported here, once, rather than on first use:
`torch.compile` cannot trace an import, and the layer picks its ops inside `forward`. The choice
itself is resolved outside any traced graph (torch.compiler.assume_constant_result), so a compiled
model never traces the C++ build.
"""
import torch

from . import _device, csrc, reference
from ._checks import BACKENDS, check_choice

try:
    from . import ops as triton_ops
    TRITON_IMPORT_ERROR = None
except ImportError as error:  # no triton on this platform: the other backends still work
    triton_ops, TRITON_IMPORT_ERROR = None, error

_MODULES = {"reference": reference, "triton": triton_ops, "cpp": csrc}


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    # Evaluated once by torch.compile while tracing (it may build the C++ extension), never traced.
    if backend == "auto":
        backend = {"cuda": "triton", "cpu": "cpp"}.get(device_type, "reference")
    if backend == "cpp" and device_type == "cpu" and not csrc.built("cpu"):
        return "reference"
    return backend


def resolve(backend, device):
    """The name of the backend that runs for `backend` on tensors of `device`."""
    check_choice("backend", backend, BACKENDS)
    return _resolve(backend, torch.device(device).type)


def get(backend, device):
    """The module of the backend that runs for `backend` on tensors on `device`, or an error
    saying why none can."""
    device = torch.device(device)
    name = resolve(backend, device)
    if name == "triton":
        if triton_ops is None:
            raise ImportError(f"backend: 'triton' is unavailable: {TRITON_IMPORT_ERROR}")
        if device.type != "cuda" and not _device.INTERPRETED:
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got device {device}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got device {device}")
    return _MODULES[name]
