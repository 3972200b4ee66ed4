"""python -m bench --distributed P: the PEER layer with its tables sharded by columns over P processes
(peer_kernels.distributed.PEERParallel, replicated input and output), launched by torchrun; per rank,
the forward and backward times and the bytes each collective moved, next to what the byte model
below predicts for column and for row sharding. NCCL on GPUs (one per process), gloo on a CPU.

Bytes are counted per collective from the tensor each rank puts in (its payload) and, as sent bytes,
by the ring algorithm's count: an all-reduce of X bytes sends 2(P-1)/P X, an all-gather of X per rank
(P-1) X, a reduce-scatter or all-to-all of X (P-1)/P X. gloo has no all-to-all and gathers instead.

A rank whose peer is stuck waits for it as long as the process group's timeout: TIMEOUT_SECONDS
here (`--timeout`), not torch's default of 30 minutes (gloo) or 10 (NCCL); a rank that dies makes
torchrun stop the others.
"""
import argparse
import copy
import datetime
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
# No public API counts a collective's bytes; a dispatch mode sees each c10d op with its tensors.
from torch.utils._python_dispatch import TorchDispatchMode

from peer_kernels import PEER

from . import cases, report, run, timing

# The process group's timeout: well above a step of the largest preset with its first-call
# compilation, far below torch's default.
TIMEOUT_SECONDS = 120.0
# op name -> sent bytes per payload byte under the ring algorithm, for P ranks
RING = {
    "allreduce_": lambda p: 2 * (p - 1) / p, "all_reduce": lambda p: 2 * (p - 1) / p,
    "broadcast_": lambda p: (p - 1) / p,
    "all_gather_into_tensor": lambda p: p - 1,
    "reduce_scatter_tensor": lambda p: (p - 1) / p, "all_to_all_single": lambda p: (p - 1) / p,
}


class CollectiveBytes(TorchDispatchMode):
    """Counts the collectives run inside it: name -> {count, payload_bytes, sent_bytes}."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks, self.counts = ranks, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace in ("c10d", "_c10d_functional") and name in RING:
            payload = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
            nbytes = payload.numel() * payload.element_size()
            entry = self.counts.setdefault(name, {"count": 0, "payload_bytes": 0, "sent_bytes": 0.0})
            entry["count"] += 1
            entry["payload_bytes"] += nbytes
            entry["sent_bytes"] += RING[name](self.ranks) * nbytes
        return func(*args, **(kwargs or {}))


def replica_bytes(shape, ranks):
    """Bytes one rank sends per backward to keep the replicated retrieval parameters equal: the
    first rank's gradient of the query projection (h*2*dk, d) and of the per-head keys
    (h, n, 2, dk), in the parameters' dtype, broadcast (the bench's layer has no norms)."""
    p, b = ranks, shape.torch_dtype.itemsize
    return (p - 1) / p * shape.h * 2 * shape.dk * (shape.d + shape.n) * b


def column_bytes(shape, ranks, sequence_parallel=False):
    """Bytes one rank sends per forward+backward under PEERParallel (ring model; NCCL's all-to-all).
    z and its gradient are reduced in the accumulation dtype (float32; float64 for float64)."""
    p, b = ranks, shape.torch_dtype.itemsize
    z = shape.T * shape.h * shape.k * (8 if shape.dtype == "float64" else 4)
    columns = shape.T * math.ceil(shape.d / p) * b              # one rank's block of y or dx
    # z forward, d(gate * act(z)) backward, and the replicas' gradients
    reductions = 2 * 2 * (p - 1) / p * z + replica_bytes(shape, ranks)
    if not sequence_parallel:                                    # all-gather y, all-gather dx
        return reductions + 2 * (p - 1) * columns
    tokens = math.ceil(shape.T / p) * shape.d * b                # one rank's tokens of x
    # all-gather x; y and dy between column and token shards by all-to-all; all-gather dx's columns
    return reductions + (p - 1) * tokens + 2 * (p - 1) / p * columns + (p - 1) * columns


def row_bytes(shape, ranks, sequence_parallel=False):
    """The same for row sharding (expert parallel: rank r owns N/P experts, whole rows), its cheapest
    form for PEER, where nearly every token has a pick on every rank (h*k picks per token):
    replicated tokens: all-reduce of the partial y forward, of the partial dx and of dgates backward;
    tokens sharded: all-gather x and dy, reduce-scatter the partial y and dx, and all-to-all of the
    rank's (id, gate, token) pairs (4 + 4 + 4 bytes) forward and of their dgates (4) backward.
    Retrieval is replicated as in column sharding, so its replicas' gradients are broadcast too."""
    p, b = ranks, shape.torch_dtype.itemsize
    activations = shape.T * shape.d * b
    pairs = shape.T * shape.h * shape.k
    if not sequence_parallel:
        return 2 * 2 * (p - 1) / p * activations + 2 * (p - 1) / p * pairs * 4 + replica_bytes(shape, ranks)
    return (4 * (p - 1) / p * activations + (p - 1) / p * math.ceil(pairs / p) * (12 + 4)
            + replica_bytes(shape, ranks))


def _layer(shape, device):
    """The bench's layer (cases.make_workload's), the same weights on every rank."""
    torch.manual_seed(0)
    return PEER(shape.d, heads=shape.h, num_experts=shape.N, num_experts_per_head=shape.k, dim_key=shape.dk,
                product_key_topk=shape.k_sub, activation=shape.activation, gating=shape.gating, query_norm=None,
                device=device, dtype=shape.torch_dtype)


def _check(single, layer, x, dy):
    """Relative RMS error of the sharded layer's output and dx against the single-process layer."""
    errors = []
    for module in (single, layer):
        y = module(x)
        errors.append((y.detach(), torch.autograd.grad(y, x, dy)[0]))
    (y0, dx0), (y1, dx1) = errors
    return max(cases.rel_rms(y1, y0), cases.rel_rms(dx1, dx0))


def measure(shape, mesh, device):
    """One rank's row for `shape`: times, collectives, the check's error, the byte models."""
    from torch.distributed.tensor.parallel import parallelize_module

    from peer_kernels.distributed import PEERParallel

    ranks = mesh.size()
    layer = _layer(shape, device)
    single = copy.deepcopy(layer)
    parallelize_module(layer, mesh, PEERParallel())
    x = torch.randn(1, shape.T, shape.d, device=device, dtype=shape.torch_dtype, requires_grad=True)
    dy = torch.randn(1, shape.T, shape.d, device=device, dtype=shape.torch_dtype)
    error = _check(single, layer, x, dy)
    del single
    if error > cases.TOLERANCE[shape.torch_dtype]:
        raise AssertionError(f"{shape.label()}: the sharded layer differs from the single-process one: relative "
                             f"RMS error {error:.3g} > {cases.TOLERANCE[shape.torch_dtype]:g}")
    phases = [lambda item: (item, layer(item)), lambda state: torch.autograd.grad(
        state[1], [state[0], *layer.parameters()], dy)]
    forward, backward = timing.measure(device, [x], phases, warm=True)
    counter = CollectiveBytes(ranks)
    with counter:
        phases[1](phases[0](x))
    step = [f + b for f, b in zip(forward, backward)]
    return {
        "shape": shape.label(), **{f"shape_{k}": v for k, v in vars(shape).items()},
        "ranks": ranks, "rank": mesh.get_local_rank(), "forward_ms": timing.median(forward),
        "backward_ms": timing.median(backward), "median_ms": timing.median(step), "reps": len(step),
        "collectives": counter.counts, "sent_bytes": sum(c["sent_bytes"] for c in counter.counts.values()),
        "column_model_bytes": column_bytes(shape, ranks), "row_model_bytes": row_bytes(shape, ranks),
        "error": error, "times_ms": step,
    }


def table(meta, rows):
    headers = ["shape", "rank", "fwd ms", "bwd ms", "fwd+bwd ms", "collectives", "MB sent",
               "model: column MB", "row MB", "rel err"]
    body = [[r["shape"], f"{r['rank']}/{r['ranks']}", f"{r['forward_ms']:.3f}", f"{r['backward_ms']:.3f}",
             f"{r['median_ms']:.3f}", ", ".join(f"{name} x{c['count']}" for name, c in r["collectives"].items()),
             *(f"{r[key] / 1e6:.3f}" for key in ("sent_bytes", "column_model_bytes", "row_model_bytes")),
             f"{r['error']:.1e}"] for r in rows]
    notes = ["", "PEERParallel, replicated input and output; MB sent: by each rank, forward+backward, ring-algorithm "
                 "counts of the collectives it ran; model: the same count derived from the shapes for column "
                 "sharding (this layer) and for row sharding (expert parallel; not built); rel err: output and dx "
                 "against the single-process layer."]
    return "\n".join([f"{meta['device_name']}: {meta['world_size']} processes ({meta['process_group']}), torch "
                      f"{meta['torch']}, commit {meta['git_commit']}, {meta['date']}", "",
                      report.text_table(headers, body)] + notes)


def launch(ranks, preset_name, device, out, stem, timeout=TIMEOUT_SECONDS):
    """Runs this module under torchrun with `ranks` processes; its exit status."""
    env = dict(os.environ)
    if device.type == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torchrun --standalone: every rank is on this host
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "bench.distributed", "--preset", preset_name, "--device", device.type, "--out", out,
               "--stem", stem, "--timeout", str(timeout)]
    return subprocess.run(command, cwd=run.ROOT, env=env).returncode


def main(argv=None):
    """One rank, under torchrun."""
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument("--preset", required=True, choices=sorted(cases.PRESETS))
    parser.add_argument("--device", required=True, choices=("cuda", "cpu"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--stem", required=True)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="the process group's, in seconds")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    rows = [measure(shape, mesh, device) for shape in cases.PRESETS[args.preset].shapes]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if int(os.environ["RANK"]) == 0:
        rows = [rank_rows[i] for i in range(len(rows)) for rank_rows in gathered]
        meta = {**run.environment(device, args.preset), "world_size": len(gathered),
                "process_group": "nccl" if device.type == "cuda" else "gloo"}
        report.write(args.out, args.stem, meta, rows, [])
        print(table(meta, rows))
        print(f"\nresults: {os.path.join(args.out, args.stem)}.json (.csv)")
    # Every rank is done past this barrier: leave without the process group's teardown, in which gloo
    # on a loaded CPU sometimes aborts ("terminate called without an active exception", 1 run in 10),
    # as tests/test_distributed.py's workers do.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
