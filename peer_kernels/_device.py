"""Facts about where kernels run, each read in one place: whether Triton interprets its kernels on
the CPU, a CUDA device's architecture and its SM count."""
import functools

import torch


def _triton_interprets():
    """Whether @triton.jit gives interpreted functions in this process. Triton decides that when a
    kernel is defined, from TRITON_INTERPRET as Triton itself parses it, so ask Triton: a probe
    kernel defined now is what the package's kernels got at their import."""
    try:
        import triton
    except ImportError:  # no Triton: nothing is interpreted, and the Triton backend is unavailable
        return False

    @triton.jit
    def probe():
        pass

    return not isinstance(probe, triton.runtime.JITFunction)


INTERPRETED = _triton_interprets()


def cuda_arch(device):
    """The SM version of a CUDA device (80 for an A100, 90 for an H100); 0 for any other device."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of a CUDA device."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
