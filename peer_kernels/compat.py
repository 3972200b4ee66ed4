"""peer-pytorch's classes on peer_kernels' kernels: change the import, keep the code.

    from peer_kernels.compat import PEER, PEERLora, ChunkedPEER   # was: from PEER_pytorch import ...

`PEER`, `PEERLora` and `ChunkedPEER` take peer-pytorch 0.2's constructor arguments with its
defaults (`PEER(dim, heads=8, num_experts=1_000_000, num_experts_per_head=16, activation=nn.GELU,
dim_key=None, ...)`: relu gates on each head's best expert with `non_competing_scores=True`,
`dim_key = dim // 2`), have its submodules, attributes and state_dict keys in its order, initialise
as it does (from the same seed, the very same weights), and take its forward arguments
(`train_mem_mask`). They add three keywords: `backend` ("auto" | "triton" | "cpp" | "reference",
as peer_kernels.PEER), `device` and `dtype` (where and in what dtype the parameters are made).
The math is peer-pytorch's; it runs on the backends' ops, so the `(batch, seq, heads, k, dim)`
tensors of gathered expert rows are never built.

`from_peer_pytorch(module or state_dict, ...)` and `to_peer_pytorch(layer)` convert between
peer-pytorch's `PEER` and `peer_kernels.PEER` (the same weights and outputs; `PEER.from_peer_pytorch`
and `layer.to_peer_pytorch()` call them).

`patch_peer_pytorch()` runs `PEER_pytorch.PEER` and `PEER_pytorch.PEERLora` themselves on these
forwards: instances made before the call and after it (the classes' `forward` is replaced, so the
patch holds for the process until `unpatch_peer_pytorch()`). A patched instance runs on
backend "auto"; set `module.backend = "reference"` (any backend name) to choose another.

Differences, all by design: inputs may be `(..., dim)` (peer-pytorch takes `(batch, seq, dim)`
only); the retrieval scores accumulate in float32 for 16-bit inputs (peer-pytorch ranks them in
bf16 under autocast, so near ties may pick other experts); `PEER`'s activation runs inside the
expert kernel, so it must be `nn.GELU` (either approximation), `nn.ReLU` or `nn.SiLU` (a
`ValueError` names anything else); `train_mem_mask` also works with `separate_embed_per_head`
(a mask over all `heads * num_experts` rows); `ChunkedPEER` runs the whole sequence at once.
"""
import contextlib
import functools
import math

import torch
from torch import nn

from . import _math, backends
from ._checks import check_config, check_tensor, resolve_k_sub, sub_keys_per_half
from .module import PEER as Layer, RMSNorm, retrieve_and_mix

# peer_kernels.PEER's parameter names -> peer-pytorch's (PEER_pytorch.PEER) state_dict keys.
_PEER_PYTORCH_KEYS = {
    "norm.gamma": "norm.gamma",
    "to_queries.weight": "to_queries.0.weight",
    "keys": "keys",
    "w_down": "weight_down_embed.weight",
    "w_up": "weight_up_embed.weight",
}


def _gating(score_activation):
    """peer-pytorch's score activation as the ops' gating name."""
    if isinstance(score_activation, nn.Softmax):
        return "softmax"
    if isinstance(score_activation, nn.ReLU):
        return "relu"
    raise ValueError(f"score_activation: expected nn.Softmax or nn.ReLU, got {type(score_activation).__name__}")


def _product_keys(module, dim, heads, num_experts, num_experts_per_head, dim_key, product_key_topk,
                  non_competing_scores, dropout, activation_name, backend):
    """Checks the arguments the two classes share and sets peer-pytorch's attributes from them;
    returns dim_key (dim // 2 by default)."""
    if isinstance(dim, int) and not isinstance(dim, bool) and dim % 2:
        raise ValueError(f"dim: expected an even number (peer-pytorch's product keys split it), got {dim}")
    dim_key = dim // 2 if dim_key is None else dim_key
    k = 1 if non_competing_scores else num_experts_per_head
    # k' defaults to num_experts_per_head (also when the gating keeps k = 1): errors name what was given
    k_sub = resolve_k_sub(num_experts_per_head, product_key_topk, sub_keys_per_half(num_experts),
                          "num_experts_per_head", "product_key_topk")
    check_config(dim=dim, heads=heads, num_experts=num_experts, num_experts_per_head=k, dim_key=dim_key,
                 product_key_topk=k_sub, activation=activation_name,
                 gating="relu" if non_competing_scores else "softmax", query_norm=None, backend=backend,
                 dropout=dropout)
    module.heads, module.num_experts, module.backend = heads, num_experts, backend
    module.num_keys = math.isqrt(num_experts)
    module.product_key_topk, module.num_experts_per_head_topk = k_sub, k
    return dim_key


class _QueryHalves(nn.Module):
    """peer-pytorch's to_queries[1]: (..., 2*heads*dim_key) laid out (half, head, dk) ->
    (2, ..., heads, dim_key). The forwards here call to_queries[0] alone."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, q):
        return q.unflatten(-1, (2, self.heads, -1)).movedim(-3, 0)


def _query_modules(module, dim, heads, dim_key, dropout, non_competing_scores, factory):
    """to_queries (the Linear, then the layout), keys, dropout and score_activation, registered in
    peer-pytorch's order."""
    module.to_queries = nn.Sequential(nn.Linear(dim, dim_key * heads * 2, bias=False, **factory),
                                      _QueryHalves(heads))
    module.keys = nn.Parameter(torch.empty(heads, module.num_keys, 2, dim_key, **factory))
    module.dropout = nn.Dropout(dropout)
    module.score_activation = nn.ReLU() if non_competing_scores else nn.Softmax(dim=-1)


def _allocate(module, device):
    """The modules were built on the meta device: allocate them where asked, then initialise them
    once, in peer-pytorch's order, by reset_parameters."""
    module.to_empty(device=torch.get_default_device() if device is None else device)
    module.reset_parameters()


def _retrieval_inputs(module, x, dim):
    """x (..., dim) -> tokens (T, dim), queries (T, heads, 2, dim_key) and keys in peer-pytorch's
    working dtype: that of the query projection's output (autocast's, else the parameters')."""
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape (..., dim) with dim = {dim}, got {tuple(x.shape)}")
    tokens = module.norm(x.reshape(-1, dim))
    q = module.to_queries[0](tokens)
    queries = q.view(tokens.shape[0], 2, module.heads, module.keys.shape[-1]).transpose(1, 2)
    return tokens.to(q.dtype), queries, module.keys.to(q.dtype)


def _ops(module, device):
    # peer-pytorch's own instances (patched) have no backend attribute: they run on "auto"
    return backends.get(getattr(module, "backend", "auto"), device)


class _MaskRowGrads(torch.autograd.Function):
    """The identity on an expert table whose backward multiplies row e's gradient by mask[e]:
    peer-pytorch's train_mem_mask, which scales each retrieved row's gradient by its expert's
    mask value, summed over the retrievals, is exactly that."""

    @staticmethod
    def forward(ctx, table, mask):
        ctx.save_for_backward(mask)
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return grad * mask.to(grad.dtype)[:, None], None


class PEER(nn.Module):
    """peer-pytorch's `PEER_pytorch.PEER` on peer_kernels' kernels (see the module docstring).

    forward(x, train_mem_mask=None): x (..., dim) -> (..., dim). train_mem_mask, a (num_experts,)
    tensor (bool or float; (heads * num_experts,) with separate_embed_per_head), scales the
    gradient that each expert's rows in weight_down_embed / weight_up_embed receive; the output
    and every other gradient are unchanged (peer-pytorch's sparse memory fine-tuning).
    """

    def __init__(self, dim, *, heads=8, num_experts=1_000_000, num_experts_per_head=16, activation=nn.GELU,
                 dim_key=None, product_key_topk=None, separate_embed_per_head=False, pre_rmsnorm=False,
                 non_competing_scores=True, dropout=0., backend="auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": "meta", "dtype": dtype}
        act = activation()
        dim_key = _product_keys(self, dim, heads, num_experts, num_experts_per_head, dim_key, product_key_topk,
                                non_competing_scores, dropout, _activation_name(act), backend)
        self.separate_embed_per_head = separate_embed_per_head
        rows = num_experts * (heads if separate_embed_per_head else 1)
        self.norm = RMSNorm(dim, **factory) if pre_rmsnorm else nn.Identity()
        self.weight_down_embed = nn.Embedding(rows, dim, **factory)
        self.weight_up_embed = nn.Embedding(rows, dim, **factory)
        self.activation = act
        _query_modules(self, dim, heads, dim_key, dropout, non_competing_scores, factory)
        _allocate(self, device)

    @torch.no_grad()
    def reset_parameters(self):
        """peer-pytorch's initialisation, in its order: expert tables N(0, 1) (nn.Embedding's),
        to_queries as nn.Linear, keys N(0, 0.02), the pre-norm's gamma zero."""
        for module in (self.norm, self.weight_down_embed, self.weight_up_embed, self.to_queries[0]):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.keys, std=0.02)

    def forward(self, x, train_mem_mask=None):
        dim = self.weight_down_embed.embedding_dim
        tokens, queries, keys = _retrieval_inputs(self, x, dim)
        ops = _ops(self, tokens.device)
        w_down, w_up = self.weight_down_embed.weight, self.weight_up_embed.weight
        if train_mem_mask is not None:
            check_tensor("train_mem_mask", train_mem_mask, (w_down.shape[0],), dtypes=None, device=w_down.device)
            w_down, w_up = _MaskRowGrads.apply(w_down, train_mem_mask), _MaskRowGrads.apply(w_up, train_mem_mask)
        k, k_sub, gating = self.num_experts_per_head_topk, self.product_key_topk, _gating(self.score_activation)
        activation = _activation_name(self.activation)
        y = retrieve_and_mix(ops, tokens=tokens, queries=queries, keys=keys, w_down=w_down, w_up=w_up, k=k, k_sub=k_sub,
                             gating=gating, activation=activation, separate_embed_per_head=self.separate_embed_per_head,
                             dropout=self.dropout.p if self.training else 0.0)
        return y.view(*x.shape[:-1], dim)


class PEERLora(nn.Module):
    """peer-pytorch's `PEER_pytorch.PEERLora` on peer_kernels' kernels: a bias-free feed-forward
    block (proj_in, activation, dropout, proj_out) whose two projections each add retrieved
    rank-1 adapters, sum_j g_j (a_j . h) b_j, with a: (num_experts, width in) and b:
    (num_experts, width out) tables: the expert op with the identity activation. Its activation
    acts on the dense hidden layer, so any activation class works.
    """

    def __init__(self, dim, *, expansion_factor=2., num_experts=1_000_000, heads=4, num_experts_per_head=4,
                 activation=nn.GELU, dim_key=None, product_key_topk=None, pre_rmsnorm=False,
                 non_competing_scores=True, dropout=0., backend="auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": "meta", "dtype": dtype}
        dim_key = _product_keys(self, dim, heads, num_experts, num_experts_per_head, dim_key, product_key_topk,
                                non_competing_scores, dropout, "identity", backend)
        self.num_experts_per_head = num_experts_per_head
        dim_inner = int(dim * expansion_factor)
        self.norm = RMSNorm(dim, **factory) if pre_rmsnorm else nn.Identity()
        self.proj_in = nn.Linear(dim, dim_inner, bias=False, **factory)
        self.proj_out = nn.Linear(dim_inner, dim, bias=False, **factory)
        self.proj_in_lora_a = nn.Embedding(num_experts, dim, **factory)
        self.proj_in_lora_b = nn.Embedding(num_experts, dim_inner, **factory)
        self.proj_out_lora_a = nn.Embedding(num_experts, dim_inner, **factory)
        self.proj_out_lora_b = nn.Embedding(num_experts, dim, **factory)
        self.activation = activation()
        _query_modules(self, dim, heads, dim_key, dropout, non_competing_scores, factory)
        _allocate(self, device)

    @property
    def lora_k(self):
        return self.heads * self.num_experts_per_head

    @torch.no_grad()
    def reset_parameters(self):
        """peer-pytorch's initialisation, in its order (so that a seed gives its very weights: the
        adapter tables are drawn N(0, 1) by nn.Embedding first, then redrawn N(0, 0.02))."""
        tables = (self.proj_in_lora_a, self.proj_in_lora_b, self.proj_out_lora_a, self.proj_out_lora_b)
        for module in (self.norm, self.proj_in, self.proj_out, *tables, self.to_queries[0]):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.keys, std=0.02)
        for table in (self.proj_in_lora_a, self.proj_out_lora_b, self.proj_in_lora_b, self.proj_out_lora_a):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, x):
        dim = self.proj_in.in_features
        tokens, queries, keys = _retrieval_inputs(self, x, dim)
        ops = _ops(self, tokens.device)
        scores, expert_ids = ops.product_key_topk(queries, keys, self.num_experts_per_head_topk, self.product_key_topk)
        gates = _math.gate(scores, _gating(self.score_activation))

        def adapters(h, a, b):
            return ops.peer_experts(h, expert_ids, gates, a.weight, b.weight, "identity")

        hidden = self.proj_in(tokens) + adapters(tokens, self.proj_in_lora_a, self.proj_in_lora_b)
        hidden = self.dropout(self.activation(hidden))
        y = self.proj_out(hidden) + adapters(hidden, self.proj_out_lora_a, self.proj_out_lora_b)
        return y.view(*x.shape[:-1], dim)


class ChunkedPEER(nn.Module):
    """peer-pytorch's `ChunkedPEER(peer, seq_chunk_size=128)`: its state_dict is the wrapped
    module's under `peer.`. peer-pytorch splits the sequence into checkpointed chunks to bound the
    gathered expert rows; the fused kernels never build those, so the sequence runs in one call
    (the same outputs) and `seq_chunk_size` is kept for the signature."""

    def __init__(self, peer, seq_chunk_size=128):
        super().__init__()
        if not isinstance(peer, nn.Module):
            raise TypeError(f"peer: expected a PEER or PEERLora module, got {type(peer).__name__}")
        self.peer, self.seq_chunk_size = peer, seq_chunk_size

    def forward(self, x):
        return self.peer(x)


# ---- conversion between peer_kernels.PEER and PEER_pytorch.PEER ------------------------------------

def from_peer_pytorch(source, *, backend="auto", layer_class=None, **peer_pytorch_kwargs):
    """A PEER with the weights and math of a `PEER_pytorch.PEER`.

    `source` is the module itself, or its state_dict together with peer-pytorch's constructor
    arguments that its weights cannot tell, which must then be given as the module was constructed
    with them (a TypeError names any missing; guessing loads other math silently):
    `non_competing_scores` (the gating, and k = 1 when True), `num_experts_per_head` and
    `activation` (peer-pytorch's class, nn.GELU say). The shapes (`dim`, `heads`, `num_experts`,
    `dim_key`) and `pre_rmsnorm` / `separate_embed_per_head` are read from the weights (given too,
    they must agree: a ValueError); `product_key_topk` defaults to `num_experts_per_head` as in
    peer-pytorch (only a smaller value changes the picks) and `dropout` (training only) to 0.
    peer-pytorch has no query norm and per-head keys; `non_competing_scores=True` is relu gating
    with one expert per head. The pre-norm output feeds both the queries and the experts.
    layer_class: the class to build (peer_kernels.PEER or a subclass; PEER.from_peer_pytorch passes
    its own).
    """
    if isinstance(source, nn.Module):
        if peer_pytorch_kwargs:
            raise TypeError("from_peer_pytorch: keyword arguments go with a state_dict, not a module")
        config = _config_of_peer_pytorch_module(source)
        state = source.state_dict()
    else:
        config = _config_of_peer_pytorch_state(source, **peer_pytorch_kwargs)
        state = source
    weight = state["weight_down_embed.weight"]
    layer = (layer_class or Layer)(**config, backend=backend, device=weight.device, dtype=weight.dtype)
    layer.load_state_dict({ours: state[theirs] for ours, theirs in _PEER_PYTORCH_KEYS.items()
                           if theirs in state})
    return layer


def to_peer_pytorch(layer, *, share_weights=False):
    """The `PEER_pytorch.PEER` equivalent to a peer_kernels.PEER layer (same weights), where peer-pytorch
    has its options. share_weights=True: its parameters are the layer's own tensors, not copies (no
    second copy of the tables; a change to one is a change to the other)."""
    from PEER_pytorch import PEER as PeerPytorch

    unsupported = {"query_norm": (layer.query_norm_kind, None), "shared_keys": (layer.shared_keys, False)}
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"to_peer_pytorch: peer-pytorch has no {name}; expected {needed!r}, got {value!r}")
    if layer.gating not in ("softmax", "relu") or (layer.gating == "relu" and layer.num_experts_per_head != 1):
        raise ValueError("to_peer_pytorch: peer-pytorch gates by softmax, or by relu with num_experts_per_head=1; "
                         f"got gating={layer.gating!r}, num_experts_per_head={layer.num_experts_per_head}")
    if layer.dim % 2:
        raise ValueError(f"to_peer_pytorch: peer-pytorch needs an even dim, got {layer.dim}")
    activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                  "gelu_tanh": functools.partial(nn.GELU, approximate="tanh")}[layer.activation]
    with torch.device("meta") if share_weights else contextlib.nullcontext():
        other = PeerPytorch(
            layer.dim, heads=layer.heads, num_experts=layer.num_experts, activation=activation,
            num_experts_per_head=layer.num_experts_per_head if layer.gating == "softmax" else layer.product_key_topk,
            dim_key=layer.dim_key, product_key_topk=layer.product_key_topk,
            separate_embed_per_head=layer.separate_embed_per_head, pre_rmsnorm=layer.pre_rmsnorm,
            non_competing_scores=layer.gating == "relu", dropout=layer.dropout,
        )
    if not share_weights:
        other = other.to(device=layer.w_down.device, dtype=layer.w_down.dtype)
    ours = layer.state_dict(keep_vars=share_weights)
    other.load_state_dict({theirs: ours[mine] for mine, theirs in _PEER_PYTORCH_KEYS.items() if mine in ours},
                          assign=share_weights)
    return other


def _activation_name(activation):
    """peer-pytorch takes an activation class (nn.GELU by default); map an instance to our names."""
    if isinstance(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    for cls, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu")):
        if isinstance(activation, cls):
            return name
    raise ValueError(
        f"activation: expected nn.ReLU, nn.GELU or nn.SiLU from peer-pytorch, got {type(activation).__name__}")


def _peer_config(*, dim, heads, num_experts, experts_per_head, k_sub, dim_key, activation, relu_gating,
                 pre_rmsnorm, separate_embed_per_head, dropout):
    return dict(dim=dim, heads=heads, num_experts=num_experts, num_experts_per_head=experts_per_head,
                product_key_topk=k_sub, dim_key=dim_key, activation=_activation_name(activation),
                gating="relu" if relu_gating else "softmax", query_norm=None, pre_rmsnorm=pre_rmsnorm,
                shared_keys=False, separate_embed_per_head=separate_embed_per_head, dropout=dropout)


def _config_of_peer_pytorch_module(module):
    return _peer_config(
        dim=module.weight_down_embed.embedding_dim, heads=module.heads, num_experts=module.num_experts,
        experts_per_head=module.num_experts_per_head_topk, k_sub=module.product_key_topk,
        dim_key=module.keys.shape[-1], activation=module.activation,
        relu_gating=isinstance(module.score_activation, nn.ReLU), pre_rmsnorm=not isinstance(module.norm, nn.Identity),
        separate_embed_per_head=module.separate_embed_per_head, dropout=module.dropout.p)


# peer-pytorch's constructor arguments (PEER_pytorch 0.2) that a PEER's weights do not hold
_NOT_IN_THE_WEIGHTS = ("non_competing_scores", "num_experts_per_head", "activation")
_WITH_DEFAULTS = {"product_key_topk": None, "dropout": 0.0}


def _config_of_peer_pytorch_state(state, **kwargs):
    """The config of the PEER_pytorch.PEER whose state_dict is `state` (see from_peer_pytorch):
    shapes from its weights, the rest from kwargs."""
    missing = [name for name in _NOT_IN_THE_WEIGHTS if name not in kwargs]
    if missing:
        raise TypeError(f"from_peer_pytorch: a state_dict's weights do not say {', '.join(missing)}; pass "
                        f"{'them' if len(missing) > 1 else 'it'} as the PEER_pytorch.PEER was constructed (e.g. "
                        "non_competing_scores=True, num_experts_per_head=16, activation=nn.GELU: peer-pytorch's "
                        "defaults), or pass the module itself")
    absent = [key for key in ("keys", "weight_down_embed.weight", "weight_up_embed.weight") if key not in state]
    if absent:
        raise ValueError(f"state_dict: expected a PEER_pytorch.PEER state_dict, missing {', '.join(absent)}")
    heads, n, _, dim_key = state["keys"].shape
    rows, dim = state["weight_down_embed.weight"].shape
    if rows not in (n * n, heads * n * n):
        raise ValueError(f"state_dict: weight_down_embed.weight has {rows} rows, expected n*n = {n * n} or "
                         f"heads*n*n = {heads * n * n} for keys of shape {tuple(state['keys'].shape)}")
    shapes = dict(dim=dim, heads=heads, num_experts=n * n, dim_key=dim_key, pre_rmsnorm="norm.gamma" in state,
                  separate_embed_per_head=rows == heads * n * n and heads > 1)
    for name, value in shapes.items():
        given = kwargs.pop(name, value)
        if name == "dim_key" and given is None:  # peer-pytorch's default
            given = dim // 2
        equivalent = name == "separate_embed_per_head" and heads == 1  # one head: the same rows either way
        if given != value and not equivalent:
            raise ValueError(f"{name}: the state_dict's weights say {value!r}, got {given!r}")
    unknown = set(kwargs) - set(_NOT_IN_THE_WEIGHTS) - set(_WITH_DEFAULTS)
    if unknown:
        raise TypeError(f"from_peer_pytorch: unexpected keyword arguments {sorted(unknown)} (peer-pytorch's PEER "
                        "takes none such)")
    options = {**_WITH_DEFAULTS, **kwargs}
    return _peer_config(
        **shapes, experts_per_head=1 if options["non_competing_scores"] else options["num_experts_per_head"],
        k_sub=options["num_experts_per_head"] if options["product_key_topk"] is None else options["product_key_topk"],
        activation=options["activation"](),
        relu_gating=options["non_competing_scores"], dropout=options["dropout"])


_ORIGINAL_FORWARDS = {}


def patch_peer_pytorch():
    """Makes `PEER_pytorch.PEER` and `PEER_pytorch.PEERLora` run on peer_kernels' kernels, instances
    made before and after the call: their classes' `forward` becomes this module's. Idempotent;
    `unpatch_peer_pytorch()` restores peer-pytorch's. Needs peer-pytorch installed."""
    import PEER_pytorch

    for theirs, ours in ((PEER_pytorch.PEER, PEER), (PEER_pytorch.PEERLora, PEERLora)):
        if theirs not in _ORIGINAL_FORWARDS:
            _ORIGINAL_FORWARDS[theirs] = theirs.forward
            theirs.forward = ours.forward


def unpatch_peer_pytorch():
    """Undoes patch_peer_pytorch() (nothing to do if it was not called)."""
    while _ORIGINAL_FORWARDS:
        theirs, forward = _ORIGINAL_FORWARDS.popitem()
        theirs.forward = forward
