"""The C++ backend (csrc_reference/, peer_kernels.csrc) against the reference, peer-pytorch and the
Triton ops; its tie rule, bad ids, the fallback when it does not build, and the CUDA source compiling.

The extension is built once per machine (about a minute on 2 cores) and cached by torch; the
session fixture loads it, or skips the tests that need it with the reason.
"""
import functools
import shutil
import subprocess
import warnings

import pytest
import torch
from torch.utils import cpp_extension

import peer_kernels
from peer_kernels import backends, csrc, reference

from utils import poison_empty, rel_rms_error, random_ids

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
    return csrc._extension("cpu")


def fused_inputs(T, d, h, n, dk, dtype=torch.float64, shared_keys=False, separate=False, **_):
    rows = (h if separate else 1) * n * n
    return [
        torch.randn(T, d, dtype=dtype, requires_grad=True),
        torch.randn(T, h, 2, dk, dtype=dtype, requires_grad=True),
        torch.randn(1 if shared_keys else h, n, 2, dk, dtype=dtype, requires_grad=True),
        (torch.randn(rows, d, dtype=dtype) / d ** 0.5).requires_grad_(),
        (torch.randn(rows, d, dtype=dtype) / d ** 0.5).requires_grad_(),
    ]


def outputs_and_grads(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <out, dout> for a fixed random dout, w.r.t. every input."""
    out = fn(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
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


def test_fused_float32_and_strided_queries(ext):
    """fp32 at rtol 1e-5; queries as the module makes them: a transposed view of the projection."""
    T, d, h, n, dk, k, k_sub = 64, 40, 4, 16, 16, 6, 4
    x = torch.randn(T, d, requires_grad=True)
    projection = torch.randn(T, 2 * h * dk, requires_grad=True)
    keys = (torch.randn(h, n, 2, dk) / dk ** 0.5).requires_grad_()
    w_down, w_up = [(torch.randn(n * n, d) / d ** 0.5).requires_grad_() for _ in range(2)]

    def run(op, x, projection, keys, w_down, w_up):
        queries = projection.view(T, 2, h, dk).transpose(1, 2)  # (T, h, 2, dk), not contiguous
        return op(x, queries, keys, w_down, w_up, k, k_sub, "softmax", "gelu_tanh")

    inputs = [x, projection, keys, w_down, w_up]
    expected = outputs_and_grads(functools.partial(run, reference.peer_fused), inputs)
    actual = outputs_and_grads(functools.partial(run, csrc.peer_fused), inputs)
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fused_bfloat16_computes_in_float32(ext):
    inputs = fused_inputs(**ODD, dtype=torch.bfloat16)
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], gating="sigmoid", activation="silu")
    expected = outputs_and_grads(lambda *t: reference.peer_fused(*t, **args), inputs)
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape
        assert rel_rms_error(a, e) < 1e-2


# ---- retrieval and experts alone ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared_keys", [False, True])
def test_product_key_topk(ext, monkeypatch, dtype, shared_keys):
    T, h, n, dk, k, k_sub = ODD["T"], ODD["h"], ODD["n"], ODD["dk"], ODD["k"], ODD["k_sub"]
    queries = torch.randn(T, h, 2, dk, dtype=dtype, requires_grad=True)
    keys = torch.randn(1 if shared_keys else h, n, 2, dk, dtype=dtype, requires_grad=True)
    ref_scores, ref_ids = reference.product_key_topk(queries, keys, k, k_sub)
    poison_empty(monkeypatch)
    scores, ids = csrc.product_key_topk(queries, keys, k, k_sub)
    assert scores.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (T, h, k)
    assert torch.equal(ids, ref_ids)  # random inputs: no ties
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, ref_scores, **tol)
    dscores = torch.randn_like(scores)
    expected = torch.autograd.grad(ref_scores, (queries, keys), dscores)
    actual = torch.autograd.grad(scores, (queries, keys), dscores)
    assert_all_close(list(actual), list(expected), **tol)


def test_product_key_topk_in_several_token_chunks(ext):
    """n = 1024 and 4 heads make the extension's sub-key score chunk 512 tokens: 600 tokens need a
    full chunk and a partial one."""
    queries, keys = torch.randn(600, 4, 2, 4, dtype=torch.float64), torch.randn(4, 1024, 2, 4, dtype=torch.float64)
    scores, ids = csrc.product_key_topk(queries, keys, 6, 3)
    ref_scores, ref_ids = reference.product_key_topk(queries, keys, 6, 3)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


def test_product_key_topk_bfloat16_scores_are_float32(ext):
    queries, keys = torch.randn(8, 2, 2, 16, dtype=torch.bfloat16), torch.randn(2, 9, 2, 16, dtype=torch.bfloat16)
    scores, ids = csrc.product_key_topk(queries, keys, 4, 3)
    ref_scores, _ = reference.product_key_topk(queries, keys, 4, 3)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_smaller_index_and_the_gradient_follows_the_picks(ext):
    """Small integers make every score exact, so the ties are exact: all first-half sub-keys are
    equal, and the second half repeats its values, so many candidates share a score."""
    T, h, n, dk, k, k_sub = 6, 2, 7, 4, 9, 4
    queries = torch.randint(-3, 4, (T, h, 2, dk)).double().requires_grad_()
    keys = torch.randint(-3, 4, (h, n, 2, dk)).double()
    keys[:, :, 0] = keys[:, :1, 0]  # every a scores the same
    keys[:, 4:, 1] = keys[:, :3, 1]  # b = 4, 5, 6 repeat b = 0, 1, 2
    keys.requires_grad_()
    scores, ids = csrc.product_key_topk(queries, keys, k, k_sub)
    sub = reference.sub_key_scores(queries, keys).detach()
    for t in range(T):
        for head in range(h):
            s1, s2 = sub[t, head, 0].tolist(), sub[t, head, 1].tolist()
            best1 = sorted(range(n), key=lambda i: (-s1[i], i))[:k_sub]
            best2 = sorted(range(n), key=lambda i: (-s2[i], i))[:k_sub]
            candidates = sorted((-(s1[a] + s2[b]), a * n + b) for a in best1 for b in best2)[:k]
            assert ids[t, head].tolist() == [e for _, e in candidates]
            assert scores[t, head].tolist() == [-s for s, _ in candidates]
    # The gradient of the scores as the picks define them: q1 . keys[a, 0] + q2 . keys[b, 1].
    dscores = torch.randn_like(scores)
    actual = torch.autograd.grad(scores, (queries, keys), dscores)
    head_index = torch.arange(h)[None, :, None]
    picked = (torch.einsum("thd,thkd->thk", queries[:, :, 0], keys[head_index, ids // n, 0])
              + torch.einsum("thd,thkd->thk", queries[:, :, 1], keys[head_index, ids % n, 1]))
    expected = torch.autograd.grad(picked, (queries, keys), dscores)
    assert_all_close(list(actual), list(expected), rtol=1e-12, atol=1e-12)


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
            ext.experts_forward(x, ids, gates, w_down, w_up, "gelu")
        with pytest.raises(RuntimeError, match=r"expert_ids: expected values in \[0, 5\)"):
            ext.experts_backward(x, x, ids, gates, gates, w_down, w_up, "gelu")
    queries, keys = torch.randn(T, h, 2, 4), torch.randn(h, 3, 2, 4)
    sub_key_ids = random_ids(T, h, k, 9)
    sub_key_ids[1, 0, 1] = 9  # a = 3 does not exist for n = 3
    with pytest.raises(RuntimeError, match=r"expert_ids: expected values in \[0, 9\)"):
        ext.retrieval_backward(torch.randn(T, h, k), queries, keys, sub_key_ids)
    with pytest.raises(RuntimeError, match="k_sub: expected in"):
        ext.retrieval_forward(queries, keys, 2, 4)


def test_build_failure_warns_once_and_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setitem(csrc._EXTENSIONS, "cpu", ("peer_kernels_csrc_missing", ("no_such_file.cpp",)))
    monkeypatch.setattr(csrc, "_extension", functools.lru_cache(maxsize=None)(csrc._extension.__wrapped__))
    with pytest.warns(RuntimeWarning, match="cpu extension is unavailable.*falling back to peer_kernels.reference"):
        assert not csrc.available()
    inputs = fused_inputs(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use does not warn again
        y = csrc.peer_fused(*inputs, TINY["k"], TINY["k_sub"])
    torch.testing.assert_close(y, reference.peer_fused(*inputs, TINY["k"], TINY["k_sub"]), rtol=0, atol=0)


# ---- the module: backend="cpp" vs peer-pytorch ----------------------------------------------------

PEER_PYTORCH_CONFIGS = [
    dict(heads=4, num_experts=16 ** 2, num_experts_per_head=6, dim_key=16, non_competing_scores=False),
    dict(heads=2, num_experts=9 ** 2, num_experts_per_head=3, dim_key=12, non_competing_scores=True),
    dict(heads=3, num_experts=8 ** 2, num_experts_per_head=4, dim_key=16, non_competing_scores=False,
         separate_embed_per_head=True, pre_rmsnorm=True, activation=torch.nn.SiLU),
]


@pytest.mark.parametrize("config", PEER_PYTORCH_CONFIGS)
def test_module_cpp_backend_matches_peer_pytorch(ext, config):
    PEER_pytorch = pytest.importorskip("PEER_pytorch")
    dim = 32
    theirs = PEER_pytorch.PEER(dim, **config)
    with torch.no_grad():
        theirs.keys.normal_(std=config["dim_key"] ** -0.5)  # spread scores: no near-ties in fp32
    ours = peer_kernels.PEER.from_peer_pytorch(theirs, backend="cpp")
    x = torch.randn(2, 24, dim)
    results = []
    for layer, down, up in ((theirs, theirs.weight_down_embed.weight, theirs.weight_up_embed.weight),
                            (ours, ours.w_down, ours.w_up)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.ones_like(y) + x)  # a non-constant, fixed dy
        results.append([y.detach(), xi.grad, down.grad, up.grad, layer.keys.grad])
    assert_all_close(results[1], results[0], rtol=1e-5, atol=1e-5)


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
    shape = dict(T=8, d=16, h=2, n=8, dk=8)
    inputs = [t.detach().float().requires_grad_() for t in fused_inputs(**shape)]
    args = dict(k=4, k_sub=3, gating="softmax", activation="gelu")
    expected = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    on_device = [t.detach().to(device).requires_grad_() for t in inputs]
    actual = outputs_and_grads(lambda *t: ops.peer_fused(*t, **args), on_device)
    assert_all_close([a.cpu() for a in actual], expected, rtol=1e-4, atol=1e-5)


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
    for _, files in csrc._EXTENSIONS.values():
        assert set(files) <= names
    assert {"peer_math.h", "peer_torch.h", "peer_cuda.h"} <= names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_fused_matches_reference(dtype):
    if not csrc.cuda_available():
        pytest.skip("the CUDA extension did not build")
    inputs = [t.detach().cuda().requires_grad_() for t in fused_inputs(**ODD, dtype=dtype, separate=True)]
    args = dict(k=ODD["k"], k_sub=ODD["k_sub"], gating="softmax", activation="gelu", separate_embed_per_head=True)
    expected = outputs_and_grads(lambda *t: reference.peer_fused(*t, **args), inputs)
    actual = outputs_and_grads(lambda *t: csrc.peer_fused(*t, **args), inputs)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_all_close(actual, expected, **tol)
