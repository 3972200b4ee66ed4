"""peer_kernels: fused kernels for the PEER layer (Mixture of A Million Experts, arXiv 2407.04153).

`PEER` is the layer; `reference` the naive PyTorch oracle; `ops` the Triton ops (absent where
Triton is); `csrc` the C++ reference backend, built on first use; `optim` the optimizers for
sparse table gradients. Set TRITON_INTERPRET=1 before the
import to run the Triton ops on CPU tensors (slow; for tests).
"""
from . import backends, optim, reference
from .module import PEER

__version__ = "0.1.0"
__all__ = ["PEER", "reference", "backends", "optim", "__version__"]
