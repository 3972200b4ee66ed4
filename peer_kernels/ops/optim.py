"""Launchers of the row-sparse optimizer kernels (kernels/optim.py): each updates, in place, only
the rows a coalesced sparse gradient holds. peer_kernels/optim.py wraps them as optimizers (with
plain-PyTorch twins for tensors Triton cannot take)."""
import math

import triton

from .. import _checks, _device, tuning
from ..kernels import optim as kernels


def sparse_adamw_step(param, rows, values, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """AdamW at step `step` (1, 2, ...) on param[rows] (param (E, D), rows (U,) unique int64, values
    (U, D)); exp_avg / exp_avg_sq (E, D) fp32 change at the rows only."""
    _checks.check_optimizer_state("exp_avg", exp_avg, param)
    _checks.check_optimizer_state("exp_avg_sq", exp_avg_sq, param)
    beta1, beta2 = betas
    D = param.shape[1]
    block_d, num_warps = tuning.optim_block(dim=D, arch=_device.cuda_arch(param.device))
    kernels.sparse_adamw_kernel[(rows.numel(), triton.cdiv(D, block_d))](
        param_ptr=param, rows_ptr=rows, grad_ptr=values.contiguous(), exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step_size=lr / (1 - beta1 ** step),
        bias_correction2_sqrt=math.sqrt(1 - beta2 ** step), D=D, BLOCK_D=block_d, num_warps=num_warps)


def rowwise_adagrad_step(param, rows, values, state, lr, eps, weight_decay):
    """Row-wise Adagrad on param[rows]; state (E,) fp32 changes at the rows only."""
    _checks.check_optimizer_state("sum", state, param, rows_only=True)
    D = param.shape[1]
    block_d, num_warps = tuning.optim_block(dim=D, arch=_device.cuda_arch(param.device))
    kernels.rowwise_adagrad_kernel[(rows.numel(),)](
        param_ptr=param, rows_ptr=rows, grad_ptr=values.contiguous(), state_ptr=state, lr=lr, eps=eps,
        weight_decay=weight_decay, D=D, BLOCK_D=block_d, num_warps=num_warps)
