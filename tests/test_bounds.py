"""The comparison of tests/bounds.py can fail: what every kernel test relies on. Correct results
from every backend stay far below C = 16 units of eps * S; a wrong expert row or a gate off by
1e-3 lands orders of magnitude above it."""
import pytest
import torch

import bounds
from conftest import DEVICE, device_for
from peer_kernels import _device, backends, reference

BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])


def experts_case(activation):
    T, h, k, d, rows = 6, 3, 5, 40, 23
    x, ids = torch.randn(T, d), torch.randint(0, rows, (T, h, k))
    gates, w_down, w_up, dy = torch.rand(T, h, k) + 0.1, torch.randn(rows, d), torch.randn(rows, d), torch.randn(T, d)
    expected = bounds.experts(x.double(), ids, gates.double(), w_down.double(), w_up.double(), dy.double(), activation)
    return (x, ids, gates, w_down, w_up), dy, expected


def run(ops, device, inputs, dy, activation):
    x, ids, gates, w_down, w_up = (t.to(device) for t in inputs)
    leaves = [t.clone().requires_grad_() for t in (x, gates, w_down, w_up)]
    y = ops.peer_experts(leaves[0], ids, *leaves[1:], activation)
    grads = torch.autograd.grad(y, leaves, dy.to(device))
    return {name: t.cpu() for name, t in zip(("y", "dx", "dgates", "dw_down", "dw_up"), (y, *grads))}


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_correct_results_are_far_inside_and_planted_errors_far_outside(activation):
    inputs, dy, expected = experts_case(activation)
    for name in BACKENDS:
        actual = run(backends.get(name, device_for(name)), device_for(name), inputs, dy, activation)
        for key, value in actual.items():
            assert bounds.ratio(value, *expected[key]).max() <= bounds.C / 4, (name, key)
    x, ids, gates, w_down, w_up = inputs
    # plant on the slot that matters most, so the error cannot vanish behind a ~0 activation
    coef = (gates.double() * reference.activate(torch.einsum("thkd,td->thk", w_down.double()[ids], x.double()),
                                                activation)).abs()
    slot = tuple(int(i) for i in torch.unravel_index(coef.argmax(), coef.shape))
    wrong_row = ids.clone()
    wrong_row[slot] = (wrong_row[slot] + 1) % w_down.shape[0]
    off_gate = gates.clone()
    off_gate[slot] += 1e-3
    ops = backends.get("reference", DEVICE)
    for planted in ((x, wrong_row, gates, w_down, w_up), (x, ids, off_gate, w_down, w_up)):
        y = run(ops, DEVICE, planted, dy, activation)["y"]
        assert bounds.ratio(y, *expected["y"]).max() > 10 * bounds.C
        with pytest.raises(AssertionError, match="eps \\* S"):
            bounds.check("y", y, *expected["y"])


def test_nan_must_match_nan():
    exact, magnitude = torch.tensor([1.0, float("nan")], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    bounds.check("same", torch.tensor([1.0, float("nan")]), exact, magnitude)
    for wrong in ([1.0, 0.0], [float("nan"), float("nan")]):
        with pytest.raises(AssertionError):
            bounds.check("wrong", torch.tensor(wrong), exact, magnitude)
