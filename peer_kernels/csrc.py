"""The "cpp" backend: the C++ (CPU, OpenMP) and CUDA implementations in csrc_reference/.

They are an independent second implementation of SPEC section 1 (forward and backward written in
C++, not derived from the Triton kernels), and the package's CPU backend. Nothing is compiled at
install time: each extension is built with `torch.utils.cpp_extension.load` on first use (about
half a minute on 2 cores, announced once on stderr) and cached under torch's extension directory
(TORCH_EXTENSIONS_DIR), in a folder whose name carries a digest of the sources, the flags and the
torch and Python versions; later processes import the built library directly, with no compiler
needed. When it cannot be built or loaded, a single warning says why and the ops fall back to
`peer_kernels.reference`.

Builds are serialised with an advisory lock (flock) that the kernel drops when its holder dies, so
a build interrupted by Ctrl-C or SIGKILL cannot leave later processes waiting forever on the lock
file torch's own build leaves behind: whoever holds the flock knows such a file is stale.

The ops take the reference's arguments and checks, follow its tie rule, and are registered as
torch.library ops (`peer_kernels::cpp_*`) with fake implementations and autograd, so a model on
this backend compiles with `torch.compile(fullgraph=True)`. float64 computes in float64, every
other dtype in float32; outputs come back in x's dtype, table gradients in the tables' dtype,
retrieval scores in the compute dtype. On CUDA tensors the ops run the plain CUDA kernels (one
block per token: the hand-written CUDA baseline of bench/), built on first such call.
"""
import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from . import _checks, _library, reference

__all__ = ["available", "cuda_available", "product_key_topk", "peer_experts", "peer_down", "peer_mix", "peer_fused",
           "sources_dir"]

# name of the cached build -> its sources in csrc_reference/
_EXTENSIONS = {
    "cpu": ("peer_kernels_csrc_cpu", ("peer_cpu.cpp",)),
    "cuda": ("peer_kernels_csrc_cuda", ("peer_cuda_binding.cpp", "peer_cuda.cu")),
}
_HEADERS = ("peer_math.h", "peer_torch.h", "peer_cuda.h")
# Portable flags: the build cache may be shared by machines with different CPUs, so no -march=native.
_CFLAGS = ["-O3", "-fopenmp"]
# How long a process waits for another one's build (a cold CPU build takes ~30-60 s on 2 cores).
BUILD_WAIT_SECONDS = 900.0


def sources_dir():
    """csrc_reference/: the data-only subpackage when installed, else the source checkout's folder."""
    try:
        from . import csrc_reference
    except ImportError:  # running from a checkout: csrc_reference/ sits beside peer_kernels/
        return Path(__file__).resolve().parent.parent / "csrc_reference"
    return Path(csrc_reference.__file__).resolve().parent


def _build_root():
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def _versioned_name(kind, base, folder, files):
    """base + a digest of everything the binary depends on: a cached build is never stale."""
    digest = hashlib.sha256()
    for part in (kind, torch.__version__, sys.version, " ".join(_CFLAGS)):
        digest.update(part.encode())
    for name in sorted(set(files) | set(_HEADERS)):
        path = folder / name
        digest.update(name.encode() + (path.read_bytes() if path.exists() else b""))
    return f"{base}_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _build_lock(build_dir):
    """Exclusive for the whole load; released by the kernel if this process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file is all there is
        yield
        return
    with open(build_dir / "peer_kernels.flock", "w") as handle:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process has held the build lock of {build_dir} for "
                                       f"{BUILD_WAIT_SECONDS:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_library(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(kind):
    """The extension module for "cpu" or "cuda": imported if built before, else built now."""
    from torch.utils import cpp_extension

    base, files = _EXTENSIONS[kind]
    folder = sources_dir()
    name = _versioned_name(kind, base, folder, files)
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    with _build_lock(build_dir):
        if library.exists():
            try:
                return _import_library(name, library)
            except (ImportError, OSError):  # truncated by an interrupted link: build it again
                library.unlink()
        compiler = cpp_extension.get_cxx_compiler()
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH) and no build cached in {build_dir}")
        if kind == "cuda" and cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)")
        stale = build_dir / "lock"
        if stale.exists():  # we hold the flock, so no live process is building: a killed build left it
            warnings.warn(f"peer_kernels.csrc: removing the lock file of an interrupted build ({stale})",
                          RuntimeWarning, stacklevel=4)
            stale.unlink()
        print(f"peer_kernels: building the C++ {kind} backend on first use (about a minute; cached in {build_dir})",
              file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=name, sources=[str(folder / f) for f in files], extra_include_paths=[str(folder)],
            extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"],
            build_directory=str(build_dir), with_cuda=kind == "cuda", verbose=False)


@functools.lru_cache(maxsize=None)
def _extension(kind):
    """The built extension module for "cpu" or "cuda", or None after one warning saying why."""
    try:
        return _load(kind)
    except Exception as error:  # any build or load failure means: use the reference
        # A build error's message starts with the compile command: show its first "error" line instead.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines[1:] if "error" in line.lower()), lines[0])
        warnings.warn(f"peer_kernels.csrc: the {kind} extension is unavailable ({reason}); "
                      "falling back to peer_kernels.reference", RuntimeWarning, stacklevel=3)
        return None


@torch.compiler.assume_constant_result
def built(device_type: str) -> bool:
    """Whether the extension for tensors on `device_type` ("cpu" or "cuda") is built, building it
    now if needed. torch.compile evaluates this once while tracing, so the build never happens
    inside a graph."""
    if device_type == "cuda":
        return torch.cuda.is_available() and _extension("cuda") is not None
    return device_type == "cpu" and _extension("cpu") is not None


def available():
    """True when the CPU extension is built (building it now if needed)."""
    return built("cpu")


def cuda_available():
    """True when CUDA is usable and the CUDA extension is built (building it now if needed)."""
    return built("cuda")


def _ext(device):
    extension = _extension("cuda" if device.type == "cuda" else "cpu")
    if extension is None:
        raise RuntimeError(f"peer_kernels.csrc: no extension is built for {device} tensors")
    return extension


def _call(name, first, *args):
    """extension.name(first, *args) for `first`'s device, with autocast off (the extension's own
    matmul must compute in its documented dtype)."""
    with _library.autocast_off(first):
        return getattr(_ext(first.device), name)(first, *args)


# ---- torch.library ops: each a call into the extension, its fake, its autograd ------------------

@_library.custom_op("cpp_retrieve")
def _retrieve_op(queries: torch.Tensor, keys: torch.Tensor, k: int, k_sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, ids = _call("retrieval_forward", queries, keys, k, k_sub)
    return scores, ids


@_retrieve_op.register_fake
def _(queries, keys, k, k_sub):
    shape = (queries.shape[0], queries.shape[1], k)
    return (_library.empty(shape, queries, _checks.compute_dtype(queries.dtype)),
            _library.empty(shape, queries, torch.int64))


@_library.custom_op("cpp_retrieve_backward")
def _retrieve_backward_op(dscores: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                          ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dqueries, dkeys = _call("retrieval_backward", dscores, queries, keys, ids)
    return dqueries, dkeys


@_retrieve_backward_op.register_fake
def _(dscores, queries, keys, ids):
    return _library.empty(queries.shape, queries), _library.empty(keys.shape, keys)


def _retrieve_setup(ctx, inputs, output):
    queries, keys, _, _ = inputs
    ctx.save_for_backward(queries, keys, output[1])
    ctx.mark_non_differentiable(output[1])


def _retrieve_backward(ctx, dscores, _):
    dqueries, dkeys = _retrieve_backward_op(dscores, *ctx.saved_tensors)
    return dqueries, dkeys, None, None


_retrieve_op.register_autograd(_retrieve_backward, setup_context=_retrieve_setup)


@_library.custom_op("cpp_experts")
def _experts_op(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                w_up: torch.Tensor, activation: str, sparse_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z), z = w_down[e] . x (T, h, k) in the compute dtype, saved for the backward."""
    y, z = _call("experts_forward", x, expert_ids, gates, w_down, w_up, activation)
    return y, z


@_experts_op.register_fake
def _(x, expert_ids, gates, w_down, w_up, activation, sparse_grad):
    return (_library.empty((x.shape[0], w_up.shape[1]), x),
            _library.empty(expert_ids.shape, x, _checks.compute_dtype(x.dtype)))


@_library.custom_op("cpp_experts_backward")
def _experts_backward_op(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                         z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str, sparse_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgates, dw_down, dw_up, rows): dense table gradients and no rows, or the touched rows and
    their values."""
    dx, dgates, dw_down, dw_up, rows = _call("experts_backward", dy, x, expert_ids, gates, z, w_down, w_up,
                                             activation, sparse_grad)
    return dx, dgates, dw_down, dw_up, rows


@_experts_backward_op.register_fake
def _(dy, x, expert_ids, gates, z, w_down, w_up, activation, sparse_grad):
    return (_library.empty(x.shape, x), _library.empty(gates.shape, gates),
            *_library.fake_table_grads(sparse_grad, w_down, w_up))


def _experts_setup(ctx, inputs, output):
    x, expert_ids, gates, w_down, w_up, activation, sparse_grad = inputs
    ctx.save_for_backward(x, expert_ids, gates, output[1], w_down, w_up)
    ctx.options = (activation, sparse_grad)
    ctx.mark_non_differentiable(output[1])


def _experts_backward(ctx, dy, _):
    x, expert_ids, gates, z, w_down, w_up = ctx.saved_tensors
    dx, dgates, dw_down, dw_up, rows = _experts_backward_op(dy, *ctx.saved_tensors, *ctx.options)
    dw_down, dw_up = _library.table_gradients(rows, ctx.options[1], (dw_down, dw_up), (w_down, w_up))
    return dx, None, dgates, dw_down, dw_up, None, None


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


@_library.custom_op("cpp_down")
def _down_op(x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor, sparse_grad: bool) -> torch.Tensor:
    """z = w_down[e] . x (T, h, k) in the compute dtype."""
    return _call("down_forward", x, expert_ids, w_down)


@_down_op.register_fake
def _(x, expert_ids, w_down, sparse_grad):
    return _library.empty(expert_ids.shape, x, _checks.compute_dtype(x.dtype))


@_library.custom_op("cpp_down_backward")
def _down_backward_op(dz: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor,
                      sparse_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw_down, rows = _call("down_backward", dz, x, expert_ids, w_down, sparse_grad)
    return dx, dw_down, rows


@_down_backward_op.register_fake
def _(dz, x, expert_ids, w_down, sparse_grad):
    return (_library.empty(x.shape, x), *_library.fake_table_grads(sparse_grad, w_down))


def _down_setup(ctx, inputs, output):
    x, expert_ids, w_down, sparse_grad = inputs
    ctx.save_for_backward(x, expert_ids, w_down)
    ctx.sparse_grad = sparse_grad


def _down_backward(ctx, dz):
    x, expert_ids, w_down = ctx.saved_tensors
    dx, dw_down, rows = _down_backward_op(dz, x, expert_ids, w_down, ctx.sparse_grad)
    return dx, None, *_library.table_gradients(rows, ctx.sparse_grad, (dw_down,), (w_down,)), None


_down_op.register_autograd(_down_backward, setup_context=_down_setup)


@_library.custom_op("cpp_mix")
def _mix_op(z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_up: torch.Tensor,
            activation: str, sparse_grad: bool) -> torch.Tensor:
    """y = sum g act(z) w_up[e] (T, d_out) in z's dtype."""
    return _call("mix_forward", z, expert_ids, gates, w_up, activation)


@_mix_op.register_fake
def _(z, expert_ids, gates, w_up, activation, sparse_grad):
    return _library.empty((z.shape[0], w_up.shape[1]), z)


@_library.custom_op("cpp_mix_backward")
def _mix_backward_op(dy: torch.Tensor, z: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                     w_up: torch.Tensor, activation: str, sparse_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dz, dgates, dw_up, rows = _call("mix_backward", dy, z, expert_ids, gates, w_up, activation, sparse_grad)
    return dz, dgates, dw_up, rows


@_mix_backward_op.register_fake
def _(dy, z, expert_ids, gates, w_up, activation, sparse_grad):
    return (_library.empty(z.shape, z), _library.empty(gates.shape, gates),
            *_library.fake_table_grads(sparse_grad, w_up))


def _mix_setup(ctx, inputs, output):
    z, expert_ids, gates, w_up, activation, sparse_grad = inputs
    ctx.save_for_backward(z, expert_ids, gates, w_up)
    ctx.options = (activation, sparse_grad)


def _mix_backward(ctx, dy):
    z, expert_ids, gates, w_up = ctx.saved_tensors
    dz, dgates, dw_up, rows = _mix_backward_op(dy, *ctx.saved_tensors, *ctx.options)
    return dz, None, dgates, *_library.table_gradients(rows, ctx.options[1], (dw_up,), (w_up,)), None, None


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup)


@_library.custom_op("cpp_fused")
def _fused_op(x: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, w_down: torch.Tensor,
              w_up: torch.Tensor, k: int, k_sub: int, gating: str, activation: str, id_head_offset: int,
              sparse_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retrieval -> gating -> experts, each stage a C++ call: (y, scores, ids, gates, z); only
    (T, h, k) tensors pass between the stages. ids are product-key ids a*n + b; head h reads table
    rows ids + h * id_head_offset (separate embeddings per head)."""
    scores, ids = _call("retrieval_forward", queries, keys, k, k_sub)
    gates = _call("gates_forward", scores, gating)
    y, z = _call("experts_forward", x, _table_rows(ids, id_head_offset), gates, w_down, w_up, activation)
    return y, scores, ids, gates, z


@_fused_op.register_fake
def _(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset, sparse_grad):
    shape = (x.shape[0], queries.shape[1], k)
    acc = _checks.compute_dtype(queries.dtype)
    return (_library.empty(x.shape, x), _library.empty(shape, x, acc), _library.empty(shape, x, torch.int64),
            _library.empty(shape, x, acc), _library.empty(shape, x, _checks.compute_dtype(x.dtype)))


@_library.custom_op("cpp_fused_backward")
def _fused_backward_op(dy: torch.Tensor, x: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                       w_down: torch.Tensor, w_up: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
                       gates: torch.Tensor, z: torch.Tensor, gating: str, activation: str, id_head_offset: int,
                       sparse_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dqueries, dkeys, dw_down, dw_up, rows), the table gradients as cpp_experts_backward's."""
    dx, dgates, dw_down, dw_up, rows = _call("experts_backward", dy, x, _table_rows(ids, id_head_offset), gates, z,
                                             w_down, w_up, activation, sparse_grad)
    dscores = _call("gates_backward", scores, gates, dgates, gating)
    dqueries, dkeys = _call("retrieval_backward", dscores, queries, keys, ids)
    return dx, dqueries, dkeys, dw_down, dw_up, rows


@_fused_backward_op.register_fake
def _(dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, gating, activation, id_head_offset, sparse_grad):
    return (*(_library.empty(t.shape, t) for t in (x, queries, keys)),
            *_library.fake_table_grads(sparse_grad, w_down, w_up))


def _fused_setup(ctx, inputs, output):
    x, queries, keys, w_down, w_up, _, _, gating, activation, id_head_offset, sparse_grad = inputs
    _, scores, ids, gates, z = output
    ctx.save_for_backward(x, queries, keys, w_down, w_up, scores, ids, gates, z)
    ctx.options = (gating, activation, id_head_offset, sparse_grad)
    ctx.mark_non_differentiable(*output[1:])


def _fused_backward(ctx, dy, *_):
    w_down, w_up = ctx.saved_tensors[3:5]
    dx, dqueries, dkeys, dw_down, dw_up, rows = _fused_backward_op(dy, *ctx.saved_tensors, *ctx.options)
    dw_down, dw_up = _library.table_gradients(rows, ctx.options[-1], (dw_down, dw_up), (w_down, w_up))
    return dx, dqueries, dkeys, dw_down, dw_up, None, None, None, None, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def _table_rows(ids, id_head_offset):
    """Product-key ids -> rows of the expert tables (head h owns rows [h*offset, (h+1)*offset))."""
    return reference.head_offsets(ids, id_head_offset) if id_head_offset else ids


# ---- the public functions: the reference's signatures ---------------------------------------------

def product_key_topk(queries, keys, k, k_sub=None):
    """See `peer_kernels.reference.product_key_topk`."""
    k_sub = _checks.check_retrieval(queries, keys, k, k_sub)
    if not built(queries.device.type):
        return reference.product_key_topk(queries, keys, k, k_sub)
    return _retrieve_op(queries, keys, k, k_sub)


def peer_experts(x, expert_ids, gates, w_down, w_up, activation="gelu", sparse_grad=False):
    """See `peer_kernels.reference.peer_experts`."""
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation)
    if not built(x.device.type):
        return reference.peer_experts(x, expert_ids, gates, w_down, w_up, activation, sparse_grad)
    return _experts_op(x, expert_ids, gates, w_down, w_up, activation, bool(sparse_grad))[0]


def peer_down(x, expert_ids, w_down, sparse_grad=False):
    """See `peer_kernels.reference.peer_down`."""
    _checks.check_down(x, expert_ids, w_down)
    if not built(x.device.type):
        return reference.peer_down(x, expert_ids, w_down, sparse_grad)
    return _down_op(x, expert_ids, w_down, bool(sparse_grad))


def peer_mix(z, expert_ids, gates, w_up, activation="gelu", sparse_grad=False):
    """See `peer_kernels.reference.peer_mix`."""
    _checks.check_mix(z, expert_ids, gates, w_up, activation)
    if not built(z.device.type):
        return reference.peer_mix(z, expert_ids, gates, w_up, activation, sparse_grad)
    return _mix_op(z, expert_ids, gates, w_up, activation, bool(sparse_grad))


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False, sparse_grad=False):
    """See `peer_kernels.reference.peer_fused`."""
    k_sub = _checks.check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                                separate_embed_per_head)
    if not built(x.device.type):
        return reference.peer_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                                    separate_embed_per_head, sparse_grad)
    id_head_offset = keys.shape[1] ** 2 if separate_embed_per_head else 0
    return _fused_op(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset,
                     bool(sparse_grad))[0]
