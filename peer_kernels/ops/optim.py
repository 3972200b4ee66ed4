"""Launchers of the row-sparse optimizer kernels (kernels/optim.py): each updates, in place, only
the rows a coalesced sparse gradient holds. peer_kernels/optim.py wraps them as optimizers (with
plain-PyTorch twins where Triton cannot run)."""
import math

import triton

from ..kernels import optim as kernels

# Under TRITON_INTERPRET=1 (read when triton defines the kernels) @triton.jit gives no JITFunction.
INTERPRETED = not isinstance(kernels.sparse_adamw_kernel, triton.runtime.JITFunction)


def _block(d):
    return min(triton.next_power_of_2(d), 1024)


def sparse_adamw_step(param, rows, values, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """AdamW at step `step` (1, 2, ...) on param[rows] (param (E, D), rows (U,) unique int64, values
    (U, D)); exp_avg / exp_avg_sq (E, D) fp32 change at the rows only."""
    beta1, beta2 = betas
    D = param.shape[1]
    block = _block(D)
    kernels.sparse_adamw_kernel[(rows.numel(), triton.cdiv(D, block))](
        param, rows, values.contiguous(), exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
        lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), D=D, BLOCK_D=block, num_warps=4)


def rowwise_adagrad_step(param, rows, values, state, lr, eps, weight_decay):
    """Row-wise Adagrad on param[rows]; state (E,) fp32 changes at the rows only."""
    D = param.shape[1]
    kernels.rowwise_adagrad_kernel[(rows.numel(),)](
        param, rows, values.contiguous(), state, lr, eps, weight_decay, D=D, BLOCK_D=_block(D), num_warps=4)
