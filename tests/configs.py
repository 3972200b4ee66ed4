"""Every Triton kernel configuration that something in this repository makes a GPU compile: the
launches of the ops at the shapes of the bench presets (paper, decode, smoke; the sweep on
request), of the gpu-marked tests, and of the small widths the gradchecks use, on sm_80 and sm_90,
as tests/aot.py compile jobs.

Each job mirrors one launch of peer_kernels/ops: the kernel, the constexprs and num_warps /
num_stages the tile pickers (peer_kernels.tuning) give for that architecture, the schedule the
launcher takes at that token count (tuning.token_schedule: the decode kernels for a few tokens),
the pointer dtypes (quantized tables with their scales), and the runtime ints' values, of which
those divisible by 16 are marked so (Triton specializes on that at launch). The AOT tests build
their jobs here; when a launcher changes what it launches, only this file follows.

`selectable(arch)` is the deduplicated list: tests/test_aot.py compiles it, and
bench/gpu_session.py counts, per stage of a GPU session, how many of these it will compile.
"""
import dataclasses

import torch

from peer_kernels import _checks, _device, tuning
from peer_kernels.ops import experts as experts_ops
from peer_kernels.ops import retrieval as retrieval_ops

# SMs of the devices each arch stands for (A100; H100 and H200): the decode grids and the overlapped
# forward's chunks depend on them.
SMS = {80: 108, 90: 132}
# The bench presets a GPU session runs (bench/gpu_session.py), and the sweep's shapes on request.
PRESETS = ("paper", "decode", "smoke")
# float8_e4m3fn tables need sm_89 or newer (Triton has no fp8e4nv before): no fp8 launch on sm_80
FP8_ARCH = 89


# ---- problems ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One problem as the ops see it: T tokens, h heads, n sub-keys per half, dk, k, k' (k_sub), d;
    dtype of the queries and keys, of x (None: the same; a layer in bf16 on fp32 input), of the
    tables (None: the same; int8 / float8_e4m3fn: quantized, with fp32 row scales), and of the
    expert op's given gates (None: the accumulation dtype)."""
    T: int
    h: int
    n: int
    dk: int
    k: int
    k_sub: int
    d: int
    dtype: torch.dtype = torch.bfloat16
    x_dtype: torch.dtype = None
    table_dtype: torch.dtype = None
    gates_dtype: torch.dtype = None
    gating: str = "softmax"
    activation: str = "gelu"
    ids_dtype: torch.dtype = torch.int64

    @property
    def activations(self):
        return self.x_dtype or self.dtype

    @property
    def tables(self):
        return self.table_dtype or self.dtype

    @property
    def quantized(self):
        return self.tables in _checks.QUANTIZED_DTYPES

    @property
    def acc(self):
        return _checks.compute_dtype(self.dtype)

    @property
    def gates(self):
        return self.gates_dtype or self.acc

    @property
    def slots(self):
        return self.h * self.k


PAPER = Case(T=8192, h=8, n=1024, dk=128, k=16, k_sub=16, d=1024)

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv", torch.int32: "i32", torch.int64: "i64"}


def _ptr(dtype):
    return "*" + TRITON_DTYPES[dtype]


def _job(module, kernel, arch, ptrs, ints, constexprs, num_warps, num_stages=3, disassemble=True):
    """A tests/aot.py job: `ptrs` name -> dtype (None: a constexpr None, the pointer a launch passes
    as None), `ints` name -> the value the launcher passes (kept as the job's "ints")."""
    constexprs = dict(constexprs, **{name: None for name, dtype in ptrs.items() if dtype is None})
    ptrs = {name: dtype for name, dtype in ptrs.items() if dtype is not None}
    return dict(module=f"peer_kernels.kernels.{module}", kernel=kernel, arch=arch, constexprs=constexprs,
                signature={**{name: _ptr(dtype) for name, dtype in ptrs.items()}, **{name: "i32" for name in ints}},
                aligned=list(ptrs) + [name for name, value in ints.items() if value % 16 == 0],
                disassemble=disassemble, num_warps=num_warps, num_stages=num_stages, ints=ints)


def _scales(case, *names):
    """The row-scale pointers of quantized tables (fp32), or None for float tables."""
    return {name: torch.float32 if case.quantized else None for name in names}


# ---- the launches of each op (peer_kernels/ops) ----------------------------------------------------

def _retrieval_ints(case, T):
    """The runtime ints of the retrieval kernels in the layer's default layout: queries a (T, 2, h,
    dk) projection seen as (T, h, 2, dk), keys per head, one table for all heads (no id offset)."""
    n, dk, h = case.n, case.dk, case.h
    return dict(T=T, heads=h, n=n, dk=dk, k=case.k, stride_t=2 * h * dk, stride_h=dk, stride_p=h * dk,
                key_head_stride=2 * n * dk, id_head_offset=0)


def retrieval_config(case, arch, one_pass=False):
    return tuning.retrieval_config(n=case.n, dk=case.dk, k=case.k, k_sub=case.k_sub, dtype=case.dtype, arch=arch,
                                   interpreted=False, one_pass=one_pass)


def _level_select(enabled):
    """tuning.overrides as bench's triton-network provider sets them: no level selection."""
    return tuning.overrides() if enabled else tuning.overrides(level_select=False)


def retrieval_forward(case, arch, gating, T=None, level_select=True):
    """ops/retrieval.launch_retrieve at T tokens (default: the case's): the token-tile kernel, or
    for a few tokens the key-slice and merge kernels."""
    T = T or case.T
    with _level_select(level_select):
        config, launch = retrieval_config(case, arch)
    ptrs = dict(queries_ptr=case.dtype, keys_ptr=case.dtype)
    out = dict(pairs_ptr=torch.int32, scores_ptr=case.acc, ids_ptr=torch.int64, gates_ptr=case.acc)
    ints = _retrieval_ints(case, T)
    gating_code = retrieval_ops.GATING_CODES[gating]
    if tuning.token_schedule(num_tokens=T, arch=arch) == "token_tiles":
        return [_job("retrieval", "product_key_topk_kernel", arch, dict(ptrs, **out), ints,
                     dict(config, GATING=gating_code), **launch)]
    block_n, slice_rows, slices = tuning.key_slices(num_tokens=T, heads=case.h, n=case.n, block_t=config["BLOCK_T"],
                                                    block_n=config["BLOCK_N"], ks_pad=config["KS_PAD"], sms=SMS[arch])
    ptrs["lists_ptr"] = torch.int32 if config["INDEX_BITS"] else torch.int64
    shared = {name: config[name] for name in ("BLOCK_T", "DK_PAD", "KS_PAD", "INDEX_BITS")}
    common = {name: ints[name] for name in ("T", "n", "dk", "stride_t", "stride_h", "stride_p", "key_head_stride")}
    return [_job("retrieval", "key_slice_topk_kernel", arch, ptrs, dict(common, slice_rows=slice_rows, slices=slices),
                 dict(shared, BLOCK_N=block_n, INPUT_PRECISION=config["INPUT_PRECISION"],
                      UPCAST_DOT=config["UPCAST_DOT"]), launch["num_warps"]),
            _job("retrieval", "merge_key_slices_kernel", arch, dict(ptrs, **out), dict(ints, slices=slices),
                 dict(shared, P_PAD=config["P_PAD"], K_PAD=config["K_PAD"], GATING=gating_code,
                      EXACT=config["EXACT"]), launch["num_warps"])]


def retrieval_backward(case, arch, gating, has_dscores):
    config, launch = tuning.retrieval_backward_config(dk=case.dk, k=case.k, arch=arch)
    acc = case.acc
    ptrs = dict(queries_ptr=case.dtype, keys_ptr=case.dtype, ids_ptr=torch.int64, scores_ptr=acc, gates_ptr=acc,
                dscores_ptr=acc, dgates_ptr=acc, dqueries_ptr=acc, dkeys_ptr=acc)
    return _job("retrieval", "product_key_topk_backward_kernel", arch, ptrs, _retrieval_ints(case, case.T),
                dict(config, GATING=retrieval_ops.GATING_CODES[gating], HAS_DSCORES=has_dscores), **launch,
                disassemble=False)


def _decode_tile(case, arch, T, table_dtype):
    return tuning.decode_gather_tile(num_tokens=T, slots=case.slots, dim=case.d, itemsize=table_dtype.itemsize,
                                     arch=arch, sms=SMS[arch])


def _sum_parts(arch, rows, parts, width, acc, out):
    parts_pad, block_w, num_warps = tuning.sum_parts_tile(parts=parts, width=width)
    return _job("experts", "sum_parts_kernel", arch, dict(parts_ptr=acc, out_ptr=out), {},
                dict(PARTS=parts, W=width, PARTS_PAD=parts_pad, BLOCK_W=block_w), num_warps, disassemble=False)


def experts_decode(case, arch, T, down=True, up=True):
    """ops/experts._launch_decode: z's column-block shares (down), y's slot-block shares (up) and
    the sums of the shares."""
    acc, S, d = case.acc, case.slots, case.d
    scales = _scales(case, "w_down_scale_ptr", "w_up_scale_ptr")
    jobs, z_parts = [], 1
    if down:
        block_s, block_d, num_warps = _decode_tile(case, arch, T, case.tables)
        z_parts = tuning.cdiv(d, block_d)
        jobs.append(_job("experts", "experts_decode_down_kernel", arch,
                         dict(x_ptr=case.activations, expert_ids_ptr=case.ids_dtype, w_down_ptr=case.tables,
                              w_down_scale_ptr=scales["w_down_scale_ptr"], z_parts_ptr=acc), dict(T=T),
                         dict(D_IN=d, S=S, BLOCK_S=block_s, BLOCK_D=block_d), num_warps))
    if not up:
        return jobs + [_sum_parts(arch, T, z_parts, S, acc, acc)]
    block_s, block_d, num_warps = _decode_tile(case, arch, T, case.tables)
    jobs.append(_job("experts", "experts_decode_up_kernel", arch,
                     dict(z_parts_ptr=acc, expert_ids_ptr=case.ids_dtype, gates_ptr=case.gates, w_up_ptr=case.tables,
                          w_up_scale_ptr=scales["w_up_scale_ptr"], z_ptr=acc, y_parts_ptr=acc), dict(T=T),
                     dict(D_OUT=d, S=S, Z_PARTS=z_parts, ACTIVATION=experts_ops.activation_id(case.activation),
                          PARTS_PAD=tuning.next_power_of_2(z_parts), BLOCK_S=block_s, BLOCK_D=block_d, WRITE_Z=down),
                     num_warps))
    return jobs + [_sum_parts(arch, T, tuning.cdiv(S, block_s), d, acc, case.activations)]


def experts_forward(case, arch, T=None, persistent=False, down=True, up=True):
    """ops/experts._launch_forward at T tokens: experts_fwd_kernel over token tiles (persistent:
    the overlapped forward's whole-SM programs), or for a few tokens the decode kernels."""
    T = T or case.T
    if not persistent and tuning.token_schedule(num_tokens=T, arch=arch) == "decode":
        return experts_decode(case, arch, T, down, up)
    block_t, block_s, block_d, num_warps = tuning.gather_tile(num_tokens=T, slots=case.slots, dim=case.d,
                                                              acc_dtype=case.acc, arch=arch, whole_sm=persistent)
    ptrs = dict(x_ptr=case.activations, expert_ids_ptr=case.ids_dtype, gates_ptr=case.gates, w_down_ptr=case.tables,
                w_up_ptr=case.tables, **_scales(case, "w_down_scale_ptr", "w_up_scale_ptr"), y_ptr=case.activations,
                z_ptr=case.acc)
    constexprs = dict(D_IN=case.d if down else 1, D_OUT=case.d if up else 1, S=case.slots,
                      ACTIVATION=experts_ops.activation_id(case.activation), BLOCK_T=block_t, BLOCK_S=block_s,
                      BLOCK_D=block_d, DOWN=down, UP=up, PERSISTENT=persistent)
    return [_job("experts", "experts_fwd_kernel", arch, ptrs, dict(T=T), constexprs, num_warps)]


def table_grad(case, arch, sparse=False):
    """ops/experts.reduce_table_grad for one table: the chunks' reduction and the combine of the
    runs that cross chunks. Its chunk is a runtime int whose value depends on the device's SMs
    (tuning.table_grad_tile takes a device): taken as on a CPU, only whether it is a multiple of 16,
    an alignment hint, may differ on a GPU."""
    slots = case.T * case.slots
    cpu = torch.device("cpu")
    block_n, block_d, chunk, num_warps = tuning.table_grad_tile(dim=case.d, slots=slots, device=cpu)
    sorted_ids = torch.int32 if case.n * case.n <= 2 ** 31 - 1 else torch.int64
    out_rows = torch.int64 if sparse else sorted_ids
    chunks = tuning.cdiv(slots, chunk)
    jobs = [_job("experts", "table_grad_kernel", arch,
                 dict(src_ptr=case.activations, weights_ptr=case.acc, sorted_ids_ptr=sorted_ids, order_ptr=torch.int64,
                      out_rows_ptr=out_rows, out_ptr=case.tables, partials_ptr=case.acc),
                 dict(n=slots, chunk=chunk), dict(D=case.d, S=case.slots, BLOCK_N=block_n, BLOCK_D=block_d), num_warps,
                 disassemble=False)]
    block_c, block_d, num_warps = tuning.table_grad_combine_tile(dim=case.d, device=cpu)
    jobs.append(_job("experts", "table_grad_combine_kernel", arch,
                     dict(partials_ptr=case.acc, sorted_ids_ptr=sorted_ids, out_rows_ptr=out_rows, out_ptr=case.tables),
                     dict(n=slots, chunk=chunk, chunks=chunks), dict(D=case.d, BLOCK_C=block_c, BLOCK_D=block_d),
                     num_warps, disassemble=False))
    return jobs


def experts_backward(case, arch, atomic, sparse=False, down=True, up=True):
    """ops/experts' token-major backward and, without atomics, the sorted table-gradient reduction
    (both tables share one job when they share a dtype, as they do here)."""
    block_t, block_s, block_d, num_warps = tuning.gather_tile(num_tokens=case.T, slots=case.slots, dim=case.d,
                                                              acc_dtype=case.acc, arch=arch, atomic=atomic)
    acc = case.acc
    # the launcher passes dz for the pointers a mode never reads or writes: acc dtype either way
    ptrs = dict(x_ptr=case.activations, dy_ptr=case.activations, expert_ids_ptr=case.ids_dtype, gates_ptr=case.gates,
                z_ptr=acc, w_down_ptr=case.tables, w_up_ptr=case.tables, dx_ptr=case.activations,
                dgates_ptr=case.gates, dz_ptr=acc, ga_ptr=acc, dw_down_ptr=acc, dw_up_ptr=acc)
    constexprs = dict(D_IN=case.d if down else 1, D_OUT=case.d if up else 1, S=case.slots,
                      ACTIVATION=experts_ops.activation_id(case.activation), BLOCK_T=block_t, BLOCK_S=block_s,
                      BLOCK_D=block_d, UP=up, DOWN=down, ATOMIC=atomic)
    jobs = [_job("experts", "experts_bwd_tokens_kernel", arch, ptrs, dict(T=case.T), constexprs, num_warps,
                 disassemble=False)]
    return jobs if atomic else jobs + table_grad(case, arch, sparse)


def one_pass(case, arch):
    """ops/fused._one_pass."""
    constexprs, launch = tuning.one_pass_config(num_tokens=case.T, heads=case.h, d=case.d, n=case.n, dk=case.dk,
                                                k=case.k, k_sub=case.k_sub, dtype=case.dtype, arch=arch,
                                                interpreted=False)
    constexprs.update(D=case.d, ACTIVATION=experts_ops.activation_id(case.activation),
                      GATING=retrieval_ops.GATING_CODES[case.gating])
    acc = case.acc
    ptrs = dict(x_ptr=case.activations, queries_ptr=case.dtype, keys_ptr=case.dtype, pairs_ptr=torch.int32,
                w_down_ptr=case.tables, w_up_ptr=case.tables, **_scales(case, "w_down_scale_ptr", "w_up_scale_ptr"),
                y_ptr=case.activations, scores_ptr=acc, ids_ptr=torch.int64, gates_ptr=acc, z_ptr=acc)
    return _job("fused", "peer_fused_kernel", arch, ptrs, _retrieval_ints(case, case.T), constexprs, **launch)


def optimizers(case, arch):
    """SparseAdamW's and RowwiseAdagrad's kernels on the case's tables."""
    block_d, num_warps = tuning.optim_block(dim=case.d, arch=arch)
    jobs = []
    for kernel, ptrs, floats in (
            ("sparse_adamw_kernel", dict(exp_avg_ptr=torch.float32, exp_avg_sq_ptr=torch.float32),
             ("lr", "beta1", "beta2", "eps", "weight_decay", "step_size", "bias_correction2_sqrt")),
            ("rowwise_adagrad_kernel", dict(state_ptr=torch.float32), ("lr", "eps", "weight_decay"))):
        job = _job("optim", kernel, arch, dict(param_ptr=case.tables, rows_ptr=torch.int64, grad_ptr=case.tables,
                                               **ptrs), {}, dict(D=case.d, BLOCK_D=block_d), num_warps,
                   disassemble=False)
        job["signature"].update({name: "fp32" for name in floats})
        jobs.append(job)
    return jobs


# ---- what each caller runs ---------------------------------------------------------------------------

SCHEDULES = ("two_kernel", "overlap", "one_pass")


def overlap_chunk(case, arch):
    """(tokens per chunk, persistent expert programs) of the overlapped forward (ops/fused._overlapped)."""
    block_t = retrieval_config(case, arch)[0]["BLOCK_T"]
    return tuning.overlap_schedule(heads=case.h, block_t=block_t, sms=SMS[arch])


def launched_tiles(case, device):
    """(retrieval tokens per tile, keys per tile, overlapped tokens per chunk) as the launchers pick
    them for the case's tensors on `device`: under the interpreter its tiles, and the two "SMs"
    ops/fused._overlapped plans for off a GPU."""
    config = tuning.retrieval_config(n=case.n, dk=case.dk, k=case.k, k_sub=case.k_sub, dtype=case.dtype,
                                     arch=_device.cuda_arch(device))[0]
    sms = _device.sm_count(device) if device.type == "cuda" else 2
    return config["BLOCK_T"], config["BLOCK_N"], tuning.overlap_schedule(heads=case.h, block_t=config["BLOCK_T"],
                                                                        sms=sms)[0]


def fused_forward(case, arch, schedule, level_select=True):
    """ops/fused.fused's launches on one schedule."""
    if schedule == "one_pass":
        return [one_pass(case, arch)]
    chunk, _ = overlap_chunk(case, arch)
    if schedule == "two_kernel" or case.T <= chunk:
        return (retrieval_forward(case, arch, case.gating, level_select=level_select)
                + experts_forward(case, arch))
    last = case.T % chunk or chunk
    jobs = [job for T in sorted({chunk, last})
            for job in retrieval_forward(case, arch, case.gating, T=T, level_select=level_select)]
    return jobs + experts_forward(case, arch, T=chunk, persistent=True) + experts_forward(case, arch, T=last)


def fused(case, arch, schedule, deterministic=True, sparse=False, level_select=True, backward=True):
    """ops.peer_fused: its forward on one schedule, and its backward."""
    forward = fused_forward(case, arch, schedule, level_select)
    if not backward:
        return forward
    return forward + experts_backward(case, arch, atomic=not (deterministic or sparse), sparse=sparse) + [
        retrieval_backward(case, arch, case.gating, has_dscores=False)]


def experts(case, arch, deterministic=True):
    """ops.peer_experts, forward and backward."""
    return experts_forward(case, arch) + experts_backward(case, arch, atomic=not deterministic)


def retrieval(case, arch, level_select=True):
    """ops.product_key_topk, forward and backward."""
    return (retrieval_forward(case, arch, "none", level_select=level_select)
            + [retrieval_backward(case, arch, "none", has_dscores=True)])


def layer(case, arch, backward=True, sparse=False):
    """PEER(backend="triton" / "auto") on a GPU: peer_fused's default schedule."""
    return fused(case, arch, "two_kernel", sparse=sparse, backward=backward)


def bench_provider(case, arch, op, provider):
    """The launches of one bench provider (bench/providers.py) on one op."""
    if op == "retrieval":
        return retrieval(case, arch, level_select=provider != "triton-network")
    if op == "experts":
        gated = dataclasses.replace(case, gates_dtype=case.dtype)   # bench/cases.py: gates in the bench dtype
        return experts(gated, arch, deterministic=provider != "triton-atomic")
    if op == "fused":
        schedule = {"triton-1pass": "one_pass", "triton-overlap": "overlap"}.get(provider, "two_kernel")
        return fused(case, arch, schedule, deterministic=provider != "triton-atomic",
                     level_select=provider != "triton-network")
    if op == "decode":   # the layer in inference (no query norm): forward only
        if provider == "token-tiles":
            with tuning.overrides(decode_tokens=0):
                return layer(case, arch, backward=False)
        if provider == "fp8" and arch < FP8_ARCH:
            return []
        tables = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(provider)
        return layer(dataclasses.replace(case, table_dtype=tables), arch, backward=False)
    if op == "layer":
        return layer(case, arch)
    # the training step: the layer, and the row-sparse optimizers on its sparse table gradients
    sparse = provider in ("sparse-adamw", "rowwise-adagrad", "torch-sparse-adam")
    return layer(case, arch, sparse=sparse) + (optimizers(case, arch) if provider in ("sparse-adamw",
                                                                                      "rowwise-adagrad") else [])


TRITON_PROVIDERS = {"retrieval": ("triton", "triton-network"), "experts": ("triton", "triton-atomic"),
                    "fused": ("triton-1pass", "triton-2kernel", "triton-overlap", "triton-atomic", "triton-network"),
                    "layer": ("triton",), "step": ("adamw", "sparse-adamw", "rowwise-adagrad", "torch-sparse-adam"),
                    "decode": ("decode", "token-tiles", "int8", "fp8")}


def bench_case(shape):
    """A bench/cases.py Shape as a Case."""
    return Case(T=shape.T, h=shape.h, n=shape.n, dk=shape.dk, k=shape.k, k_sub=shape.k_sub, d=shape.d,
                dtype=shape.torch_dtype, gating=shape.gating, activation=shape.activation)


def bench(preset, arch, ops=None, providers=None):
    """The launches of a bench preset (bench/cases.py PRESETS value): its shapes x ops x the Triton
    providers among `providers` (default: all)."""
    jobs = []
    for shape in preset.shapes:
        case = bench_case(shape)
        for op in ops or preset.ops:
            for provider in TRITON_PROVIDERS[op]:
                if providers is None or provider in providers:
                    jobs += bench_provider(case, arch, op, provider)
    return unique(jobs)


def gpu_tests(arch):
    """The launches of each gpu-marked test at its GPU sizes: test id -> jobs (tests/test_*.py,
    `@pytest.mark.gpu`; test_csrc's runs no Triton kernel)."""
    tests = {}
    for T, schedule in ((300, "one_pass"), (300, "two_kernel"), (3000, "overlap")):
        fp32 = Case(T=T, h=4, n=100, dk=64, k=16, k_sub=16, d=256, dtype=torch.float32)
        tests[f"test_fused.py::test_gpu_float32_at_many_tiles[{schedule}]"] = fused(fp32, arch, schedule)
    paper = dataclasses.replace(PAPER, T=2048)
    tests["test_fused.py::test_gpu_bfloat16_at_paper_shapes"] = retrieval_forward(paper, arch, "none") + [
        job for schedule in SCHEDULES for job in fused(paper, arch, schedule)]
    large = Case(T=4, h=2, n=725, dk=16, k=4, k_sub=4, d=4096, gates_dtype=torch.float32)
    tests["test_experts.py::test_large_row_offsets"] = [job for deterministic in (True, False)
                                                        for job in experts(large, arch, deterministic)]
    tests["test_experts.py::test_torch_compile_inductor"] = experts(
        Case(T=64, h=4, n=32, dk=16, k=8, k_sub=8, d=128, dtype=torch.float32), arch)
    # fp32 PEER layers: usage tracking and grow run forwards only, the training step its backward too
    for name, (T, h, n, dk, k, backward) in {
            "test_instruments.py::test_tracking_never_waits_for_the_device": (256, 4, 64, 32, 8, False),
            "test_instruments.py::test_grow_on_the_device": (5, 3, 8, 8, 4, False),
            "test_training.py::test_cuda_graph_capture_of_a_training_step": (128, 2, 6, 8, 3, True)}.items():
        tests[name] = layer(Case(T=T, h=h, n=n, dk=dk, k=k, k_sub=k, d=16, dtype=torch.float32), arch,
                            backward=backward)
    # a bf16 layer's decode steps: peer_kernels.warmup's in the layer's dtype, then fp32 input
    for T in (1, 8):
        step = Case(T=T, h=2, n=16, dk=16, k=4, k_sub=4, d=32)
        tests[f"test_decode.py::test_decode_step_is_cuda_graph_capturable[{T}]"] = [
            job for x_dtype in (None, torch.float32)
            for job in layer(dataclasses.replace(step, x_dtype=x_dtype), arch, backward=False)]
    # greedy generation of a tiny Llama: the prompt (2 x 7 tokens), then 2 tokens per step
    variants = {"float": None, "int8": torch.int8, **({"fp8": torch.float8_e4m3fn} if arch >= FP8_ARCH else {})}
    for label, tables in variants.items():
        model = Case(T=14, h=2, n=8, dk=8, k=4, k_sub=4, d=32, dtype=torch.float32, table_dtype=tables)
        tests[f"test_generation.py::test_cuda_graph_generation[{label}]"] = [
            job for T in (14, 2) for job in layer(dataclasses.replace(model, T=T), arch, backward=False)]
    return {name: unique(jobs) for name, jobs in tests.items()}


def small_widths(arch):
    """k' <= 4 and float64 (the gradchecks' and the differential test's tiny layers), where tl.gather
    had no warp-local layout under triton 3.4 / 3.6 (kernels/retrieval._take): the retrieval over
    token tiles and the one-pass kernel."""
    jobs = []
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for k, k_sub in ((1, 1), (4, 2), (3, 4)):
            case = Case(T=500, h=2, n=13, dk=24, k=k, k_sub=k_sub, d=24, dtype=dtype)
            jobs += retrieval_forward(case, arch, "softmax") + [one_pass(case, arch)]
    return jobs


def selectable(arch, sweep=False):
    """Every job above for one arch, each once, in a stable order: the gpu-marked tests, the small
    widths and the bench presets a GPU session runs (PRESETS), with the sweep preset's shapes but
    its first (the paper's) when `sweep`."""
    from bench.cases import PRESETS as presets

    jobs = [job for jobs in gpu_tests(arch).values() for job in jobs] + small_widths(arch)
    for name in PRESETS + (("sweep",) if sweep else ()):
        jobs += bench(presets[name], arch)
    return unique(jobs)


def key(job, alignment=True):
    """What makes two jobs one compile (aot.compile_kernel's inputs); without `alignment`, what makes
    them one variant: jobs that differ only in which runtime ints are multiples of 16 compile alike
    but for the hints."""
    return (job["module"], job["kernel"], job["arch"], job["num_warps"], job["num_stages"],
            tuple(sorted(job["signature"].items())), tuple(sorted(job["constexprs"].items())),
            tuple(sorted(job["aligned"])) if alignment else ())


def unique(jobs, alignment=True):
    """The jobs, each compile (or with alignment=False each variant) once, in their order."""
    seen, out = set(), []
    for job in jobs:
        if key(job, alignment) not in seen:
            seen.add(key(job, alignment))
            out.append(job)
    return out
