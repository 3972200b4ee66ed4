"""peer_kernels: fused kernels for the PEER layer (Mixture of A Million Experts, arXiv 2407.04153).

`PEER` is the layer, and `warmup(model)` runs its layers once before their decode steps are
captured in CUDA graphs; `reference` the naive PyTorch oracle; `ops` the Triton ops (absent where
Triton is); `csrc` the C++ reference backend, built on first use; `optim` the optimizers for
sparse table gradients. Set TRITON_INTERPRET=1 before the import to run the Triton ops on CPU
tensors (slow; for tests). `compat` has peer-pytorch's classes on these kernels and
`patch_peer_pytorch()` puts peer-pytorch's own on them; `transformers` puts PEER into Hugging Face
models; `distributed` shards it over several GPUs (none of them needs peer-pytorch or transformers
to be imported). `quantize_` stores every PEER layer's expert tables in int8 (or fp8) with a
scale per row, for inference.
"""
from . import backends, optim, reference
from .compat import patch_peer_pytorch, unpatch_peer_pytorch
from .module import PEER, warmup
from .quantize import quantize_

__version__ = "0.1.0"
__all__ = ["PEER", "warmup", "reference", "backends", "optim", "quantize_", "patch_peer_pytorch", "unpatch_peer_pytorch",
           "__version__"]
