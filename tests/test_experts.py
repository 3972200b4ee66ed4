"""peer_kernels.ops.peer_experts (the fused Triton expert kernels) against the reference oracle.

Without a GPU the kernels run under the interpreter on tiny shapes; test_aot_* compile every kernel and
block configuration the launchers can pick for sm_80 / sm_90 and check the SASS.
"""
import collections
import dataclasses

import numpy as np
import pytest
import torch

import aot
import configs
from conftest import DEVICE, gpu_sizes
from peer_kernels import _device, reference, tuning
from peer_kernels._checks import compute_dtype
from peer_kernels.kernels import experts as kernels
from peer_kernels.ops import experts as ops
from peer_kernels.ops import peer_experts
import bounds
from utils import poison_empty, random_ids

ACTIVATIONS = reference.ACTIVATIONS


def make_inputs(T=6, h=3, k=5, d=40, rows=23, dtype=torch.float32, ids_dtype=torch.int64, gates_dtype=None):
    """Fresh random inputs with the duplicates the gradients must sum: token 0 picks one expert in two
    heads, a third of the tokens share one expert, and the table's last row is used."""
    x = torch.randn(T, d, device=DEVICE, dtype=dtype)
    if T * h * k == 0:
        expert_ids = torch.zeros((T, h, k), device=DEVICE, dtype=ids_dtype)
    else:
        expert_ids = random_ids(T, h, k, rows, device=DEVICE, dtype=ids_dtype)
    if T and h > 1 and k > 2:
        expert_ids[0, 1, 2] = expert_ids[0, 0, 0]
        expert_ids[::3, -1, -1] = 7 % rows
    gates = torch.rand(T, h, k, device=DEVICE, dtype=gates_dtype or dtype) + 0.1
    w_down = torch.randn(rows, d, device=DEVICE, dtype=dtype)
    w_up = torch.randn(rows, d, device=DEVICE, dtype=dtype)
    return x, expert_ids, gates, w_down, w_up


NAMES = ("y", "dx", "dgates", "dw_down", "dw_up")


def forward_and_grads(fn, x, expert_ids, gates, w_down, w_up, dy=None, **kwargs):
    """{y, dx, dgates, dw_down, dw_up} of fn with dy (fresh random if None) as the output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, w_down, w_up)]
    y = fn(leaves[0], expert_ids, leaves[1], leaves[2], leaves[3], **kwargs)
    dy = torch.randn_like(y) if dy is None else dy
    return dict(zip(NAMES, (y, *torch.autograd.grad(y, leaves, dy)))), dy


def exact(x, expert_ids, gates, w_down, w_up, dy, activation="gelu"):
    """name -> (float64 value, S) on the same inputs (see tests/bounds.py)."""
    return bounds.experts(x.double(), expert_ids, gates.double(), w_down.double(), w_up.double(), dy.double(),
                          activation)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_reference(dtype, activation, deterministic, monkeypatch):
    inputs = make_inputs(dtype=dtype)
    poison_empty(monkeypatch)
    actual, dy = forward_and_grads(peer_experts, *inputs, activation=activation, deterministic=deterministic)
    assert [t.dtype for t in actual.values()] == [dtype] * 5
    bounds.check_all(actual, exact(*inputs, dy, activation))


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(5, 1, 1, 16, 4), (3, 2, 8, 64, 50), (9, 4, 3, 24, 1)],
                         ids=["hk1", "hk16", "one_row"])
def test_shapes_and_id_dtypes(shape, ids_dtype, monkeypatch):
    """h*k = 1 (several tokens per program), a power-of-two h*k, and a one-row table (every slot of
    every token hits the same expert)."""
    T, h, k, d, rows = shape
    inputs = make_inputs(T, h, k, d, rows, ids_dtype=ids_dtype)
    poison_empty(monkeypatch)
    for deterministic in (False, True):
        actual, dy = forward_and_grads(peer_experts, *inputs, deterministic=deterministic)
        bounds.check_all(actual, exact(*inputs, dy))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16", "bf16-x-fp32-tables", "fp32-x-bf16-tables"])
def test_half_precision_and_mixed(dtypes, monkeypatch):
    """16-bit activations and/or tables with fp32 gates, accumulated in fp32: within the fp32 bound
    of the float64 oracle on the same (rounded) inputs, plus the final rounding of 16-bit results.
    x in 16 bits with fp32 tables is mixed precision (autocast); tables are read as stored."""
    x_dtype, table_dtype = dtypes
    x, expert_ids, gates, w_down, w_up = make_inputs(T=8, h=2, k=4, d=32, rows=11, gates_dtype=torch.float32)
    x, w_down, w_up = x.to(x_dtype), w_down.to(table_dtype), w_up.to(table_dtype)
    poison_empty(monkeypatch)
    for deterministic in (False, True):
        actual, dy = forward_and_grads(peer_experts, x, expert_ids, gates, w_down, w_up, deterministic=deterministic)
        assert [t.dtype for t in actual.values()] == [x_dtype, x_dtype, torch.float32, table_dtype, table_dtype]
        bounds.check_all(actual, exact(x, expert_ids, gates, w_down, w_up, dy))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gradcheck(deterministic):
    x, expert_ids, gates, w_down, w_up = make_inputs(T=2, h=2, k=2, d=4, rows=3, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, gates, w_down, w_up)]

    def fn(x, gates, w_down, w_up):
        return peer_experts(x, expert_ids, gates, w_down, w_up, "gelu", deterministic)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_gradcheck_activations(activation):
    x, expert_ids, gates, w_down, w_up = make_inputs(T=3, h=2, k=3, d=8, rows=5, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, gates, w_down, w_up)]
    assert torch.autograd.gradcheck(
        lambda *a: peer_experts(a[0], expert_ids, a[1], a[2], a[3], activation), args, fast_mode=True)


def test_deterministic_is_bitwise_reproducible():
    inputs = make_inputs(T=16, h=4, k=4, d=24, rows=6)   # ~43 slots per row: long sorted segments
    first, dy = forward_and_grads(peer_experts, *inputs, deterministic=True)
    second, _ = forward_and_grads(peer_experts, *inputs, dy=dy, deterministic=True)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name
    bounds.check_all(first, exact(*inputs, dy))


@pytest.mark.parametrize("rows", [1, 3, 500], ids=["all-one-row", "long-runs", "short-runs"])
def test_sorted_reduction_across_chunks(rows):
    """The segmented reduction's programs own chunks of the sorted slots (4 chunks here): runs of one
    row that cross chunk boundaries (a row used by hundreds of slots), a single row, and rows used
    once or twice. Bitwise reproducible, within the bound of the oracle, untouched rows exactly 0."""
    inputs = make_inputs(T=32, h=4, k=4, d=24, rows=rows)
    first, dy = forward_and_grads(peer_experts, *inputs)
    second, _ = forward_and_grads(peer_experts, *inputs, dy=dy)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name
    bounds.check_all(first, exact(*inputs, dy))
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[inputs[1].unique()] = False
    assert not first["dw_down"][untouched].any() and not first["dw_up"][untouched].any()


# --- the table-gradient reduction alone (ops/experts.reduce_table_grad) ---------------------------

# Small tiles and many chunks under the interpreter: chunks of a few dozen sorted slots, 4 windows of
# slots each, and 12 chunks combined 4 at a time, so that runs cross chunks and combine windows.
SMALL_TABLE_GRAD = dict(table_grad_values=256, table_grad_programs_per_sm=12, table_grad_combine_columns=64)


def run_lengths(layout, n, chunk):
    """Lengths of the runs of equal rows in sorted order (summing to n) of one layout of the slots."""
    runs = {
        "one-row": [n],                                                     # one run across every chunk
        "long-and-singletons": [n // 3, 1, 1, n // 5, 2],
        "chunk-boundaries": [chunk, 2 * chunk, chunk, 3 * chunk],           # runs that begin and end at them
        # over exactly two chunks (mid to mid); over three, ending on the first position of the third
        "two-chunks": [chunk // 2, chunk, chunk + chunk // 2 + 1],
    }[layout]
    return runs + [1] * (n - sum(runs))


def table_grad_inputs(lengths, d, dtype, slots=5):
    """(src, weights, table, expert_ids) whose sorted slots have runs of these lengths, run i on row
    2i + 1 (the even rows untouched), the slots shuffled over (T, 1, slots)."""
    n = sum(lengths)
    ids = torch.cat([torch.full((length,), 2 * i + 1) for i, length in enumerate(lengths)])
    expert_ids = ids[torch.randperm(n)].reshape(n // slots, 1, slots)
    src = torch.randn(n // slots, d, dtype=dtype)
    weights = torch.randn(n // slots, 1, slots, dtype=compute_dtype(dtype))
    return src, weights, torch.zeros(2 * len(lengths) + 1, d, dtype=dtype), expert_ids


def check_table_grad(grad, rows, src, weights, table, expert_ids, sparse):
    """Against the float64 sum, S the sum of |weight * src| over each row's slots."""
    ids = expert_ids.reshape(-1)
    terms = weights.reshape(-1, 1).double() * src.double().repeat_interleave(expert_ids[0].numel(), 0)
    exact = torch.zeros(table.shape, dtype=torch.float64).index_add_(0, ids, terms)
    magnitude = torch.zeros(table.shape, dtype=torch.float64).index_add_(0, ids, terms.abs())
    if sparse:
        assert torch.equal(rows, ids.unique())
        exact, magnitude = exact[rows], magnitude[rows]
    else:
        assert rows.numel() == 0 and grad.shape == table.shape
    assert grad.dtype == table.dtype
    bounds.check("table gradient", grad, exact, magnitude)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("layout, dtype", [
    ("one-row", torch.float32), ("long-and-singletons", torch.float32), ("chunk-boundaries", torch.float32),
    ("two-chunks", torch.float32), ("one-row", torch.float64), ("chunk-boundaries", torch.bfloat16),
    ("long-and-singletons", torch.bfloat16)], ids=lambda v: str(v).removeprefix("torch."))
def test_table_grad_runs_across_chunks(layout, dtype, sparse, monkeypatch):
    """Runs that cross chunks (each chunk summed alone, the parts combined in chunk order): one run
    over all 12 chunks and 3 combine windows, long runs among singletons, runs that begin and end
    exactly at chunk boundaries, a run over exactly two chunks; n not a multiple of the chunk, d not
    of the column tiles. Bitwise reproducible, within the bound of the float64 sum, untouched rows
    exactly 0 (dense) or absent (sparse), no unwritten output or part read (NaN-poisoned)."""
    n, d = 250, 40
    with tuning.overrides(**SMALL_TABLE_GRAD):
        _, _, chunk, _ = tuning.table_grad_tile(dim=d, slots=n, device=DEVICE)
        assert tuning.cdiv(n, chunk) == 11 and n % chunk
        src, weights, table, expert_ids = table_grad_inputs(run_lengths(layout, n, chunk), d, dtype)
        poison_empty(monkeypatch)
        (first,), rows = ops.table_grads([(src, weights, table)], expert_ids, sparse)
        (second,), _ = ops.table_grads([(src, weights, table)], expert_ids, sparse)
    assert torch.equal(first, second)
    check_table_grad(first, rows, src, weights, table, expert_ids, sparse)
    if not sparse:
        assert not first[0::2].any()


class _Recording:
    """Stands in for a kernel: records each launch's grid and arguments and, per program, the loads
    of the argument `watch` (see _count_loads). That argument (read-only in the kernel) is passed as
    a copy in a padded buffer of its own, so that no other tensor's address lies in or beside it."""
    PAD = 4096

    def __init__(self, kernel, watch, watched):
        self.kernel, self.watch, self.watched, self.launches = kernel, watch, watched, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            tensor = kwargs[self.watch]
            padded = torch.zeros(tensor.numel() + 2 * self.PAD, dtype=tensor.dtype)
            kwargs[self.watch] = padded[self.PAD:self.PAD + tensor.numel()].view(tensor.shape).copy_(tensor)
            reads = collections.defaultdict(list)
            self.launches.append((grid, kwargs, reads))
            self.watched.append((padded, self.PAD, tensor.numel(), reads))
            try:
                self.kernel[grid](**kwargs)
            finally:
                self.watched.pop()
        return launch


def _count_loads(monkeypatch, watched):
    """Makes the interpreter record every load of each program (x, y) that points into the padded
    buffer on top of `watched` (masked lanes too: a window whose lanes are all masked off is still an
    iteration), as the element offsets in the watched tensor that its unmasked lanes read."""
    from triton.runtime import interpreter
    real = interpreter.InterpreterBuilder.create_masked_load

    def load(builder, ptrs, mask, *args):
        if watched:
            padded, pad, numel, reads = watched[-1]
            offsets = (ptrs.data.astype(np.int64) - padded.data_ptr()) // padded.element_size()
            if ((offsets >= 0) & (offsets < padded.numel())).any():
                read = (offsets >= pad) & (offsets < pad + numel) & np.broadcast_to(mask.data, ptrs.data.shape)
                reads[builder.grid_idx[:2]].append(np.unique(offsets[read] - pad))
        return real(builder, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)


@pytest.mark.skipif(not _device.INTERPRETED, reason="counts the interpreter's loads")
def test_table_grad_work_per_program_is_bounded(monkeypatch):
    """Collapsed routing (every slot on one row: one run of all n slots). Counted in the interpreter:
    each program (chunk, column block) of the first kernel reads the slot order of its own chunk's
    positions and no other, one load per window, cdiv(chunk, BLOCK_N) windows; each combine program
    reads the (chunks, 2, d) parts in cdiv(chunks, BLOCK_C) windows. A walk of the run by the program
    it begins in (as before issue 23) reads all n positions there. d = 300: two column blocks of
    the first kernel, five of the combine, the last ones partial."""
    n, d = 65, 300
    watched = []
    _count_loads(monkeypatch, watched)
    main = _Recording(kernels.table_grad_kernel, "order_ptr", watched)
    combine = _Recording(kernels.table_grad_combine_kernel, "partials_ptr", watched)
    monkeypatch.setattr(kernels, "table_grad_kernel", main)
    monkeypatch.setattr(kernels, "table_grad_combine_kernel", combine)
    with tuning.overrides(**SMALL_TABLE_GRAD):
        block_n, block_d, chunk, _ = tuning.table_grad_tile(dim=d, slots=n, device=DEVICE)
        block_c, combine_d, _ = tuning.table_grad_combine_tile(dim=d, device=DEVICE)
        src, weights, table, expert_ids = table_grad_inputs([n], d, torch.float32)
        (grad,), rows = ops.table_grads([(src, weights, table)], expert_ids, sparse=False)
    check_table_grad(grad, rows, src, weights, table, expert_ids, sparse=False)
    chunks = tuning.cdiv(n, chunk)
    assert (block_n, chunk, chunks, block_c) == (2, 6, 11, 4)        # the shape this test means to cover

    [(grid, args, reads)] = main.launches
    assert tuple(grid) == (chunks, tuning.cdiv(d, block_d)) == (11, 2)
    assert args["partials_ptr"].shape == (chunks, 2, d)
    assert sorted(reads) == [(p, c) for p in range(chunks) for c in range(grid[1])]
    for (p, c), loads in reads.items():
        own = np.arange(p * chunk, min(n, (p + 1) * chunk))
        assert len(loads) == tuning.cdiv(own.size, block_n), (p, c)
        assert np.array_equal(np.concatenate(loads), own), (p, c)

    [(grid, args, reads)] = combine.launches
    assert tuple(grid) == (tuning.cdiv(d, combine_d),) == (5,)
    windows = tuning.cdiv(chunks, block_c)
    assert sorted(reads) == [(c, 0) for c in range(grid[0])]
    for program, loads in reads.items():
        # each window loads its chunks' head parts and the tail parts of the chunks before them
        assert len(loads) == 2 * windows, program


def saved_bytes(fn, x, expert_ids, gates, w_down, w_up):
    """Bytes autograd saves for backward, parameters (the tables) excluded."""
    params = {w_down.data_ptr(), w_up.data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, expert_ids, gates, w_down, w_up)
    return total


def test_saved_tensors_are_linear_in_tokens():
    T, h, k, d = 16, 4, 8, 64
    x, expert_ids, gates, w_down, w_up = make_inputs(T, h, k, d, rows=40)
    x.requires_grad_()
    gates.requires_grad_()
    w_down, w_up = torch.nn.Parameter(w_down), torch.nn.Parameter(w_up)
    gathered = T * h * k * d * x.element_size()     # one (T, h, k, d) tensor
    bound = T * (d * x.element_size() + h * k * 3 * 8)  # x; ids, gates and z at <= 8 bytes each
    ours = saved_bytes(peer_experts, x, expert_ids, gates, w_down, w_up)
    assert 0 < ours <= bound < gathered / 4
    # the measurement sees the oracle's gathered rows: the bound is one the test can fail
    assert saved_bytes(reference.peer_experts, x, expert_ids, gates, w_down, w_up) > gathered


def test_non_contiguous_inputs():
    x, expert_ids, gates, w_down, w_up = make_inputs(T=5, h=2, k=3, d=16, rows=9)
    x_nc = x.t().contiguous().t()                              # column-major
    ids_nc = expert_ids.transpose(1, 2).contiguous().transpose(1, 2)
    gates_nc = torch.stack([gates, gates], -1)[..., 0]          # strided last dim
    w_up_nc = w_up.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (x_nc, ids_nc, gates_nc, w_up_nc))
    dy = torch.randn(5, 16).t().contiguous().t()
    actual, _ = forward_and_grads(peer_experts, x_nc, ids_nc, gates_nc, w_down, w_up_nc, dy=dy)
    assert all(t.is_contiguous() for t in actual.values())
    bounds.check_all(actual, exact(x, expert_ids, gates, w_down, w_up, dy))


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched")


@pytest.mark.parametrize("empty", ["tokens", "slots"])
def test_empty_launches_nothing(empty, monkeypatch):
    T, k = (0, 3) if empty == "tokens" else (4, 0)
    inputs = make_inputs(T=T, h=2, k=k, d=8, rows=5)
    expected, dy = forward_and_grads(reference.peer_experts, *inputs)
    for name in ("experts_fwd_kernel", "experts_bwd_tokens_kernel", "table_grad_kernel", "table_grad_combine_kernel"):
        monkeypatch.setattr(kernels, name, _NoLaunch())
    for deterministic in (False, True):
        actual, _ = forward_and_grads(peer_experts, *inputs, dy=dy, deterministic=deterministic)
        for name in NAMES:
            assert actual[name].shape == expected[name].shape, name
            assert not actual[name].any(), name   # nothing to sum: exact zeros


def test_bad_inputs_raise_before_launch(monkeypatch):
    x, expert_ids, gates, w_down, w_up = make_inputs(T=4, h=2, k=2, d=8, rows=5)
    monkeypatch.setattr(kernels, "experts_fwd_kernel", _NoLaunch())
    cases = [
        (ValueError, "expert_ids", (x, expert_ids + 5, gates, w_down, w_up, "gelu")),
        (ValueError, "expert_ids", (x, expert_ids - 5, gates, w_down, w_up, "gelu")),
        (TypeError, "expert_ids", (x, expert_ids.float(), gates, w_down, w_up, "gelu")),
        (ValueError, "gates", (x, expert_ids, gates[:, :1], w_down, w_up, "gelu")),
        (TypeError, "w_up", (x, expert_ids, gates, w_down, w_up.double(), "gelu")),
        (ValueError, "w_down", (x, expert_ids, gates, w_down[:, :4], w_up, "gelu")),
        (ValueError, "activation", (x, expert_ids, gates, w_down, w_up, "tanh")),
        (TypeError, "x", (x.tolist(), expert_ids, gates, w_down, w_up, "gelu")),
    ]
    for error, name, args in cases:
        with pytest.raises(error, match=name):
            peer_experts(*args)


def test_needs_cuda_without_interpreter(monkeypatch):
    inputs = make_inputs(T=2, h=1, k=2, d=8, rows=5)
    monkeypatch.setattr(_device, "INTERPRETED", False)
    if DEVICE.type == "cuda":
        inputs = [t.cpu() for t in inputs]
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        peer_experts(*inputs)


def test_torch_compile_fullgraph():
    """torch.compile traces through the custom op without a graph break, forward and backward. The
    aot_eager backend runs the traced graph without inductor codegen (tests/test_training.py runs a
    whole compiled training step with inductor too)."""
    inputs = make_inputs(T=4, h=2, k=3, d=16, rows=7)
    torch._dynamo.reset()
    compiled = torch.compile(peer_experts, fullgraph=True, backend="aot_eager")
    actual, dy = forward_and_grads(compiled, *inputs)
    bounds.check_all(actual, exact(*inputs, dy))


@pytest.mark.gpu
def test_torch_compile_inductor():
    T, h, k, d, rows = gpu_sizes((64, 4, 8, 128, 1000), (4, 2, 3, 16, 7))
    inputs = make_inputs(T=T, h=h, k=k, d=d, rows=rows)
    torch._dynamo.reset()
    compiled = torch.compile(peer_experts, fullgraph=True)
    actual, dy = forward_and_grads(compiled, *inputs)
    bounds.check_all(actual, exact(*inputs, dy))


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_memory")   # tens of GB (the atomics' fp32 scratch): not beside the paper shapes' test
def test_large_row_offsets():
    """ids * d beyond 2**31 elements: a (2**19 + 64, 4096) table, ~4.3 GB in bf16; the oracle reads
    the touched rows only."""
    rows, d, near_end = gpu_sizes((2 ** 19 + 64, 4096, 1000), (300, 64, 100))
    w_down = torch.randn(rows, d, device=DEVICE, dtype=torch.bfloat16)
    w_up = torch.randn(rows, d, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(4, d, device=DEVICE, dtype=torch.bfloat16)
    expert_ids = torch.randint(rows - near_end, rows, (4, 2, 4), device=DEVICE)
    gates = torch.rand(4, 2, 4, device=DEVICE)
    used, local, (down, up) = bounds.touched_rows(expert_ids, w_down, w_up)
    for deterministic in (False, True):
        actual, dy = forward_and_grads(peer_experts, x, expert_ids, gates, w_down, w_up, deterministic=deterministic)
        expected = exact(x, local, gates, down, up, dy)
        expected.update({name: (*expected[name], used) for name in ("dw_down", "dw_up")})
        bounds.check_all(actual, expected)


# --- AOT compilation for real GPU targets -------------------------------------------------------

# (case, halves): the paper's shapes (and the halves apart, on sm_90 only); h*k = 1 (64 tokens per
# program) with d % 8 == 0 but not % 16, fp16 and int32 ids; bf16 x with fp32 tables; odd h*k and d
# in fp32 and in fp64 (gradcheck on GPU), at more tokens than the decode schedule takes.
AOT_CASES = [
    (configs.PAPER, True),
    (configs.Case(T=8192, h=1, n=1024, dk=128, k=1, k_sub=1, d=1000, dtype=torch.float16, ids_dtype=torch.int32,
                  activation="silu"), False),
    (dataclasses.replace(configs.PAPER, table_dtype=torch.float32), False),
    (configs.Case(T=512, h=3, n=5, dk=16, k=5, k_sub=5, d=40, dtype=torch.float32, activation="gelu_tanh"), False),
    (configs.Case(T=512, h=3, n=5, dk=16, k=5, k_sub=5, d=40, dtype=torch.float64), False),
]


def aot_jobs(case, arch, halves):
    """ops/experts.py's launches for a case: the forward and the backward, atomic or sorted (with
    the table-gradient reduction); with halves, also peer_down's and peer_mix's."""
    jobs = configs.experts_forward(case, arch)
    for atomic in (True, False):
        jobs += configs.experts_backward(case, arch, atomic)
    if halves:   # only the whole forward is disassembled (~1 s each); the halves' spills show in LOCAL bytes
        for down, up in ((True, False), (False, True)):
            jobs += [dict(job, disassemble=False) for job in configs.experts_forward(case, arch, down=down, up=up)]
            for atomic in (True, False):
                jobs += configs.experts_backward(case, arch, atomic, down=down, up=up)
    return configs.unique(jobs)


@pytest.fixture(scope="module")
def aot_results():
    jobs = [job for case, halves in AOT_CASES for arch in aot.ARCHS
            for job in aot_jobs(case, arch, halves and arch == 90)]
    return list(zip(jobs, aot.compile_report(jobs)))


@pytest.mark.aot
def test_aot_compiles_without_spills(aot_results):
    # per case and arch: forward, two token-major backwards (atomic or not), the sorted reduction's two kernels;
    # the paper's shape on sm_90 adds the two halves' forwards and backwards
    assert len(aot_results) == len(AOT_CASES) * len(aot.ARCHS) * 5 + 6
    for job, stats in aot_results:
        assert stats["local_bytes"] == 0 and stats.get("stl", 0) == stats.get("ldl", 0) == 0, (aot.describe(job), stats)
        assert 0 < stats["registers"] <= 255, aot.describe(job)
        # the deterministic kernels must not touch gradient data with atomics
        atomic = job["constexprs"].get("ATOMIC", False)
        assert (stats["atomics"] > 0) == atomic, (aot.describe(job), stats)


@pytest.mark.aot
def test_aot_table_grad_programs_fit_their_sms(aot_results):
    """The sorted reduction's grid is table_grad_programs_per_sm chunks per SM per column block, each
    chunk the same work whatever the routing: at the paper's shapes its registers leave room for that
    many programs of a column block on an SM at once, on sm_80 and sm_90."""
    checked = 0
    for job, stats in aot_results:
        if job["kernel"] != "table_grad_kernel" or job["constexprs"]["D"] != 1024:
            continue
        programs = tuning.tiles(job["arch"]).table_grad_programs_per_sm
        assert aot.ctas_per_sm(stats["registers"], job["num_warps"]) >= programs, (aot.describe(job), stats)
        checked += 1
    assert checked == 2 * len(aot.ARCHS)   # bf16, and bf16 x with fp32 tables


@pytest.mark.aot
def test_aot_forward_gathers_rows_with_128bit_loads(aot_results):
    """bf16/fp16 with d % 8 == 0: every thread loads its share of each table chunk as 8-element
    (128-bit) vectors, so a loop body issues tile / (threads * 8) LDG.E.128 per table."""
    checked = 0
    for job, stats in aot_results:
        if job["kernel"] != "experts_fwd_kernel":
            continue
        c = job["constexprs"]
        if job["signature"]["w_down_ptr"] not in ("*bf16", "*fp16") or c["D_IN"] % 8 or not job["disassemble"]:
            continue
        per_table = c["BLOCK_T"] * c["BLOCK_S"] * c["BLOCK_D"] // (32 * job["num_warps"] * 8)
        assert stats["ldg128"] >= 2 * per_table, (aot.describe(job), stats)
        checked += 1
    assert checked == 2 * len(aot.ARCHS)


@pytest.mark.aot
def test_aot_forward_keeps_enough_bytes_in_flight(aot_results):
    """The gather is latency-bound unless many row loads are in flight: ~4.3 TB/s at ~600 ns on 132
    SMs needs >= 32 KB per SM (issue 15). The paper-shape forward issues a whole (BLOCK_T, BLOCK_S,
    BLOCK_D) row tile of loads per pass (the 128-bit loads asserted above) and fits enough CTAs per
    SM for that tile times the CTAs to pass 32 KB, on sm_80 and sm_90."""
    checked = 0
    for job, stats in aot_results:
        c = job["constexprs"]
        if job["kernel"] != "experts_fwd_kernel" or c["D_IN"] != 1024 or c["S"] != 128 or not job["disassemble"]:
            continue
        itemsize = 2 if job["signature"]["w_down_ptr"] in ("*bf16", "*fp16") else 4
        tile_bytes = c["BLOCK_T"] * c["BLOCK_S"] * c["BLOCK_D"] * itemsize
        resident = aot.ctas_per_sm(stats["registers"], job["num_warps"])
        assert resident * tile_bytes >= 32 * 1024, (aot.describe(job), stats["registers"], resident, tile_bytes)
        checked += 1
    assert checked == 2 * len(aot.ARCHS)   # bf16 tables, and bf16 x with fp32 tables
