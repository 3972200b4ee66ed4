"""python -m bench --profile: per-kernel times of the layer's forward and backward (torch.profiler),
for the preset's first shape. On a GPU the table lists each kernel (retrieval, expert gather, the
sorted table-gradient reduction, ...) by its CUDA time; on a CPU the ops by CPU time. On a GPU it
then compares peer_fused's forward schedules: wall time against the sum of their kernels' times,
which the overlapped schedule beats only where its two streams really run side by side."""
import statistics

import torch

from . import cases

STEPS = 5


def profile_layer(preset, device, log=print):
    shape = preset.shapes[0]
    workload = cases.make_workload("layer", shape, device, 1)
    layer = workload.shared["layer"]
    layer.backend = "auto"
    inputs = workload.inputs(0)

    def step():
        layer(inputs["x"]).backward(inputs["dy"])

    step()  # compiles the kernels; not profiled
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    log(f"{shape.label()}: {STEPS} forward+backward steps of PEER(backend={layer.resolved_backend!r}) on {device}")
    log(prof.key_averages().table(sort_by=sort_by, row_limit=25))


SCHEDULES = {"overlap": dict(overlap=True), "two_kernel": dict(overlap=False), "one_pass": dict(one_pass=True)}


def _kernel_ms(prof):
    """Summed device time of the profiled kernels, ms (the attribute's name changed in torch 2.4)."""
    total = 0.0
    for event in prof.key_averages():
        total += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return total / 1000


def profile_fused_schedules(preset, device, log=print):
    """Per schedule of peer_kernels.ops.peer_fused: the forward's median wall time (CUDA events) and
    its kernels' summed time, per call, on the preset's first shape. Wall below the sum: overlap."""
    if device.type != "cuda":
        log("peer_fused schedules: Triton runs on a GPU only; skipped")
        return
    from peer_kernels.ops import peer_fused
    shape = preset.shapes[0]
    inputs = cases.make_workload("fused", shape, device, 1).inputs(0)
    args = (inputs["x"], inputs["queries"], inputs["keys"], inputs["w_down"], inputs["w_up"], shape.k, shape.k_sub,
            shape.gating, shape.activation)
    log(f"{shape.label()}: peer_fused forward, per call (no grad)")
    log(f"{'schedule':<12}{'wall ms':>10}{'kernels ms':>12}{'kernels / wall':>16}")
    with torch.no_grad():
        for name, options in SCHEDULES.items():
            peer_fused(*args, **options)  # compiles
            walls = []
            for _ in range(STEPS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                peer_fused(*args, **options)
                end.record()
                torch.cuda.synchronize(device)
                walls.append(start.elapsed_time(end))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    peer_fused(*args, **options)
                torch.cuda.synchronize(device)
            wall, kernels = statistics.median(walls), _kernel_ms(prof) / STEPS
            log(f"{name:<12}{wall:>10.3f}{kernels:>12.3f}{kernels / wall:>16.2f}")
