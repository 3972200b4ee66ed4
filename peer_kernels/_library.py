"""The package's torch.library ops, each op family declared once: schema, fake (meta)
implementation, and the autograd that joins the forward op to its backward op, with the saved state
named. Backends only fill them: `implement(family, backend, forward=..., backward=...)` registers a
backend's two launchers (peer_kernels/ops for "triton", peer_kernels/csrc for "cpp"), and every op
takes the backend's name as its first argument.

Families (T tokens, h heads, k experts per head, E table rows; "rows" is the touched rows of a
sparse table gradient, empty for dense ones):
- retrieve(queries, keys, k, k_sub, gating, id_head_offset) -> scores, ids, gates
- experts_forward(x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad,
  w_down_scale, w_up_scale) -> y, z
- down_forward(x, expert_ids, w_down, deterministic, sparse_grad, w_down_scale) -> z
- mix_forward(z, expert_ids, gates, w_up, activation, deterministic, sparse_grad, w_up_scale) -> y
- fused_forward(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset,
  schedule, deterministic, sparse_grad, w_down_scale, w_up_scale) -> y, scores, ids, gates, z
and their *_backward ops; and project(x, weight) -> x @ weight.T, the layer's query projection on
a backend with its own (the C++ one: PEER.queries), whose backward is two matmuls in its autograd.
The scales (E,) float32, None for float tables, go with quantized tables (int8 / float8_e4m3fn,
peer_kernels.quantize_): the forward ops read a table row as its stored values times its scale.
They are for inference: the backward ops take no scales, and the autograd of a forward op given
scales refuses to record a backward (_checks.quantized_training_error). The public functions at
the end validate the arguments (peer_kernels._checks) and call these through `run` (in eager
inference, an op's body without the dispatcher); peer_kernels.ops and
peer_kernels.csrc bind them to their backend.

The ops are opaque to torch.compile (no graph break) and run their bodies eagerly on every device,
so a backend's launcher may read values back to the host (the C++ id checks) even in a compiled
model. Every output is allocated by the helpers here, which the real ops and the fakes share, so
both give the same sizes, strides and dtypes.
"""
import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch

from . import _checks

LIBRARY = "peer_kernels"
Tensor = torch.Tensor


# ---- mechanics ----------------------------------------------------------------------------------------

def custom_op(name):
    """torch.library.custom_op in this package's namespace. The body runs with its first CUDA
    tensor's device as the current one: Triton launches on the current device's current stream, so
    without it a tensor on cuda:1 would meet kernels launched on cuda:0."""
    def register(fn):
        @functools.wraps(fn)
        def on_inputs_device(*args, **kwargs):
            device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda),
                          None)
            with contextlib.nullcontext() if device is None else torch.cuda.device(device):
                return fn(*args, **kwargs)
        op = torch.library.custom_op(f"{LIBRARY}::{name}", mutates_args=())(on_inputs_device)
        _BODIES[op] = on_inputs_device
        return op
    return register


_BODIES = {}  # each op's body, for run
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def run(op, *args):
    """op(*args): through torch.library's dispatcher, or, in eager inference, by calling op's body
    directly, which is what the dispatcher would end up doing. A decode step is a few hundred
    microseconds of memory reads, and the dispatch of a custom op costs ~15 us per call with the
    caches warm and ~0.15 ms with them cold (after the rest of a model has streamed its weights
    through them: docs/serving.md). Eager inference: gradients off, not under torch.compile, no
    profiler (which lists the ops it sees), no dispatch or function mode (FakeTensorMode, a
    FlopCounterMode, ...), and no tensor subclass among the arguments."""
    direct = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
              and not torch.autograd.profiler._is_profiler_enabled
              and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
              and all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor)))
    return (_BODIES[op] if direct else op)(*args)


def empty(shape, like, dtype=None):
    """A fresh contiguous tensor on `like`'s device (a fake one under fake-tensor tracing). Every
    op output is allocated this way, never with empty_like, which would copy the strides of a
    non-contiguous input into the real output but not always into the fake one."""
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)


def acc(t):
    """The accumulation dtype of t's computations."""
    return _checks.compute_dtype(t.dtype)


@dataclasses.dataclass(frozen=True)
class Implementation:
    forward: Callable
    backward: Optional[Callable]  # None for project (its autograd's matmuls)


_IMPLEMENTATIONS = {}
FAMILIES = ("retrieve", "experts", "down", "mix", "fused", "project")


def implement(family, backend, *, forward, backward):
    """Registers a backend's launchers for an op family. Each takes the family's arguments (see the
    module docstring) as keywords, the backend's name excepted, and returns its outputs."""
    _checks.check_choice("family", family, FAMILIES)
    _IMPLEMENTATIONS[family, backend] = Implementation(forward, backward)


def _implementation(family, backend):
    try:
        return _IMPLEMENTATIONS[family, backend]
    except KeyError:
        raise ValueError(f"backend: {backend!r} implements no {family} op") from None


def table_gradients(rows, sparse, grads, tables):
    """The gradients autograd gets for the tables from what a backward op returned: dense as they
    are, or, with `sparse`, coalesced sparse COO tensors of the touched rows (rows (U,) int64
    ascending and unique, each grad their values (U, d)): the nn.Embedding(sparse=True) layout."""
    if not sparse:
        return list(grads)
    return [torch.sparse_coo_tensor(rows[None], values, tuple(t.shape), is_coalesced=True, check_invariants=False)
            for values, t in zip(grads, tables)]


# ---- outputs, shared by the real ops and the fakes ----------------------------------------------------

def retrieve_outputs(queries, k, gating):
    """Unwritten scores (T, h, k) in the accumulation dtype, ids (T, h, k) int64, gates like scores
    (shape (0,) for gating "none")."""
    T, h = queries.shape[:2]
    return (empty((T, h, k), queries, acc(queries)), empty((T, h, k), queries, torch.int64),
            empty((T, h, k) if gating != "none" else (0,), queries, acc(queries)))


def experts_outputs(x, expert_ids, d_out):
    """Unwritten y (T, d_out) in x's dtype and z (T, h, k) in the accumulation dtype."""
    return empty((x.shape[0], d_out), x), empty(expert_ids.shape, x, acc(x))


def fused_outputs(x, queries, k, gating):
    """Unwritten (y, scores, ids, gates, z) of fused_forward."""
    scores, ids, gates = retrieve_outputs(queries, k, gating)
    y, z = experts_outputs(x, ids, x.shape[1])
    return y, scores, ids, gates, z


def table_grad_outputs(sparse, *tables):
    """Table gradients and their rows as the backward ops return them: dense (each like its table,
    rows empty) or sparse (values (U, d) per table and rows (U,), U known only to the real op)."""
    if not sparse:
        return (*(empty(t.shape, t) for t in tables), empty((0,), tables[0], torch.int64))
    count = torch.library.get_ctx().new_dynamic_size()
    return (*(empty((count, t.shape[1]), t) for t in tables), empty((count,), tables[0], torch.int64))


# ---- retrieval ------------------------------------------------------------------------------------------

@custom_op("retrieve")
def retrieve(backend: str, queries: Tensor, keys: Tensor, k: int, k_sub: int, gating: str, id_head_offset: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """scores (T, h, k) descending in the accumulation dtype, ids (T, h, k) int64 = a*n + b +
    head*id_head_offset, gates = gating(scores) ((0,) for gating "none"). Differentiable in queries
    and keys through scores and gates."""
    return _implementation("retrieve", backend).forward(
        queries=queries, keys=keys, k=k, k_sub=k_sub, gating=gating, id_head_offset=id_head_offset)


@retrieve.register_fake
def _(backend, queries, keys, k, k_sub, gating, id_head_offset):
    return retrieve_outputs(queries, k, gating)


@custom_op("retrieve_backward")
def retrieve_backward(backend: str, dscores: Optional[Tensor], dgates: Optional[Tensor], queries: Tensor,
                      keys: Tensor, ids: Tensor, scores: Tensor, gates: Tensor, gating: str, id_head_offset: int
                      ) -> tuple[Tensor, Tensor]:
    """(dqueries, dkeys) in the inputs' dtypes; dscores / dgates None where no gradient flows."""
    return _implementation("retrieve", backend).backward(
        dscores=dscores, dgates=dgates, queries=queries, keys=keys, ids=ids, scores=scores, gates=gates,
        gating=gating, id_head_offset=id_head_offset)


@retrieve_backward.register_fake
def _(backend, dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset):
    return empty(queries.shape, queries), empty(keys.shape, keys)


def _retrieve_setup(ctx, inputs, output):
    backend, queries, keys, _k, _k_sub, gating, id_head_offset = inputs
    scores, ids, gates = output
    ctx.save_for_backward(queries, keys, ids, scores, gates)
    ctx.backend, ctx.gating, ctx.id_head_offset = backend, gating, id_head_offset
    ctx.mark_non_differentiable(ids)


def _retrieve_gradients(ctx, dscores, _dids, dgates):
    queries, keys, ids, scores, gates = ctx.saved_tensors
    dqueries, dkeys = retrieve_backward(ctx.backend, dscores, dgates if ctx.gating != "none" else None, queries,
                                        keys, ids, scores, gates, ctx.gating, ctx.id_head_offset)
    return None, dqueries, dkeys, None, None, None, None


retrieve.register_autograd(_retrieve_gradients, setup_context=_retrieve_setup)


# ---- the expert stage ------------------------------------------------------------------------------------

@custom_op("experts_forward")
def experts_forward(backend: str, x: Tensor, expert_ids: Tensor, gates: Tensor, w_down: Tensor, w_up: Tensor,
                    activation: str, deterministic: bool, sparse_grad: bool, w_down_scale: Optional[Tensor] = None,
                    w_up_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(y, z): y (T, d_out) = sum g act(z) w_up[e] in x's dtype, z (T, h, k) = w_down[e] . x in the
    accumulation dtype (saved for the backward). deterministic and sparse_grad only travel to it."""
    return _implementation("experts", backend).forward(
        x=x, expert_ids=expert_ids, gates=gates, w_down=w_down, w_up=w_up, activation=activation,
        w_down_scale=w_down_scale, w_up_scale=w_up_scale)


@experts_forward.register_fake
def _(backend, x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad, w_down_scale=None,
      w_up_scale=None):
    return experts_outputs(x, expert_ids, w_up.shape[1])


@custom_op("experts_backward")
def experts_backward(backend: str, dy: Tensor, x: Tensor, expert_ids: Tensor, gates: Tensor, z: Tensor,
                     w_down: Tensor, w_up: Tensor, activation: str, deterministic: bool, sparse_grad: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgates, dw_down, dw_up, rows) in the dtypes of (x, gates, w_down, w_up)."""
    return _implementation("experts", backend).backward(
        dy=dy, x=x, expert_ids=expert_ids, gates=gates, z=z, w_down=w_down, w_up=w_up, activation=activation,
        deterministic=deterministic, sparse_grad=sparse_grad)


@experts_backward.register_fake
def _(backend, dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse_grad):
    return empty(x.shape, x), empty(gates.shape, gates), *table_grad_outputs(sparse_grad, w_down, w_up)


def _refuse_quantized(scales, name):
    """The autograd of a forward op given scales: no backward op takes them."""
    if any(scale is not None for scale in scales):
        raise _checks.quantized_training_error(name)


def _experts_setup(ctx, inputs, output):
    backend, x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad, *scales = inputs
    _refuse_quantized(scales, "experts_forward's inputs")
    _y, z = output
    ctx.save_for_backward(x, expert_ids, gates, z, w_down, w_up)
    ctx.backend, ctx.activation, ctx.deterministic, ctx.sparse_grad = backend, activation, deterministic, sparse_grad
    ctx.mark_non_differentiable(z)


def _experts_gradients(ctx, dy, _dz):
    x, expert_ids, gates, z, w_down, w_up = ctx.saved_tensors
    dx, dgates, dw_down, dw_up, rows = experts_backward(ctx.backend, dy, x, expert_ids, gates, z, w_down, w_up,
                                                        ctx.activation, ctx.deterministic, ctx.sparse_grad)
    dw_down, dw_up = table_gradients(rows, ctx.sparse_grad, (dw_down, dw_up), (w_down, w_up))
    return None, dx, None, dgates, dw_down, dw_up, None, None, None, None, None


experts_forward.register_autograd(_experts_gradients, setup_context=_experts_setup)


@custom_op("down_forward")
def down_forward(backend: str, x: Tensor, expert_ids: Tensor, w_down: Tensor, deterministic: bool,
                 sparse_grad: bool, w_down_scale: Optional[Tensor] = None) -> Tensor:
    """z (T, h, k) = w_down[e] . x in the accumulation dtype: the expert stage's first half."""
    return _implementation("down", backend).forward(x=x, expert_ids=expert_ids, w_down=w_down,
                                                    w_down_scale=w_down_scale)


@down_forward.register_fake
def _(backend, x, expert_ids, w_down, deterministic, sparse_grad, w_down_scale=None):
    return empty(expert_ids.shape, x, acc(x))


@custom_op("down_backward")
def down_backward(backend: str, dz: Tensor, x: Tensor, expert_ids: Tensor, w_down: Tensor, deterministic: bool,
                  sparse_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw_down, rows)."""
    return _implementation("down", backend).backward(
        dz=dz, x=x, expert_ids=expert_ids, w_down=w_down, deterministic=deterministic, sparse_grad=sparse_grad)


@down_backward.register_fake
def _(backend, dz, x, expert_ids, w_down, deterministic, sparse_grad):
    return empty(x.shape, x), *table_grad_outputs(sparse_grad, w_down)


def _down_setup(ctx, inputs, output):
    backend, x, expert_ids, w_down, deterministic, sparse_grad, w_down_scale = inputs
    _refuse_quantized((w_down_scale,), "down_forward's inputs")
    ctx.save_for_backward(x, expert_ids, w_down)
    ctx.backend, ctx.deterministic, ctx.sparse_grad = backend, deterministic, sparse_grad


def _down_gradients(ctx, dz):
    x, expert_ids, w_down = ctx.saved_tensors
    dx, dw_down, rows = down_backward(ctx.backend, dz.to(acc(x)), x, expert_ids, w_down, ctx.deterministic,
                                      ctx.sparse_grad)
    dw_down, = table_gradients(rows, ctx.sparse_grad, (dw_down,), (w_down,))
    return None, dx, None, dw_down, None, None, None


down_forward.register_autograd(_down_gradients, setup_context=_down_setup)


@custom_op("mix_forward")
def mix_forward(backend: str, z: Tensor, expert_ids: Tensor, gates: Tensor, w_up: Tensor, activation: str,
                deterministic: bool, sparse_grad: bool, w_up_scale: Optional[Tensor] = None) -> Tensor:
    """y (T, d_out) = sum g act(z) w_up[e] in z's dtype: the expert stage's second half."""
    return _implementation("mix", backend).forward(
        z=z, expert_ids=expert_ids, gates=gates, w_up=w_up, activation=activation, w_up_scale=w_up_scale)


@mix_forward.register_fake
def _(backend, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad, w_up_scale=None):
    return empty((z.shape[0], w_up.shape[1]), z)


@custom_op("mix_backward")
def mix_backward(backend: str, dy: Tensor, z: Tensor, expert_ids: Tensor, gates: Tensor, w_up: Tensor,
                 activation: str, deterministic: bool, sparse_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dgates, dw_up, rows)."""
    return _implementation("mix", backend).backward(
        dy=dy, z=z, expert_ids=expert_ids, gates=gates, w_up=w_up, activation=activation,
        deterministic=deterministic, sparse_grad=sparse_grad)


@mix_backward.register_fake
def _(backend, dy, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad):
    return empty(z.shape, z), empty(gates.shape, gates), *table_grad_outputs(sparse_grad, w_up)


def _mix_setup(ctx, inputs, output):
    backend, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad, w_up_scale = inputs
    _refuse_quantized((w_up_scale,), "mix_forward's inputs")
    ctx.save_for_backward(z, expert_ids, gates, w_up)
    ctx.backend, ctx.activation, ctx.deterministic, ctx.sparse_grad = backend, activation, deterministic, sparse_grad


def _mix_gradients(ctx, dy):
    z, expert_ids, gates, w_up = ctx.saved_tensors
    dz, dgates, dw_up, rows = mix_backward(ctx.backend, dy.to(z.dtype), z, expert_ids, gates, w_up, ctx.activation,
                                           ctx.deterministic, ctx.sparse_grad)
    dw_up, = table_gradients(rows, ctx.sparse_grad, (dw_up,), (w_up,))
    return None, dz, None, dgates, dw_up, None, None, None, None


mix_forward.register_autograd(_mix_gradients, setup_context=_mix_setup)


# ---- the fused op -------------------------------------------------------------------------------------------

@custom_op("fused_forward")
def fused_forward(backend: str, x: Tensor, queries: Tensor, keys: Tensor, w_down: Tensor, w_up: Tensor, k: int,
                  k_sub: int, gating: str, activation: str, id_head_offset: int, schedule: str, deterministic: bool,
                  sparse_grad: bool, w_down_scale: Optional[Tensor] = None, w_up_scale: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, scores, ids, gates, z): retrieval, gating and the experts; schedule names how the
    backend runs the forward (every backend has "two_kernel": retrieval, then the experts)."""
    return _implementation("fused", backend).forward(
        x=x, queries=queries, keys=keys, w_down=w_down, w_up=w_up, k=k, k_sub=k_sub, gating=gating,
        activation=activation, id_head_offset=id_head_offset, schedule=schedule, w_down_scale=w_down_scale,
        w_up_scale=w_up_scale)


@fused_forward.register_fake
def _(backend, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset, schedule,
      deterministic, sparse_grad, w_down_scale=None, w_up_scale=None):
    return fused_outputs(x, queries, k, gating)


@custom_op("fused_backward")
def fused_backward(backend: str, dy: Tensor, x: Tensor, queries: Tensor, keys: Tensor, w_down: Tensor,
                   w_up: Tensor, scores: Tensor, ids: Tensor, gates: Tensor, z: Tensor, gating: str, activation: str,
                   id_head_offset: int, deterministic: bool, sparse_grad: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dqueries, dkeys, dw_down, dw_up, rows)."""
    return _implementation("fused", backend).backward(
        dy=dy, x=x, queries=queries, keys=keys, w_down=w_down, w_up=w_up, scores=scores, ids=ids, gates=gates, z=z,
        gating=gating, activation=activation, id_head_offset=id_head_offset, deterministic=deterministic,
        sparse_grad=sparse_grad)


@fused_backward.register_fake
def _(backend, dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, gating, activation, id_head_offset,
      deterministic, sparse_grad):
    return *(empty(t.shape, t) for t in (x, queries, keys)), *table_grad_outputs(sparse_grad, w_down, w_up)


def _fused_setup(ctx, inputs, output):
    (backend, x, queries, keys, w_down, w_up, _k, _k_sub, gating, activation, id_head_offset, _schedule,
     deterministic, sparse_grad, *scales) = inputs
    _refuse_quantized(scales, "fused_forward's inputs")
    _y, scores, ids, gates, z = output
    ctx.save_for_backward(x, queries, keys, w_down, w_up, scores, ids, gates, z)
    ctx.backend, ctx.gating, ctx.activation, ctx.id_head_offset = backend, gating, activation, id_head_offset
    ctx.deterministic, ctx.sparse_grad = deterministic, sparse_grad
    ctx.mark_non_differentiable(scores, ids, gates, z)


def _fused_gradients(ctx, dy, *_):
    x, queries, keys, w_down, w_up, scores, ids, gates, z = ctx.saved_tensors
    dx, dqueries, dkeys, dw_down, dw_up, rows = fused_backward(
        ctx.backend, dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, ctx.gating, ctx.activation,
        ctx.id_head_offset, ctx.deterministic, ctx.sparse_grad)
    dw_down, dw_up = table_gradients(rows, ctx.sparse_grad, (dw_down, dw_up), (w_down, w_up))
    return None, dx, dqueries, dkeys, dw_down, dw_up, None, None, None, None, None, None, None, None, None, None


fused_forward.register_autograd(_fused_gradients, setup_context=_fused_setup)


# ---- the query projection -------------------------------------------------------------------------------

@custom_op("project")
def project(backend: str, x: Tensor, weight: Tensor) -> Tensor:
    """x (T, d_in) @ weight (d_out, d_in).T -> (T, d_out) in x's dtype: a bias-free Linear."""
    return _implementation("project", backend).forward(x=x, weight=weight)


@project.register_fake
def _(backend, x, weight):
    return empty((x.shape[0], weight.shape[0]), x)


def _project_setup(ctx, inputs, output):
    _, x, weight = inputs
    ctx.save_for_backward(x, weight)


def _project_gradients(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[1] else None
    dweight = dy.t() @ x if ctx.needs_input_grad[2] else None
    return None, dx, dweight


project.register_autograd(_project_gradients, setup_context=_project_setup)


# ---- the public functions, for a backend -----------------------------------------------------------------

def product_key_topk(backend, queries, keys, k, k_sub=None):
    """peer_kernels.reference.product_key_topk on `backend`."""
    k_sub = _checks.check_retrieval(queries, keys, k, k_sub)
    scores, ids, _ = run(retrieve, backend, queries, keys, k, k_sub, "none", 0)
    return scores, ids


def peer_experts(backend, x, expert_ids, gates, w_down, w_up, activation, deterministic, sparse_grad,
                 w_down_scale=None, w_up_scale=None):
    """peer_kernels.reference.peer_experts on `backend`. The ids' range is checked by the backend's
    launcher, where it runs eagerly even inside a torch.compile'd graph."""
    _checks.check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=False,
                          w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    return run(experts_forward, backend, x, expert_ids, gates, w_down, w_up, activation, bool(deterministic),
               bool(sparse_grad), w_down_scale, w_up_scale)[0]


def peer_down(backend, x, expert_ids, w_down, deterministic, sparse_grad, w_down_scale=None):
    """peer_kernels.reference.peer_down on `backend`."""
    _checks.check_down(x, expert_ids, w_down, check_range=False, w_down_scale=w_down_scale)
    return run(down_forward, backend, x, expert_ids, w_down, bool(deterministic), bool(sparse_grad), w_down_scale)


def peer_mix(backend, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad, w_up_scale=None):
    """peer_kernels.reference.peer_mix on `backend`."""
    _checks.check_mix(z, expert_ids, gates, w_up, activation, check_range=False, w_up_scale=w_up_scale)
    return run(mix_forward, backend, z, expert_ids, gates, w_up, activation, bool(deterministic), bool(sparse_grad),
               w_up_scale)


def peer_fused(backend, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
               sparse_grad, schedule, deterministic, w_down_scale=None, w_up_scale=None):
    """peer_kernels.reference.peer_fused on `backend`, its forward run by `schedule`."""
    k_sub = _checks.check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                                separate_embed_per_head, w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    id_head_offset = keys.shape[1] ** 2 if separate_embed_per_head else 0
    return run(fused_forward, backend, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset,
               schedule, bool(deterministic), bool(sparse_grad), w_down_scale, w_up_scale)[0]
