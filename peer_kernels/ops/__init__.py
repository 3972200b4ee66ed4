"""The Triton backend: the package's ops (peer_kernels._library) filled with the launchers of this
package (retrieval.py, experts.py, fused.py; optim.py launches the optimizers' kernels), which run
the @triton.jit kernels of peer_kernels.kernels on CUDA tensors (CPU tensors under
TRITON_INTERPRET=1). The functions here have the reference's signatures and semantics
(peer_kernels.reference) and are autograd-aware torch.library ops."""
from .. import _library
from . import experts as _experts, fused as _fused, retrieval as _retrieval  # noqa: F401  (they fill the ops)

__all__ = ["product_key_topk", "peer_experts", "peer_down", "peer_mix", "peer_fused"]


def product_key_topk(queries, keys, k, k_sub=None):
    """Product-key retrieval; see peer_kernels.reference.product_key_topk."""
    return _library.product_key_topk("triton", queries, keys, k, k_sub)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", deterministic=True, sparse_grad=False, *,
                 w_down_scale=None, w_up_scale=None):
    """Fused single-neuron expert mixing; see peer_kernels.reference.peer_experts.

    x (T, d_in), expert_ids (T, h, k) int32/int64, gates (T, h, k) any float dtype, w_down (E, d_in) and
    w_up (E, d_out) in one float dtype (read as stored; float64 only with a float64 x) -> y (T, d_out)
    in x's dtype. deterministic=True (default) makes the table gradients bitwise reproducible
    (sorted, atomic-free reduction); False accumulates them with fp32 atomics. sparse_grad=True gives
    the tables coalesced sparse COO gradients of the touched rows (sorted reduction). Quantized
    tables (int8 / float8_e4m3fn) come with their scales w_down_scale, w_up_scale (E,) float32:
    the kernels multiply each row by its scale in registers (inference only).
    """
    return _library.peer_experts("triton", x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad,
                                 w_down_scale, w_up_scale)


def peer_down(x, expert_ids, w_down, sparse_grad=False, deterministic=True, *, w_down_scale=None):
    """z = w_down[e] . x; see peer_kernels.reference.peer_down."""
    return _library.peer_down("triton", x, expert_ids, w_down, deterministic, sparse_grad, w_down_scale)


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", sparse_grad=False, deterministic=True, *,
             w_up_scale=None):
    """y = sum g act(z) w_up[e]; see peer_kernels.reference.peer_mix."""
    return _library.peer_mix("triton", z, expert_ids, gates, w_up, activation, deterministic, sparse_grad,
                             w_up_scale)


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False, sparse_grad=False, one_pass=False, overlap=False, deterministic=True, *,
               w_down_scale=None, w_up_scale=None):
    """Retrieval, gating and expert mixing; see peer_kernels.reference.peer_fused.

    x (T, d), queries (T, h, 2, dk), keys (h or 1, n, 2, dk), w_down / w_up (S*n*n, d) -> y (T, d).
    sparse_grad=True gives the tables sparse COO gradients of the touched rows. The forward's
    schedule (ops/fused.py): by default the retrieval kernel, then the expert kernel; overlap=True
    runs the retrieval of the next chunk of tokens beside the expert kernel of this one;
    one_pass=True one kernel for both. The default is the simplest schedule expected to be fast
    until a GPU has timed the three (bench: triton-2kernel, triton-overlap, triton-1pass). deterministic=True makes the expert-table
    gradients bitwise reproducible (the key gradients still use atomics). Quantized tables: their
    scales as in peer_experts, on every schedule.
    """
    if one_pass and overlap:
        raise ValueError("one_pass and overlap: expected at most one of them True, got both")
    schedule = "one_pass" if one_pass else "overlap" if overlap else "two_kernel"
    return _library.peer_fused("triton", x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                               separate_embed_per_head, sparse_grad, schedule, deterministic, w_down_scale, w_up_scale)
