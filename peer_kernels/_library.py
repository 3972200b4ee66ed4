"""torch.library registration shared by the Triton ops (peer_kernels/ops) and the C++ ops
(peer_kernels/csrc.py): one namespace, and output allocation that the real ops and their fake
(meta) implementations share, so both give the same sizes, strides and dtypes."""
import contextlib
import functools

import torch

LIBRARY = "peer_kernels"


def custom_op(name, mutates_args=()):
    """torch.library.custom_op in this package's namespace: the op is opaque to torch.compile
    (no graph break) and runs its Python body eagerly, on every device. The body runs with its
    first CUDA tensor's device as the current one: Triton launches on the current device's current
    stream, so without it a tensor on cuda:1 would meet kernels launched on cuda:0."""
    def register(fn):
        @functools.wraps(fn)
        def on_inputs_device(*args, **kwargs):
            device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda),
                          None)
            with contextlib.nullcontext() if device is None else torch.cuda.device(device):
                return fn(*args, **kwargs)
        return torch.library.custom_op(f"{LIBRARY}::{name}", mutates_args=mutates_args)(on_inputs_device)
    return register


def empty(shape, like, dtype=None):
    """A fresh contiguous tensor on `like`'s device (a fake one under fake-tensor tracing). Every
    op output is allocated this way, never with empty_like, which would copy the strides of a
    non-contiguous input into the real output but not always into the fake one."""
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)



def autocast_off(like):
    """A context in which an op computes in the dtypes it documents: torch.autocast, which would
    run its matmuls in 16 bits, is switched off on `like`'s device."""
    return torch.autocast(like.device.type, enabled=False)


def table_gradients(rows, sparse, grads, tables):
    """The gradients autograd gets for the tables from what a backward op returned: dense as they
    are, or, with `sparse`, coalesced sparse COO tensors of the touched rows (rows (U,) int64
    ascending and unique, each grad their values (U, d)): the nn.Embedding(sparse=True) layout."""
    if not sparse:
        return list(grads)
    return [torch.sparse_coo_tensor(rows[None], values, tuple(t.shape), is_coalesced=True, check_invariants=False)
            for values, t in zip(grads, tables)]


def fake_table_grads(sparse, *tables):
    """Fake table gradients and their rows, as the backward ops return them: dense (each like its
    table, rows empty) or sparse (values (U, d) per table and rows (U,), U depending on the data)."""
    if not sparse:
        return (*(empty(t.shape, t) for t in tables), empty((0,), tables[0], torch.int64))
    count = torch.library.get_ctx().new_dynamic_size()
    return (*(empty((count, t.shape[1]), t) for t in tables), empty((count,), tables[0], torch.int64))
