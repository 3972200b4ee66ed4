"""torch.library registration shared by the Triton ops (peer_kernels/ops) and the C++ ops
(peer_kernels/csrc.py): one namespace, and output allocation that the real ops and their fake
(meta) implementations share, so both give the same sizes, strides and dtypes."""
import torch

LIBRARY = "peer_kernels"


def custom_op(name, mutates_args=()):
    """torch.library.custom_op in this package's namespace: the op is opaque to torch.compile
    (no graph break) and runs its Python body eagerly, on every device."""
    return torch.library.custom_op(f"{LIBRARY}::{name}", mutates_args=mutates_args)


def empty(shape, like, dtype=None):
    """A fresh contiguous tensor on `like`'s device (a fake one under fake-tensor tracing). Every
    op output is allocated this way, never with empty_like, which would copy the strides of a
    non-contiguous input into the real output but not always into the fake one."""
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)



def autocast_off(like):
    """A context in which an op computes in the dtypes it documents: torch.autocast, which would
    run its matmuls in 16 bits, is switched off on `like`'s device."""
    return torch.autocast(like.device.type, enabled=False)
