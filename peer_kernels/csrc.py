"""The "cpp" backend: the C++ (CPU, OpenMP) and CUDA implementations in csrc_reference/.

They are an independent second implementation of SPEC section 1 (forward and backward written in
C++, not derived from the Triton kernels), and the package's CPU backend. Nothing is compiled at
install time: each extension is built with `torch.utils.cpp_extension.load` on first use and cached
in torch's extension directory (TORCH_EXTENSIONS_DIR), so later processes only load it. When the
build fails (no compiler, no nvcc, ...) a single warning says why and the ops fall back to
`peer_kernels.reference`.

The ops take the reference's arguments and are autograd-aware (forward and backward in C++).
float64 computes in float64; every other dtype computes in float32 and returns results in the input
dtype (retrieval scores in float32). Ties in top-k go to the smaller sub-key index, then to the smaller
expert id; the gradient follows the picks made. On CUDA tensors the ops run the plain CUDA kernels
(one block per token: the hand-written CUDA baseline of bench/), built on first such call.
"""
import functools
import shutil
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from . import _checks, reference

__all__ = ["available", "cuda_available", "product_key_topk", "peer_experts", "peer_fused", "sources_dir"]

# name of the cached build -> its sources in csrc_reference/
_EXTENSIONS = {
    "cpu": ("peer_kernels_csrc_cpu", ("peer_cpu.cpp",)),
    "cuda": ("peer_kernels_csrc_cuda", ("peer_cuda_binding.cpp", "peer_cuda.cu")),
}
# Portable flags: the build cache may be shared by machines with different CPUs, so no -march=native.
_CFLAGS = ["-O3", "-fopenmp"]


def sources_dir():
    """csrc_reference/: the data-only subpackage when installed, else the source checkout's folder."""
    try:
        from . import csrc_reference
    except ImportError:  # running from a checkout: csrc_reference/ sits beside peer_kernels/
        return Path(__file__).resolve().parent.parent / "csrc_reference"
    return Path(csrc_reference.__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _extension(kind):
    """The built extension module for "cpu" or "cuda", or None after one warning saying why."""
    name, files = _EXTENSIONS[kind]
    try:
        from torch.utils import cpp_extension

        compiler = cpp_extension.get_cxx_compiler()
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
        if kind == "cuda" and cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)")
        folder = sources_dir()
        return cpp_extension.load(
            name=name, sources=[str(folder / f) for f in files], extra_include_paths=[str(folder)],
            extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"],
            with_cuda=kind == "cuda", verbose=False)
    except Exception as error:  # any build or load failure means: use the reference
        # A build error's message starts with the compile command: show its first "error" line instead.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines[1:] if "error" in line.lower()), lines[0])
        warnings.warn(f"peer_kernels.csrc: the {kind} extension is unavailable ({reason}); "
                      "falling back to peer_kernels.reference", RuntimeWarning, stacklevel=3)
        return None


def available():
    """True when the CPU extension is built (building it now if needed)."""
    return _extension("cpu") is not None


def cuda_available():
    """True when CUDA is usable and the CUDA extension is built (building it now if needed)."""
    return torch.cuda.is_available() and _extension("cuda") is not None


def _extension_for(device):
    if device.type == "cpu":
        return _extension("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return _extension("cuda")
    return None


class _ProductKeyTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, k, k_sub, ext):
        scores, expert_ids = ext.retrieval_forward(queries, keys, k, k_sub)
        ctx.ext = ext
        ctx.save_for_backward(queries, keys, expert_ids)
        ctx.mark_non_differentiable(expert_ids)
        return scores, expert_ids

    @staticmethod
    @once_differentiable
    def backward(ctx, dscores, _):
        queries, keys, expert_ids = ctx.saved_tensors
        dqueries, dkeys = ctx.ext.retrieval_backward(dscores, queries, keys, expert_ids)
        return dqueries, dkeys, None, None, None


class _PeerExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ids, gates, w_down, w_up, activation, ext):
        y, z = ext.experts_forward(x, expert_ids, gates, w_down, w_up, activation)
        ctx.ext, ctx.activation = ext, activation
        ctx.save_for_backward(x, expert_ids, gates, w_down, w_up, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, expert_ids, gates, w_down, w_up, z = ctx.saved_tensors
        dx, dgates, dw_down, dw_up = ctx.ext.experts_backward(
            dy, x, expert_ids, gates, z, w_down, w_up, ctx.activation)
        return dx, None, dgates, dw_down, dw_up, None, None


class _PeerFused(torch.autograd.Function):
    """Retrieval -> gating -> experts, each stage a C++ call; only (T, h, k) tensors pass between them."""

    @staticmethod
    def forward(ctx, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head, ext):
        scores, expert_ids = ext.retrieval_forward(queries, keys, k, k_sub)
        gates = ext.gates_forward(scores, gating)
        rows = _expert_rows(expert_ids, keys.shape[1], separate_embed_per_head)
        y, z = ext.experts_forward(x, rows, gates, w_down, w_up, activation)
        ctx.ext, ctx.options = ext, (gating, activation, separate_embed_per_head)
        ctx.save_for_backward(x, queries, keys, w_down, w_up, scores, expert_ids, gates, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, queries, keys, w_down, w_up, scores, expert_ids, gates, z = ctx.saved_tensors
        gating, activation, separate_embed_per_head = ctx.options
        rows = _expert_rows(expert_ids, keys.shape[1], separate_embed_per_head)
        dx, dgates, dw_down, dw_up = ctx.ext.experts_backward(dy, x, rows, gates, z, w_down, w_up, activation)
        dscores = ctx.ext.gates_backward(scores, gates, dgates, gating)
        dqueries, dkeys = ctx.ext.retrieval_backward(dscores, queries, keys, expert_ids)
        return dx, dqueries, dkeys, dw_down, dw_up, None, None, None, None, None, None


def _expert_rows(expert_ids, n, separate_embed_per_head):
    """Product-key ids -> rows of the expert tables (head h owns the h-th block of n*n rows)."""
    return reference.head_offsets(expert_ids, n * n) if separate_embed_per_head else expert_ids


def product_key_topk(queries, keys, k, k_sub=None):
    """See `peer_kernels.reference.product_key_topk`."""
    k_sub = _checks.check_retrieval(queries, keys, k, k_sub)
    ext = _extension_for(queries.device)
    if ext is None:
        return reference.product_key_topk(queries, keys, k, k_sub)
    return _ProductKeyTopK.apply(queries, keys, k, k_sub, ext)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu"):
    """See `peer_kernels.reference.peer_experts`."""
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation)
    ext = _extension_for(x.device)
    if ext is None:
        return reference.peer_experts(x, expert_ids, gates, w_down, w_up, activation)
    return _PeerExperts.apply(x, expert_ids, gates, w_down, w_up, activation, ext)


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False):
    """See `peer_kernels.reference.peer_fused`."""
    k_sub = _checks.check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                                separate_embed_per_head)
    ext = _extension_for(x.device)
    if ext is None:
        return reference.peer_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                                    separate_embed_per_head)
    return _PeerFused.apply(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                            separate_embed_per_head, ext)
