"""The C++ backend (csrc_reference/, peer_kernels.csrc) against the reference, peer-pytorch and the
Triton ops; its tie rule, bad ids, the fallback when it does not build, and the CUDA source compiling.
Its build cache under faults (killed builds, damaged or read-only caches): tests/test_faults.py.

The extension is built once per machine (about a minute on 2 cores) and cached by torch; the
session fixture loads it, or skips the tests that need it with the reason.
"""
import functools
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import peer_kernels
from peer_kernels import backends, csrc, reference

import bounds
from conftest import DEVICE
from utils import poison_empty, random_ids, untie, untie_layer

ACTIVATIONS = reference.ACTIVATIONS
GATINGS = reference.GATINGS
# Odd sizes: T tokens, d model dim, h heads, n sub-keys per half, dk sub-key dim, k experts, k' sub-keys.
ODD = dict(T=37, d=48, h=3, n=13, dk=8, k=5, k_sub=4)
TINY = dict(T=4, d=6, h=2, n=5, dk=3, k=3, k_sub=2)


@pytest.fixture(scope="session")
def ext():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = csrc.available()
    if not available:
        messages = [str(w.message) for w in caught]
        if shutil.which(cpp_extension.get_cxx_compiler()) is None:
            pytest.skip(f"no C++ compiler: {messages}")
        pytest.fail(f"the C++ extension did not build with the compiler present: {messages}")
    return csrc.build._extension("cpu")


def fused_inputs(T, d, h, n, dk, dtype=torch.float64, shared_keys=False, separate=False, device="cpu", **_):
    rows = (h if separate else 1) * n * n
    return [
        torch.randn(T, d, dtype=dtype, device=device, requires_grad=True),
        torch.randn(T, h, 2, dk, dtype=dtype, device=device, requires_grad=True),
        torch.randn(1 if shared_keys else h, n, 2, dk, dtype=dtype, device=device, requires_grad=True),
        (torch.randn(rows, d, dtype=dtype, device=device) / d ** 0.5).requires_grad_(),
        (torch.randn(rows, d, dtype=dtype, device=device) / d ** 0.5).requires_grad_(),
    ]


def outputs_and_grads(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <out, dout> for a fixed random dout, w.r.t. every input."""
    out = fn(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype,
                       device="cpu").to(out.device)
    wrt = [t for t in inputs if t.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(out, wrt, dout))


def assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (i, a.dtype, e.dtype, a.shape, e.shape)
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"tensor {i}: {m}")


# ---- fused op vs reference ------------------------------------------------------------------------

@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_float64_every_gating_and_activation(ext, monkeypatch, gating, activation):
    inputs = fused_inputs(**ODD)
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], gating=gating, activation=activation)
    expected = outputs_and_grads(lambda *t: reference.peer_fused(*t, **args), inputs)
    poison_empty(monkeypatch)
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared_keys,separate", [(True, False), (False, True), (True, True)])
def test_fused_shared_keys_and_separate_embeds(ext, monkeypatch, shared_keys, separate):
    inputs = fused_inputs(**ODD, shared_keys=shared_keys, separate=separate)
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], separate_embed_per_head=separate)
    expected = outputs_and_grads(lambda *t: reference.peer_fused(*t, **args), inputs)
    poison_empty(monkeypatch)
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


def fused_bound(inputs, dout, k, k_sub, gating="softmax", activation="gelu", separate=False):
    """[y, dx, dqueries, dkeys, dw_down, dw_up] as (exact float64, S) pairs (tests/bounds.py)."""
    x, queries, keys, w_down, w_up = (t.detach().double() for t in inputs)
    out = bounds.fused(x, torch.zeros_like(x), queries, torch.zeros_like(queries), keys, w_down, w_up,
                       dout.double(), torch.zeros_like(x), k, k_sub, gating, activation, separate)
    return [out[name] for name in ("y", "dx", "dqueries", "dkeys", "dw_down", "dw_up")]


def check_bounds(actual, expected):
    for i, (a, (e, magnitude)) in enumerate(zip(actual, expected, strict=True)):
        bounds.check(f"tensor {i}", a, e, magnitude)


def untied_fused_inputs(k, k_sub, **shape):
    """fused_inputs with queries clear of near-ties (utils.untie)."""
    inputs = fused_inputs(**shape)
    untie(inputs[1].detach().view(inputs[1].shape[0], -1), lambda t: t.view(inputs[1].shape), inputs[2], k, k_sub)
    return inputs


def test_fused_float32_and_strided_queries(ext):
    """fp32 against the float64 oracle; queries as the module makes them: a transposed view of the
    projection."""
    T, d, h, n, dk, k, k_sub = 64, 40, 4, 16, 16, 6, 4
    x = torch.randn(T, d, requires_grad=True)
    projection = torch.randn(T, 2 * h * dk)
    keys = (torch.randn(h, n, 2, dk) / dk ** 0.5).requires_grad_()
    w_down, w_up = [(torch.randn(n * n, d) / d ** 0.5).requires_grad_() for _ in range(2)]

    def as_queries(projection):
        return projection.view(T, 2, h, dk).transpose(1, 2)  # (T, h, 2, dk), not contiguous

    untie(projection, as_queries, keys, k, k_sub)
    projection.requires_grad_()

    def run(x, projection, keys, w_down, w_up):
        return csrc.peer_fused(x, as_queries(projection), keys, w_down, w_up, k, k_sub, "softmax", "gelu_tanh")

    actual = outputs_and_grads(run, [x, projection, keys, w_down, w_up])
    expected = fused_bound([x, as_queries(projection), keys, w_down, w_up], torch.randn(
        T, d, generator=torch.Generator().manual_seed(1)), k, k_sub, activation="gelu_tanh")
    expected[2] = tuple(t.transpose(1, 2).reshape(T, -1) for t in expected[2])   # dqueries -> dprojection
    check_bounds(actual, expected)


def test_fused_bfloat16_computes_in_float32(ext):
    """bf16 inputs, products exact in fp32, sums in fp32: the fp32 bound of the float64 oracle on the
    same (rounded) inputs, plus the final rounding of the bf16 results."""
    inputs = untied_fused_inputs(**ODD, dtype=torch.bfloat16)
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], gating="sigmoid", activation="silu")
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    assert all(a.dtype == torch.bfloat16 for a in actual)
    dout = torch.randn(ODD["T"], ODD["d"], generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    check_bounds(actual, fused_bound(inputs, dout, **args))


# ---- retrieval and experts alone ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared_keys", [False, True])
def test_product_key_topk(ext, monkeypatch, dtype, shared_keys):
    T, h, n, dk, k, k_sub = ODD["T"], ODD["h"], ODD["n"], ODD["dk"], ODD["k"], ODD["k_sub"]
    queries = torch.randn(T, h, 2, dk, dtype=dtype)
    keys = torch.randn(1 if shared_keys else h, n, 2, dk, dtype=dtype, requires_grad=True)
    untie(queries.view(T, -1), lambda t: t.view(T, h, 2, dk), keys, k, k_sub)
    queries.requires_grad_()
    _, ref_ids = reference.product_key_topk(queries.double(), keys.double(), k, k_sub)
    poison_empty(monkeypatch)
    scores, ids = csrc.product_key_topk(queries, keys, k, k_sub)
    assert scores.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (T, h, k)
    assert torch.equal(ids, ref_ids)  # clear of near-ties: the float64 picks, in order
    dscores = torch.randn_like(scores)
    dqueries, dkeys = torch.autograd.grad(scores, (queries, keys), dscores)
    bounds.check_all(dict(scores=scores, dqueries=dqueries, dkeys=dkeys),
                     bounds.retrieval(queries.double(), keys.double(), k, k_sub, dscores.double()))


def test_product_key_topk_in_several_token_chunks(ext):
    """n = 1024 and 4 heads make the extension's sub-key score chunk 512 tokens: 600 tokens need a
    full chunk and a partial one."""
    queries, keys = torch.randn(600, 4, 2, 4, dtype=torch.float64), torch.randn(4, 1024, 2, 4, dtype=torch.float64)
    scores, ids = csrc.product_key_topk(queries, keys, 6, 3)
    ref_scores, ref_ids = reference.product_key_topk(queries, keys, 6, 3)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,n,k_sub,k", [(1, 700, 16, 16), (9, 130, 5, 7), (20, 64, 13, 4), (3, 130, 100, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_scan_keeps_the_tie_rule(ext, dtype, T, n, k_sub, k):
    """The decode scan (a task per head and slice of key rows, its scores kept and each list
    selected at the end): several passes of its 8 tokens (T = 9, 20), slices shorter than k_sub
    (n = 130, k_sub = 100: two slices of 65 rows), several slices at one token (n = 700), and
    small-integer inputs whose float32 sums are exact and tie often: the oracle's ids and scores."""
    generator = torch.Generator().manual_seed(T * n + k_sub)
    queries = torch.randint(-2, 3, (T, 3, 2, 24), generator=generator).to(dtype)
    keys = torch.randint(-2, 3, (3, n, 2, 24), generator=generator).to(dtype)
    scores, ids = ext.retrieval_forward(queries, keys, k, k_sub, "decode")
    ref_scores, ref_ids = reference.product_key_topk(queries.double(), keys.double(), k, k_sub)
    assert torch.equal(ids, ref_ids) and torch.equal(scores.double(), ref_scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_scan_reads_16_bit_keys_as_their_float32_values(ext, dtype):
    """16-bit keys are converted to float32 in registers, 8 at a time: the scan's scores and picks
    are bitwise those of the same keys stored in float32 (dk = 136: the dot's whole vectors and a
    tail), at one token and over two token passes. Among the keys: float16 subnormals (rows scaled
    by 2**-20), the largest float16, negative zeros, and an infinity and a NaN in head 2's rows."""
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(3, 300, 2, 136, generator=generator)
    keys[:, :40] *= 2.0 ** -20
    keys[:, 50, 0, :8] = torch.tensor([65504.0, -65504.0, -0.0, 0.0, 1.0, -1.0, 2.0 ** -24, -(2.0 ** -14)])
    keys[2, 60, 1, 3], keys[2, 70, 0, 100] = math.inf, math.nan
    keys = keys.to(dtype)
    for T in (1, 11):
        queries = torch.randn(T, 3, 2, 136, generator=generator)
        scores, ids = ext.retrieval_forward(queries, keys, 8, 8, "decode")
        wide_scores, wide_ids = ext.retrieval_forward(queries, keys.float(), 8, 8, "decode")
        assert torch.equal(ids, wide_ids)
        torch.testing.assert_close(scores, wide_scores, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_projection_reads_16_bit_weights_as_their_float32_values(ext, dtype):
    """Up to 8 tokens the projection sums a 16-bit weight's rows converted once for all the tokens:
    its outputs are the float32 weight's sums rounded to the dtype, bitwise (subnormal float16
    values among the weights), and a token's do not depend on the tokens beside it."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(72, 136, generator=generator)
    weight[:8] *= 2.0 ** -20
    weight, x = weight.to(dtype), torch.randn(5, 136, generator=generator).to(dtype)
    y = ext.linear_forward(x, weight)
    assert torch.equal(y, ext.linear_forward(x.float(), weight.float()).to(dtype))
    assert torch.equal(ext.linear_forward(x[2:3], weight), y[2:3])


@pytest.mark.parametrize("k_sub", [4, 12, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_tiles_selection_keeps_the_tie_rule_at_its_bound(ext, dtype, k_sub):
    """The token-tile scan of a (token, head, half) keeps the scores that reach a bound, the least
    over 8 lanes (score i in lane i % 8) of each lane's ceil(k_sub / 8)-th largest among its whole
    rows (n = 83: ten rows and 3 scores beyond), and places those candidates by counting the ones the
    tie rule ranks first. k_sub = 4 and 12 take it (one and two ranks; float32 collects the
    candidates with AVX2 where the CPU has it, float64 by the portable loop), 40 (five ranks) the
    plain scan. Queries and keys are small integers and halves, so every sum is exact in float32
    too and equal scores abound. Head 0: six equal top scores, straddling the k_sub-th place at
    k_sub = 4 (its second half's scores distinct); head 1: +inf and -inf scores; head 2: a NaN score
    (the plain scan); head 3: 50 equal top scores, all candidates; head 4: every score equal, more
    candidates than the counting takes (offers). Each must pick what the oracle picks."""
    T, h, n, dk, k = 3, 5, 83, 4, 7
    keys = torch.randint(-2, 3, (h, n, 2, dk)).double()
    queries = torch.randint(-2, 3, (T, h, 2, dk)).double()
    tied = [3, 19, 35, 51, 67, 80]
    keys[0, tied, 0] = 5.0
    queries[:, 0, 0] = queries[:, 3, 0] = 1.0
    keys[0, :, 1] = 0.0
    keys[0, :, 1, 0] = torch.arange(n) - n // 2
    queries[:, 0, 1] = 1.0
    queries[:, 1, 1] = queries[:, 1, 1].abs() + 0.5
    keys[1, 10, 1], keys[1, 60, 1] = math.inf, -math.inf
    keys[2, 30, 0, 2] = math.nan
    keys[3, :50, 0] = 5.0
    keys[4, :, 1] = 0.0
    queries, keys = queries.to(dtype), keys.to(dtype)
    scores, ids = ext.retrieval_forward(queries, keys, k, k_sub, "token_tiles")
    ref_scores, ref_ids = reference.product_key_topk(queries.double(), keys.double(), k, k_sub)
    assert torch.equal(ids, ref_ids)
    on_top = min(k_sub, len(tied))
    assert (ids[:, 0, :on_top] // n == torch.tensor(tied[:on_top])).all()  # the smallest tied indices, in order
    assert (ids[:, 1, :4] % n == 10).all() and (ids[:, 2, 0] // n == 30).all()
    assert (ids[:, 3, :k] // n < 50).all() and (ids[:, 4, :k] % n < k_sub).all()
    torch.testing.assert_close(scores, ref_scores.to(dtype), rtol=0, atol=0, equal_nan=True)


def test_portable_vector_paths_pick_and_sum_as_the_oracle(ext):
    """PEER_KERNELS_CPU_PORTABLE=1 turns the hand-written AVX2 paths off (the int8 rows, the
    selection's candidates), as on a CPU without AVX2: their tests, rerun in a process that sets it,
    pass on the portable loops."""
    if ext.vector_paths() != "avx2":
        pytest.skip(f"this CPU takes the {ext.vector_paths()} paths already")
    env = dict(os.environ, PEER_KERNELS_CPU_PORTABLE="1")
    here = Path(__file__).parent
    probe = "from peer_kernels import csrc; print(csrc.build._extension('cpu').vector_paths())"
    taken = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert taken.stdout.strip() == "portable", taken.stderr
    tests = [f"{here / 'test_csrc.py'}::test_token_tiles_selection_keeps_the_tie_rule_at_its_bound",
             f"{here / 'test_csrc.py'}::test_product_key_topk",
             f"{here / 'test_quantize.py'}::test_expert_stage_reads_rows_times_their_scales"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not reference and not triton",
                             *tests], env=env, cwd=here.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [1, 7, 70])
def test_linear_forward_against_float64(ext, dtype, T):
    """The query projection by blocks of output features (300 of them: four blocks of 75 on two
    threads; 63: one block) equals x @ weight.T within the rounding of its 37-term sums and of the
    output's dtype."""
    for d_out in (300, 63):
        x, weight = torch.randn(T, 37).to(dtype), torch.randn(d_out, 37).to(dtype)
        y = ext.linear_forward(x, weight)
        assert y.dtype == dtype and y.shape == (T, d_out)
        exact = x.double() @ weight.double().T
        magnitude = x.double().abs() @ weight.double().abs().T
        assert ((y.double() - exact).abs() <= 38 * torch.finfo(dtype).eps * magnitude).all()
    with torch.inference_mode():  # its output is an inference tensor, written by the tasks' threads
        torch.testing.assert_close(ext.linear_forward(x, weight), y, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="linear_forward: expected x"):
        ext.linear_forward(torch.randn(2, 5), torch.randn(3, 4))
    # ATen's own error, raised by a matmul on the tasks' threads, reaches the caller (it used to
    # end the process from inside the parallel region)
    with pytest.raises(RuntimeError):
        ext.linear_forward(torch.ones(2, 4, dtype=torch.bool), torch.ones(300, 4, dtype=torch.bool))


def test_product_key_topk_bfloat16_scores_are_float32(ext):
    queries, keys = torch.randn(8, 2, 2, 16), torch.randn(2, 9, 2, 16, dtype=torch.bfloat16)
    untie(queries.view(8, -1), lambda t: t.view(8, 2, 2, 16).bfloat16(), keys, 4, 3)
    queries = queries.bfloat16()
    scores, ids = csrc.product_key_topk(queries, keys, 4, 3)
    assert scores.dtype == torch.float32
    assert torch.equal(ids, reference.product_key_topk(queries.double(), keys.double(), 4, 3)[1])
    dscores = torch.zeros(8, 2, 4, dtype=torch.float64)
    bounds.check("scores", scores, *bounds.retrieval(queries.double(), keys.double(), 4, 3, dscores)["scores"])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_peer_experts_duplicates_and_last_row(ext, monkeypatch, activation):
    T, d, h, k, rows = 29, ODD["d"], ODD["h"], ODD["k"], 11  # 11 rows for 435 slots: many duplicates
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(T, h, k, dtype=torch.float64, requires_grad=True)
    w_down, w_up = [torch.randn(rows, d, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    expert_ids = random_ids(T, h, k, rows, dtype=torch.int32)
    expert_ids[0, 1] = expert_ids[0, 0]  # the same expert in two heads of one token
    inputs = [x, expert_ids, gates, w_down, w_up]
    expected = outputs_and_grads(lambda *t: reference.peer_experts(*t, activation), inputs)
    poison_empty(monkeypatch)
    actual = outputs_and_grads(lambda *t: csrc.peer_experts(*t, activation), inputs)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(ext):
    T, d, h, n, dk, k, k_sub = TINY.values()
    x, queries, keys, w_down, w_up = fused_inputs(**TINY, shared_keys=True, separate=True)
    for gating, activation in [("softmax", "gelu"), ("sigmoid", "silu"), ("relu", "gelu_tanh")]:
        assert torch.autograd.gradcheck(
            lambda *t: csrc.peer_fused(*t, k, k_sub, gating, activation, True), (x, queries, keys, w_down, w_up))
    gates = torch.rand(T, h, k, dtype=torch.float64, requires_grad=True)
    ids = random_ids(T, h, k, w_down.shape[0])
    assert torch.autograd.gradcheck(lambda *t: csrc.peer_experts(t[0], ids, *t[1:], "relu"), (x, gates, w_down, w_up))
    assert torch.autograd.gradcheck(lambda *t: csrc.product_key_topk(*t, k, k_sub)[0], (queries, keys))


# ---- bad ids and fallback -------------------------------------------------------------------------

def test_out_of_range_ids_raise(ext):
    T, d, h, k, rows = 3, 8, 2, 2, 5
    x, w_down, w_up = torch.randn(T, d), torch.randn(rows, d), torch.randn(rows, d)
    gates = torch.rand(T, h, k)
    for bad in (rows, -1):
        ids = random_ids(T, h, k, rows)
        ids[2, 1, 0] = bad
        with pytest.raises(ValueError, match=r"expert_ids: expected values in \[0, 5\)"):
            csrc.peer_experts(x, ids, gates, w_down, w_up)
        # The extension itself checks too, for callers that bypass peer_kernels._checks.
        with pytest.raises(RuntimeError, match=rf"expert_ids: expected values in \[0, 5\).*got {bad}"):
            ext.experts_forward(x, ids, gates, w_down, w_up, "gelu", schedule="decode")
        with pytest.raises(RuntimeError, match=r"expert_ids: expected values in \[0, 5\)"):
            ext.experts_backward(x, x, ids, gates, gates, w_down, w_up, "gelu", False)
    queries, keys = torch.randn(T, h, 2, 4), torch.randn(h, 3, 2, 4)
    sub_key_ids = random_ids(T, h, k, 9)
    sub_key_ids[1, 0, 1] = 9  # a = 3 does not exist for n = 3
    with pytest.raises(RuntimeError, match=r"expert_ids: expected values in \[0, 9\)"):
        ext.retrieval_backward(torch.randn(T, h, k), queries, keys, sub_key_ids)
    with pytest.raises(RuntimeError, match="k_sub: expected in"):
        ext.retrieval_forward(queries, keys, 2, 4, "decode")


def test_build_failure_warns_once_and_falls_back_to_the_reference(monkeypatch):
    """Backend choice decides the fallback, once: "cpp" (or "auto" on a CPU) resolves to the
    reference, and the layer says so; the C++ functions themselves refuse to run without a build."""
    monkeypatch.setitem(csrc.build._EXTENSIONS, "cpu", ("peer_kernels_csrc_missing", ("no_such_file.cpp",)))
    monkeypatch.setattr(csrc.build, "_extension",
                        functools.lru_cache(maxsize=None)(csrc.build._extension.__wrapped__))
    with pytest.warns(RuntimeWarning, match="cpu extension is unavailable.*falling back to peer_kernels.reference"):
        assert not csrc.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later uses do not warn again
        for backend in ("cpp", "auto"):
            assert backends.resolve(backend, "cpu") == "reference"
            layer = peer_kernels.PEER(TINY["d"], heads=TINY["h"], num_experts=TINY["n"] ** 2, dim_key=TINY["dk"],
                                      num_experts_per_head=TINY["k"], product_key_topk=TINY["k_sub"],
                                      query_norm=None, backend=backend).double()
            assert layer.resolved_backend == "reference"
            x = torch.randn(TINY["T"], TINY["d"], dtype=torch.float64)
            expected = peer_kernels.PEER(TINY["d"], heads=TINY["h"], num_experts=TINY["n"] ** 2,
                                         dim_key=TINY["dk"], num_experts_per_head=TINY["k"],
                                         product_key_topk=TINY["k_sub"], query_norm=None,
                                         backend="reference").double()
            expected.load_state_dict(layer.state_dict())
            torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)
    inputs = fused_inputs(**TINY)
    with pytest.raises(RuntimeError, match="no cpu extension is built"):
        csrc.peer_fused(*inputs, TINY["k"], TINY["k_sub"])


# ---- the module: backend="cpp" vs peer-pytorch ----------------------------------------------------

PEER_PYTORCH_CONFIGS = [
    dict(heads=4, num_experts=16 ** 2, num_experts_per_head=6, dim_key=16, non_competing_scores=False),
    dict(heads=2, num_experts=9 ** 2, num_experts_per_head=3, dim_key=12, non_competing_scores=True),
    dict(heads=3, num_experts=8 ** 2, num_experts_per_head=4, dim_key=16, non_competing_scores=False,
         separate_embed_per_head=True, pre_rmsnorm=True, activation=torch.nn.SiLU),
]


@pytest.mark.parametrize("config", PEER_PYTORCH_CONFIGS)
def test_module_cpp_backend_matches_peer_pytorch(ext, config):
    """Ours on the C++ backend and peer-pytorch, both in fp32 with the same weights, each against
    the float64 oracle with the bound of tests/bounds.py."""
    PEER_pytorch = pytest.importorskip("PEER_pytorch")
    dim = 32
    theirs = PEER_pytorch.PEER(dim, **config)
    with torch.no_grad():
        theirs.keys.normal_(std=config["dim_key"] ** -0.5)
    ours = peer_kernels.PEER.from_peer_pytorch(theirs, backend="cpp")
    x = untie_layer(ours, torch.randn(2, 24, dim))
    dy = torch.randn(2, 24, dim)
    expected = bounds.expected_layer(ours, x, dy)
    bounds.check_all(bounds.layer_results(ours, x, dy), expected)
    theirs_results = bounds.layer_results(theirs, x, dy)
    bounds.check_all({ours_name: theirs_results[name] for name, ours_name in PEER_PYTORCH_NAMES.items()
                      if name in theirs_results}, expected)


# peer-pytorch's names of the outputs and gradients -> ours
PEER_PYTORCH_NAMES = {"y": "y", "x": "x", "keys": "keys", "to_queries.0.weight": "to_queries.weight",
                      "weight_down_embed.weight": "w_down", "weight_up_embed.weight": "w_up",
                      "norm.gamma": "norm.gamma"}


def test_auto_backend_is_cpp_on_cpu(ext):
    assert backends.resolve("auto", torch.device("cpu")) == "cpp"
    assert backends.get("auto", torch.device("cpu")) is csrc


# ---- the Triton ops, under the interpreter without a GPU ------------------------------------------

def test_cpp_matches_triton(ext):
    try:
        from peer_kernels import ops
    except Exception as error:  # written in parallel: may not import yet
        pytest.skip(f"peer_kernels.ops does not import: {type(error).__name__}: {error}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = dict(k=4, k_sub=3, gating="softmax", activation="gelu")
    inputs = [t.detach().float().requires_grad_() for t in untied_fused_inputs(T=8, d=16, h=2, n=8, dk=8, k=4, k_sub=3)]
    expected = fused_bound(inputs, torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), **args)
    check_bounds(outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs), expected)
    on_device = [t.detach().to(device).requires_grad_() for t in inputs]
    actual = outputs_and_grads(lambda *t: ops.peer_fused(*t, **args), on_device)
    check_bounds([a.cpu() for a in actual], expected)


# ---- the CUDA version -----------------------------------------------------------------------------

def test_cuda_source_compiles_for_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    source = csrc.sources_dir() / "peer_cuda.cu"
    assert "torch" not in source.read_text()  # the kernels build with nvcc alone
    result = subprocess.run(
        [nvcc, "-c", "-arch=sm_90", "-O3", "-std=c++17", f"-I{csrc.sources_dir()}", str(source),
         "-o", str(tmp_path / "peer_cuda.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "peer_cuda.o").stat().st_size > 0


def test_sources_are_where_the_loader_looks():
    names = {p.name for p in csrc.sources_dir().iterdir()}
    for _, files in csrc.build._EXTENSIONS.values():
        assert set(files) <= names
    assert {"peer_math.h", "peer_torch.h", "peer_cuda.h"} <= names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_fused_matches_reference(dtype):
    """The CUDA extension's fused op; in the dry run the C++ one, through the same harness."""
    if not (csrc.available() if DEVICE.type == "cpu" else csrc.cuda_available()):
        pytest.skip(f"the {DEVICE.type} extension did not build")
    inputs = untied_fused_inputs(**ODD, dtype=dtype, separate=True, device=DEVICE)
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], gating="softmax", activation="gelu", separate_embed_per_head=True)
    expected = outputs_and_grads(lambda *t: reference.peer_fused(*t, **args), inputs)
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    if dtype == torch.float64:
        assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)
    else:
        check_bounds(actual, fused_bound([t.cpu() for t in inputs], torch.randn(
            ODD["T"], ODD["d"], generator=torch.Generator().manual_seed(1), device="cpu"), ODD["k"], ODD["k_sub"],
            separate=True))


def test_zero_heads_is_an_error_not_a_crash(ext):
    """The extension's own check (for callers that bypass peer_kernels._checks): once a SIGFPE."""
    with pytest.raises(RuntimeError, match="queries: expected at least one head"):
        ext.retrieval_forward(torch.randn(5, 0, 2, 8), torch.randn(1, 6, 2, 8), 4, 3, "token_tiles")
