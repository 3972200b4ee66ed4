"""The implementations a case can be run with. Each provider builds, for one op and workload, a
Runner whose `fn` has the reference's signature (a module for the layer), or raises Unavailable with
the reason it cannot run here. Backends written elsewhere in the package are imported only here,
lazily, so a missing or unbuilt one skips its rows and nothing else."""
import copy
import dataclasses
import functools
import importlib
import inspect
import os

import torch
import torch.nn.functional as F

from peer_kernels import reference

from .cases import LAYER_PARAMS

OP_FUNCTIONS = {"retrieval": "product_key_topk", "experts": "peer_experts", "fused": "peer_fused"}


class Unavailable(Exception):
    """This provider cannot run this op here; the message says why."""


@dataclasses.dataclass
class Runner:
    fn: object
    params: tuple = ()  # layer only: the module's parameters in LAYER_PARAMS order
    # Computes in the input dtype (e.g. sub-key scores rounded to bf16 before top-k, which then picks
    # other experts on near-ties): checked in float32 as well when the bench-dtype check fails.
    native_precision: bool = False


def _peer_params(layer):
    named = dict(layer.named_parameters())
    return tuple(named[name] for name in LAYER_PARAMS)


def _layer_with_backend(layer, backend):
    """The same PEER (parameters shared, not copied) with another backend: a shallow copy shares the
    module's parameter and submodule dicts, only the plain `backend` attribute is its own."""
    view = copy.copy(layer)
    view.backend = backend
    return Runner(view, _peer_params(view))


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as error:  # a module being written in parallel, or a missing dependency
        raise Unavailable(f"cannot import {name}: {error}") from None


def _triton_ops(device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise Unavailable("Triton needs a CUDA device (TRITON_INTERPRET=1 runs its interpreter on the CPU: "
                          "a check of the wiring, its timings mean nothing)")
    return _import("peer_kernels.ops")


# ---- providers -----------------------------------------------------------------------------------

def build_reference(op, workload):
    if op == "layer":
        return _layer_with_backend(workload.shared["layer"], "reference")
    return Runner(getattr(reference, OP_FUNCTIONS[op]))


def build_compile(op, workload):
    """torch.compile of the reference, static shapes. The compilation itself happens in the first
    (untimed) call. The compile cache is reset first so that a sweep's many shapes never hit the
    recompile limit, past which torch would silently run the uncompiled function."""
    torch.compiler.reset()
    runner = build_reference(op, workload)
    return dataclasses.replace(runner, fn=torch.compile(runner.fn, dynamic=False))


def build_triton(op, workload, **options):
    """peer_kernels.ops; the layer is PEER(backend="triton"), whose path is ops.peer_fused's default."""
    ops = _triton_ops(workload.device)
    if op == "layer":
        return _layer_with_backend(workload.shared["layer"], "triton")
    fn = getattr(ops, OP_FUNCTIONS[op])
    missing = set(options) - set(inspect.signature(fn).parameters)
    if missing:
        raise Unavailable(f"peer_kernels.ops.{fn.__name__} has no option {sorted(missing)}")
    return Runner(functools.partial(fn, **options) if options else fn)


def build_csrc(op, workload):
    """peer_kernels.csrc: the C++ (OpenMP) ops on a CPU, the plain CUDA kernels on a GPU; the layer is
    PEER(backend="cpp"), CPU only. csrc falls back to the reference where its extension did not
    build, so that is checked here: such rows would time the reference under another name."""
    csrc = _import("peer_kernels.csrc")
    if workload.device.type == "cuda":
        if op == "layer":
            raise Unavailable("PEER(backend='cpp') runs on CPU tensors; the CUDA kernels are measured per op")
        if not csrc.cuda_available():
            raise Unavailable("peer_kernels.csrc.cuda_available() is False (its CUDA extension did not build)")
    elif not csrc.available():
        raise Unavailable("peer_kernels.csrc.available() is False (its C++ extension did not build)")
    if op == "layer":
        return _layer_with_backend(workload.shared["layer"], "cpp")
    return Runner(getattr(csrc, OP_FUNCTIONS[op]))


def embedding_bag_experts(x, expert_ids, gates, w_down, w_up, activation="gelu"):
    """The expert stage with stock PyTorch ops at their best: the up projection as one
    F.embedding_bag(per_sample_weights=g*a), which never builds the (T, h*k, d) up rows; the down
    projection has no such op (it needs a dot product per row), so its rows are gathered."""
    T, h, k = expert_ids.shape
    ids = expert_ids.reshape(T, h * k)
    down_rows = F.embedding(ids, w_down)                                  # (T, h*k, d)
    z = torch.bmm(down_rows, x.unsqueeze(-1)).squeeze(-1)                # (T, h*k)
    weights = gates.reshape(T, h * k) * reference.activate(z, activation)
    return F.embedding_bag(ids, w_up, per_sample_weights=weights, mode="sum")


def build_embedding_bag(op, workload):
    return Runner(embedding_bag_experts, native_precision=True)


def build_peer_pytorch(op, workload):
    """PEER_pytorch.PEER with the same weights (non_competing_scores=False: softmax over the k)."""
    _import("PEER_pytorch")
    layer = workload.shared["layer"]
    with torch.device(workload.device):  # its tables are initialised where they live, not on the host
        other = layer.to_peer_pytorch()
    theirs = {"to_queries.weight": other.to_queries[0].weight, "keys": other.keys,
              "w_down": other.weight_down_embed.weight, "w_up": other.weight_up_embed.weight}
    return Runner(other, tuple(theirs[name] for name in LAYER_PARAMS), native_precision=True)


# name -> (ops it implements, builder); the table's order
PROVIDERS = {
    "reference": (("retrieval", "experts", "fused", "layer"), build_reference),
    "compile": (("retrieval", "experts", "fused", "layer"), build_compile),
    "triton": (("retrieval", "experts", "layer"), build_triton),
    "triton-1pass": (("fused",), functools.partial(build_triton, one_pass=True)),
    "triton-2kernel": (("fused",), functools.partial(build_triton, one_pass=False)),
    "triton-atomic": (("experts", "fused"), functools.partial(build_triton, deterministic=False)),
    "csrc": (("retrieval", "experts", "fused", "layer"), build_csrc),
    "embedding_bag": (("experts",), build_embedding_bag),
    "peer-pytorch": (("layer",), build_peer_pytorch),
}


def supports(name, op):
    return op in PROVIDERS[name][0]


def build(name, op, workload):
    return PROVIDERS[name][1](op, workload)
