"""Input checks shared by the module, every op and every backend (the reference included).

Each check raises before any work is done, and its message names the argument, what was expected
and what was given. Nothing is silently cast, truncated or wrapped around.

Dtype rules of the ops (docs/numerics.md, "Dtypes and mixed precision"): queries and keys share
one float dtype; x, the expert tables and the gates may each have their own (the tables are read in
their stored dtype, never copied to another), except that float64 mixes with nothing: a float64 x
needs float64 tables, and the other way round. Accumulation is float64 for float64 inputs, float32
otherwise.

Quantized tables (peer_kernels.quantize_): int8 or float8_e4m3fn, each with its scale, one float32
per row (a table row is its stored values times its scale). They are for inference: no backward op
takes a scale, so an op on quantized tables refuses inputs that would need a gradient.
"""
import math
import numbers

import torch

from . import _device

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")
GATINGS = ("softmax", "sigmoid", "relu")
QUERY_NORMS = ("batchnorm", "layernorm", None)
BACKENDS = ("auto", "triton", "cpp", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPUTE_DTYPES = (torch.float32, torch.float64)
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)
ID_DTYPES = (torch.int32, torch.int64)


def compute_dtype(dtype):
    """The accumulation dtype of every backend: float64 stays float64 (gradcheck), every other
    float computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_topk(k, k_sub, n, k_name, k_sub_name):
    """k experts per head from k_sub sub-keys per half of n: 1 <= k_sub <= n, 1 <= k <= k_sub**2.
    The names are the caller's arguments (the module's num_experts_per_head / product_key_topk, the
    ops' k / k_sub), so a message names what the user wrote."""
    check_int(k_name, k, 1)
    check_int(k_sub_name, k_sub, 1)
    if k_sub > n:
        raise ValueError(f"{k_sub_name}: expected <= n = sqrt(num_experts) = {n} sub-keys per half, got {k_sub}")
    if k > k_sub * k_sub:
        raise ValueError(f"{k_name}: expected <= {k_sub_name}**2 = {k_sub * k_sub} candidates, got {k}")


def resolve_k_sub(k, k_sub, n, k_name, k_sub_name):
    """k_sub, defaulting to k; checked against n (errors name k when k_sub was defaulted)."""
    if k_sub is None:
        check_topk(k, k, n, k_name, f"{k_name} ({k_sub_name} defaults to it)")
        return k
    check_topk(k, k_sub, n, k_name, k_sub_name)
    return k_sub


def sub_keys_per_half(num_experts):
    """n such that n*n == num_experts, or a ValueError."""
    check_int("num_experts", num_experts, 1)
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        raise ValueError(f"num_experts: expected a perfect square (n*n), got {num_experts}")
    return n


def check_config(*, dim, heads, num_experts, num_experts_per_head, dim_key, product_key_topk,
                 activation, gating, query_norm, backend, dropout):
    """Validates the PEER constructor; returns (n, k_sub)."""
    check_int("dim", dim, 1)
    check_int("heads", heads, 1)
    check_int("dim_key", dim_key, 1)
    n = sub_keys_per_half(num_experts)
    k_sub = resolve_k_sub(num_experts_per_head, product_key_topk, n, "num_experts_per_head", "product_key_topk")
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("gating", gating, GATINGS)
    check_choice("query_norm", query_norm, QUERY_NORMS)
    check_choice("backend", backend, BACKENDS)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
    return n, k_sub


def check_tensor(name, t, shape=None, dtypes=FLOAT_DTYPES, device=None):
    """shape: a tuple of ints or None (any size) per dim. Meta tensors (no data) are refused."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (e.g. on cpu or cuda), got a meta tensor")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (like x / queries), got {t.device}")


def check_at_least(name, size, what, minimum=1):
    if size < minimum:
        raise ValueError(f"{name}: expected at least {minimum} {what}, got {size}")


def check_float64_alone(pairs):
    """pairs of (name, tensor): float64 computes in float64 and mixes with no other dtype."""
    doubles = [name for name, t in pairs if t.dtype == torch.float64]
    if doubles and len(doubles) != len(pairs):
        others = ", ".join(f"{name} {t.dtype}" for name, t in pairs if t.dtype != torch.float64)
        raise TypeError(f"{doubles[0]}: float64 mixes with no other dtype (it computes in float64), "
                        f"but got {others}")


def check_retrieval(queries, keys, k, k_sub):
    """queries (T, h, 2, dk), keys (h or 1, n, 2, dk) of one dtype; returns the resolved k_sub."""
    check_tensor("queries", queries, (None, None, 2, None))
    T, h, _, dk = queries.shape
    check_at_least("queries", h, "head in dim 1")
    check_at_least("queries", dk, "feature in dim 3 (dim_key)")
    check_tensor("keys", keys, (None, None, 2, dk), dtypes=(queries.dtype,), device=queries.device)
    if keys.shape[0] not in (1, h):
        raise ValueError(f"keys: expected {h} heads (or 1 for shared keys) in dim 0, got {keys.shape[0]}")
    return resolve_k_sub(k, k_sub, keys.shape[1], "k", "k_sub")


def check_table(name, table, scale, shape, device):
    """An expert table `name` of `shape` on `device`: a float dtype, or a quantized one with its
    scale `name`_scale, (rows,) float32 on the same device."""
    if scale is None and isinstance(table, torch.Tensor) and table.dtype in QUANTIZED_DTYPES:
        raise TypeError(f"{name}: a {table.dtype} table needs its per-row scale {name}_scale "
                        f"(see peer_kernels.quantize_), got none")
    if scale is not None and isinstance(table, torch.Tensor) and table.dtype not in QUANTIZED_DTYPES:
        raise TypeError(f"{name}_scale: scales go with quantized tables "
                        f"{tuple(str(d) for d in QUANTIZED_DTYPES)}, but {name} is {table.dtype}")
    check_tensor(name, table, shape, dtypes=QUANTIZED_DTYPES if scale is not None else FLOAT_DTYPES, device=device)
    if scale is not None:
        check_tensor(f"{name}_scale", scale, (table.shape[0],), dtypes=(torch.float32,), device=device)


def quantized_training_error(name):
    """The error for `name`, which would need a gradient through quantized tables."""
    return ValueError(f"{name}: requires a gradient, but the expert tables are quantized (peer_kernels.quantize_), "
                      f"which is for inference only: run under torch.no_grad() or torch.inference_mode(), or train "
                      f"with float tables and quantize after")


def check_inference_only(scales, tensors):
    """With quantized tables (any scale given), none of the (name, tensor) pairs may need a
    gradient: no backward op takes the scales."""
    if all(scale is None for scale in scales) or not torch.is_grad_enabled():
        return
    for name, t in tensors:
        if t.requires_grad:
            raise quantized_training_error(name)


def check_tables(x, w_down, w_up, rows=None, d_out=None, w_down_scale=None, w_up_scale=None):
    """w_down (rows, d_in) with x's d_in and w_up (rows, d_out) of one dtype, on x's device, float
    or quantized with their scales; float64 only with a float64 x. d_out: required width of w_up,
    or None (any, at least 1)."""
    check_table("w_down", w_down, w_down_scale, (rows, x.shape[1]), x.device)
    check_table("w_up", w_up, w_up_scale, (w_down.shape[0], d_out), x.device)
    if w_up.dtype != w_down.dtype:
        raise TypeError(f"w_up: expected dtype {w_down.dtype} (w_down's), got {w_up.dtype}")
    check_at_least("w_up", w_up.shape[1], "feature in dim 1 (d_out)")
    check_float64_alone([("x", x), ("w_down", w_down)])


def check_experts(x, expert_ids, gates, w_down, w_up, activation, check_range=True, w_down_scale=None,
                  w_up_scale=None):
    """x (T, d_in), expert_ids (T, h, k) int32/int64, gates (T, h, k), w_down (E, d_in), w_up (E, d_out),
    quantized with their scales (E,) or not.

    Ids are checked against the table size on the host (one reduction): a kernel must never read
    out of bounds. check_range=False leaves that to check_expert_ids (for code traced by
    torch.compile, where reading a value back to the host is a graph break).
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("x", x, (None, None))
    T, d = x.shape
    check_at_least("x", d, "feature in dim 1 (d)")
    check_tensor("expert_ids", expert_ids, (T, None, None), dtypes=ID_DTYPES, device=x.device)
    check_tensor("gates", gates, tuple(expert_ids.shape), device=x.device)
    check_tables(x, w_down, w_up, w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    check_inference_only((w_down_scale, w_up_scale), (("x", x), ("gates", gates), ("w_down", w_down), ("w_up", w_up)))
    if check_range:
        check_expert_ids(expert_ids, w_down.shape[0])


def check_expert_ids(expert_ids, rows):
    """Every id in [0, rows). Reads the range back to the host, so it is skipped while torch.compile
    traces (the ops check again where they run eagerly; compiled indexing asserts on the device)."""
    if expert_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"expert_ids: expected values in [0, {rows}) (rows of w_down), got [{lo}, {hi}]")


def checked_expert_ids(expert_ids, rows):
    """Ids that no kernel can read or write out of a table of `rows` rows with, as a launcher uses
    them: checked on the host for CPU tensors (a ValueError); on a GPU without a host sync (which
    would cost a round trip per call and rule out CUDA-graph capture): an asynchronous device
    assert, which fails the next synchronisation with the message, and ids clamped into [0, rows)
    until then."""
    if not expert_ids.is_cuda:
        check_expert_ids(expert_ids, rows)
        return expert_ids
    torch._assert_async(((expert_ids >= 0) & (expert_ids < rows)).all(),
                        f"expert_ids: expected values in [0, {rows}) (rows of the expert tables)")
    return expert_ids.clamp(0, rows - 1)


def check_launchable(name, t):
    """Triton kernels take CUDA tensors, or CPU tensors when Triton interprets them."""
    if t.device.type != "cuda" and not _device.INTERPRETED:
        raise ValueError(f"{name}: expected a CUDA tensor for the Triton ops (or TRITON_INTERPRET=1 set before "
                         f"import), got device {t.device}")


# The first CUDA architecture whose Triton has float8_e4m3fn (fp8e4nv): sm_89 (Ada), sm_90 (Hopper).
FLOAT8_ARCH = 89


def check_table_arch(name, table, arch):
    """A table the Triton kernels can read on CUDA architecture `arch` (_device.cuda_arch; 0 off
    CUDA, where the interpreter reads any dtype): float8_e4m3fn needs sm_89 or newer."""
    if table.dtype == torch.float8_e4m3fn and 0 < arch < FLOAT8_ARCH:
        raise TypeError(f"{name}: float8_e4m3fn tables need a GPU of sm_{FLOAT8_ARCH} or newer for the Triton "
                        f"kernels, and this one is sm_{arch}; quantize to torch.int8 instead "
                        f"(peer_kernels.quantize_(module, torch.int8))")


def check_layer_input(x, dim):
    """x (..., dim) of a float dtype, with data: a PEER layer's input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape (..., dim) with dim = {dim}, got {tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError("x: expected a tensor with data (e.g. on cpu or cuda), got a meta tensor")


def check_batch_norm_input(projection):
    """query_norm="batchnorm" in training: the query features (T, features) it is about to fold
    into its running statistics must be finite, or one NaN token makes the statistics NaN, and every
    later eval output with them. CPU tensors: checked on the host, a ValueError before the
    statistics change. CUDA tensors (and code torch.compile traces): an asynchronous device assert,
    because a host check would synchronise every training step and rule out CUDA-graph capture; it
    fails the next synchronisation, and so any checkpoint save (which copies the statistics to the
    host) before NaN statistics can reach the file, and like every device assert it ends the
    process's use of the GPU."""
    message = ("x: a token's query features are not finite (NaN or inf) in training with query_norm='batchnorm', "
               "whose running statistics would become NaN, and every later eval output with them; find the "
               "non-finite input, or use query_norm='layernorm' (per token)")
    finite = torch.isfinite(projection).all()
    if projection.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(finite, message)
    elif not finite:
        raise ValueError(message)


def check_fused(x, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
                w_down_scale=None, w_up_scale=None):
    """The fused op's arguments; returns the resolved k_sub."""
    check_choice("gating", gating, GATINGS)
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("x", x, (None, None))
    check_at_least("x", x.shape[1], "feature in dim 1 (d)")
    k_sub = check_retrieval(queries, keys, k, k_sub)
    h = queries.shape[1]
    if queries.shape[0] != x.shape[0]:
        raise ValueError(f"queries: expected {x.shape[0]} tokens (x's dim 0) in dim 0, got {queries.shape[0]}")
    check_tensor("queries", queries, device=x.device)
    check_float64_alone([("x", x), ("queries", queries)])
    check_tables(x, w_down, w_up, rows=(h if separate_embed_per_head else 1) * keys.shape[1] ** 2,
                 d_out=x.shape[1], w_down_scale=w_down_scale, w_up_scale=w_up_scale)
    check_inference_only((w_down_scale, w_up_scale), (("x", x), ("queries", queries), ("keys", keys),
                                                      ("w_down", w_down), ("w_up", w_up)))
    return k_sub


def check_down(x, expert_ids, w_down, check_range=True, w_down_scale=None):
    """The down projection's arguments: x (T, d), expert_ids (T, h, k), w_down (E, d) with its scale
    (E,) if quantized."""
    check_tensor("x", x, (None, None))
    check_at_least("x", x.shape[1], "feature in dim 1 (d)")
    check_tensor("expert_ids", expert_ids, (x.shape[0], None, None), dtypes=ID_DTYPES, device=x.device)
    check_table("w_down", w_down, w_down_scale, (None, x.shape[1]), x.device)
    check_float64_alone([("x", x), ("w_down", w_down)])
    check_inference_only((w_down_scale,), (("x", x), ("w_down", w_down)))
    if check_range:
        check_expert_ids(expert_ids, w_down.shape[0])


def check_mix(z, expert_ids, gates, w_up, activation, check_range=True, w_up_scale=None):
    """The up mix's arguments: z, expert_ids, gates (T, h, k), w_up (E, d_out) with its scale (E,)
    if quantized. z is peer_down's output, in a compute dtype (compute_dtype),
    which every backend reads it in."""
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("z", z, (None, None, None), dtypes=COMPUTE_DTYPES)
    check_tensor("expert_ids", expert_ids, tuple(z.shape), dtypes=ID_DTYPES, device=z.device)
    check_tensor("gates", gates, tuple(z.shape), device=z.device)
    check_table("w_up", w_up, w_up_scale, (None, None), z.device)
    check_at_least("w_up", w_up.shape[1], "feature in dim 1 (d_out)")
    check_float64_alone([("z", z), ("w_up", w_up)])
    check_inference_only((w_up_scale,), (("z", z), ("gates", gates), ("w_up", w_up)))
    if check_range:
        check_expert_ids(expert_ids, w_up.shape[0])


def check_optimizer_state(name, state, param, rows_only=False):
    """A row-sparse optimizer's state tensor for the table `param` (E, D): float32 whatever the
    table's dtype (the steps read and write it as float32; the Triton kernels would read 16-bit
    memory as float32), contiguous, (E, D), or (E,) with rows_only, on the table's device."""
    shape = tuple(param.shape[:1] if rows_only else param.shape)
    if state.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32 optimizer state (for a {param.dtype} table too), got {state.dtype}")
    if tuple(state.shape) != shape or not state.is_contiguous():
        raise ValueError(f"{name}: expected contiguous optimizer state of shape {shape}, got shape "
                         f"{tuple(state.shape)}{'' if state.is_contiguous() else ' (not contiguous)'}")
    if state.device != param.device:
        raise ValueError(f"{name}: expected optimizer state on the table's device {param.device}, got {state.device}")


# The smallest eps of the row-sparse optimizers: the smallest normal float32. A touched row whose
# gradient was zero so far has a zero denominator but for eps (0/0 is NaN), and a GPU may flush a
# subnormal eps to zero.
MIN_OPTIMIZER_EPS = torch.finfo(torch.float32).tiny


def check_number(name, value, minimum=0.0, below=None):
    """A finite real number (not a bool) >= minimum, and < below when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum or (below is not None and value >= below):
        bounds = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ValueError(f"{name}: expected a finite number {bounds}, got {value!r}")


def check_sparse_adamw(*, lr, betas, eps, weight_decay):
    """SparseAdamW's hyperparameters (a param group's)."""
    check_number("lr", lr)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, below=1.0)
    check_number("eps", eps, minimum=MIN_OPTIMIZER_EPS)
    check_number("weight_decay", weight_decay)


def check_rowwise_adagrad(*, lr, eps, weight_decay, initial_accumulator_value):
    """RowwiseAdagrad's hyperparameters (a param group's)."""
    check_number("lr", lr)
    check_number("eps", eps, minimum=MIN_OPTIMIZER_EPS)
    check_number("weight_decay", weight_decay)
    check_number("initial_accumulator_value", initial_accumulator_value)
