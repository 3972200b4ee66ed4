"""Fault injection: what an operator meets when things go wrong, each case ending in a correct result
or a clear error, never in lost data, a crash or a hang.

- Resume: a training run interrupted by torch.save / torch.load of the model and of its optimizers
  continues bit for bit as the uninterrupted run, for every table dtype, both row-sparse optimizers
  and both of their step paths (the PyTorch steps of CPU tensors, the Triton kernels under the
  interpreter); the kernels refuse optimizer state of another dtype than float32.

Bounded in time: about a minute and a half on 2 cores (CI runs it with the rest of tests/).
"""
import io

import pytest
import torch

import peer_kernels
from peer_kernels import csrc, optim

# ---- resume: optimizer and model state through torch.save / torch.load ------------------------------

TABLE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_SPARSE_OPTIMIZERS = {"SparseAdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                         "RowwiseAdagrad": dict(lr=0.1, eps=1e-8, weight_decay=0.01)}
STEPS_BEFORE, STEPS_AFTER = 1, 2


@pytest.fixture(params=["pytorch", "kernels"])
def step_path(request, monkeypatch):
    """The optimizers' two step paths: the PyTorch steps (CPU tensors) and the Triton kernels (under
    the interpreter without a GPU)."""
    if request.param == "pytorch":
        monkeypatch.setattr(optim, "_kernels_for", lambda param: None)
    elif optim._kernels_for(torch.zeros(1)) is None:
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return request.param


def _training(dtype, optimizer_name, seed):
    """A small PEER (the C++ backend where it builds) with sparse table gradients in `dtype`, a
    row-sparse optimizer on its tables and SGD with momentum on the rest (torch's AdamW writes NaN
    into fp16 parameters: its eps rounds to 0 in fp16)."""
    torch.manual_seed(seed)
    layer = peer_kernels.PEER(16, heads=2, num_experts=64, num_experts_per_head=2, dim_key=8, sparse_grad=True,
                              dtype=dtype)
    tables = [layer.w_down, layer.w_up]
    rest = [p for name, p in layer.named_parameters() if name not in ("w_down", "w_up")]
    optimizers = [getattr(optim, optimizer_name)(tables, **ROW_SPARSE_OPTIMIZERS[optimizer_name]),
                  torch.optim.SGD(rest, lr=1e-2, momentum=0.9)]
    return layer, optimizers


def _train(layer, optimizers, steps):
    for step in steps:
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(layer.w_down.dtype)
        layer(x).float().square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def _state_tensors(layer, optimizers):
    """Every entry of the model's and the optimizers' state, by name."""
    tensors = {f"model {name}": value for name, value in layer.state_dict().items()}
    for i, optimizer in enumerate(optimizers):
        for param_id, entry in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer {i} param {param_id} {key}": value for key, value in entry.items()})
    return tensors


@pytest.mark.parametrize("optimizer_name", ROW_SPARSE_OPTIMIZERS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(step_path, dtype, optimizer_name):
    """Before: torch.optim's load_state_dict cast the fp32 state to a 16-bit table's dtype; the
    PyTorch steps then trained differently and the kernels read the 16-bit state as fp32 (NaN)."""
    layer, optimizers = _training(dtype, optimizer_name, seed=0)
    _train(layer, optimizers, range(STEPS_BEFORE + STEPS_AFTER))
    expected = _state_tensors(layer, optimizers)

    layer, optimizers = _training(dtype, optimizer_name, seed=0)
    _train(layer, optimizers, range(STEPS_BEFORE))
    checkpoint = io.BytesIO()
    torch.save({"model": layer.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}, checkpoint)
    del layer, optimizers
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    layer, optimizers = _training(dtype, optimizer_name, seed=1)  # other weights until loaded
    layer.load_state_dict(saved["model"])
    for optimizer, state in zip(optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    _train(layer, optimizers, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))

    actual = _state_tensors(layer, optimizers)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[name].dtype == value.dtype, (name, actual[name].dtype, value.dtype)
            assert torch.isfinite(value).all(), name
            assert torch.equal(actual[name], value), f"{name}: the resumed run differs"
        else:  # SparseAdamW's step count
            assert actual[name] == value, name


@pytest.mark.parametrize("optimizer_name, state_name", [("SparseAdamW", "exp_avg_sq"), ("RowwiseAdagrad", "sum")])
def test_optimizer_state_of_another_dtype_is_refused(step_path, optimizer_name, state_name):
    """The steps read and write their state as float32: state of another dtype is an error naming it,
    not memory read as the wrong type."""
    table = torch.nn.Parameter(torch.randn(6, 8).bfloat16())
    optimizer = getattr(optim, optimizer_name)([table])
    for _ in range(2):
        table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 8).bfloat16(), (6, 8)).coalesce()
        if optimizer.state:
            optimizer.state[table][state_name] = optimizer.state[table][state_name].bfloat16()
            with pytest.raises(TypeError, match=f"{state_name}: expected float32 optimizer state"):
                optimizer.step()
        else:
            optimizer.step()
