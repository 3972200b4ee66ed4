"""The paper's instruments on a PEER layer: expert usage (its Table 2 measures, counted on the
device) and growing the pool of experts while keeping every expert's function. The layer's
`track_usage`, `usage_stats` and `grow` delegate here."""
import math

import torch
from torch import nn

from . import _math
from ._checks import sub_keys_per_half


def track_usage(layer, value):
    """Sets layer.track_usage. While True, every forward adds its retrievals to `usage_counts`, an (S*N,) int64 buffer
    on the parameters' device (S = heads with separate_embed_per_head, else 1), with no host
    sync; usage_stats() reads and resets them. The counts are not part of the
    state_dict. The fused op keeps its expert ids to itself, so tracking runs the retrieval op
    once more, without gradients (a small part of the layer's cost); gradient checkpointing,
    which runs the forward again, counts it twice. The counts are each process's own:
    DistributedDataParallel's default broadcast_buffers=True overwrites them with rank 0's
    before every forward, so track with broadcast_buffers=False and all_reduce the counts."""
    if not isinstance(value, bool):
        raise TypeError(f"track_usage: expected a bool, got {type(value).__name__} {value!r}")
    if value and getattr(layer, "usage_counts", None) is None:
        layer.register_buffer("usage_counts", torch.zeros(layer.w_down.shape[0], dtype=torch.int64,
                                                          device=layer.w_down.device), persistent=False)
    layer._track_usage = value


@torch.no_grad()
def count_usage(layer, ops, queries, keys):
    """Adds one forward's retrievals to layer.usage_counts: the backend's retrieval op again,
    without gradients. Its picks are the fused op's (one tie rule), and the ids stay on the device
    (the expert op would check their range on the host)."""
    _, ids = ops.product_key_topk(queries, keys, layer.num_experts_per_head, layer.product_key_topk)
    if layer.separate_embed_per_head:
        ids = _math.head_offsets(ids, layer.num_experts)
    ids = ids.reshape(-1)
    layer.usage_counts.index_add_(0, ids, torch.ones_like(ids))


def usage_stats(layer, *, reset=True):
    """Expert usage since tracking began or the last reset, the paper's Table 2 measures:
    {"counts": (S*N,) int64 tensor (a copy; S*N rows as in track_usage), "used_fraction": the
    share of the S*N experts retrieved at least once, "kl_from_uniform": KL(p || uniform) =
    log(S*N) + sum p log p over the retrieval frequencies p (nan before any retrieval)}.
    reset=True zeroes the counts. Reading them waits for the device."""
    counts = getattr(layer, "usage_counts", None)
    if counts is None:
        raise RuntimeError("usage_stats: no usage was tracked; set layer.track_usage = True before the forward")
    counts = counts.clone()
    if reset:
        layer.usage_counts.zero_()
    total = int(counts.sum())
    p = counts.double() / max(total, 1)
    kl = math.log(counts.numel()) + float(torch.xlogy(p, p).sum()) if total else math.nan
    return {"counts": counts, "used_fraction": float((counts > 0).double().mean()), "kl_from_uniform": kl}


@torch.no_grad()
def grow(layer, num_experts, *, optimizer=None):
    """Grows the pool to `num_experts`, a larger perfect square n'*n', keeping every existing
    expert's function: sub-key a of each half keeps its index, so expert a*n + b becomes
    a*n' + b (its rows move; within each head's block with separate_embed_per_head), and the
    output is unchanged for every token whose retrieval still picks old experts only. The new
    sub-keys and rows are initialised as reset_parameters() initialises them.

    keys, w_down and w_up become new, larger Parameters (requires_grad kept, .grad dropped), so
    an optimizer built on the old ones must be told: pass it as `optimizer` and its param
    groups get the new Parameters, with their state re-laid like the Parameters (the new
    entries zero, scalars such as Adam's step kept); or build a new optimizer. usage_counts
    are re-laid as well. Returns the layer. A layer with quantized tables (peer_kernels.quantize_)
    is not grown: grow the float layer, then quantize it."""
    if layer.w_down_scale is not None:
        raise ValueError(f"layer: its tables are quantized ({layer.w_down.dtype}); grow the float layer, then "
                         f"quantize_ it")
    n_new = sub_keys_per_half(num_experts)
    n = math.isqrt(layer.num_experts)
    if n_new <= n:
        raise ValueError(f"num_experts: expected a perfect square larger than {layer.num_experts}, got {num_experts}")
    sets = layer.w_down.shape[0] // layer.num_experts
    old = {"keys": layer.keys, "w_down": layer.w_down, "w_up": layer.w_up}
    for name, param in old.items():
        for key, value in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"optimizer: cannot re-lay its state {key!r} of shape {tuple(value.shape)} "
                                 f"for {name} of shape {tuple(param.shape)}; build a new optimizer instead")
    grown = {id(p) for p in old.values()}
    kept = [(t, t.clone()) for t in (*layer.parameters(), *layer.buffers()) if id(t) not in grown]
    for name, param in old.items():
        shape = (param.shape[0], n_new, *param.shape[2:]) if name == "keys" else (sets * n_new * n_new, layer.dim)
        setattr(layer, name, nn.Parameter(param.new_empty(shape), requires_grad=param.requires_grad))
    layer.num_experts = num_experts
    layer.reset_parameters()  # initialises the new entries; everything else is put back next
    for t, value in kept:
        t.copy_(value)
    for name, param in old.items():
        _place_grown(param, getattr(layer, name), n, None if name == "keys" else sets)
    counts = getattr(layer, "usage_counts", None)
    if counts is not None:
        layer.usage_counts = _place_grown(counts, counts.new_zeros(sets * n_new * n_new), n, sets)
    if optimizer is not None:
        new = {id(p): getattr(layer, name) for name, p in old.items()}
        for group in optimizer.param_groups:
            group["params"] = [new.get(id(p), p) for p in group["params"]]
        for name, param in old.items():
            state = optimizer.state.pop(param, None)
            if state is None:
                continue
            target = getattr(layer, name)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = _place_grown(value, value.new_zeros(target.shape), n,
                                              None if name == "keys" else sets)
            optimizer.state[target] = state
    return layer


def _place_grown(value, into, n, sets):
    """Writes `value`, laid out for n sub-keys per half, into `into`, laid out for n' > n: keys
    (h, n, 2, dk) keep their sub-key index (sets None); rows (sets*n*n, ...) of expert a*n + b go
    to row a*n' + b of their set. Returns `into`."""
    if sets is None:
        into[:, :n] = value
    else:
        n_new, rest = math.isqrt(into.shape[0] // sets), value.shape[1:]
        into.view(sets, n_new, n_new, *rest)[:, :n, :n] = value.view(sets, n, n, *rest)
    return into
