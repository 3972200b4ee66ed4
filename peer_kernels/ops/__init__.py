"""The Triton ops: autograd-aware, registered with torch.library, same signatures as the reference."""
from .experts import peer_down, peer_experts, peer_mix
from .fused import peer_fused
from .retrieval import product_key_topk

__all__ = ["product_key_topk", "peer_experts", "peer_down", "peer_mix", "peer_fused"]
