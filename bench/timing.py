"""Wall-clock measurement: CUDA events on a GPU, time.perf_counter on a CPU.

An iteration runs a chain of phases (forward, then backward): phase 0 gets an input set, each
later phase what the one before returned, and each phase is timed on its own, so one training-step
iteration yields the forward, the backward and their sum. Input sets are used round-robin, several
of them, so that the L2 cache holds none when it comes round again.
"""
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from peer_kernels import _memory

# Per-case budgets: enough repetitions for a stable median, bounded for long sweeps.
GPU_WARMUP_MS, GPU_BUDGET_MS, GPU_REPS = 25.0, 300.0, (10, 100)
CPU_BUDGET_MS, CPU_REPS = 300.0, (3, 15)


def _iterate_cpu(phases, item):
    durations, state = [], item
    for phase in phases:
        start = time.perf_counter()
        state = phase(state)
        durations.append((time.perf_counter() - start) * 1e3)
    return durations


def _iterate_cuda(phases, item):
    """Launches one iteration with an event before and after each phase; timings read later."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
    state = item
    events[0].record()
    for phase, end in zip(phases, events[1:]):
        state = phase(state)
        end.record()
    return events


def _host_ms(device, phases, item):
    """One iteration's wall time in ms, synchronized: sizes the warm-up and the repetitions."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _iterate_cpu(phases, item)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(1e-3, (time.perf_counter() - start) * 1e3)


def last_level_cache_bytes(device):
    """The largest cache the data passes through: the GPU's L2, or the CPU's largest (Linux's sysfs;
    32 MiB where it says nothing)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=32 << 20)


def measure(device, items, phases, warm=False, cold=False):
    """Per-phase durations in ms: a list with one list per phase, one entry per repetition.

    A first iteration (compilation, autotuning, allocator growth) is never counted: a warm-up, or,
    on a CPU with warm=True, the caller's own untimed call of the same function on the same shapes.
    A CPU repeats until CPU_BUDGET_MS have passed (within CPU_REPS); a GPU sizes its repetitions and a
    further warm-up of GPU_WARMUP_MS on a second, synchronized iteration.
    cold: before each timed iteration, untimed, a buffer twice the last-level cache is read, so that
    the iteration reads its parameters and rows from memory, as a layer among many does (the few
    input sets of a decode step touch a few MB of rows, which would otherwise stay in cache). Read,
    not written: evicting written lines would make the iteration pay for writing them back.
    """
    flush = None
    if cold:
        flush = _memory.empty((2 * last_level_cache_bytes(device) // 4,), dtype=torch.float32, device=device).zero_()

    def timed(iterate, item):
        if flush is not None:
            flush.sum()
        return iterate(phases, item)

    if device.type != "cuda":
        if not warm:
            _iterate_cpu(phases, items[0])
        per_rep, spent = [], 0.0
        low, high = CPU_REPS
        while len(per_rep) < high and (len(per_rep) < low or spent < CPU_BUDGET_MS):
            per_rep.append(timed(_iterate_cpu, items[(len(per_rep) + 1) % len(items)]))
            spent += sum(per_rep[-1])
        return [list(series) for series in zip(*per_rep)]
    _host_ms(device, phases, items[0])
    estimate = _host_ms(device, phases, items[1 % len(items)])
    for i in range(max(3, math.ceil(GPU_WARMUP_MS / estimate))):
        _iterate_cpu(phases, items[i % len(items)])
    low, high = GPU_REPS
    reps = max(low, min(high, math.ceil(GPU_BUDGET_MS / estimate)))
    per_rep = [timed(_iterate_cuda, items[i % len(items)]) for i in range(reps)]
    torch.cuda.synchronize(device)
    return [[events[p].elapsed_time(events[p + 1]) for events in per_rep] for p in range(len(phases))]


def median(times_ms):
    return statistics.median(times_ms)


def peak_memory_bytes(device, phases, item):
    """Extra memory at the peak up to the end of each phase, beyond what was allocated before the
    iteration (weights and inputs excluded). GPU: torch.cuda.max_memory_allocated. CPU: torch's
    allocator keeps no peak counter there, so the profiler records every allocation and free
    (profile_memory=True) and the peak of the running sum is taken; each op's net allocation is
    counted at its start, so a temporary allocated and freed inside one op is not seen."""
    if device.type != "cuda":
        return _cpu_peak_bytes(phases, item)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    peaks, state = [], item
    for phase in phases:
        state = phase(state)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    return peaks


@contextlib.contextmanager
def _silenced_stderr():
    """The profiler's C++ side writes a start and a stop line to fd 2 each time; keep them out of the
    progress lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(phases, item):
    labels = [f"bench_phase_{i}" for i in range(len(phases))]
    state = item
    with _silenced_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as prof:
        for label, phase in zip(labels, phases):
            with torch.profiler.record_function(label):
                state = phase(state)
    del state
    events = prof.events()
    phase_ends = [max(e.time_range.end for e in events if e.name == label) for label in labels]
    peaks, live, peak = [], 0, 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        while len(peaks) < len(phase_ends) and event.time_range.start > phase_ends[len(peaks)]:
            peaks.append(peak)
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peaks + [peak] * (len(phases) - len(peaks))


def matmul_tflops(device):
    """A square matmul's rate measured now (TFLOP/s), in MATMUL_DTYPES[device type]: the compute
    roofline the rows' TFLOP/s are compared with (ATen's BLAS on torch's threads on a CPU)."""
    size = 8192 if device.type == "cuda" else 2048
    dtype = MATMUL_DTYPES[device.type]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    (times,) = measure(device, [None], [lambda _: a @ b])
    return 2 * size ** 3 / (median(times) * 1e-3) / 1e12


# The dtype of the compute roofline: the decode preset's (bf16 on a GPU, fp32 elsewhere).
MATMUL_DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}


def copy_bandwidth_gbps(device):
    """Device copy bandwidth measured now (bytes read + bytes written per second, in GB/s): the
    roofline the expert gather is compared with. 1 GiB on a GPU, 128 MiB on a CPU, where the
    buffers are on huge pages as the layer's tables are (peer_kernels._memory): the floor is what
    the memory gives at its best."""
    nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = _memory.empty((nbytes // 4,), dtype=torch.float32, device=device).uniform_()
    dst = _memory.empty((nbytes // 4,), dtype=torch.float32, device=device)
    (times,) = measure(device, [None], [lambda _: dst.copy_(src)])
    return 2 * nbytes / (median(times) * 1e-3) / 1e9
