"""PEER on torch.distributed: the expert tables sharded by columns (the model dim) over a 1-D mesh.

    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, tp_mesh, {"layers.*.peer": PEERParallel()})

`PEERParallel` is a DTensor `ParallelStyle`. It makes `w_down` and `w_up` DTensors `Shard(1)`: rank r
holds columns [off_r, off_r + n_r) of every expert row, split as `torch.chunk` splits (ceil(d/P)
columns per rank, the last ranks short when P does not divide d). Every other parameter and buffer
(query projection, keys, norms) becomes a `Replicate()` DTensor, and retrieval runs identically on
every rank, so each rank picks the same experts with the same gates. It works through the layer's
public seam only: `distribute_module`'s input and output functions convert the layouts (and let
the layer's query path see its replicated parameters as local tensors while it runs), and the
layer's `expert_stage` becomes `ColumnParallelExperts`, the backend's own two halves per column
shard, with the layer's kernels unchanged:

    forward                                          backward
    x_r   = x[:, cols_r]           (no comm)         dx: all-gather of the column blocks (T*d)
    z     = all-reduce(peer_down(x_r, ids, U_r))     identity: dz is the same on every rank
            (T*h*k fp32)
    m     = gates * act(z)         (no comm)         all-reduce of dm = v.dy (T*h*k fp32): each rank's
                                                     dy only meets its own columns of v; dz and
                                                     dgates then follow locally from dm
    y_r   = peer_mix(m, ids, 1, V_r, "identity")     table gradients local to each shard
    y     = y_r gathered to the output layout        (its mirror)
    replicated parameters (query path, keys)         broadcast of the first rank's gradients

Bytes each rank sends per forward+backward (ring algorithms, P ranks, activations of b bytes, z in
fp32): the two reductions, 2 * 2(P-1)/P * T*h*k*4, the broadcast of the replicated parameters'
gradients, (P-1)/P * 2*h*dk*(d + n) values (the query projection and per-head keys, in their dtype),
plus the layer's input and output: replicated, an all-gather of y and one of dx, (P-1)/P * T*d*b
each; sequence-parallel, an all-gather of x and of dx, and y and dy between column and token shards
by all-to-all. At the paper's shapes (T=8192, d=1024, h*k=128, bf16) and P=8: 51 MB per rank and
step replicated (7 of them the broadcast), 55 MB sequence-parallel, where FSDP would all-gather the
two tables, 3.8 GB, per pass.

Column or row sharding. Row sharding (expert parallel: rank r owns N/P whole experts; tokens' (id,
gate) pairs go to the owners by all-to-all) computes each z on its owner with no reduction, but with
h*k = 128 picks per token nearly every token has a pick on every rank ((7/8)**128 ~ 4e-8 that it
misses one of 8), so every rank needs nearly every token's x and dy and returns partial y and dx for
all of them: 4 (P-1)/P * T*d*b, against column's 2 (P-1)/P * T*d*b (its y and dx are split by
columns already) plus its reductions, 16 (P-1)/P * T*h*k. Column moves fewer bytes when
d*b > 4*h*k with replicated input and output and d*b > 8*h*k sequence-parallel (bf16, h*k = 128:
d > 256 and d > 512): at d = 1024, P = 8, 51 vs 73 MB replicated and 55 vs 68 MB sequence-parallel;
at d = 4096, 150 vs 261 and 165 vs 255 MB (both with the broadcast of the replicated retrieval
parameters' gradients). Row pays for small d with many picks per token, and
where retrieval must itself be split (column replicates the query projection and the sub-key scores
on every rank); it inherits expert-parallel load imbalance from hot experts, which column sharding,
every rank doing 1/P of every row, does not have. docs/distributed.md has the table, and
bench/distributed.py the byte model (`python -m bench --distributed P` measures it).

Conventions: dropout > 0 draws its mask on every rank; seed the ranks of one mesh identically (as
Megatron and torchtitan do) so the masks agree. The replicated parameters' gradients are computed
on every rank, and every rank then takes the first rank's (one broadcast per parameter in
backward): the Triton keys backward sums with fp32 atomics, whose rounding differs from rank to
rank, and replicas updated by different gradients would drift apart until a near-tie picked
different experts on different ranks. With one gradient and the same optimizer they stay bitwise
equal, by construction (tests/test_distributed.py injects the atomics' rounding on CPUs, where every
backend is deterministic). Parameters live on different meshes once FSDP2 is added, so
`torch.nn.utils.clip_grad_norm_` cannot stack their norms; take each gradient's
`.norm().full_tensor()` and combine those.
"""
import inspect

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from . import _math
from ._checks import check_layer_input
from .module import PEER

TABLES = ("w_down", "w_up")
# torch >= 2.7 lets a style say whose data a distributed tensor starts from; 2.6 always used rank 0's.
_HAS_SRC_DATA_RANK = "src_data_rank" in inspect.signature(distribute_tensor).parameters


def _collective(what, run, tensor, group, **options):
    """run(tensor, group=group, **options), a collective of the style's: when it fails (gloo: a peer
    rank died, or did not join within the process group's timeout) the error says which and what
    bounds the wait. NCCL reports such failures asynchronously: its watchdog ends the process."""
    try:
        run(tensor, group=group, **options)
    except RuntimeError as error:  # torch.distributed.DistBackendError is one
        raise type(error)(
            f"PEERParallel: {what} over the tensor-parallel group failed: a peer rank died, or did not join "
            f"within the process group's timeout (dist.init_process_group(timeout=...)): {error}") from error


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward: what follows the sum is replicated, so
    every rank already holds the whole gradient of it."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone(memory_format=torch.contiguous_format)
        _collective("the all-reduce of z", dist.all_reduce, total, group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradientOverRanks(torch.autograd.Function):
    """Identity in forward; in backward the gradient is combined over the group's ranks, by mode:
    - "sum" (an all-reduce): a replicated tensor consumed by a column-sharded op gets one partial
      gradient per column shard.
    - "first" (a broadcast of the group's first rank's): a replicated parameter's gradient is
      computed on every rank from the same inputs, but a backend that sums it with fp32 atomics (the
      Triton keys backward) rounds differently on each, and replicas updated by different gradients
      drift apart until a near-tie picks other experts on other ranks. With one gradient they are
      updated alike: equal by construction."""

    @staticmethod
    def forward(ctx, replicated, group, mode):
        ctx.group, ctx.mode = group, mode
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx, grad):
        combined = grad.clone(memory_format=torch.contiguous_format)
        if ctx.mode == "sum":
            _collective("the all-reduce of the gradient of gates * act(z)", dist.all_reduce, combined, ctx.group)
        else:
            _collective("the broadcast of a replicated parameter's gradient", dist.broadcast, combined, ctx.group,
                        src=dist.get_global_rank(ctx.group, 0))
        return combined, None, None


class ColumnParallelExperts:
    """The expert stage PEERParallel installs as `layer.expert_stage`: the backend's expert stage
    for tables (E, d) that are Shard(1) DTensors. x (T, d_in), ids and gates (T, h, k), the same on
    every rank -> y (T, d_out) as a Shard(1) DTensor. (sparse_grad is refused for sharded tables:
    PEERParallel._apply.)"""

    def __init__(self, mesh):
        self.mesh = mesh

    def __call__(self, ops, x, expert_ids, gates, w_down, w_up, activation, sparse_grad):
        group = self.mesh.get_group()
        columns = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False).redistribute(
            self.mesh, [Shard(1)]).to_local()
        z = _SumOverRanks.apply(ops.peer_down(columns, expert_ids, w_down.to_local()), group)
        # The gate times the activation, summed over ranks in backward: the mix's gradient wrt it is
        # v.dy, partial over columns, and one reduction of it gives both dz and dgates.
        mixed = _GradientOverRanks.apply(gates.to(z.dtype) * _math.activate(z, activation), group, "sum")
        y = ops.peer_mix(mixed, expert_ids, torch.ones_like(mixed), w_up.to_local(), "identity")
        shape = (x.shape[0], w_up.shape[1])
        return DTensor.from_local(y.to(x.dtype), self.mesh, [Shard(1)], run_check=False, shape=torch.Size(shape),
                                  stride=(shape[1], 1))


class _ReplicatedAsLocal:
    """A layer's replicated DTensor parameters and buffers swapped for their local tensors while
    it computes, so its query path runs on plain tensors as in one process (torch 2.6's DTensor has
    no batch norm). A parameter's local view carries its gradient back to the DTensor, the first
    rank's on every rank (_GradientOverRanks, "first"); a buffer's shares its storage, so batch norm's
    running statistics update in place. Swapped in by the style's input function, back by a forward
    hook that runs even when the forward raises."""

    def __init__(self, layer, mesh):
        self.layer, self.mesh, self.swapped = layer, mesh, []

    def swap_in(self):
        self.swap_back()
        for module in self.layer.modules():
            for entries in (module._parameters, module._buffers):
                for name, value in entries.items():
                    if isinstance(value, DTensor) and value.placements == (Replicate(),):
                        self.swapped.append((entries, name, value))
                        local = value.to_local()
                        is_parameter = entries is module._parameters
                        entries[name] = _GradientOverRanks.apply(local, self.mesh.get_group(), "first") \
                            if is_parameter else local

    def swap_back(self, *_hook_arguments):
        while self.swapped:
            entries, name, value = self.swapped.pop()
            entries[name] = value


def _placement(name, value):
    if value is None:
        return Replicate()
    if not isinstance(value, Placement):
        raise TypeError(f"{name}: expected a torch.distributed.tensor Placement such as Replicate() or Shard(1), "
                        f"got {type(value).__name__}")
    return value


def _normalized(placement, ndim):
    """Shard(-1) and Shard(ndim - 1) are the same layout but compare unequal."""
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim + ndim)
    return placement


class PEERParallel(ParallelStyle):
    """Shards a `peer_kernels.PEER` layer's expert tables by columns over a 1-D device mesh.

    `parallelize_module(model, tp_mesh, {"...peer": PEERParallel()})`, or
    `parallelize_module(layer, tp_mesh, PEERParallel())`. Afterwards `w_down` and `w_up` are `Shard(1)`
    DTensors, the other parameters and buffers `Replicate()` DTensors, and `layer.expert_stage` a
    `ColumnParallelExperts`; see the module docstring for the collectives. The replicated
    parameters get the mesh's first rank's gradient on every rank, so they stay bitwise equal.
    Compose with FSDP2 by applying this first, then `fully_shard` on a 2-D mesh's other dim.

    A dead or stuck peer: the forward and the backward run collectives, which wait for every rank of
    the mesh. A rank that dies under torchrun makes its agent stop the others; one that is stuck (a
    hung data loader, a debugger) makes them wait as long as the process group's timeout, torch's
    default 30 minutes for gloo and 10 for NCCL. Set a shorter one where the process group is made,
    longer than the slowest step (first-call compilation included):
    `dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=2))`. gloo then raises on
    the waiting ranks, an error naming the collective of this style that failed; NCCL's watchdog
    ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default). `python -m bench
    --distributed P` uses 120 s (`--timeout`).

    input_layouts: the layout of a plain-tensor input (default Replicate(); Shard(1) for a
      sequence-parallel (batch, seq, dim) input, whose sequence must then split evenly, as
      DTensor.from_local assumes); a DTensor input keeps its own. Either is made replicated.
    output_layouts: the output's layout, Replicate() (default) or Shard(dim) for sequence parallelism.
    use_local_output: return the local tensor (default) rather than the DTensor.
    """

    def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output=True):
        super().__init__()
        self.input_layouts = _placement("input_layouts", input_layouts)
        self.output_layouts = _placement("output_layouts", output_layouts)
        self.use_local_output = use_local_output

    def _partition(self, name, module, mesh):
        if name:  # the children's parameters: distribute_module replicates them
            return
        for table in TABLES:
            param = getattr(module, table)
            module.register_parameter(table, torch.nn.Parameter(
                self._shard_columns(param, mesh), requires_grad=param.requires_grad))
        module.expert_stage = ColumnParallelExperts(mesh)

    def _shard_columns(self, table, mesh):
        placements = [Shard(1)]
        if _HAS_SRC_DATA_RANK:
            sharded = distribute_tensor(table, mesh, placements, src_data_rank=self.src_data_rank)
        else:
            sharded = distribute_tensor(table, mesh, placements)
        local = sharded.to_local()
        if local.is_contiguous():
            return sharded
        # torch 2.6 leaves a short last shard as a strided view, which FSDP2 refuses to shard
        return DTensor.from_local(local.contiguous(), mesh, placements, run_check=False, shape=sharded.shape,
                                  stride=sharded.stride())

    def _replicated_input(self, layer, inputs, mesh, swap):
        """The layer's input as a replicated local tensor, its replicated parameters swapped in."""
        x, *rest = inputs
        check_layer_input(x, layer.dim)
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [_normalized(self.input_layouts, x.dim())], run_check=False)
        if x.placements != (Replicate(),):
            x = x.redistribute(mesh, [Replicate()])
        swap.swap_in()
        return (x.to_local(), *rest)

    def _output(self, layer, y, mesh):
        """The layer's output in the output layout."""
        if not isinstance(y, DTensor):  # an empty batch, computed on every rank
            y = DTensor.from_local(y, mesh, [Replicate()], run_check=False)
        layout = _normalized(self.output_layouts, y.dim())
        if y.placements != (layout,):
            y = y.redistribute(mesh, [layout])
        return y.to_local() if self.use_local_output else y

    # ParallelStyle._apply is private by name but is the extension point parallelize_module calls
    # (the built-in styles and torchtitan's implement it), unchanged from torch 2.6 to 2.13.
    def _apply(self, module, device_mesh):
        if not isinstance(module, PEER):
            raise TypeError(f"module: PEERParallel applies to a peer_kernels.PEER layer, got {type(module).__name__}")
        if module.sparse_grad:
            raise ValueError("sparse_grad: the column-sharded tables' gradients are dense DTensor shards; "
                             "build the layer with sparse_grad=False for PEERParallel")
        if device_mesh.ndim != 1:
            raise ValueError(f"device_mesh: expected a 1-D mesh (e.g. mesh['tp'] of a 2-D mesh), got "
                             f"{device_mesh.ndim} dims {tuple(device_mesh.shape)}")
        ranks = device_mesh.size()
        per_rank = -(-module.dim // ranks)  # Shard(1) splits as torch.chunk does
        if (ranks - 1) * per_rank >= module.dim:
            raise ValueError(f"dim: {module.dim} columns split as torch.chunk over {ranks} ranks ({per_rank} each) "
                             f"leave the last rank none; use a dim that {ranks} divides, or fewer ranks")
        swap = _ReplicatedAsLocal(module, device_mesh)
        distribute_module(module, device_mesh, self._partition,
                          lambda layer, inputs, mesh: self._replicated_input(layer, inputs, mesh, swap), self._output)
        module.register_forward_hook(swap.swap_back, always_call=True)
        return module
