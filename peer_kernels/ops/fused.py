"""peer_fused: everything after the query projection (retrieval, gating, expert mixing) as one
torch.library op, with the reference's signature (peer_kernels.reference.peer_fused).

Three forward schedules with the same outputs, saved tensors and backward:
- "overlap" (default; overlap=False turns it off): the two kernels below over chunks of tokens,
  the expert kernel of chunk c on a high-priority side stream while the retrieval of chunk c+1
  runs on the caller's, each on its own share of the SMs (overlap_schedule);
- "two_kernel" (overlap=False): retrieval with fused gating (ops/retrieval.py), then the expert
  kernel (ops/experts.py);
- "one_pass" (one_pass=True): kernels/fused.py, one launch per layer.
The default is the best static estimate at the paper's shapes on an H200; no GPU has timed any of
them yet (bench/ times all three as triton-overlap, triton-2kernel and triton-1pass, and
--profile prints each one's wall time against its kernels' summed time):
- one pass, 2.2-3.8 ms: ~200 registers at 8 warps, so one CTA per SM, runs the compute-bound
  retrieval and the memory-bound gather one after the other in each CTA and keeps ~16 KB of row
  loads in flight per SM;
- two kernels, 1.3-1.75 ms: the retrieval (~0.3-0.45 ms with level selection) and then the expert
  kernel (~7 CTAs per SM, ~112 KB in flight, 1.0-1.3 ms), one after the other;
- overlap, ~1.1-1.35 ms: the retrieval on half the SMs (~0.6-0.9 ms) hides under the gather on
  the other half (66 CTAs x 64 KB in flight at the peak of each pass, nothing between passes), plus
  the first chunk's retrieval. It is the two-kernel path when T fits one chunk (512 tokens at
  h = 8 on 132 SMs).
Saved for backward: x, queries, ids, scores, gates and z = w_down[e] . x, O(T*(d + h*(dk + k))).
The backward is the expert op's backward (dx, dgates, dw_down, dw_up; `deterministic` as there)
followed by the retrieval backward driven by dgates (dqueries, dkeys).
"""
import contextlib

import torch
import triton

from .. import _library
from .._checks import check_fused, compute_dtype
from ..kernels import fused as kernels
from . import _launch, experts, retrieval


def one_pass_config(T, heads, d, n, dk, k, k_sub, dtype, activation, gating, arch,
                    interpreted=retrieval.INTERPRETED, block_t=32):
    """(constexprs, launch options) of peer_fused_kernel: the retrieval's token tile and padding
    (ops/retrieval.retrieval_config) and the expert kernel's gather tile (_launch.gather_tile),
    whose token count MIX_T must divide the retrieval tile. dtype: the queries' (and keys') dtype,
    which sets the accumulation dtype too (float64 mixes with no other, so x accumulates alike).

    block_t = 32 tokens and 8 warps, from the SASS at the paper's shapes (bf16, h=8, n=1024, dk=128,
    k=k'=16, d=1024): 64 tokens leave T/64 = 128 programs, fewer than the SMs; 32 tokens spill on
    sm_80 at 4 warps and 16 tokens spill on sm_90 at 4 warps; 32 tokens at 8 warps spill on neither
    (triton 3.9: 212 registers on sm_90, 208 on sm_80; triton 3.6: 197 and 224) with key tiles of
    64; 128 spill on sm_80. Not yet timed on a GPU. The retrieval keeps its sorting network: level
    selection's 3 levels of keys on top of the gather's state spill inside a loop (sm_80, triton 3.6,
    n = 130).
    """
    config, launch = retrieval.retrieval_config(n, dk, k, k_sub, dtype, arch, interpreted, block_t, max_block_n=64,
                                                allow_level_select=False)
    mix_t, block_s, block_d, _ = _launch.gather_tile(T, heads * k, d, compute_dtype(dtype))
    config.update(D=d, ACTIVATION=_launch.activation_id(activation), GATING=retrieval.GATING_CODES[gating],
                  MIX_T=min(mix_t, config["BLOCK_T"]), BLOCK_S=block_s, BLOCK_D=block_d)
    return config, dict(launch, num_warps=8)


def forward_outputs(x, queries, k, gating):
    """Unwritten (y, scores, ids, gates, z) of fused_forward."""
    scores, ids, gates = retrieval.retrieve_outputs(queries, k, gating)
    y, z = experts.forward_outputs(x, ids, x.shape[1])
    return y, scores, ids, gates, z


def _one_pass(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset):
    T, h, _, dk = queries.shape
    n = keys.shape[1]
    y, scores, ids, gates, z = forward_outputs(x, queries, k, gating)
    if T == 0:
        return y, scores, ids, gates, z
    queries, (stride_t, stride_h, stride_p) = retrieval.query_strides(queries)
    config, launch = one_pass_config(T, h, x.shape[1], n, dk, k, k_sub, queries.dtype, activation, gating,
                                     _launch.cuda_arch(x.device))
    pairs = retrieval.pair_table(k, k_sub, config["P_PAD"], x.device)
    kernels.peer_fused_kernel[(triton.cdiv(T, config["BLOCK_T"]),)](
        x, queries, keys, pairs, w_down, w_up, y, scores, ids, gates, z,
        T, h, n, dk, k, stride_t, stride_h, stride_p, retrieval.key_head_stride(keys),
        id_head_offset, **launch, **config)
    return y, scores, ids, gates, z


def _two_kernel(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset):
    scores, ids, gates = retrieval.launch_retrieve(queries, keys, k, k_sub, gating, id_head_offset)
    y, z = experts.launch_forward(x, ids, gates, w_down, w_up, activation)
    return y, scores, ids, gates, z


def overlap_schedule(heads, block_t, sms):
    """(tokens per chunk, expert programs) of the overlapped forward on `sms` SMs.

    The SMs are split in space, not by dispatch order: the expert kernel runs persistent on half of
    them, one 16-warp CTA each (69-106 registers, too many for two: tests/test_fused.py asserts it
    on the sm_80 / sm_90 SASS), keeping 64 KB of 16-bit rows per pass in flight: 66 x 64 KB = 4.2
    MB on an H200, where ~4.3 TB/s at ~600 ns needs ~2.6 MB. A chunk's retrieval grid, BLOCK_T
    tokens x one head per program and one program per SM (255 registers at 8 warps), fits the
    other half: 64 programs, 512-token chunks, 16 chunks at the paper's shapes. Each stream runs
    its kernels in order, so at any time one retrieval and one expert kernel run, and together they
    fit the device whichever the block scheduler starts first."""
    programs = max(1, sms // 2)
    return block_t * max(1, (sms - programs) // heads), programs


# One side stream per device for the overlapped forward's expert kernel. High priority: where the
# split above leaves a choice (fewer SMs than it assumes), freed SMs go to the expert programs.
_MIXER_STREAMS = {}


def _mixer_stream(device):
    if device.index not in _MIXER_STREAMS:
        _MIXER_STREAMS[device.index] = torch.cuda.Stream(device=device, priority=-1)
    return _MIXER_STREAMS[device.index]


def _overlapped(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset):
    """The two kernels, chunk by chunk: the expert kernel of chunk c on the mixer stream after
    chunk c's retrieval, the retrieval of chunk c+1 on the caller's stream meanwhile. The last
    chunk's expert kernel, which nothing runs beside, takes the whole device (one program per
    tile), and a single chunk is the two-kernel path. Nothing is allocated on the mixer stream,
    and the caller's stream waits for it before returning (also on an error), so every tensor it
    touched is in use on the caller's stream until then (no record_stream needed). Off a GPU (the
    interpreter) the same chunks run in order on two "SMs": chunks of one token tile, one
    persistent expert program."""
    T, h, _, dk = queries.shape
    block_t = retrieval.retrieval_config(keys.shape[1], dk, k, k_sub, queries.dtype,
                                         _launch.cuda_arch(x.device))[0]["BLOCK_T"]
    chunk, programs = overlap_schedule(h, block_t, _launch.sm_count(x.device) if x.is_cuda else 2)
    if T <= chunk:
        return _two_kernel(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset)
    outputs = forward_outputs(x, queries, k, gating)
    y, scores, ids, gates, z = outputs
    caller = torch.cuda.current_stream() if x.is_cuda else None
    mixer = _mixer_stream(x.device) if x.is_cuda else None
    try:
        for t0 in range(0, T, chunk):
            rows = slice(t0, t0 + chunk)
            retrieval.launch_retrieve(queries[rows], keys, k, k_sub, gating, id_head_offset,
                                      out=(scores[rows], ids[rows], gates[rows]))
            with contextlib.nullcontext() if mixer is None else torch.cuda.stream(mixer):
                if mixer is not None:
                    mixer.wait_stream(caller)
                experts.launch_forward(x[rows], ids[rows], gates[rows], w_down, w_up, activation,
                                       out=(y[rows], z[rows]), programs=programs if t0 + chunk < T else None)
    finally:
        if mixer is not None:
            caller.wait_stream(mixer)
    return outputs


_SCHEDULES = {"two_kernel": _two_kernel, "one_pass": _one_pass, "overlap": _overlapped}


@_library.custom_op("fused_forward")
def fused_forward(x: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, w_down: torch.Tensor,
                  w_up: torch.Tensor, k: int, k_sub: int, gating: str, activation: str, id_head_offset: int,
                  schedule: str, deterministic: bool, sparse_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, scores, ids, gates, z); inputs validated, schedule one of _SCHEDULES."""
    _launch.check_launchable(x, kernels.peer_fused_kernel)
    x, keys, w_down, w_up = _launch.contiguous(x, keys, w_down, w_up)  # queries are read through their strides
    return _SCHEDULES[schedule](x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset)


@fused_forward.register_fake
def _(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset, schedule, deterministic,
      sparse_grad):
    return forward_outputs(x, queries, k, gating)


@_library.custom_op("fused_backward")
def fused_backward(dy: torch.Tensor, x: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                   w_down: torch.Tensor, w_up: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
                   gates: torch.Tensor, z: torch.Tensor, gating: str, activation: str, id_head_offset: int,
                   deterministic: bool, sparse_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dqueries, dkeys, dw_down, dw_up, rows), the table gradients as experts.table_grads gives them."""
    dx, dgates, dw_down, dw_up, rows = experts.launch_backward(
        *_launch.contiguous(dy, x, ids, gates, z, w_down, w_up), activation, deterministic, sparse_grad)
    dqueries, dkeys = retrieval.launch_retrieve_backward(
        None, dgates, queries, keys, ids, scores, gates, gating, id_head_offset)
    return dx, dqueries, dkeys, dw_down, dw_up, rows


@fused_backward.register_fake
def _(dy, x, queries, keys, w_down, w_up, scores, ids, gates, z, gating, activation, id_head_offset, deterministic,
      sparse_grad):
    return (*(_library.empty(t.shape, t) for t in (x, queries, keys)),
            *_library.fake_table_grads(sparse_grad, w_down, w_up))


def _setup_context(ctx, inputs, output):
    x, queries, keys, w_down, w_up, _, _, gating, activation, id_head_offset, _, deterministic, sparse_grad = inputs
    _, scores, ids, gates, z = output
    ctx.save_for_backward(x, queries, keys, w_down, w_up, scores, ids, gates, z)
    ctx.options = (gating, activation, id_head_offset, deterministic, sparse_grad)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dy, *_):
    x, queries, keys, w_down, w_up = ctx.saved_tensors[:5]
    dx, dqueries, dkeys, dw_down, dw_up, rows = fused_backward(dy, *ctx.saved_tensors, *ctx.options)
    dw_down, dw_up = _library.table_gradients(rows, ctx.options[-1], (dw_down, dw_up), (w_down, w_up))
    return dx, dqueries, dkeys, dw_down, dw_up, None, None, None, None, None, None, None, None


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def peer_fused(x, queries, keys, w_down, w_up, k, k_sub=None, gating="softmax", activation="gelu",
               separate_embed_per_head=False, sparse_grad=False, one_pass=False, overlap=None, deterministic=True):
    """Retrieval, gating and expert mixing: same contract as peer_kernels.reference.peer_fused.

    x (T, d), queries (T, h, 2, dk), keys (h or 1, n, 2, dk), w_down / w_up (S*n*n, d) -> y (T, d).
    sparse_grad=True gives the tables sparse COO gradients of the touched rows. The forward's
    schedule (see the module docstring): by default (overlap=None, or True) the retrieval of the next
    chunk of tokens runs beside the expert kernel of this one; overlap=False runs the two kernels
    one after the other; one_pass=True one kernel for both. deterministic=True makes the
    expert-table gradients bitwise reproducible (the key gradients still use atomics).
    """
    k_sub = check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head)
    if one_pass and overlap:
        raise ValueError("one_pass and overlap: expected at most one of them True, got both")
    schedule = "one_pass" if one_pass else "two_kernel" if overlap is False else "overlap"
    id_head_offset = keys.shape[1] ** 2 if separate_embed_per_head else 0
    return fused_forward(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, id_head_offset,
                         schedule, bool(deterministic), bool(sparse_grad))[0]
