"""Huge pages for the large tables on a CPU (peer_kernels._memory): the advice reaches the kernel for
the layer's tables and quantize_'s, and is harmless where it cannot apply."""
import mmap
import os

import pytest
import torch

from peer_kernels import PEER, _memory, quantize_

linux = pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                           reason="madvise(MADV_HUGEPAGE) needs Linux with transparent huge pages")


def huge_page_advised(tensor):
    """Whether the mapping holding the tensor's first 2 MiB-aligned page carries the kernel's
    huge-page advice ("hg" among its VmFlags in /proc/self/smaps)."""
    storage = tensor.untyped_storage()
    address = -(-storage.data_ptr() // (2 << 20)) * (2 << 20)
    assert address + (2 << 20) <= storage.data_ptr() + storage.nbytes(), "the tensor holds no whole huge page"
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                begin, end = (int(part, 16) for part in fields[0].split("-"))
                inside = begin <= address < end
            elif inside and fields[0] == "VmFlags:":
                return "hg" in fields[1:]
    raise AssertionError("no mapping holds the tensor")


@linux
def test_advice_reaches_the_kernel():
    """On a fresh anonymous mapping (never advised, unlike memory the allocator may hand out again):
    no advice before, the advice after."""
    region = mmap.mmap(-1, 8 << 20)
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    assert not huge_page_advised(tensor)
    assert _memory.advise_huge_pages(tensor) is tensor
    assert huge_page_advised(tensor)
    del tensor
    region.close()


@linux
def test_empty_is_advised():
    assert huge_page_advised(_memory.empty((4 << 20,), dtype=torch.uint8, device="cpu"))


@linux
def test_layer_and_quantized_tables_are_advised():
    layer = PEER(1024, heads=2, num_experts=64 ** 2, num_experts_per_head=4, dim_key=16, query_norm=None)
    assert all(huge_page_advised(table) for table in (layer.w_down, layer.w_up))   # 16 MiB each
    quantize_(layer)
    assert layer.w_down.dtype == torch.int8
    assert all(huge_page_advised(table) for table in (layer.w_down, layer.w_up))   # 4 MiB each


def test_advice_is_a_no_op_where_it_cannot_apply():
    for tensor in (torch.empty(3), torch.empty(1 << 20, device="meta")):
        assert _memory.advise_huge_pages(tensor) is tensor
