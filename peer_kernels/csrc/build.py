"""Builds and loads the C++ extensions of csrc_reference/ (the "cpp" backend's compiled half).

Nothing is compiled at install time: each extension is built with `torch.utils.cpp_extension.load`
on first use (announced once on stderr) and cached under torch's extension directory
(TORCH_EXTENSIONS_DIR), in a folder whose name carries a digest of the sources, the flags and the
torch and Python versions; later processes import the built library directly, with no compiler
needed. When it cannot be built or loaded, a single warning says why, and backend choice
(peer_kernels.backends) runs the reference instead.

A cached build is used only when it is complete, which a crash or a full disk can break (a
truncated library makes the process that maps it die of SIGBUS, and every later one): builds
happen in a private folder, are imported there (the check that they load), and only then are
renamed into place, with the SHA-256 of the library recorded beside it last. Before a cached
library is imported its digest is compared with the record; a library without a matching record
is rebuilt (the announcement says why), or, where nothing can be built, skipped with the one
warning. A complete build is loaded without taking the lock or writing anything, so a read-only
cache (a shared, pre-built one) works.

Builds are serialised with an advisory lock (flock) that the kernel drops when its holder dies, so
a build interrupted by Ctrl-C or SIGKILL cannot leave later processes waiting forever; whoever
holds the flock knows that the private folders left in the cache are an interrupted build's, and
removes them.
"""
import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
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


_NOT_BUILT = "not built yet"
# Prefix of the private folders builds happen in, inside the cache folder (the rename stays on one
# file system, so it is atomic).
_STAGING_PREFIX = "building-"


@contextlib.contextmanager
def _build_lock(handle, build_dir):
    """Exclusive on the open lock file `handle` for the whole build; released by the kernel if this
    process dies. Yields whether it is exclusive (no flock on Windows: then torch's own lock file is
    all there is)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
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
        yield True
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


def _import_library(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest_file(library):
    """Where a library's SHA-256 is recorded when it is built."""
    return library.with_name(library.name + ".sha256")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(name, library):
    """(the imported module, None) when the cached library is complete, else (None, why not)."""
    try:
        recorded = _digest_file(library).read_text().strip()
    except FileNotFoundError:
        if not library.exists():
            return None, _NOT_BUILT
        return None, "no digest recorded beside it: an interrupted build or an older peer_kernels"
    try:
        actual = _sha256(library)
    except FileNotFoundError:
        return None, "its library is missing"
    if actual != recorded:  # never imported: mapping a truncated library is a SIGBUS
        return None, "damaged: its SHA-256 differs from the one recorded when it was built"
    try:
        return _import_library(name, library), None
    except (ImportError, OSError) as error:
        return None, f"it does not load ({error})"


def _load(kind):
    """The extension module for "cpu" or "cuda": imported if a complete build is cached, else built
    now (under the lock, which is first taken here: a complete build needs no write access)."""
    base, files = _EXTENSIONS[kind]
    folder = sources_dir()
    name = _versioned_name(kind, base, folder, files)
    build_dir = _build_root() / name
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    module, problem = _cached(name, library)
    if module is not None:
        return module
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(build_dir / "peer_kernels.flock", "w")
    except OSError as error:  # a read-only cache, say
        raise RuntimeError(f"the extension cache {build_dir} is not writable ({error}) and holds no usable build "
                           f"({problem})") from None
    with lock_file, _build_lock(lock_file, build_dir) as exclusive:
        module, problem = _cached(name, library)  # another process may have built it while this one waited
        if module is not None:
            return module
        if exclusive:
            _remove_interrupted_builds(build_dir)
        return _build(kind, name, folder, files, build_dir, library, problem)


def _remove_interrupted_builds(build_dir):
    """With the flock held no live process is building: private folders left are a killed build's."""
    for staging in build_dir.glob(f"{_STAGING_PREFIX}*"):
        warnings.warn(f"peer_kernels.csrc: removing the leftovers of an interrupted build ({staging})",
                      RuntimeWarning, stacklevel=5)
        shutil.rmtree(staging, ignore_errors=True)


def _build(kind, name, folder, files, build_dir, library, problem):
    """Builds the extension in a private folder, imports it there, then moves the library into place
    and records its digest (last: a library is trusted only with its record). Returns the module."""
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH) and no usable build cached in "
                           f"{build_dir} ({problem})")
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)")
    why = "on first use" if problem == _NOT_BUILT else f"again: the cached one is unusable ({problem})"
    print(f"peer_kernels: building the C++ {kind} backend {why} (about a minute; cached in {build_dir})",
          file=sys.stderr, flush=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=build_dir))
    try:
        module = cpp_extension.load(
            name=name, sources=[str(folder / f) for f in files], extra_include_paths=[str(folder)],
            extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"],
            build_directory=str(staging), with_cuda=kind == "cuda", verbose=False)
        built = staging / library.name
        digest = _sha256(built)
        os.replace(built, library)  # atomic: a reader opens the old library or the whole new one
        record = staging / _digest_file(library).name
        record.write_text(digest + "\n")
        os.replace(record, _digest_file(library))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return module


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
