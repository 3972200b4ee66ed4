"""python -m bench --profile: per-kernel times of the layer's forward and backward (torch.profiler),
for the preset's first shape. On a GPU the table lists each kernel (retrieval, expert gather, the
sorted table-gradient reduction, ...) by its CUDA time; on a CPU the ops by CPU time."""
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
