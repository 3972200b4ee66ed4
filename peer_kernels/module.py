"""The PEER layer as an nn.Module. It owns the parameters and composes the ops of a backend;
peer-pytorch conversion lives in compat.py, expert usage and growing the pool in instruments.py."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _library, _math, _memory, backends, instruments
from ._checks import check_batch_norm_input, check_config, check_layer_input




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
    updates the running statistics twice. A non-finite token (NaN or inf) in training would make
    the running statistics NaN, and every later eval output with them: it is an error instead (a
    ValueError naming x before the statistics change on a CPU; on a GPU a device-side assert, which
    fails the next synchronisation, with no host sync per step: peer_kernels._checks.
    check_batch_norm_input). query_norm="layernorm" (per token, per head and half)
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

    `expert_stage`: None (the fused op), or a callable `stage(ops, x, expert_ids, gates, w_down,
    w_up, activation, sparse_grad) -> y` that runs the expert stage instead, after the retrieval op
    (x (T, dim), ids and gates (T, heads, k), ops the backend's module). It is the layer's one seam
    for distribution: peer_kernels.distributed.PEERParallel installs one for column-sharded tables.

    Quantized tables (peer_kernels.quantize_, inference only): w_down and w_up int8 or
    float8_e4m3fn with one float32 scale per row in the buffers w_down_scale and w_up_scale (None,
    and absent from the state_dict, for float tables). Loading a state_dict with quantized tables
    quantizes the layer first (peer_kernels.quantize.match_checkpoint).
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
        self.expert_stage = None

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
        # the per-row scales of quantized tables (peer_kernels.quantize_); None for float tables
        self.register_buffer("w_down_scale", None)
        self.register_buffer("w_up_scale", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """(Re)initialises every parameter and buffer of the layer (see the class docstring)."""
        for module in (self.norm, self.to_queries, self.query_norm):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for table in (self.keys, self.w_down, self.w_up):
            _memory.advise_huge_pages(table)  # before the first write (fresh or to_empty's memory)
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
                f"dropout={self.dropout}, sparse_grad={self.sparse_grad}, backend={self.backend!r}"
                + (f", quantized={self.w_down.dtype}" if self.w_down_scale is not None else ""))

    def queries(self, x):
        """x (T, dim) -> queries (T, heads, 2, dim_key), a view of the (half, head, dk) projection."""
        projection = self._project(x)
        if self.training and self.query_norm_kind == "batchnorm":
            check_batch_norm_input(projection)
        q = self.query_norm(projection)
        return q.view(x.shape[0], 2, self.heads, self.dim_key).transpose(1, 2)

    def _project(self, x):
        """to_queries(x). On the C++ backend, when to_queries is a plain bias-free nn.Linear in x's
        dtype, outside autocast, with no hook that calling it would run, the backend's own projection
        (_library.project): it spreads the output features over the CPU threads, where ATen's matmul of
        a few tokens splits the tokens and packs the whole weight on each thread (docs/serving.md).
        Anything else (a wrapped or replaced Linear, a tensor-subclass weight, a hook, autocast) calls
        to_queries as it is."""
        linear = self.to_queries
        plain = (type(linear) is nn.Linear and linear.bias is None and type(linear.weight) is nn.Parameter
                 and linear.weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)
                 and not _has_hooks(linear))
        if plain and backends.resolve(self.backend, x.device) == "cpp":
            return _library.run(_library.project, "cpp", x, linear.weight)
        return linear(x)

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
        check_layer_input(x, self.dim)
        if self.w_down.device.type == "meta":
            raise ValueError("PEER: the parameters are on the meta device (not allocated); call "
                             "layer.to_empty(device=...) and then layer.reset_parameters() first")
        if self.sparse_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._flag_fresh_sparse_grads()
        autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if x.numel() == 0:
            return (x * 0).to(dtype)  # an empty batch: an empty output, still attached to x's graph
        ops = backends.get(self.backend, x.device)
        tokens = self.norm(x.reshape(-1, self.dim))
        if self.training and self.query_norm_kind == "batchnorm" and tokens.shape[0] == 1:
            raise ValueError(f"x: got shape {tuple(x.shape)}, 1 token; query_norm='batchnorm' normalises over the "
                             "tokens of a batch in training mode and cannot normalise 1 token; batch more tokens, "
                             "use eval(), or use query_norm='layernorm' (per token)")
        # The query path in the compute dtype (outside autocast its projection in the parameters'),
        # the keys cast to it like an autocast Linear's weight; the expert tables are never cast.
        retrieval_dtype = dtype if autocast else self.keys.dtype
        queries = self.queries(tokens if autocast else tokens.to(self.to_queries.weight.dtype)).to(retrieval_dtype)
        keys = self.keys.to(retrieval_dtype)
        tokens = tokens.to(dtype)
        if self.track_usage:
            instruments.count_usage(self, ops, queries, keys)
        y = retrieve_and_mix(ops, tokens=tokens, queries=queries, keys=keys, w_down=self.w_down, w_up=self.w_up,
                             w_down_scale=self.w_down_scale, w_up_scale=self.w_up_scale,
                             k=self.num_experts_per_head, k_sub=self.product_key_topk, gating=self.gating,
                             activation=self.activation, separate_embed_per_head=self.separate_embed_per_head,
                             dropout=self.dropout if self.training else 0.0, expert_stage=self.expert_stage,
                             sparse_grad=self.sparse_grad)
        return y.reshape(x.shape)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half() and the like cast every floating tensor: quantized tables and their
        # scales keep their dtypes (the kernels read them as stored) and follow the device only.
        if self.w_down_scale is None:
            return super()._apply(fn, recurse)
        stored = {name: getattr(self, name).detach() for name in ("w_down", "w_up", "w_down_scale", "w_up_scale")}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                if isinstance(after, nn.Parameter):
                    after.data = before.to(after.device)
                else:
                    setattr(self, name, before.to(after.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        from .quantize import match_checkpoint  # quantize imports this module

        match_checkpoint(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- peer-pytorch interop (peer_kernels.compat) -----------------------------------------------

    @classmethod
    def from_peer_pytorch(cls, source, *, backend="auto", **peer_pytorch_kwargs):
        """A PEER with the weights and math of a `PEER_pytorch.PEER`: see
        peer_kernels.compat.from_peer_pytorch."""
        from .compat import from_peer_pytorch

        return from_peer_pytorch(source, backend=backend, layer_class=cls, **peer_pytorch_kwargs)

    def to_peer_pytorch(self, *, share_weights=False):
        """The equivalent `PEER_pytorch.PEER` (same weights; with share_weights the same tensors): see
        peer_kernels.compat.to_peer_pytorch."""
        from .compat import to_peer_pytorch

        return to_peer_pytorch(self, share_weights=share_weights)

    # ---- the paper's instruments (peer_kernels.instruments) ---------------------------------------

    _track_usage = False

    @property
    def track_usage(self):
        """While True, every forward adds its retrievals to `usage_counts` (see
        peer_kernels.instruments.track_usage)."""
        return self._track_usage

    @track_usage.setter
    def track_usage(self, value):
        instruments.track_usage(self, value)

    def usage_stats(self, reset=True):
        """Expert usage since tracking began or the last reset: see peer_kernels.instruments.usage_stats."""
        return instruments.usage_stats(self, reset=reset)

    def grow(self, num_experts, optimizer=None):
        """Grows the pool to `num_experts`, keeping every expert's function: see
        peer_kernels.instruments.grow. Returns the layer."""
        return instruments.grow(self, num_experts, optimizer=optimizer)


def warmup(module, *, tokens=1, dtype=None):
    """Runs every PEER layer in `module` (a layer or a whole model) once for each token count in
    `tokens` (an int or a sequence of them) on random input of `dtype` (default: the layer's float
    parameters'), in inference: under torch.no_grad and in eval mode, each layer's mode restored
    after, so no parameter or running statistic changes. It does what a layer's first call does for
    those shapes: Triton compiles and loads the kernels, the retrieval's pair table is copied to
    the device, the C++ extension is built or loaded. After it a decode step with those token
    counts can be captured in a CUDA graph (torch.cuda.graph), which none of that may happen in;
    it runs in the caller's context, so warm up under the autocast a step will run under. Returns
    `module`."""
    counts = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    for layer in module.modules():
        if not isinstance(layer, PEER):
            continue
        training = layer.training
        layer.eval()
        try:
            with torch.no_grad():
                for count in counts:
                    # the keys' dtype: the layer's float parameters (its tables may be quantized)
                    layer(torch.randn(count, layer.dim, device=layer.keys.device, dtype=dtype or layer.keys.dtype))
        finally:
            layer.train(training)
    return module


def backend_expert_stage(ops, x, expert_ids, gates, w_down, w_up, activation, sparse_grad, w_down_scale=None,
                         w_up_scale=None):
    """The expert stage on a backend's own op: what an expert_stage replaces."""
    return ops.peer_experts(x, expert_ids, gates, w_down, w_up, activation, sparse_grad=sparse_grad,
                            w_down_scale=w_down_scale, w_up_scale=w_up_scale)


def retrieve_and_mix(ops, *, tokens, queries, keys, w_down, w_up, k, k_sub, gating, activation,
                     separate_embed_per_head, dropout=0.0, expert_stage=None, sparse_grad=False, w_down_scale=None,
                     w_up_scale=None):
    """The layer after its query path, on a backend's ops: retrieval, gating and the experts, by the
    fused op, or by the retrieval op and then `expert_stage` (default: the backend's expert op) when
    dropout > 0 or an expert stage is given (PEER.expert_stage). Dropout on the activations a_j
    equals dropout on the gates g_j (y and every gradient are the same products), so the expert
    stage needs no dropout of its own. Quantized tables come with their scales, and only to the
    backend's own ops (an expert_stage takes float tables)."""
    quantized = w_down_scale is not None or w_up_scale is not None
    if quantized and expert_stage is not None:
        raise ValueError("expert_stage: a custom expert stage (e.g. peer_kernels.distributed.PEERParallel's) takes "
                         "float tables, but this layer's are quantized (peer_kernels.quantize_)")
    scales = dict(w_down_scale=w_down_scale, w_up_scale=w_up_scale) if quantized else {}
    if dropout > 0 or expert_stage is not None:
        scores, expert_ids = ops.product_key_topk(queries, keys, k, k_sub)
        if separate_embed_per_head:
            expert_ids = _math.head_offsets(expert_ids, keys.shape[1] ** 2)
        gates = F.dropout(_math.gate(scores, gating), dropout, training=dropout > 0)
        return (expert_stage or backend_expert_stage)(ops, tokens, expert_ids, gates, w_down, w_up, activation,
                                                      sparse_grad, **scales)
    return ops.peer_fused(tokens, queries, keys, w_down, w_up, k, k_sub, gating, activation, separate_embed_per_head,
                          sparse_grad=sparse_grad, **scales)


def _has_hooks(module):
    """Whether calling `module` would run a hook of its own or a global one (torch.nn.modules.module's
    register_module_forward_hook and the like)."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def _flag_coalesced(table):
    """PEER._flag_fresh_sparse_grads's hook: the first gradient stored is the backward's own."""
    grad = table.grad
    if getattr(table, "_peer_fresh_grad", False) and grad is not None and grad.is_sparse and not grad.is_coalesced():
        table.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                             check_invariants=False)
    table._peer_fresh_grad = False


