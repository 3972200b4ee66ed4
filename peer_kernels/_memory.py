"""Huge pages for the layer's large tables on a CPU.

A decode step reads its expert rows (4 KiB each in float32 at dim 1024) from anywhere in tables of
gigabytes. On 4 KiB pages every row costs a TLB miss and a page walk, and the hardware prefetchers
stop at each page's edge; on 2 MiB pages the page-table entries of a whole table fit in the
caches. Linux gives 2 MiB pages (transparent huge pages) to memory that asks for them with
madvise(MADV_HUGEPAGE) in its default "madvise" mode, when the memory is first touched: so the
advice goes to a table's memory before it is written (docs/serving.md has the measurements).
"""
import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def advise_huge_pages(tensor):
    """Asks Linux to back the whole 2 MiB pages inside a CPU tensor's storage with huge pages, for
    its pages not yet touched (call it before the tensor is first written). Advice only: a no-op
    off Linux, on other devices, on storages under 2 MiB, or where the kernel declines (THP
    "never"). Returns the tensor."""
    if _MADVISE is None or tensor.device.type != "cpu":
        return tensor
    storage = tensor.untyped_storage()
    begin = -(-storage.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (storage.data_ptr() + storage.nbytes()) // _HUGE_PAGE * _HUGE_PAGE
    if end > begin:
        _MADVISE(begin, end - begin, _MADV_HUGEPAGE)  # advice: a refusal leaves the pages as they are
    return tensor


def empty(shape, *, dtype, device):
    """torch.empty, advised for huge pages before anything writes it (advise_huge_pages)."""
    return advise_huge_pages(torch.empty(shape, dtype=dtype, device=device))
