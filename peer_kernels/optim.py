"""Optimizers for tables with sparse gradients (PEER(sparse_grad=True), nn.Embedding(sparse=True)).

Dense AdamW over a PEER layer's two (N, d) tables moves their parameters, gradients and two fp32
moments every step: ~47 GB at the paper's shapes, more than the layer itself. These update only the
rows a step touched, in one kernel per table (Triton on CUDA; plain PyTorch on a CPU):

- SparseAdamW: AdamW, lazily: a row's moments, its decoupled weight decay and its step happen only
  in steps that touch it (bias correction uses the parameter's global step count, as
  torch.optim.SparseAdam does). That is the documented difference from dense AdamW, under which an
  untouched row still decays and still moves by its old momentum.
- RowwiseAdagrad: Adagrad with one fp32 accumulator per row (the mean of the row's squared
  gradients), FBGEMM's row-wise variant: the optimizer state of a 1M x 1024 table is 4 MB, not 8 GB.

Parameters whose gradient is dense (or missing) are left alone, so a model can give its other
parameters to any dense optimizer. Gradient values may be 16-bit; state and arithmetic are fp32.

Resuming: `state_dict()` / `load_state_dict()` keep the state float32 for 16-bit tables too (where
torch.optim would cast it to the table's dtype), so a run resumed from a torch.save'd model and
optimizer state continues bit for bit as the uninterrupted run would have (both step paths, every
table dtype: tests/test_faults.py). The steps refuse state of another dtype (a TypeError naming it).

Hyperparameters are checked when a param group is added (the constructor's groups too) and at
every step (param_groups may have been edited, as by an LR scheduler): finite numbers, betas a pair
in [0, 1), eps at least the smallest normal float32 (~1.2e-38: a touched row whose gradient is zero
has nothing else in its denominator). With finite gradients, parameters and hyperparameters a step
writes no NaN, unless a product leaves float32's range (weight_decay * param, say).
"""
import itertools
import math
import types

import torch

from . import _checks, _device

try:
    from .ops import optim as kernel_steps
except ImportError:  # no Triton on this platform: the PyTorch steps below do all the work
    kernel_steps = None


def _kernels_for(param):
    """The Triton launchers for CUDA tensors (and CPU ones under the interpreter), else None."""
    if kernel_steps is not None and (param.is_cuda or _device.INTERPRETED):
        return kernel_steps
    return None


def sparse_adamw_step(param, rows, values, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """AdamW at step `step` (1, 2, ...) on param[rows] (param (E, D), rows (U,) unique int64, values
    (U, D)); exp_avg / exp_avg_sq (E, D) fp32 change at the rows only. The arithmetic of
    kernels/optim.sparse_adamw_kernel, in PyTorch."""
    _checks.check_optimizer_state("exp_avg", exp_avg, param)
    _checks.check_optimizer_state("exp_avg_sq", exp_avg_sq, param)
    beta1, beta2 = betas
    grad = values.float()
    # each table is read and written once at the rows (index_select / index_copy_), as the kernel does
    m = exp_avg.index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = v.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    p = param.index_select(0, rows).float().mul_(1 - lr * weight_decay)
    p.sub_(m.div(denom).mul_(lr / (1 - beta1 ** step)))  # the ratio first, as the kernel (see there)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    param.index_copy_(0, rows, p.to(param.dtype))


def rowwise_adagrad_step(param, rows, values, state, lr, eps, weight_decay):
    """Row-wise Adagrad on param[rows]; state (E,) fp32 changes at the rows only. The arithmetic of
    kernels/optim.rowwise_adagrad_kernel, in PyTorch."""
    _checks.check_optimizer_state("sum", state, param, rows_only=True)
    p = param.index_select(0, rows).float()
    grad = torch.add(values.float(), p, alpha=weight_decay)     # a new tensor: the gradient stays as it is
    acc = state.index_select(0, rows).add_(grad.pow(2).mean(dim=1))
    state.index_copy_(0, rows, acc)
    # the ratio first, as the kernel (see there)
    param.index_copy_(0, rows, p.sub_(grad.div_(acc.sqrt().add_(eps)[:, None]).mul_(lr)).to(param.dtype))


def _sparse_grads(group):
    """(param, rows, values, step functions) for every parameter of the group with a sparse gradient."""
    for param in group["params"]:
        grad = param.grad
        if grad is None or not grad.is_sparse:
            continue
        if param.dim() != 2 or not param.is_contiguous():
            raise ValueError(f"params: expected contiguous 2-D tables (E, d) for a row-sparse optimizer, got "
                             f"shape {tuple(param.shape)}{'' if param.is_contiguous() else ' (not contiguous)'}")
        if not grad.is_coalesced():  # e.g. the sum of several micro-batches' gradients
            grad = grad.coalesce()
        if grad._nnz():
            yield param, grad.indices()[0], grad.values(), _kernels_for(param) or _TORCH_STEPS


class _RowSparseOptimizer(torch.optim.Optimizer):
    """step() over the parameters with sparse gradients; subclasses update one table's rows and
    check a param group's hyperparameters (_check_group)."""

    def add_param_group(self, param_group):
        # checked with the defaults it would get, before torch adds it: a bad group is never kept
        # (torch.optim.Optimizer.__init__ adds the constructor's groups here too)
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict, except that the state tensors are loaded as saved
        (float32), copied to their parameter's device: torch casts floating state to the parameter's
        dtype, which rounds a 16-bit table's moments to 16 bits, and the resumed run would then
        train differently from the uninterrupted one. torch loads the groups and the other state."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {
            param_id: {key: value for key, value in entry.items() if not isinstance(value, torch.Tensor)}
            for param_id, entry in saved.items()}})
        # torch's own pairing of the saved ids with the parameters (it checked the group sizes)
        saved_ids = itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            for key, value in saved.get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # edited since they were added, maybe (an LR scheduler does)
            self._check_group(group)
        for group in self.param_groups:
            for param, rows, values, steps in _sparse_grads(group):
                self._update(group, self.state[param], param, rows, values, steps)
        return loss


class SparseAdamW(_RowSparseOptimizer):
    """Lazy AdamW on the touched rows of tables with sparse gradients (see the module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _check_group(group):
        _checks.check_sparse_adamw(lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                   weight_decay=group["weight_decay"])

    def _update(self, group, state, param, rows, values, steps):
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        state["step"] += 1
        steps.sparse_adamw_step(param, rows, values, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                group["lr"], group["betas"], group["eps"], group["weight_decay"])


class RowwiseAdagrad(_RowSparseOptimizer):
    """Adagrad with one fp32 accumulator per table row (see the module docstring)."""

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0, initial_accumulator_value=0.0):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value))

    @staticmethod
    def _check_group(group):
        _checks.check_rowwise_adagrad(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                                      initial_accumulator_value=group["initial_accumulator_value"])

    def _update(self, group, state, param, rows, values, steps):
        if not state:
            state["sum"] = torch.full((param.shape[0],), float(group["initial_accumulator_value"]),
                                      dtype=torch.float32, device=param.device)
        steps.rowwise_adagrad_step(param, rows, values, state["sum"], group["lr"], group["eps"], group["weight_decay"])


# the steps above, in the launchers' shape, for tensors the kernels cannot take
_TORCH_STEPS = types.SimpleNamespace(sparse_adamw_step=sparse_adamw_step, rowwise_adagrad_step=rowwise_adagrad_step)
