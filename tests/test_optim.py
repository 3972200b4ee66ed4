"""peer_kernels.optim: each step equals a plain PyTorch transcription of its math (to fp32
rounding), on the Triton kernels (under the interpreter without a GPU) and on the PyTorch
fallback; only touched rows change; dense-gradient parameters are left alone."""
import math

import pytest
import torch

import peer_kernels
from conftest import DEVICE
from peer_kernels import optim


def sparse_grad(rows, values, shape):
    return torch.sparse_coo_tensor(rows[None], values, shape).coalesce()


def table_and_grads(dtype=torch.float32, E=11, D=24, steps_=3):
    torch.manual_seed(1)
    table = torch.randn(E, D, device=DEVICE).to(dtype)
    grads = []
    for _ in range(steps_):
        rows = torch.randperm(E, device=DEVICE)[:5].sort().values
        grads.append(sparse_grad(rows, torch.randn(5, D, device=DEVICE).to(dtype), (E, D)))
    return table, grads


def adamw_transcription(table, grads, lr, betas, eps, wd):
    """Lazy AdamW in float64, row by row, written from the formulas."""
    p = table.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        for r, g in zip(grad.indices()[0].tolist(), grad.values().double()):
            m[r] = betas[0] * m[r] + (1 - betas[0]) * g
            v[r] = betas[1] * v[r] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[r] / (1 - betas[0] ** t), v[r] / (1 - betas[1] ** t)
            p[r] = p[r] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def adagrad_transcription(table, grads, lr, eps, wd):
    p = table.double().clone()
    state = torch.zeros(p.shape[0], dtype=torch.float64)
    for grad in grads:
        for r, g in zip(grad.indices()[0].tolist(), grad.values().double()):
            g = g + wd * p[r]
            state[r] += (g * g).mean()
            p[r] = p[r] - lr * g / (state[r].sqrt() + eps)
    return p


def run(optimizer_cls, table, grads, **hyper):
    param = torch.nn.Parameter(table.clone())
    optimizer = optimizer_cls([param], **hyper)
    for grad in grads:
        param.grad = grad
        optimizer.step()
    return param.detach()


@pytest.fixture(params=["kernels", "pytorch"])
def path(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setattr(optim, "_kernels_for", lambda param: None)
    elif optim._kernels_for(torch.zeros(1, device=DEVICE)) is None:
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_adamw_is_lazy_adamw(path, dtype):
    table, grads = table_and_grads(dtype)
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    actual = run(optim.SparseAdamW, table, grads, **hyper)
    expected = adamw_transcription(table, grads, hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"])
    # fp32 arithmetic over a few steps of O(1) values; 16-bit tables round their stored value each step
    tolerance = 1e-5 if dtype == torch.float32 else 3 * 2 ** -8
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance)
    touched = torch.zeros(table.shape[0], dtype=torch.bool)
    for grad in grads:
        touched[grad.indices()[0].cpu()] = True
    assert torch.equal(actual[~touched.to(DEVICE)], table[~touched.to(DEVICE)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_adagrad(path, dtype):
    table, grads = table_and_grads(dtype)
    actual = run(optim.RowwiseAdagrad, table, grads, lr=0.1, eps=1e-8, weight_decay=0.01)
    expected = adagrad_transcription(table, grads, 0.1, 1e-8, 0.01)
    tolerance = 1e-5 if dtype == torch.float32 else 3 * 2 ** -8
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance)


def test_rowwise_adagrad_state_is_one_float_per_row():
    table, grads = table_and_grads()
    param = torch.nn.Parameter(table.clone())
    optimizer = optim.RowwiseAdagrad([param])
    param.grad = grads[0]
    optimizer.step()
    (state,) = optimizer.state.values()
    assert state["sum"].shape == (table.shape[0],) and state["sum"].dtype == torch.float32


def test_dense_gradients_are_left_to_another_optimizer():
    table, grads = table_and_grads()
    sparse_param, dense_param = torch.nn.Parameter(table.clone()), torch.nn.Parameter(table.clone())
    sparse_param.grad, dense_param.grad = grads[0], grads[0].to_dense()
    optim.SparseAdamW([sparse_param, dense_param]).step()
    assert torch.equal(dense_param, table) and not torch.equal(sparse_param, table)


def test_uncoalesced_sums_of_micro_batches_are_coalesced_first():
    """a + b of two sparse gradients holds duplicate rows: the step must see their sum once."""
    table, grads = table_and_grads(steps_=2)
    summed = grads[0] + grads[1]
    once = run(optim.SparseAdamW, table, [summed.coalesce()])
    param = torch.nn.Parameter(table.clone())
    param.grad = torch.sparse_coo_tensor(torch.cat([grads[0].indices(), grads[1].indices()], 1),
                                         torch.cat([grads[0].values(), grads[1].values()]), table.shape)
    optim.SparseAdamW([param]).step()
    torch.testing.assert_close(param.detach(), once, rtol=0, atol=0)


def test_a_training_step_with_the_layer():
    """PEER(sparse_grad=True) + SparseAdamW on the tables, a dense optimizer on the rest: the loss goes
    down over a few steps and untouched table rows never move."""
    torch.manual_seed(0)
    layer = peer_kernels.PEER(16, heads=2, num_experts=64, num_experts_per_head=2, dim_key=8, query_norm="layernorm",
                              sparse_grad=True, backend="reference", device=DEVICE)
    tables = [layer.w_down, layer.w_up]
    others = [p for n, p in layer.named_parameters() if n not in ("w_down", "w_up")]
    sparse_opt, dense_opt = optim.SparseAdamW(tables, lr=1e-2), torch.optim.AdamW(others, lr=1e-2)
    x, target = torch.randn(32, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE)
    before = layer.w_down.detach().clone()
    touched = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        touched[layer.w_down.grad.indices()[0]] = True
        sparse_opt.step(), dense_opt.step()
        sparse_opt.zero_grad(), dense_opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.w_down[~touched], before[~touched])


BAD_HYPERPARAMETERS = [
    (optim.SparseAdamW, dict(lr=-1), ValueError), (optim.SparseAdamW, dict(lr=math.inf), ValueError),
    (optim.RowwiseAdagrad, dict(lr=math.nan), ValueError), (optim.SparseAdamW, dict(betas=(1.0, 0.9)), ValueError),
    (optim.SparseAdamW, dict(betas=0.9), TypeError), (optim.SparseAdamW, dict(betas=(0.9, "0.99")), TypeError),
    (optim.SparseAdamW, dict(betas=(0.9, 0.99, 0.5)), TypeError), (optim.SparseAdamW, dict(eps=0.0), ValueError),
    (optim.RowwiseAdagrad, dict(eps=-1e-3), ValueError), (optim.RowwiseAdagrad, dict(eps=1e-45), ValueError),
    (optim.SparseAdamW, dict(weight_decay=math.inf), ValueError), (optim.RowwiseAdagrad, dict(lr=True), TypeError),
    (optim.RowwiseAdagrad, dict(initial_accumulator_value=-1.0), ValueError),
]


@pytest.mark.parametrize("cls, kwargs, error", BAD_HYPERPARAMETERS,
                         ids=[f"{cls.__name__}-{kwargs}" for cls, kwargs, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters(cls, kwargs, error):
    """At construction, at add_param_group (where the group is then not added) and at step (for
    param_groups edited since, as an LR scheduler does), each error naming the hyperparameter."""
    name = next(iter(kwargs))
    with pytest.raises(error, match=rf"^{name}"):
        cls([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)
    optimizer = cls([torch.nn.Parameter(torch.zeros(3, 2))])
    with pytest.raises(error, match=rf"^{name}"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 2))], **kwargs})
    assert len(optimizer.param_groups) == 1
    optimizer.param_groups[0].update(kwargs)
    with pytest.raises(error, match=rf"^{name}"):
        optimizer.step()


@pytest.mark.parametrize("cls", [optim.SparseAdamW, optim.RowwiseAdagrad])
def test_finite_inputs_never_step_to_nan(path, cls):
    """A touched row whose gradient is zero (fresh state: 0/0 without eps, or an lr/eps that
    overflows) and one whose squared gradient overflows float32, with the smallest eps and a large
    lr: every row stays finite, and the zero-gradient row (no weight decay) does not move."""
    table = torch.randn(4, 8, device=DEVICE)
    values = torch.zeros(2, 8, device=DEVICE)
    values[1] = 1e30
    param = torch.nn.Parameter(table.clone())
    param.grad = sparse_grad(torch.tensor([0, 2], device=DEVICE), values, table.shape)
    cls([param], lr=10.0, eps=torch.finfo(torch.float32).tiny, weight_decay=0.0).step()
    assert torch.isfinite(param).all(), param
    assert torch.equal(param[0], table[0])


def test_not_a_table():
    param = torch.nn.Parameter(torch.zeros(3, 2, 2))
    param.grad = torch.zeros(3, 2, 2).to_sparse()
    with pytest.raises(ValueError, match="2-D tables"):
        optim.RowwiseAdagrad([param]).step()


@pytest.mark.aot
def test_kernels_compile_for_gpus():
    """sm_80 / sm_90 AOT builds of both kernels for bf16 tables at the paper's width, no spills."""
    import aot
    import configs
    jobs = [job for arch in aot.ARCHS for job in configs.optimizers(configs.PAPER, arch)]
    reports = aot.compile_report(jobs)
    assert len(reports) == 2 * len(aot.ARCHS)
    for job, stats in zip(jobs, reports):
        assert stats["local_bytes"] == 0 and 0 < stats["registers"] <= 255, (aot.describe(job), stats)
