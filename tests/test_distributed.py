"""peer_kernels.distributed.PEERParallel on 2 CPU processes (gloo): the sharded layer against the
single-process layer with the same weights (float64 to rounding, float32 within tests/bounds.py's
bound of the float64 oracle), uneven column shards, FSDP2 on the rest of a model, and
torch.distributed.checkpoint from 2 processes to 1. Each spawn starts 2 interpreters (a few
seconds), so every check of one kind runs in one spawn."""
import copy
import faulthandler
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bounds
import peer_kernels
from peer_kernels import csrc
from utils import untie_layer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
D = 11  # columns 6 and 5: uneven shards
SMALL = dict(heads=3, num_experts=25, num_experts_per_head=4, dim_key=4)
# (name, PEER options, PEERParallel options as layout names, train); every gating, both key kinds
CONFIGS = [
    ("per-head keys, softmax, batchnorm", dict(), dict(), True),
    ("same, eval", dict(), dict(), False),
    ("shared keys, sigmoid, layernorm, rmsnorm, sequence-parallel",
     dict(shared_keys=True, gating="sigmoid", query_norm="layernorm", pre_rmsnorm=True, activation="silu",
          product_key_topk=3), dict(input_layouts="seq", output_layouts="seq"), True),
    ("separate embeddings, relu gating, DTensor output",
     dict(separate_embed_per_head=True, gating="relu", query_norm=None, activation="gelu_tanh"),
     dict(use_local_output=False), True),
]
HANG_SECONDS = 120  # a spawn takes ~10 s
FSDP_MIN_TORCH = (2, 7)  # FSDP2 on CPU tensors: torch 2.6 lacks the CPU stream's record_event


def _entry(rank, init_file, fn, args):
    # A rank stuck in a collective (say its peer failed) prints where it is and ends.
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo otherwise binds to the hostname's address
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    fn(rank, *args)
    # Both ranks done, exit with neither destroy_process_group, which sometimes hangs in gloo
    # (torch 2.6: 2 runs in 25), nor interpreter teardown, which sometimes aborts after it.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_spawned(fn, *args):
    """fn(rank, *args) on WORLD processes with a process group; a worker's exception fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(os.path.join(tmp, "rendezvous"), fn, args), nprocs=WORLD)


def _mesh(shape=(WORLD,), names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _style(options):
    from torch.distributed.tensor import Shard

    from peer_kernels.distributed import PEERParallel

    layouts = {name: Shard(1) for name, value in options.items() if value == "seq"}  # x: (batch, seq, dim)
    return PEERParallel(**{**options, **layouts})


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sharded_results(layer, x, dy):
    """y, dx and every parameter's whole gradient of the sharded layer (x, dy: this rank's input)."""
    from torch.distributed.tensor import DTensor, Replicate

    params = dict(layer.named_parameters())
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    if isinstance(y, DTensor):  # use_local_output=False
        assert y.placements == (Replicate(),), y.placements
        y = y.to_local()
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    return {"y": y.detach(), "x": grads[0], **{name: _full(g) for name, g in zip(params, grads[1:])}}


def _parity(rank, backends):
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh()
    for backend in backends:
        for name, options, style, train in CONFIGS:
            torch.manual_seed(0)
            single = peer_kernels.PEER(D, **SMALL, **options, backend=backend).train(train)
            x = untie_layer(single, torch.randn(2, 6, D))
            dy = torch.randn(2, 6, D)
            rows = (slice(None), slice(3 * rank, 3 * rank + 3)) if style.get("input_layouts") else (slice(None),)
            where = f"{backend}, {name}"

            sharded = parallelize_module(copy.deepcopy(single), mesh, _style(style))
            expected = bounds.expected_layer(single, x, dy)
            results = _sharded_results(sharded, x[rows], dy[rows])
            for key in ("y", "x"):
                expected[key] = tuple(t[rows] for t in expected[key])
            try:
                bounds.check_all(results, expected)
            except AssertionError as error:
                raise AssertionError(f"{where}, float32: {error}") from None

            single64 = copy.deepcopy(single).double()
            sharded64 = parallelize_module(copy.deepcopy(single64), mesh, _style(style))
            exact = bounds.layer_results(single64, x.double(), dy.double())
            results = _sharded_results(sharded64, x.double()[rows], dy.double()[rows])
            for key, value in exact.items():
                value = value[rows] if key in ("y", "x") else value
                torch.testing.assert_close(results[key], value, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{where}, float64, {key}: {m}")
            for key, buffer in sharded64.named_buffers():  # batchnorm's running statistics
                torch.testing.assert_close(_full(buffer), single64.get_buffer(key), rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{where}, float64, buffer {key}: {m}")


def _dropout(rank):
    """The same seed on both ranks draws the same gate mask, so the sharded layer still equals the
    single-process one drawing from that seed."""
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    single = peer_kernels.PEER(D, **SMALL, dropout=0.5, backend="reference", dtype=torch.float64)
    sharded = parallelize_module(copy.deepcopy(single), _mesh(), _style({}))
    x, dy = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    results = []
    for layer in (single, sharded):
        torch.manual_seed(1)
        results.append(_sharded_results(layer, x, dy))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-12, atol=1e-12, msg=lambda m: f"dropout, {key}: {m}")


def _bad_input(rank):
    from torch.distributed.tensor.parallel import parallelize_module

    from peer_kernels.distributed import PEERParallel

    with pytest.raises(ValueError, match="dim: 1 columns split as torch.chunk over 2 ranks"):
        parallelize_module(peer_kernels.PEER(1, **SMALL), _mesh(), PEERParallel())
    with pytest.raises(TypeError, match="module: PEERParallel applies to a peer_kernels.PEER layer, got Linear"):
        parallelize_module(nn.Linear(4, 4), _mesh(), PEERParallel())
    with pytest.raises(ValueError, match="sparse_grad: the column-sharded tables"):
        parallelize_module(peer_kernels.PEER(D, **SMALL, sparse_grad=True), _mesh(), PEERParallel())
    with pytest.raises((ValueError, RuntimeError), match="1-D mesh|1D DeviceMesh"):  # torch 2.6 checks it first
        parallelize_module(peer_kernels.PEER(D, **SMALL), _mesh((1, WORLD), ("dp", "tp")), PEERParallel())


def _save(rank, path):
    """A sharded layer after one optimizer step, saved by both ranks; rank 0 also saves its whole
    state for the comparison."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    layer = parallelize_module(peer_kernels.PEER(D, **SMALL, backend="reference"), _mesh(), _style({}))
    layer(torch.randn(5, D)).square().sum().backward()
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    state = get_model_state_dict(layer)
    dcp.save(state, checkpoint_id=os.path.join(path, "checkpoint"))
    whole = {key: _full(value) for key, value in state.items()}
    if rank == 0:
        torch.save(whole, os.path.join(path, "expected.pt"))


def _sharded_checks(rank, backends, path):
    _parity(rank, backends)
    _dropout(rank)
    _bad_input(rank)
    _save(rank, path)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Runs every check of the sharded layer in one spawn; returns where it saved its checkpoint."""
    path = str(tmp_path_factory.mktemp("distributed"))
    backends = ["reference"] + (["cpp"] if csrc.available() else [])
    run_spawned(_sharded_checks, backends, path)
    return path


def test_sharded_layer_equals_single_process(checkpoint_dir):
    """Outputs and every gradient, float32 and float64, every config of CONFIGS on every CPU
    backend; dropout; the errors for a mesh or a dim it cannot shard over (all in the spawn)."""


def test_checkpoint_from_two_processes_loads_in_one(checkpoint_dir):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)  # other weights than the saved ones
    layer = peer_kernels.PEER(D, **SMALL, backend="reference")
    state = layer.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(checkpoint_dir, "checkpoint"))  # no process group: one process
    layer.load_state_dict(state)
    expected = torch.load(os.path.join(checkpoint_dir, "expected.pt"))
    assert set(expected) == set(layer.state_dict())
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


REPLICA_STEPS = 3


def _replicas_after_training(rank, backend):
    """REPLICA_STEPS AdamW steps of a sharded layer, rank 1's keys gradient one rounding away from
    rank 0's: then every replicated parameter, bitwise the same on both ranks.

    CPU backends are deterministic, so the ranks' gradients would be equal anyway; on GPUs the
    Triton keys backward sums with fp32 atomics, whose order (and so rounding) differs from rank to
    rank. That is injected here: the backend's retrieval backward (peer_kernels._library's
    registration, in this process only) moves every element of rank 1's keys gradient to the next
    float32 up (torch.nextafter), what a different summation order does to a sum. Without the
    style's broadcast of the first rank's gradient the keys differ after the first step."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import parallelize_module

    from peer_kernels import _library

    original = _library._implementation("retrieve", backend)
    seen = []

    def rounded_differently(**arguments):
        dqueries, dkeys = original.backward(**arguments)
        if rank == 1:
            dkeys = torch.nextafter(dkeys, torch.full_like(dkeys, torch.inf))
        seen.append(dkeys)
        return dqueries, dkeys

    _library.implement("retrieve", backend, forward=original.forward, backward=rounded_differently)
    torch.manual_seed(0)
    layer = parallelize_module(peer_kernels.PEER(D, **SMALL, backend=backend), _mesh(), _style({}))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05)
    for step in range(REPLICA_STEPS):
        x, target = torch.randn(16, D), torch.randn(16, D)
        (layer(x) * target).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def on_both_ranks(t):
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.contiguous())
        return gathered

    first, second = on_both_ranks(seen[0])
    assert not torch.equal(first, second), "the injected rounding did not reach the keys' gradient"
    replicated = {name: p for name, p in layer.named_parameters()
                  if isinstance(p, DTensor) and p.placements == (Replicate(),)}
    assert {"keys", "to_queries.weight", "query_norm.weight", "query_norm.bias"} <= set(replicated), replicated
    for name, param in replicated.items():
        first, second = on_both_ranks(param.to_local())
        assert torch.equal(first, second), (f"{backend}: {name} differs between the ranks after {REPLICA_STEPS} "
                                            f"steps by up to {(first - second).abs().max().item():.3g}")


def test_replicated_parameters_stay_bitwise_equal():
    """Before: each rank applied its own gradient to its copy of the retrieval parameters, and the
    copies drifted apart by the atomics' rounding (injected: see _replicas_after_training)."""
    run_spawned(_replicas_after_training, "cpp" if csrc.available() else "triton")


class Tiny(nn.Module):
    """A PEER between two dense layers: FSDP2 shards those, the PEER tables are sharded by columns."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.peer = peer_kernels.PEER(D, **SMALL, query_norm="layernorm", backend="reference")
        self.out = nn.Linear(D, D)

    def forward(self, x):
        return self.out(self.peer(torch.tanh(self.inp(x))))


def _fsdp_training_step(rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_default_dtype(torch.float64)
    for dp, tp in ((1, WORLD), (WORLD, 1)):
        mesh = _mesh((dp, tp), ("dp", "tp"))
        torch.manual_seed(0)
        single = Tiny()
        model = copy.deepcopy(single)
        parallelize_module(model, mesh["tp"], {"peer": _style({})})
        fully_shard(model.peer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        assert model.peer.w_down.placements == (Shard(0), Shard(1)), model.peer.w_down.placements
        xs, target = torch.randn(dp, 6, D), torch.randn(6, D)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (single, model)]
        # FSDP averages the gradients over dp: the single process takes the mean of the dp losses
        sum((single(x) * target).sum() for x in xs).div(dp).backward()
        (model(xs[mesh["dp"].get_local_rank()]) * target).sum().backward()
        where = f"mesh (dp={dp}, tp={tp})"
        for name, param in model.named_parameters():
            torch.testing.assert_close(_full(param.grad), single.get_parameter(name).grad, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{where}, gradient of {name}: {m}")
        for optimizer in optimizers:
            optimizer.step()
        for name, param in model.named_parameters():
            torch.testing.assert_close(_full(param), single.get_parameter(name), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{where}, {name} after the step: {m}")
        torch.testing.assert_close(model(xs[0]), single(xs[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < FSDP_MIN_TORCH,
                    reason="FSDP2 on CPU tensors needs torch >= 2.7")
def test_training_step_with_fsdp2_on_the_rest():
    run_spawned(_fsdp_training_step)
