"""Data-only subpackage: the C++/CUDA sources of peer_kernels.csrc, JIT-built on first use."""
