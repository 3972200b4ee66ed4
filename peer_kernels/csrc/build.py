"""Builds and loads the C++ extensions of csrc_reference/ (the "cpp" backend's compiled half).

Nothing is compiled at install time: each extension is built with `torch.utils.cpp_extension.load`
on first use (announced once on stderr) and cached under torch's extension directory
(TORCH_EXTENSIONS_DIR), in a folder whose name carries a digest of the sources, the flags and the
torch and Python versions; later processes import the built library directly, with no compiler
needed. When it cannot be built or loaded, a single warning says why, and backend choice
(peer_kernels.backends) runs the reference instead.

Builds are serialised with an advisory lock (flock) that the kernel drops when its holder dies, so
a build interrupted by Ctrl-C or SIGKILL cannot leave later processes waiting forever on the lock
file torch's own build leaves behind: whoever holds the flock knows such a file is stale.
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
        from .. import csrc_reference
    except ImportError:  # running from a checkout: csrc_reference/ sits beside peer_kernels/
        return Path(__file__).resolve().parents[2] / "csrc_reference"
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


def extension(device):
    """The built extension module for tensors on `device`, or a RuntimeError."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    module = _extension(kind)
    if module is None:
        raise RuntimeError(f"peer_kernels.csrc: no {kind} extension is built (see the warning above for why); "
                           f"use backend='reference'")
    return module
