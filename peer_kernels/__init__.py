"""peer_kernels: fused kernels for the PEER layer (Mixture of A Million Experts, arXiv 2407.04153).

`PEER` is the layer; `reference` the naive PyTorch oracle; `ops` the Triton ops (imported on first
use, as Triton may be absent); `csrc` the C++/CUDA reference backend (built on first use).
"""
import importlib

from . import reference
from .module import PEER

__version__ = "0.1.0"
__all__ = ["PEER", "reference", "ops", "csrc", "__version__"]


def __getattr__(name):
    if name in ("ops", "csrc"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'peer_kernels' has no attribute {name!r}")
