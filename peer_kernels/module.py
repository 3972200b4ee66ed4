"""The PEER layer as an nn.Module. It owns the parameters and composes the ops of a backend."""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, reference
from ._checks import check_config, sub_keys_per_half

# Our parameter names -> peer-pytorch's (PEER_pytorch.PEER) state_dict keys.
_PEER_PYTORCH_KEYS = {
    "norm.gamma": "norm.gamma",
    "to_queries.weight": "to_queries.0.weight",
    "keys": "keys",
    "w_down": "weight_down_embed.weight",
    "w_up": "weight_up_embed.weight",
}


class RMSNorm(nn.Module):
    """peer-pytorch's pre-norm, formula for formula (outputs match it bit for bit):
    normalize(x) * sqrt(dim) * (1 + gamma), with gamma initialised to zero."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self):
        self.gamma.zero_()

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1)


class _PerHalfLayerNorm(nn.LayerNorm):
    """LayerNorm over each head's half-query (dk features): the unit that meets a sub-key."""

    def __init__(self, heads, dim_key, device=None, dtype=None):
        super().__init__(dim_key, device=device, dtype=dtype)
        self.heads, self.dim_key = heads, dim_key

    def forward(self, q):
        return super().forward(q.unflatten(-1, (2 * self.heads, self.dim_key))).flatten(-2)


class PEER(nn.Module):
    """Parameter Efficient Expert Retrieval (arXiv 2407.04153): `(..., dim) -> (..., dim)`.

    Each of `heads` heads retrieves `num_experts_per_head` single-neuron experts out of
    `num_experts` (a perfect square n*n) with product keys, and mixes them:
    `y = sum_{h,j} gate_j * act(u_{e_j} . x) * v_{e_j}`. See README.md for the options.

    Parameters (peer-pytorch compatible layout):
      to_queries.weight (heads*2*dim_key, dim), output laid out (half, head, dim_key);
      keys (heads or 1, n, 2, dim_key); w_down, w_up (S*num_experts, dim), S = heads with
      separate_embed_per_head else 1; norm.gamma (dim,) with pre_rmsnorm.
    Initialisation (`reset_parameters`, which sets every parameter and buffer, so the meta-device
    pattern `to_empty()` + `reset_parameters()` works): rows of w_down ~ N(0, 1/dim) so that u.x has
    unit variance for unit-RMS x; rows of w_up ~ N(0, 1/dim), the same fan scale; keys ~
    N(0, 1/dim_key) so that sub-key scores of (batch-)normalised queries have unit variance and the
    gates neither saturate nor flatten; to_queries as nn.Linear; norms at identity.

    query_norm="batchnorm" (the paper's choice, the default) normalises each query feature with
    statistics over all the tokens of the batch in training mode: a token's output then depends on
    the other tokens of the batch, later ones included (a leak in a causal LM), one token alone
    cannot be normalised (a ValueError), and gradient checkpointing that re-runs the forward
    updates the running statistics twice. query_norm="layernorm" (per token, per head and half)
    or None has none of these.

    sparse_grad=True: the tables' gradients are coalesced sparse COO tensors of the rows the batch
    touched (the nn.Embedding(sparse=True) contract), for torch.optim.SparseAdam / SGD / Adagrad
    or peer_kernels.optim.SparseAdamW / RowwiseAdagrad.

    Dtypes: the parameters may be float32 while activations are bf16/fp16 (mixed precision). The
    layer computes in the autocast dtype under torch.autocast, else in x's dtype: the query path
    (projection, norm, sub-key scores) runs in that dtype (outside autocast, the projection in the
    parameters' dtype), the expert tables are read in their stored dtype, accumulation is float32,
    and the output has the compute dtype. The small parameters (keys) are cast per call like an
    autocast Linear's weight; the expert tables never are.
    """

    def __init__(self, dim, *, heads=8, num_experts=1024 ** 2, num_experts_per_head=16, dim_key=128,
                 product_key_topk=None, activation="gelu", gating="softmax", query_norm="batchnorm",
                 pre_rmsnorm=False, shared_keys=False, separate_embed_per_head=False, dropout=0.0,
                 sparse_grad=False, backend="auto", device=None, dtype=None):
        super().__init__()
        n, k_sub = check_config(
            dim=dim, heads=heads, num_experts=num_experts, num_experts_per_head=num_experts_per_head,
            dim_key=dim_key, product_key_topk=product_key_topk, activation=activation, gating=gating,
            query_norm=query_norm, backend=backend, dropout=dropout)
        factory = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.num_experts, self.dim_key = dim, heads, num_experts, dim_key
        self.num_experts_per_head, self.product_key_topk = num_experts_per_head, k_sub
        self.activation, self.gating, self.query_norm_kind = activation, gating, query_norm
        self.pre_rmsnorm, self.shared_keys = pre_rmsnorm, shared_keys
        self.separate_embed_per_head, self.dropout, self.backend = separate_embed_per_head, dropout, backend
        self.sparse_grad = bool(sparse_grad)
        self._sparse_grad_hooks = {}
        # None, or what peer_kernels.distributed.PEERParallel installs: the forward and the expert stage
        # for tables sharded by columns over several processes
        self.column_parallel = None

        self.norm = RMSNorm(dim, **factory) if pre_rmsnorm else nn.Identity()
        self.to_queries = nn.Linear(dim, heads * 2 * dim_key, bias=False, **factory)
        if query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(heads * 2 * dim_key, **factory)
        elif query_norm == "layernorm":
            self.query_norm = _PerHalfLayerNorm(heads, dim_key, **factory)
        else:
            self.query_norm = nn.Identity()
        self.keys = nn.Parameter(torch.empty(1 if shared_keys else heads, n, 2, dim_key, **factory))
        rows = (heads if separate_embed_per_head else 1) * num_experts
        self.w_down = nn.Parameter(torch.empty(rows, dim, **factory))
        self.w_up = nn.Parameter(torch.empty(rows, dim, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """(Re)initialises every parameter and buffer of the layer (see the class docstring)."""
        for module in (self.norm, self.to_queries, self.query_norm):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.keys, std=1 / math.sqrt(self.dim_key))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(self.dim))
        nn.init.normal_(self.w_up, std=1 / math.sqrt(self.dim))

    @property
    def resolved_backend(self):
        """The backend the forward runs on for tensors on the parameters' device: "triton", "cpp"
        or "reference" ("auto" resolved; on a CPU it builds the C++ extension if needed)."""
        return backends.resolve(self.backend, self.w_down.device)

    def extra_repr(self):
        return (f"dim={self.dim}, heads={self.heads}, num_experts={self.num_experts}, "
                f"num_experts_per_head={self.num_experts_per_head}, product_key_topk={self.product_key_topk}, "
                f"dim_key={self.dim_key}, activation={self.activation!r}, gating={self.gating!r}, "
                f"shared_keys={self.shared_keys}, separate_embed_per_head={self.separate_embed_per_head}, "
                f"dropout={self.dropout}, sparse_grad={self.sparse_grad}, backend={self.backend!r}")

    def queries(self, x):
        """x (T, dim) -> queries (T, heads, 2, dim_key), a view of the (half, head, dk) projection."""
        q = self.query_norm(self.to_queries(x))
        return q.view(x.shape[0], 2, self.heads, self.dim_key).transpose(1, 2)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., dim) with dim = {self.dim}, got {tuple(x.shape)}")
        if x.device.type == "meta":
            raise ValueError("x: expected a tensor with data (e.g. on cpu or cuda), got a meta tensor")
        if self.w_down.device.type == "meta":
            raise ValueError("PEER: the parameters are on the meta device (not allocated); call "
                             "layer.to_empty(device=...) and then layer.reset_parameters() first")

    def _flag_fresh_sparse_grads(self):
        """Table gradients with sparse_grad come out of the backward coalesced (unique, sorted rows),
        but torch's gradient accumulation drops that flag when it stores a fresh sparse gradient in
        .grad. Each table whose .grad is unset now gets a post-accumulate hook that puts the flag back
        on the first gradient stored (no copy); sums of later micro-batches stay as torch makes them."""
        for table in (self.w_down, self.w_up):
            if id(table) not in self._sparse_grad_hooks:
                self._sparse_grad_hooks[id(table)] = table.register_post_accumulate_grad_hook(_flag_coalesced)
            table._peer_fresh_grad = table.grad is None

    def forward(self, x):
        if self.column_parallel is not None:
            return self.column_parallel.forward(self, x)
        return self._forward(x)

    def _forward(self, x):
        self._check_input(x)
        if self.sparse_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._flag_fresh_sparse_grads()
        autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if x.numel() == 0:
            return (x * 0).to(dtype)  # an empty batch: an empty output, still attached to x's graph
        ops = backends.get(self.backend, x.device)
        if self.column_parallel is not None:
            ops = self.column_parallel.ops(ops)
        tokens = self.norm(x.reshape(-1, self.dim))
        if self.training and self.query_norm_kind == "batchnorm" and tokens.shape[0] == 1:
            raise ValueError("query_norm: 'batchnorm' normalises over the tokens of a batch in training mode and "
                             "cannot normalise 1 token; batch more tokens, use eval(), or use "
                             "query_norm='layernorm' (per token)")
        # The query path in the compute dtype (outside autocast its projection in the parameters'),
        # the keys cast to it like an autocast Linear's weight; the expert tables are never cast.
        retrieval_dtype = dtype if autocast else self.keys.dtype
        queries = self.queries(tokens if autocast else tokens.to(self.to_queries.weight.dtype)).to(retrieval_dtype)
        keys = self.keys.to(retrieval_dtype)
        tokens = tokens.to(dtype)
        k, k_sub = self.num_experts_per_head, self.product_key_topk
        if self.track_usage:
            self._count_usage(ops, queries, keys)
        y = retrieve_and_mix(ops, tokens, queries, keys, self.w_down, self.w_up, k, k_sub, self.gating, self.activation,
                             self.separate_embed_per_head, dropout=self.dropout if self.training else 0.0,
                             unfused=self.column_parallel is not None, sparse_grad=self.sparse_grad)
        return y.reshape(x.shape)

    # ---- peer-pytorch interop -------------------------------------------------------------------

    @classmethod
    def from_peer_pytorch(cls, source, *, backend="auto", **peer_pytorch_kwargs):
        """A PEER with the weights and math of a `PEER_pytorch.PEER`.

        `source` is the module itself, or its state_dict together with the keyword arguments it was
        constructed with (`dim=...`, `heads=...`, ...; peer-pytorch's defaults apply to the rest).
        peer-pytorch has no query norm and per-head keys; `non_competing_scores=True` is relu gating
        with one expert per head. The pre-norm output feeds both the queries and the experts.
        """
        if isinstance(source, nn.Module):
            if peer_pytorch_kwargs:
                raise TypeError("from_peer_pytorch: keyword arguments go with a state_dict, not a module")
            config = _config_of_peer_pytorch_module(source)
            state = source.state_dict()
        else:
            config = _config_of_peer_pytorch_kwargs(**peer_pytorch_kwargs)
            state = source
        weight = state["weight_down_embed.weight"]
        layer = cls(**config, backend=backend, device=weight.device, dtype=weight.dtype)
        layer.load_state_dict({ours: state[theirs] for ours, theirs in _PEER_PYTORCH_KEYS.items()
                               if theirs in state})
        return layer

    def to_peer_pytorch(self):
        """The equivalent `PEER_pytorch.PEER` (same weights), where peer-pytorch has these options."""
        from PEER_pytorch import PEER as PeerPytorch

        unsupported = {"query_norm": (self.query_norm_kind, None), "shared_keys": (self.shared_keys, False)}
        for name, (value, needed) in unsupported.items():
            if value != needed:
                raise ValueError(f"to_peer_pytorch: peer-pytorch has no {name}; expected {needed!r}, got {value!r}")
        if self.gating not in ("softmax", "relu") or (self.gating == "relu" and self.num_experts_per_head != 1):
            raise ValueError("to_peer_pytorch: peer-pytorch gates by softmax, or by relu with num_experts_per_head=1; "
                             f"got gating={self.gating!r}, num_experts_per_head={self.num_experts_per_head}")
        if self.dim % 2:
            raise ValueError(f"to_peer_pytorch: peer-pytorch needs an even dim, got {self.dim}")
        activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                      "gelu_tanh": functools.partial(nn.GELU, approximate="tanh")}[self.activation]
        other = PeerPytorch(
            self.dim, heads=self.heads, num_experts=self.num_experts, activation=activation,
            num_experts_per_head=self.num_experts_per_head if self.gating == "softmax" else self.product_key_topk,
            dim_key=self.dim_key, product_key_topk=self.product_key_topk,
            separate_embed_per_head=self.separate_embed_per_head, pre_rmsnorm=self.pre_rmsnorm,
            non_competing_scores=self.gating == "relu", dropout=self.dropout,
        ).to(device=self.w_down.device, dtype=self.w_down.dtype)
        ours = self.state_dict()
        other.load_state_dict({theirs: ours[mine] for mine, theirs in _PEER_PYTORCH_KEYS.items() if mine in ours})
        return other

    # ---- the paper's instruments: expert usage, growing the pool ---------------------------------

    _track_usage = False

    @property
    def track_usage(self):
        """While True, every forward adds its retrievals to `usage_counts`, an (S*N,) int64 buffer
        on the parameters' device (S = heads with separate_embed_per_head, else 1), with no host
        sync; usage_stats() reads and resets them. The counts are not part of the
        state_dict. The fused op keeps its expert ids to itself, so tracking runs the retrieval op
        once more, without gradients (a small part of the layer's cost); gradient checkpointing,
        which runs the forward again, counts it twice. The counts are each process's own:
        DistributedDataParallel's default broadcast_buffers=True overwrites them with rank 0's
        before every forward, so track with broadcast_buffers=False and all_reduce the counts."""
        return self._track_usage

    @track_usage.setter
    def track_usage(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"track_usage: expected a bool, got {type(value).__name__} {value!r}")
        if value and self._buffers.get("usage_counts") is None:
            self.register_buffer("usage_counts", torch.zeros(self.w_down.shape[0], dtype=torch.int64,
                                                             device=self.w_down.device), persistent=False)
        self._track_usage = value

    @torch.no_grad()
    def _count_usage(self, ops, queries, keys):
        # The backend's retrieval op again, without gradients: its picks are the fused op's (one tie
        # rule), and the ids stay on the device (the expert op would check their range on the host).
        _, ids = ops.product_key_topk(queries, keys, self.num_experts_per_head, self.product_key_topk)
        if self.separate_embed_per_head:
            ids = reference.head_offsets(ids, self.num_experts)
        ids = ids.reshape(-1)
        self.usage_counts.index_add_(0, ids, torch.ones_like(ids))

    def usage_stats(self, reset=True):
        """Expert usage since tracking began or the last reset, the paper's Table 2 measures:
        {"counts": (S*N,) int64 tensor (a copy; S*N rows as in track_usage), "used_fraction": the
        share of the S*N experts retrieved at least once, "kl_from_uniform": KL(p || uniform) =
        log(S*N) + sum p log p over the retrieval frequencies p (nan before any retrieval)}.
        reset=True zeroes the counts. Reading them waits for the device."""
        counts = self._buffers.get("usage_counts")
        if counts is None:
            raise RuntimeError("usage_stats: no usage was tracked; set layer.track_usage = True before the forward")
        counts = counts.clone()
        if reset:
            self.usage_counts.zero_()
        total = int(counts.sum())
        p = counts.double() / max(total, 1)
        kl = math.log(counts.numel()) + float(torch.xlogy(p, p).sum()) if total else math.nan
        return {"counts": counts, "used_fraction": float((counts > 0).double().mean()), "kl_from_uniform": kl}

    @torch.no_grad()
    def grow(self, num_experts, optimizer=None):
        """Grows the pool to `num_experts`, a larger perfect square n'*n', keeping every existing
        expert's function: sub-key a of each half keeps its index, so expert a*n + b becomes
        a*n' + b (its rows move; within each head's block with separate_embed_per_head), and the
        output is unchanged for every token whose retrieval still picks old experts only. The new
        sub-keys and rows are initialised as reset_parameters() initialises them.

        keys, w_down and w_up become new, larger Parameters (requires_grad kept, .grad dropped), so
        an optimizer built on the old ones must be told: pass it as `optimizer` and its param
        groups get the new Parameters, with their state re-laid like the Parameters (the new
        entries zero, scalars such as Adam's step kept); or build a new optimizer. usage_counts
        are re-laid as well. Returns the layer."""
        n_new = sub_keys_per_half(num_experts)
        n = math.isqrt(self.num_experts)
        if n_new <= n:
            raise ValueError(f"num_experts: expected a perfect square larger than {self.num_experts}, got {num_experts}")
        sets = self.w_down.shape[0] // self.num_experts
        old = {"keys": self.keys, "w_down": self.w_down, "w_up": self.w_up}
        for name, param in old.items():
            for key, value in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer: cannot re-lay its state {key!r} of shape {tuple(value.shape)} "
                                     f"for {name} of shape {tuple(param.shape)}; build a new optimizer instead")
        grown = {id(p) for p in old.values()}
        kept = [(t, t.clone()) for t in (*self.parameters(), *self.buffers()) if id(t) not in grown]
        for name, param in old.items():
            shape = (param.shape[0], n_new, *param.shape[2:]) if name == "keys" else (sets * n_new * n_new, self.dim)
            setattr(self, name, nn.Parameter(param.new_empty(shape), requires_grad=param.requires_grad))
        self.num_experts = num_experts
        self.reset_parameters()  # initialises the new entries; everything else is put back next
        for t, value in kept:
            t.copy_(value)
        for name, param in old.items():
            _place_grown(param, getattr(self, name), n, None if name == "keys" else sets)
        counts = self._buffers.get("usage_counts")
        if counts is not None:
            self.usage_counts = _place_grown(counts, counts.new_zeros(sets * n_new * n_new), n, sets)
        if optimizer is not None:
            new = {id(p): getattr(self, name) for name, p in old.items()}
            for group in optimizer.param_groups:
                group["params"] = [new.get(id(p), p) for p in group["params"]]
            for name, param in old.items():
                state = optimizer.state.pop(param, None)
                if state is None:
                    continue
                target = getattr(self, name)
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        state[key] = _place_grown(value, value.new_zeros(target.shape), n,
                                                  None if name == "keys" else sets)
                optimizer.state[target] = state
        return self


def _place_grown(value, into, n, sets):
    """Writes `value`, laid out for n sub-keys per half, into `into`, laid out for n' > n: keys
    (h, n, 2, dk) keep their sub-key index (sets None); rows (sets*n*n, ...) of expert a*n + b go
    to row a*n' + b of their set. Returns `into`."""
    if sets is None:
        into[:, :n] = value
    else:
        n_new, rest = math.isqrt(into.shape[0] // sets), value.shape[1:]
        into.view(sets, n_new, n_new, *rest)[:, :n, :n] = value.view(sets, n, n, *rest)
    return into


def retrieve_and_mix(ops, tokens, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
                     dropout=0.0, unfused=False, sparse_grad=False):
    """The layer after its query path, on a backend's ops: retrieval, gating and the experts, by the
    fused op, or by the retrieval and expert ops apart when dropout > 0 or `unfused` (column-sharded
    tables, peer_kernels.distributed, sum z over their shards between the expert stage's halves).
    Dropout on the activations a_j equals dropout on the gates g_j (y and every gradient are the
    same products), so the expert op needs no dropout of its own."""
    if dropout > 0 or unfused:
        scores, expert_ids = ops.product_key_topk(queries, keys, k, k_sub)
        if separate_embed_per_head:
            expert_ids = reference.head_offsets(expert_ids, keys.shape[1] ** 2)
        gates = F.dropout(reference.gate(scores, gating), dropout, training=dropout > 0)
        return ops.peer_experts(tokens, expert_ids, gates, w_down, w_up, activation, sparse_grad=sparse_grad)
    return ops.peer_fused(tokens, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
                          sparse_grad=sparse_grad)


def _flag_coalesced(table):
    """PEER._flag_fresh_sparse_grads's hook: the first gradient stored is the backward's own."""
    grad = table.grad
    if getattr(table, "_peer_fresh_grad", False) and grad is not None and grad.is_sparse and not grad.is_coalesced():
        table.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                             check_invariants=False)
    table._peer_fresh_grad = False


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


def _config_of_peer_pytorch_kwargs(dim, heads=8, num_experts=1_000_000, num_experts_per_head=16,
                                   activation=nn.GELU, dim_key=None, product_key_topk=None,
                                   separate_embed_per_head=False, pre_rmsnorm=False,
                                   non_competing_scores=True, dropout=0.0):
    """peer-pytorch's constructor signature and defaults (PEER_pytorch 0.2)."""
    return _peer_config(
        dim=dim, heads=heads, num_experts=num_experts,
        experts_per_head=1 if non_competing_scores else num_experts_per_head,
        k_sub=num_experts_per_head if product_key_topk is None else product_key_topk,
        dim_key=dim // 2 if dim_key is None else dim_key, activation=activation(),
        relu_gating=non_competing_scores, pre_rmsnorm=pre_rmsnorm,
        separate_embed_per_head=separate_embed_per_head, dropout=dropout)
