"""The @triton.jit kernels, by stage; peer_kernels.ops launches them."""
