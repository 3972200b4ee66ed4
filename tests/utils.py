"""Helpers for the tests: fresh random inputs, NaN-poisoned outputs, error metrics."""
import torch


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors while a test runs, so a kernel that
    leaves part of its output unwritten fails the comparison instead of passing on stale zeros."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2 ** 31) + 7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))


def rel_rms_error(actual, expected):
    """||actual - expected||_2 / ||expected||_2 in float64: the bf16/fp16 comparison metric."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_ids(T, h, k, rows, device="cpu", dtype=torch.int64):
    """Expert ids in [0, rows), the last row always among them."""
    ids = torch.randint(0, rows, (T, h, k), device=device, dtype=dtype)
    ids.view(-1)[0] = rows - 1
    return ids
