"""The small pieces of PEER's math that the layer, the backends, the integrations and the oracle
share: the activations, the gatings, the per-head offsets of separate expert tables, and computing
in the documented dtype under autocast. Plain PyTorch."""
import contextlib

import torch
import torch.nn.functional as F

from ._checks import ACTIVATIONS, GATINGS


def autocast_off(like):
    """A context in which an op computes in the dtypes it documents: torch.autocast, which would
    run its matmuls in 16 bits, is switched off on `like`'s device. Entering torch.autocast costs
    ~5 us, and several times that with cold caches: skipped where autocast is off already."""
    if not torch.is_autocast_enabled(like.device.type):
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, enabled=False)


def activate(z, activation):
    """act(z), elementwise, for an activation name of _checks.ACTIVATIONS."""
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "identity":
        return z
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def gate(scores, gating):
    """scores (..., k) -> gates (..., k); softmax normalizes over the k experts of one head."""
    if gating == "softmax":
        return torch.softmax(scores, dim=-1)
    if gating == "sigmoid":
        return torch.sigmoid(scores)
    if gating == "relu":
        return F.relu(scores)
    raise ValueError(f"gating: expected one of {GATINGS}, got {gating!r}")


def head_offsets(expert_ids, num_experts):
    """expert_ids (T, h, k): shift head h's ids by h*num_experts, so that each head owns its own
    block of the expert tables (separate_embed_per_head)."""
    heads = expert_ids.shape[1]
    offsets = torch.arange(heads, device=expert_ids.device, dtype=expert_ids.dtype) * num_experts
    return expert_ids + offsets[:, None]
