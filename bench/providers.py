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
    optimizers: tuple = ()  # step only: what steps the module's parameters
    # The relative RMS error allowed against the reference, where the provider's math differs from
    # it by design (quantized tables: build_quantized); None: the bench dtype's (cases.TOLERANCE).
    tolerance: float = None
    # Another function than the op's, timed beside it for scale (e.g. a dense feed-forward): not
    # checked against the reference.
    unchecked: bool = False


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
    if op in ("layer", "step", "decode"):
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


def build_triton_network(op, workload):
    """The Triton op with the retrieval's sorting network in every token tile instead of level
    selection (tuning.overrides(level_select=False) during the call): what level selection is
    measured against."""
    runner = build_triton(op, workload)
    tuning = _import("peer_kernels.tuning")

    def with_network(*args, **kwargs):
        with tuning.overrides(level_select=False):
            return runner.fn(*args, **kwargs)

    return dataclasses.replace(runner, fn=with_network)


def build_csrc(op, workload):
    """peer_kernels.csrc: the C++ (OpenMP) ops on a CPU, the plain CUDA kernels on a GPU; the layer is
    PEER(backend="cpp"), CPU only. A layer on backend "cpp" runs the reference where the extension
    did not build, so that is checked here: such rows would time the reference under another name."""
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
    """PEER_pytorch.PEER with the same weights (non_competing_scores=False: softmax over the k); for
    the step op with AdamW on all of its parameters. For the decode op, which only reads them, the
    layer's own tensors (to_peer_pytorch(share_weights=True)): no second copy of 8 GB of tables."""
    _import("PEER_pytorch")
    layer = workload.shared["layer"]
    with torch.device(workload.device):  # its tables are initialised where they live, not on the host
        other = layer.to_peer_pytorch(share_weights=op == "decode")
    if op == "decode":
        other.eval()
    theirs = {"to_queries.weight": other.to_queries[0].weight, "keys": other.keys,
              "w_down": other.weight_down_embed.weight, "w_up": other.weight_up_embed.weight}
    optimizers = (_adamw(other.parameters(), workload.device),) if op == "step" else ()
    return Runner(other, tuple(theirs[name] for name in LAYER_PARAMS), native_precision=True, optimizers=optimizers)


def _adamw(params, device):
    """AdamW as users run it: the fused kernel on a GPU, foreach on a CPU."""
    return torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def build_step(op, workload, table_optimizer=None):
    """The layer's training step on this package (backend "auto": Triton on a GPU, C++ on a CPU), on
    its own copy of the weights (steps change them): dense gradients and AdamW on every parameter,
    or, with table_optimizer, sparse table gradients stepped by it and AdamW on the rest."""
    layer = copy.deepcopy(workload.shared["layer"])
    layer.backend, layer.sparse_grad = "auto", table_optimizer is not None
    params = dict(layer.named_parameters())
    if table_optimizer is None:
        optimizers = (_adamw(params.values(), workload.device),)
    else:
        tables = [params.pop("w_down"), params.pop("w_up")]
        optimizers = (table_optimizer(tables), _adamw(params.values(), workload.device))
    return Runner(layer, _peer_params(layer), optimizers=optimizers)


def _optim():
    return _import("peer_kernels.optim")


# ---- decode ----------------------------------------------------------------------------------------

def build_decode(op, workload, schedule=None):
    """The layer's inference step on this package (backend "auto": Triton on a GPU, C++ on a CPU):
    its default path, which takes the decode schedules up to the tuning table's decode_tokens
    (peer_kernels.tuning.token_schedule), or with schedule="token_tiles" the path of larger batches
    forced (tuning.overrides(decode_tokens=0))."""
    runner = _layer_with_backend(workload.shared["layer"], "auto")
    if schedule is None:
        return runner
    tuning = _import("peer_kernels.tuning")

    def forced(x):
        with tuning.overrides(decode_tokens=0):
            return runner.fn(x)

    return dataclasses.replace(runner, fn=forced)


def build_dense_ffn(op, workload):
    """A dense feed-forward with the layer's active parameters per token: d -> h*k -> d, GELU, no
    bias (the h*k single-neuron experts a token mixes, as one dense hidden layer)."""
    shape = workload.shape
    hidden = shape.h * shape.k
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(shape.d, hidden, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(hidden, shape.d, bias=False))
    return Runner(dense.to(device=workload.device, dtype=shape.torch_dtype).eval(), unchecked=True)


# The relative RMS error of y the check allows a quantized provider: about 3x what unit-variance
# rows give. int8 rounds each value to half its row's step, absmax / 127 (~3.3 sigma / 127 for
# d = 1024 Gaussian rows): 0.75% RMS per value, ~1% on y from the two tables; float8_e4m3fn keeps
# 3 mantissa bits, 2.5% RMS per value, ~3.5% on y.
QUANTIZED_TOLERANCE = {torch.int8: 3e-2, torch.float8_e4m3fn: 1e-1}


def quantized_view(layer, dtype):
    """A PEER layer sharing `layer`'s modules and small parameters, with its own quantized tables
    (no float copy of a table is made): a shallow copy with its own parameter and buffer dicts,
    which peer_kernels.quantize_ then fills."""
    view = copy.copy(layer)
    view._parameters, view._buffers = dict(layer._parameters), dict(layer._buffers)
    return _import("peer_kernels").quantize_(view, dtype)


def build_quantized(op, workload, dtype):
    """The "int8" / "fp8" providers: the workload's layer with `dtype` tables (peer_kernels.quantize_),
    inference only, on backend "auto" (Triton on a GPU, C++ on a CPU), checked against the float
    reference within its quantization error (QUANTIZED_QUANTIZED_TOLERANCE)."""
    if dtype == torch.float8_e4m3fn and workload.device.type == "cuda" and \
            torch.cuda.get_device_capability(workload.device) < (8, 9):
        raise Unavailable("float8_e4m3fn tables need sm_89 or newer")
    layer = quantized_view(workload.shared["layer"], dtype)
    layer.backend = "auto"

    @torch.no_grad()
    def inference(x):
        return layer(x)

    return Runner(inference, tolerance=QUANTIZED_TOLERANCE[dtype])


# name -> (ops it implements, builder); the table's order
PROVIDERS = {
    "reference": (("retrieval", "experts", "fused", "layer", "decode"), build_reference),
    "compile": (("retrieval", "experts", "fused", "layer"), build_compile),
    "triton": (("retrieval", "experts", "layer"), build_triton),
    "triton-1pass": (("fused",), functools.partial(build_triton, one_pass=True)),
    "triton-2kernel": (("fused",), functools.partial(build_triton, overlap=False)),
    "triton-overlap": (("fused",), functools.partial(build_triton, overlap=True)),
    "triton-atomic": (("experts", "fused"), functools.partial(build_triton, deterministic=False)),
    "triton-network": (("retrieval", "fused"), build_triton_network),
    "csrc": (("retrieval", "experts", "fused", "layer"), build_csrc),
    "embedding_bag": (("experts",), build_embedding_bag),
    "peer-pytorch": (("layer", "step", "decode"), build_peer_pytorch),
    "decode": (("decode",), build_decode),
    "token-tiles": (("decode",), functools.partial(build_decode, schedule="token_tiles")),
    "int8": (("layer", "decode"), functools.partial(build_quantized, dtype=torch.int8)),
    "fp8": (("layer", "decode"), functools.partial(build_quantized, dtype=torch.float8_e4m3fn)),
    "dense-ffn": (("decode",), build_dense_ffn),
    "adamw": (("step",), build_step),
    "sparse-adamw": (("step",), lambda op, w: build_step(op, w, lambda p: _optim().SparseAdamW(p, lr=1e-4))),
    "rowwise-adagrad": (("step",), lambda op, w: build_step(op, w, lambda p: _optim().RowwiseAdagrad(p))),
    "torch-sparse-adam": (("step",), lambda op, w: build_step(op, w, lambda p: torch.optim.SparseAdam(p, lr=1e-4))),
}


def supports(name, op):
    return op in PROVIDERS[name][0]


def build(name, op, workload):
    return PROVIDERS[name][1](op, workload)
