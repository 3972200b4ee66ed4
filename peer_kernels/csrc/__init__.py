"""The "cpp" backend: the C++ (CPU, OpenMP) and CUDA implementations in csrc_reference/.

They are an independent second implementation of the math (forward and backward written in C++,
not derived from the Triton kernels), and the package's CPU backend. build.py builds and loads the
extension on first use (cached; later processes need no compiler); launchers.py fills the
package's ops (peer_kernels._library) with calls into it. The functions here have the reference's
signatures and semantics, are autograd-aware torch.library ops, and compile with
torch.compile(fullgraph=True). float64 computes in float64, every other dtype in float32; outputs
come back in x's dtype, table gradients in the tables' dtype, retrieval scores in the compute
dtype. On CUDA tensors they run the plain CUDA kernels (one block per token: the hand-written
CUDA baseline of bench/), built on first such call. Without a built extension they raise;
`backend="cpp"` in the layer then runs the reference (peer_kernels.backends decides, once).
"""
from .. import _library
from . import launchers as _launchers  # noqa: F401  (fills the ops)
from .build import available, built, cuda_available, sources_dir

__all__ = ["available", "built", "cuda_available", "sources_dir", "product_key_topk", "peer_experts", "peer_down",
           "peer_mix", "peer_fused"]


def product_key_topk(queries, keys, k, k_sub=None):
    """See peer_kernels.reference.product_key_topk."""
    return _library.product_key_topk("cpp", queries, keys, k, k_sub)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", sparse_grad=False, *, w_down_scale=None,
                 w_up_scale=None):
    """See peer_kernels.reference.peer_experts."""
    return _library.peer_experts("cpp", x, expert_ids, gates, w_down, w_up, activation, True, sparse_grad,
                                 w_down_scale, w_up_scale)


def peer_down(x, expert_ids, w_down, sparse_grad=False, *, w_down_scale=None):
    """See peer_kernels.reference.peer_down."""
    return _library.peer_down("cpp", x, expert_ids, w_down, True, sparse_grad, w_down_scale)


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", sparse_grad=False, *, w_up_scale=None):
    """See peer_kernels.reference.peer_mix."""
    return _library.peer_mix("cpp", z, expert_ids, gates, w_up, activation, True, sparse_grad, w_up_scale)


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False, sparse_grad=False, *, w_down_scale=None, w_up_scale=None):
    """See peer_kernels.reference.peer_fused."""
    return _library.peer_fused("cpp", x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                               separate_embed_per_head, sparse_grad, "two_kernel", True, w_down_scale, w_up_scale)
