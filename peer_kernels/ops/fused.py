"""Launchers of the fused op (everything after the query projection: retrieval, gating, expert
mixing); peer_kernels._library declares the op they fill.

Three forward schedules with the same outputs, saved tensors and backward:
- "two_kernel" (peer_fused's default): retrieval with fused gating (ops/retrieval.py), then the
  expert kernel (ops/experts.py);
- "overlap": the same two kernels over chunks of tokens, the expert kernel of chunk c on a
  high-priority side stream while the retrieval of chunk c+1 runs on the caller's, each on its own
  share of the SMs (tuning.overlap_schedule);
- "one_pass": kernels/fused.py, one launch per layer.
No GPU has timed them yet: the default is the simplest schedule expected to be fast, and the first
GPU run decides (bench/ times all three as triton-2kernel, triton-overlap and triton-1pass, and
--profile prints each one's wall time against its kernels' summed time).
Saved for backward: x, queries, ids, scores, gates and z = w_down[e] . x, O(T*(d + h*(dk + k))).
The backward is the expert stage's backward (dx, dgates, dw_down, dw_up) followed by the retrieval
backward driven by dgates (dqueries, dkeys).
"""
import contextlib

import torch
import triton

from .. import _checks, _device, _library, tuning
from ..kernels import fused as kernels
from . import experts, retrieval


def _one_pass(*, x, queries, keys, w_down, w_up, w_down_scale, w_up_scale, k, k_sub, gating, activation,
              id_head_offset):
    T, h, _, dk = queries.shape
    n = keys.shape[1]
    y, scores, ids, gates, z = _library.fused_outputs(x, queries, k, gating)
    if T == 0:
        return y, scores, ids, gates, z
    queries, (stride_t, stride_h, stride_p) = retrieval.query_strides(queries)
    config, launch = tuning.one_pass_config(num_tokens=T, heads=h, d=x.shape[1], n=n, dk=dk, k=k, k_sub=k_sub,
                                            dtype=queries.dtype, arch=_device.cuda_arch(x.device))
    config.update(D=x.shape[1], ACTIVATION=experts.activation_id(activation), GATING=retrieval.GATING_CODES[gating])
    pairs = retrieval.pair_table(k=k, k_sub=k_sub, p_pad=config["P_PAD"], device=x.device)
    kernels.peer_fused_kernel[(triton.cdiv(T, config["BLOCK_T"]),)](
        x_ptr=x, queries_ptr=queries, keys_ptr=keys, pairs_ptr=pairs, w_down_ptr=w_down, w_up_ptr=w_up,
        w_down_scale_ptr=w_down_scale, w_up_scale_ptr=w_up_scale, y_ptr=y,
        scores_ptr=scores, ids_ptr=ids, gates_ptr=gates, z_ptr=z, T=T, heads=h, n=n, dk=dk, k=k, stride_t=stride_t,
        stride_h=stride_h, stride_p=stride_p, key_head_stride=retrieval.key_head_stride(keys),
        id_head_offset=id_head_offset, **launch, **config)
    return y, scores, ids, gates, z


def _two_kernel(*, x, queries, keys, w_down, w_up, w_down_scale, w_up_scale, k, k_sub, gating, activation,
                id_head_offset):
    scores, ids, gates = retrieval.launch_retrieve(queries=queries, keys=keys, k=k, k_sub=k_sub, gating=gating,
                                                   id_head_offset=id_head_offset)
    y, z = experts.launch_forward(x=x, expert_ids=ids, gates=gates, w_down=w_down, w_up=w_up,
                                  w_down_scale=w_down_scale, w_up_scale=w_up_scale, activation=activation)
    return y, scores, ids, gates, z


# One side stream per device for the overlapped forward's expert kernel. High priority: where the
# split leaves a choice (fewer SMs than it assumes), freed SMs go to the expert programs.
_MIXER_STREAMS = {}


def _mixer_stream(device):
    if device.index not in _MIXER_STREAMS:
        _MIXER_STREAMS[device.index] = torch.cuda.Stream(device=device, priority=-1)
    return _MIXER_STREAMS[device.index]


def _overlapped(*, x, queries, keys, w_down, w_up, w_down_scale, w_up_scale, k, k_sub, gating, activation,
                id_head_offset):
    """The two kernels, chunk by chunk: the expert kernel of chunk c on the mixer stream after
    chunk c's retrieval, the retrieval of chunk c+1 on the caller's stream meanwhile. The last
    chunk's expert kernel, which nothing runs beside, takes the whole device (one program per
    tile), and a single chunk is the two-kernel path. Nothing is allocated on the mixer stream,
    and the caller's stream waits for it before returning (also on an error), so every tensor it
    touched is in use on the caller's stream until then (no record_stream needed). Off a GPU (the
    interpreter) the same chunks run in order on two "SMs": chunks of one token tile, one
    persistent expert program."""
    T, h, _, dk = queries.shape
    arguments = dict(x=x, queries=queries, keys=keys, w_down=w_down, w_up=w_up, w_down_scale=w_down_scale,
                     w_up_scale=w_up_scale, k=k, k_sub=k_sub, gating=gating, activation=activation,
                     id_head_offset=id_head_offset)
    block_t = tuning.retrieval_config(n=keys.shape[1], dk=dk, k=k, k_sub=k_sub, dtype=queries.dtype,
                                      arch=_device.cuda_arch(x.device))[0]["BLOCK_T"]
    chunk, programs = tuning.overlap_schedule(heads=h, block_t=block_t,
                                              sms=_device.sm_count(x.device) if x.is_cuda else 2)
    if T <= chunk:
        return _two_kernel(**arguments)
    outputs = _library.fused_outputs(x, queries, k, gating)
    y, scores, ids, gates, z = outputs
    caller = torch.cuda.current_stream() if x.is_cuda else None
    mixer = _mixer_stream(x.device) if x.is_cuda else None
    try:
        for t0 in range(0, T, chunk):
            rows = slice(t0, t0 + chunk)
            retrieval.launch_retrieve(queries=queries[rows], keys=keys, k=k, k_sub=k_sub, gating=gating,
                                      id_head_offset=id_head_offset, out=(scores[rows], ids[rows], gates[rows]))
            with contextlib.nullcontext() if mixer is None else torch.cuda.stream(mixer):
                if mixer is not None:
                    mixer.wait_stream(caller)
                experts.launch_forward(x=x[rows], expert_ids=ids[rows], gates=gates[rows], w_down=w_down, w_up=w_up,
                                       w_down_scale=w_down_scale, w_up_scale=w_up_scale, activation=activation,
                                       out=(y[rows], z[rows]),
                                       programs=programs if t0 + chunk < T else None)
    finally:
        if mixer is not None:
            caller.wait_stream(mixer)
    return outputs


_SCHEDULE_FORWARDS = {"two_kernel": _two_kernel, "overlap": _overlapped, "one_pass": _one_pass}
SCHEDULES = tuple(_SCHEDULE_FORWARDS)


def fused(*, x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset, schedule, w_down_scale,
          w_up_scale):
    """The fused op's forward: (y, scores, ids, gates, z) by the named schedule."""
    _checks.check_choice("schedule", schedule, SCHEDULES)
    _checks.check_launchable("x", x)
    _checks.check_table_arch("w_down", w_down, _device.cuda_arch(x.device))
    x, keys, w_down, w_up = (t.contiguous() for t in (x, keys, w_down, w_up))  # queries: read through strides
    w_down_scale, w_up_scale = (None if s is None else s.contiguous() for s in (w_down_scale, w_up_scale))
    return _SCHEDULE_FORWARDS[schedule](x=x, queries=queries, keys=keys, w_down=w_down, w_up=w_up,
                                        w_down_scale=w_down_scale, w_up_scale=w_up_scale, k=k, k_sub=k_sub,
                                        gating=gating, activation=activation, id_head_offset=id_head_offset)


def fused_backward(*, dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, gating, activation, id_head_offset,
                   deterministic, sparse_grad):
    """(dx, dqueries, dkeys, dw_down, dw_up, rows): the expert stage's backward, then the
    retrieval's driven by dgates."""
    dy, x, ids, gates, z, w_down, w_up = (t.contiguous() for t in (dy, x, ids, gates, z, w_down, w_up))
    dx, dgates, dw_down, dw_up, rows = experts.launch_backward(
        dy=dy, x=x, expert_ids=ids, gates=gates, z=z, w_down=w_down, w_up=w_up, activation=activation,
        deterministic=deterministic, sparse_grad=sparse_grad)
    dqueries, dkeys = retrieval.launch_retrieve_backward(
        dscores=None, dgates=dgates, queries=queries, keys=keys, ids=ids, scores=scores, gates=gates, gating=gating,
        id_head_offset=id_head_offset)
    return dx, dqueries, dkeys, dw_down, dw_up, rows


_library.implement("fused", "triton", forward=fused, backward=fused_backward)
