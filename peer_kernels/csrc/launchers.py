"""The "cpp" backend's launchers: each op family of peer_kernels._library filled with calls into
the extension of csrc_reference/ (build.py builds and loads it). The extension's functions are
written from the math, not from the Triton kernels: retrieval (scores, ids), gating, and the
expert stage with its two halves, each with its backward, and the query projection; the retrieve
and fused families are composed from them here."""
import torch

from .. import _checks, _device, _library, _math, tuning
from . import build


def _call(name, first, *args):
    """extension.name(first, *args) for `first`'s device, with autocast off (the extension's own
    matmuls must compute in their documented dtype)."""
    with _math.autocast_off(first):
        return getattr(build.extension(first.device), name)(first, *args)


def _schedule(tokens):
    """The extension's schedule for a tensor of `tokens` (T, ...): "decode" (one token's work spread
    over the threads) or "token_tiles", by tuning.token_schedule (the CPU's, on the fallback table)."""
    return tuning.token_schedule(num_tokens=tokens.shape[0], arch=_device.cuda_arch(tokens.device))


def _product_key_ids(ids, id_head_offset):
    """Table rows -> the retrieval's product-key ids a*n + b (head h owns rows from h * offset)."""
    return _math.head_offsets(ids, -id_head_offset) if id_head_offset else ids


def retrieve(*, queries, keys, k, k_sub, gating, id_head_offset):
    scores, ids = _call("retrieval_forward", queries, keys, k, k_sub, _schedule(queries))
    if id_head_offset:
        ids = _math.head_offsets(ids, id_head_offset)
    if gating == "none":
        return scores, ids, _library.empty((0,), scores)
    return scores, ids, _call("gates_forward", scores, gating)


def retrieve_backward(*, dscores, dgates, queries, keys, ids, scores, gates, gating, id_head_offset):
    terms = [] if dscores is None else [dscores]
    if dgates is not None and gating != "none":
        terms.append(_call("gates_backward", scores, gates, dgates, gating))
    if not terms:
        return torch.zeros_like(queries), torch.zeros_like(keys)
    return _call("retrieval_backward", sum(terms[1:], terms[0]), queries, keys, _product_key_ids(ids, id_head_offset))


def experts(*, x, expert_ids, gates, w_down, w_up, activation, w_down_scale, w_up_scale):
    expert_ids = _checks.checked_expert_ids(expert_ids, w_down.shape[0])
    return _call("experts_forward", x, expert_ids, gates, w_down, w_up, activation, w_down_scale, w_up_scale,
                 _schedule(x))


def experts_backward(*, dy, x, expert_ids, gates, z, w_down, w_up, activation, deterministic, sparse_grad):
    # the extension's table gradients are sums in one order: deterministic either way
    return _call("experts_backward", dy, x, expert_ids, gates, z, w_down, w_up, activation, sparse_grad)


def down(*, x, expert_ids, w_down, w_down_scale):
    return _call("down_forward", x, _checks.checked_expert_ids(expert_ids, w_down.shape[0]), w_down, w_down_scale,
                 _schedule(x))


def down_backward(*, dz, x, expert_ids, w_down, deterministic, sparse_grad):
    return _call("down_backward", dz, x, expert_ids, w_down, sparse_grad)


def mix(*, z, expert_ids, gates, w_up, activation, w_up_scale):
    return _call("mix_forward", z, _checks.checked_expert_ids(expert_ids, w_up.shape[0]), gates, w_up, activation,
                 w_up_scale, _schedule(z))


def mix_backward(*, dy, z, expert_ids, gates, w_up, activation, deterministic, sparse_grad):
    return _call("mix_backward", dy, z, expert_ids, gates, w_up, activation, sparse_grad)


def fused(*, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset, schedule, w_down_scale,
          w_up_scale):
    """Retrieval -> gating -> experts, each stage one call into the extension; only (T, h, k)
    tensors pass between them."""
    _checks.check_choice("schedule", schedule, ("two_kernel",))
    scores, ids, gates = retrieve(queries=queries, keys=keys, k=k, k_sub=k_sub, gating=gating,
                                  id_head_offset=id_head_offset)
    y, z = _call("experts_forward", x, ids, gates, w_down, w_up, activation, w_down_scale, w_up_scale, _schedule(x))
    return y, scores, ids, gates, z


def fused_backward(*, dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, gating, activation, id_head_offset,
                   deterministic, sparse_grad):
    dx, dgates, dw_down, dw_up, rows = _call("experts_backward", dy, x, ids, gates, z, w_down, w_up, activation,
                                             sparse_grad)
    dqueries, dkeys = retrieve_backward(dscores=None, dgates=dgates, queries=queries, keys=keys, ids=ids,
                                        scores=scores, gates=gates, gating=gating, id_head_offset=id_head_offset)
    return dx, dqueries, dkeys, dw_down, dw_up, rows


def project(*, x, weight):
    return _call("linear_forward", x, weight)


_library.implement("retrieve", "cpp", forward=retrieve, backward=retrieve_backward)
_library.implement("experts", "cpp", forward=experts, backward=experts_backward)
_library.implement("down", "cpp", forward=down, backward=down_backward)
_library.implement("mix", "cpp", forward=mix, backward=mix_backward)
_library.implement("fused", "cpp", forward=fused, backward=fused_backward)
_library.implement("project", "cpp", forward=project, backward=None)
