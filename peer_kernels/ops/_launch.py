"""Launch helpers shared by the op families: constexpr ids, block-size picks and device checks.
Nothing here launches a kernel; torch.library registration is peer_kernels/_library.py."""
import functools

import torch
import triton

from .._checks import ACTIVATIONS


def activation_id(activation):
    """The ACTIVATION constexpr of the kernels: the index in reference.ACTIVATIONS."""
    return ACTIVATIONS.index(activation)


def check_launchable(t, kernel):
    """Triton needs CUDA tensors, or CPU tensors with the interpreter on (then `kernel`, defined
    under TRITON_INTERPRET=1, is no JITFunction)."""
    if t.device.type != "cuda" and isinstance(kernel, triton.runtime.JITFunction):
        raise ValueError(
            f"x: expected a CUDA tensor for the Triton ops (or TRITON_INTERPRET=1 set before import), "
            f"got device {t.device}")


def cuda_arch(device):
    """The SM version of a CUDA device (80 for an A100, 90 for an H100); 0 for other devices."""
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


def contiguous(*tensors):
    return tuple(t.contiguous() for t in tensors)


def gather_tile(num_tokens, slots, dim, acc_dtype=torch.float32, atomic=False, whole_sm=False):
    """(BLOCK_T, BLOCK_S, BLOCK_D, num_warps) for kernels that gather `slots` table rows per token.

    A program covers BLOCK_T tokens x all their slots, so every row is loaded once; BLOCK_T grows
    only when h*k is small, to keep >= 64 rows per program. The (BLOCK_T, BLOCK_S, BLOCK_D) row tile
    holds up to 8192 fp32 values, 64 per thread at 4 warps: eight 128-bit loads in flight per thread
    for 16-bit tables. fp64 halves it, and atomics (one 64-bit address per 4 values, live until the
    atomic issues) quarter it, so that nothing spills (checked on the SASS by tests/test_experts.py).
    whole_sm=True: four times the tile at 16 warps, the same values per thread, for a persistent
    grid that takes whole SMs (ops/fused.py's overlapped forward): 64 KB of 16-bit rows per pass.
    """
    scale = 4 if whole_sm else 1
    budget = scale * 8192 * 4 // acc_dtype.itemsize // (4 if atomic else 1)
    block_s = triton.next_power_of_2(slots)
    block_t = min(triton.next_power_of_2(num_tokens), max(1, 64 // block_s))
    block_d = min(triton.next_power_of_2(dim), max(16, budget // (block_t * block_s)))
    num_warps = min(16, scale * max(4, block_t * block_s * block_d // budget * 4))
    return block_t, block_s, block_d, num_warps


def table_grad_tile(dim, slots, device):
    """(BLOCK_N, BLOCK_D, chunk, num_warps) of kernels/experts.table_grad_kernel: windows of BLOCK_N
    sorted slots x BLOCK_D columns, at most 2048 fp32 values (16 per thread at 4 warps, the segmented
    scan's working set), and chunks of sorted positions per program: ~4 programs per SM per column
    block on a GPU (a million slots: ~500 per chunk), a few windows per chunk elsewhere."""
    block_d = min(triton.next_power_of_2(dim), 256)
    block_n = max(2, 2048 // block_d)
    programs = 4 * sm_count(device) if device.type == "cuda" else 4
    chunk = max(block_n, triton.cdiv(triton.cdiv(slots, programs), block_n) * block_n)
    return block_n, block_d, chunk, 4
