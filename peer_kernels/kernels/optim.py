"""Triton kernels of the row-sparse optimizers (peer_kernels/optim.py): one program per (touched row,
column block) updates that row of the parameter and of its state, and nothing else is read or
written. Parameters and gradient values in their own dtype (16-bit tables stay 16-bit), state and
arithmetic in fp32. Row offsets are int64: rows * D reaches 2**31 for a 1024**2 x 4096 table.
"""
import triton
import triton.language as tl


@triton.jit
def sparse_adamw_kernel(
    param_ptr,        # (E, D) updated in place
    rows_ptr,         # (U,) int64: the touched rows, unique
    grad_ptr,         # (U, D): their gradients
    exp_avg_ptr,      # (E, D) fp32, updated in place at the rows
    exp_avg_sq_ptr,   # (E, D) fp32, updated in place at the rows
    lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """AdamW on one touched row: moments, then decoupled weight decay and the step, as torch.optim.AdamW
    computes them (step_size = lr / (1 - beta1**t))."""
    index = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    at = tl.load(rows_ptr + index) * D + offs
    grad = tl.load(grad_ptr + index * D + offs, mask=mask).to(tl.float32)
    param = tl.load(param_ptr + at, mask=mask).to(tl.float32)
    exp_avg = beta1 * tl.load(exp_avg_ptr + at, mask=mask) + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * tl.load(exp_avg_sq_ptr + at, mask=mask) + (1.0 - beta2) * grad * grad
    # The ratio first: it is 0 for a zero gradient and stays bounded where the step size times a
    # large moment would overflow (inf / inf is NaN); eps >= the smallest normal float keeps the
    # denominator above 0.
    ratio = exp_avg / (tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
    param = param * (1.0 - lr * weight_decay) - step_size * ratio
    tl.store(exp_avg_ptr + at, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + at, exp_avg_sq, mask=mask)
    tl.store(param_ptr + at, param.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rowwise_adagrad_kernel(
    param_ptr,        # (E, D) updated in place
    rows_ptr,         # (U,) int64: the touched rows, unique
    grad_ptr,         # (U, D): their gradients
    state_ptr,        # (E,) fp32: each row's sum of mean squared gradients, updated at the rows
    lr, eps, weight_decay,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row-wise Adagrad (one accumulator per row, FBGEMM's rowwise variant): state += mean(g**2) over the
    row, then param -= lr g / (sqrt(state) + eps); weight decay adds weight_decay * param to g first.
    Two passes over the row: the mean needs every column before any can be updated."""
    index = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + index)
    total = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < D
        grad = tl.load(grad_ptr + index * D + offs, mask=mask, other=0.0).to(tl.float32)
        grad += weight_decay * tl.load(param_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        total += grad * grad
    state = tl.load(state_ptr + row) + tl.sum(total, axis=0) / D
    tl.store(state_ptr + row, state)
    # The ratio grad / denom first, then lr: lr / denom overflows to inf for a large lr over a small
    # eps, and inf times a zero gradient is NaN (|grad| / sqrt(state) <= sqrt(D) otherwise).
    denom = tl.sqrt(state) + eps
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < D
        param = tl.load(param_ptr + row * D + offs, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + index * D + offs, mask=mask).to(tl.float32) + weight_decay * param
        tl.store(param_ptr + row * D + offs, (param - (grad / denom) * lr).to(param_ptr.dtype.element_ty), mask=mask)
