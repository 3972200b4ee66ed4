"""Quantized expert tables for inference: `peer_kernels.quantize_(module, dtype=torch.int8)`.

    layer = peer_kernels.PEER(1024, num_experts=1024**2).eval()   # or a model holding PEER layers
    peer_kernels.quantize_(layer)                                 # int8; torch.float8_e4m3fn also
    with torch.no_grad():
        y = layer(x)

Each expert table, w_down and w_up (E, d), is stored in `dtype` with one float32 scale per row
(`w_down_scale`, `w_up_scale`, (E,)): symmetric absmax per row, scale = max |row| / Q with Q the
largest value the dtype holds (127 for int8, 448 for float8_e4m3fn), so a row's largest value
keeps its full precision and a row of zeros stays exact. int8 rounds each value to the nearest
multiple of its row's scale (error <= scale / 2); float8_e4m3fn keeps 3 mantissa bits of each
(relative error <= 2**-4, absolute <= 2**-10 * scale below the smallest normal). The tables take a
quarter of float32's bytes (half of bfloat16's), and the expert stage, which reads h*k rows of each
per token, reads that much less: every backend multiplies the rows by their scales where it reads
them (Triton and C++ in registers, the reference on the gathered rows), never materializing a
dequantized table.

A quantized layer is for inference: its tables do not require grad (int8 cannot), and a forward
whose inputs or parameters would need a gradient through the expert stage raises; run it under
torch.no_grad() or torch.inference_mode(). The rest of the layer (query projection, norms, keys)
stays as it was.

Saving and loading: the state_dict holds the quantized tables and their scales under `w_down`,
`w_up`, `w_down_scale`, `w_up_scale`. A layer loading a state_dict with quantized tables becomes
quantized in their dtype first (a fresh float layer loads a quantized checkpoint); float tables
into a quantized layer raise (load them into a float layer, then quantize_). On a transformers
model made by peer_kernels.transformers.apply_peer, quantize_ also records the dtype in
config.peer["quantization"], so that save_pretrained / peer_kernels.transformers.from_pretrained
rebuild the layers quantized.
"""
import torch
from torch import nn

from . import _checks, _memory
from .module import PEER

TABLES = ("w_down", "w_up")
# The largest magnitude each quantized dtype holds: a row's absmax maps to it.
LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Rows quantized at a time: bounds the float32 working copy (16M values, 64 MB) of a large table.
_VALUES_PER_CHUNK = 1 << 24


def dtype_name(dtype):
    """The name config.peer["quantization"] records: "int8" or "float8_e4m3fn"."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name):
    """The inverse of dtype_name, checked."""
    _checks.check_choice("quantization", name, tuple(dtype_name(d) for d in LARGEST))
    return getattr(torch, name)


def quantize_rows(table, dtype):
    """(values, scale): table (E, d) float -> values (E, d) in `dtype`, scale (E,) float32, with
    table ~= values * scale[:, None] (symmetric absmax per row; see the module docstring). Works
    through the rows in chunks, so a large table needs no float32 copy of itself."""
    _checks.check_choice("dtype", dtype, tuple(LARGEST))
    largest = LARGEST[dtype]
    values = _memory.empty(table.shape, dtype=dtype, device=table.device)
    scale = torch.empty(table.shape[0], dtype=torch.float32, device=table.device)
    rows = max(1, _VALUES_PER_CHUNK // max(1, table.shape[1]))
    for start in range(0, table.shape[0], rows):
        chunk = table[start:start + rows].float()
        absmax = chunk.abs().amax(dim=1)
        if not torch.isfinite(absmax).all():
            bad = start + int((~torch.isfinite(absmax)).nonzero()[0])
            raise ValueError(f"table: row {bad} is not finite; quantization needs finite values")
        step = absmax / largest
        scaled = (chunk / torch.where(step > 0, step, 1.0)[:, None]).clamp(-largest, largest)
        values[start:start + rows] = scaled.round() if dtype == torch.int8 else scaled
        scale[start:start + rows] = step
    return values, scale


def is_quantized(layer):
    """Whether a PEER layer's tables are quantized."""
    return layer.w_down_scale is not None


def _set_tables(layer, tables):
    """tables: name -> (values, scale). The values become frozen Parameters (the layer's parameter
    names and count stay), the scales its buffers."""
    for name, (values, scale) in tables.items():
        setattr(layer, name, nn.Parameter(values, requires_grad=False))
        setattr(layer, f"{name}_scale", scale)


def quantize_layer(layer, dtype):
    """Quantizes one PEER layer's tables in place (a layer already quantized to `dtype` is left as
    it is; to another dtype, raises)."""
    if is_quantized(layer):
        if layer.w_down.dtype != dtype:
            raise ValueError(f"dtype: the layer's tables are quantized to {layer.w_down.dtype} already; quantize "
                             f"the float layer to {dtype} instead")
        return
    if layer.w_down.device.type == "meta":
        raise ValueError("module: a PEER layer's tables are on the meta device (not allocated); allocate and load "
                         "them first")
    with torch.no_grad():
        _set_tables(layer, {name: quantize_rows(getattr(layer, name), dtype) for name in TABLES})


def make_quantized(layer, dtype):
    """Gives a PEER layer unwritten quantized tables of `dtype` and their scales, on its device: a
    layer about to load quantized ones (a checkpoint, or transformers' from_pretrained)."""
    _set_tables(layer, {name: (_memory.empty(getattr(layer, name).shape, dtype=dtype, device=layer.w_down.device),
                               torch.empty(layer.w_down.shape[0], dtype=torch.float32, device=layer.w_down.device))
                        for name in TABLES})


def match_checkpoint(layer, state_dict, prefix):
    """Before `layer` loads `state_dict`: quantized tables in it make the layer quantized in their
    dtype (unwritten, to be loaded); float tables into a quantized layer raise."""
    saved = state_dict.get(prefix + "w_down")
    if saved is None:
        return
    if prefix + "w_down_scale" in state_dict and saved.dtype in LARGEST:
        if not is_quantized(layer) or layer.w_down.dtype != saved.dtype:
            make_quantized(layer, saved.dtype)
    elif is_quantized(layer):
        raise ValueError(f"state_dict: {prefix}w_down is a {saved.dtype} table without its scale, but this layer's "
                         f"tables are quantized ({layer.w_down.dtype}); load it into a float layer, then quantize_")


def quantize_(module, dtype=torch.int8):
    """Quantizes the expert tables of every peer_kernels.PEER layer in `module` (a layer or a
    model) in place, to `dtype` (torch.int8, or torch.float8_e4m3fn) with a float32 scale per row;
    returns `module`. See the module docstring. On a model with config.peer (apply_peer), records
    the dtype there for from_pretrained."""
    _checks.check_choice("dtype", dtype, tuple(LARGEST))
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, PEER)]
    if not layers:
        raise ValueError(f"module: no peer_kernels.PEER layer in this {type(module).__name__}")
    for layer in layers:
        quantize_layer(layer, dtype)
    config = getattr(module, "config", None)
    if isinstance(getattr(config, "peer", None), dict):
        config.peer = {**config.peer, "quantization": dtype_name(dtype)}
    return module
