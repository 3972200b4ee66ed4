"""A training step as users write it: the forward and loss under torch.compile(fullgraph=True), the
backward that AOTAutograd compiled with it, an optimizer step, and a second step on the updated
weights; with the aot_eager and the inductor compilers, on every backend that runs on a CPU (Triton
under its interpreter, tiny), plain and under autocast. Each step's loss and every gradient must be
within the bound of tests/bounds.py of the float64 oracle, as the eager step's are."""
import copy

import pytest
import torch

import bounds
import peer_kernels
from conftest import DEVICE, gpu_sizes
from peer_kernels import _device
from utils import graph_replay, untie_layer

BACKENDS = ["auto"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])


def make_layer(backend, query_norm):
    torch.manual_seed(0)
    return peer_kernels.PEER(16, heads=2, num_experts=36, num_experts_per_head=3, dim_key=8, query_norm=query_norm,
                             pre_rmsnorm=True, backend=backend, device=DEVICE).train()


def check_step(layer, x, target, loss, grads):
    """The loss <y, target> and the gradients against the float64 oracle at the layer's weights
    (as they were for this step: the caller passes a copy taken before it)."""
    expected = bounds.expected_layer(layer, x, target)
    y64, magnitude = expected["y"]
    exact_loss = (y64 * target.double()).sum()
    loss_magnitude = (target.double().abs() * (magnitude + y64.abs())).sum()
    bounds.check("loss", loss.detach().reshape(()), exact_loss, loss_magnitude)
    del expected["y"], expected["x"]
    bounds.check_all(grads, expected)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step(backend, compiler):
    query_norm = "batchnorm" if compiler == "aot_eager" else "layernorm"
    layer = make_layer(backend, query_norm)
    x = untie_layer(layer, torch.randn(2, 6, 16, device=DEVICE))
    target = torch.randn(2, 6, 16, device=DEVICE)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def loss_fn(x, target):
        return (layer(x) * target).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    eager_layer = copy.deepcopy(layer)
    for step in range(2):
        before = copy.deepcopy(layer)
        optimizer.zero_grad()
        loss = compiled(x, target)
        loss.backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        check_step(before, x, target, loss, grads)
        optimizer.step()
        if step == 0:
            # the eager step from the same weights lands within the same bound of the same values
            eager_loss = (eager_layer(x) * target).sum()
            eager_loss.backward()
            check_step(before, x, target, eager_loss, {n: p.grad for n, p in eager_layer.named_parameters()})
            for name, p in layer.named_parameters():
                assert not torch.equal(p, before.get_parameter(name)), f"{name}: the optimizer step did not apply"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_under_autocast(backend):
    """Forward and loss compiled under torch.autocast(bfloat16), fp32 parameters: bf16 output, fp32
    gradients, the same as eager autocast to within bf16 rounding of the op's inputs."""
    layer = make_layer(backend, "layernorm")
    x = torch.randn(2, 6, 16, device=DEVICE)
    target = torch.randn(2, 6, 16, device=DEVICE)

    def loss_fn(x, target):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        return (y.float() * target).sum()

    torch._dynamo.reset()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        layer.zero_grad()
        loss = fn(x, target)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert all(g.dtype == torch.float32 for g in compiled_grads.values())
    # aot_eager runs the same ops on the same bf16 values as eager; allow a few bf16 roundings
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x).float()
    assert (compiled_loss - eager_loss).abs() <= 2 ** -6 * (y * target).abs().sum()
    for name, grad in compiled_grads.items():
        assert (grad - eager_grads[name]).abs().max() <= 2 ** -6 * eager_grads[name].abs().max(), name


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_with_dropout(backend, compiler):
    """The dropout path (retrieval and expert ops apart, the mask between them) compiles as one graph
    too; its random mask has no float64 twin, so the check is that the step runs and that every
    parameter gets a finite gradient of its own shape."""
    torch.manual_seed(0)
    layer = peer_kernels.PEER(16, heads=2, num_experts=36, num_experts_per_head=3, dim_key=8, dropout=0.3,
                              backend=backend, device=DEVICE).train()
    torch._dynamo.reset()
    step = torch.compile(lambda x: layer(x).pow(2).sum(), fullgraph=True, backend=compiler)
    loss = step(torch.randn(2, 6, 16, device=DEVICE))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_training_step():
    """No op syncs with the host on the dense path (ids are range-checked on the device), so a
    forward + backward of the layer captures into a CUDA graph; replays give the eager values."""
    layer = make_layer("triton", "layernorm")
    tokens = gpu_sizes(64, 8)
    x = torch.randn(2, tokens, 16, device=DEVICE)
    target = torch.randn(2, tokens, 16, device=DEVICE)
    params = list(layer.parameters())

    def step():
        return torch.autograd.grad((layer(x) * target).sum(), params)

    eager = step()
    captured = graph_replay(step, DEVICE)
    for (name, _), e, c in zip(layer.named_parameters(), eager, captured):
        if name == "keys":   # summed with atomics: the order varies run to run
            assert (c - e).abs().max() <= 1e-5 * e.abs().max(), name
        else:                # same kernels, same order: bitwise
            assert torch.equal(c, e), name
