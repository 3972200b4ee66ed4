"""PEER layers in Hugging Face transformers models, and back from a checkpoint.

    from transformers import AutoModelForCausalLM
    from peer_kernels.transformers import apply_peer, from_pretrained

    model = AutoModelForCausalLM.from_pretrained(...)      # or cls(config): any causal LM listed below
    apply_peer(model, num_experts=256**2, query_norm="layernorm")
    model.save_pretrained(path)
    model = from_pretrained(AutoModelForCausalLM, path)     # the same model: identical logits

`apply_peer(model, *, layers=None, mode="replace", **peer_kwargs)` changes the model in place and
returns it. It finds the decoder blocks and their feed-forward by structure, not by class names:
the blocks are the list of same-type modules in the decoder (`model.get_decoder()`) whose every
member has a feed-forward of the model's width (config.hidden_size, or the text config's); the
feed-forward is the block's child named `mlp`, `feed_forward` or `ffn` (else the one child whose
name contains one of them, else the one child that is not attention, a norm, dropout or an
embedding) made of linear maps that widen the hidden size and map back to it. Checked on GPT-2,
Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text, and the language model of the
multimodal one), Phi and Phi-3.

- `layers`: indices into the blocks (negative ones count from the end). Default: the one middle
  block, `len(blocks) // 2`, as in the paper, which replaces the feed-forward of one middle block.
- `mode="replace"`: the PEER layer takes the feed-forward's place (`block.mlp` is the PEER layer).
  `mode="parallel"`: it is added beside it, `y = mlp(x) + peer(x)` (the paper's "augment" option),
  in a `ParallelPEER` module: the feed-forward's parameters move from `...mlp.*` to `...mlp.ffn.*`.
  GPT-2's MLP holds the residual dropout, so replacing it drops that dropout (PEER has `dropout`).
- `peer_kwargs`: `peer_kernels.PEER`'s options (`dim` is the model's hidden size; `device` and
  `dtype` are the feed-forward's). They must be JSON values: they are saved in the model's config.
  For causal LMs prefer `query_norm="layernorm"` (or None): the default "batchnorm" (the paper's)
  normalises over the batch's tokens in training, so a token sees later tokens, one token alone
  cannot be normalised, and gradient checkpointing (which runs the forward twice) updates its
  running statistics twice; eval mode (which `generate()` needs anyway) has none of this.

The settings are written to `model.config.peer` = {"layers": [...], "mode": ..., "peer_kwargs":
{...}}; `backend` is not saved (it is a choice of the machine: `from_pretrained(..., backend=)`).
The model gets its own copy of its config: the config object it was built from is left as it was.
`from_pretrained(cls, path, *, backend="auto", **kwargs)` builds `cls` (a model class, or an Auto
class such as AutoModelForCausalLM) with the PEER layers of its config and loads the checkpoint
with transformers' own `from_pretrained` (kwargs such as `dtype` or `device_map` go there); a PEER
weight that is missing from the checkpoint or does not fit raises instead of being left random. A
checkpoint without `config.peer` raises too: to add PEER to a pretrained model, load it as usual
and call `apply_peer`. (transformers releases before 4.49 rename every parameter named `*gamma*`
on load, PEER's `norm.gamma` with `pre_rmsnorm=True` included: the check raises there.)

The PEER layer is position-wise, so `generate()` and its KV cache work unchanged (call
`model.eval()` first with query_norm="batchnorm"), as do gradient checkpointing, `torch.compile`
and `torch.autocast`. peft: `get_peft_model` freezes every parameter it does not adapt, the new
PEER layers included; unfreeze them after it (`for layer in peer_modules(model).values():
layer.requires_grad_(True)`; they are then saved with the base model, not the adapter), or list
them in `modules_to_save` (which keeps a second copy of each: costly with large tables). With
`target_modules="all-linear"`, pass `exclude_modules=["to_queries"]` so that LoRA stays off the
PEER query projection.
"""
import copy
import json

from torch import nn

from . import quantize
from ._checks import BACKENDS, check_choice
from .module import PEER

MODES = ("replace", "parallel")
_FFN_NAMES = ("mlp", "feed_forward", "ffn")
_NOT_FFN = ("attn", "attention", "norm", "drop", "embed")
_FROM_THE_MODEL = ("dim", "device", "dtype")


class ParallelPEER(nn.Module):
    """mode="parallel": a block's feed-forward and a PEER layer side by side, ffn(x) + peer(x)."""

    def __init__(self, ffn, peer):
        super().__init__()
        self.ffn, self.peer = ffn, peer

    def forward(self, hidden_states):
        return self.ffn(hidden_states) + self.peer(hidden_states)


def peer_modules(model):
    """name -> PEER layer, for every PEER layer in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PEER)}


def apply_peer(model, *, layers=None, mode="replace", **peer_kwargs):
    """Puts PEER layers into the decoder blocks of a transformers model, in place; returns the
    model. See the module docstring."""
    check_choice("mode", mode, MODES)
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise TypeError(f"model: expected a transformers model (an nn.Module with a config), got {type(model).__name__}")
    if getattr(config, "peer", None):
        raise ValueError(f"model: it has PEER layers already (config.peer = {config.peer}); call apply_peer once, "
                         "with every block in `layers`")
    for name in _FROM_THE_MODEL:
        if name in peer_kwargs:
            raise TypeError(f"{name}: apply_peer takes it from the model, it is not an argument")
    backend = peer_kwargs.pop("backend", "auto")
    for name, value in peer_kwargs.items():
        if json.loads(json.dumps(value, default=repr)) != value:
            raise TypeError(f"{name}: expected a JSON value (it is saved in config.json), got {value!r}")
    hidden = _hidden_size(config)
    blocks = _decoder_blocks(model, hidden)
    layers = _block_indices(layers, len(blocks))
    _install(blocks, hidden, layers, mode, peer_kwargs, backend)
    own = copy.copy(config)
    own.peer = {"layers": layers, "mode": mode, "peer_kwargs": peer_kwargs}
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = own
    return model


def from_pretrained(cls, path, *, backend="auto", **kwargs):
    """The model saved at `path` by save_pretrained after apply_peer, as `cls` (a transformers
    model class or an Auto class), with its PEER layers; kwargs go to transformers'
    from_pretrained. See the module docstring."""
    import transformers

    check_choice("backend", backend, BACKENDS)
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, "peer", None)
    if not settings:
        raise ValueError(f"path: the config at {path!r} has no PEER settings (config.peer); to add PEER to this "
                         f"model, load it with {cls.__name__}.from_pretrained and call apply_peer")
    if hasattr(cls, "_model_mapping"):
        cls = cls._model_mapping[type(config)]
    model, info = _with_peer(cls).from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    model.__class__ = cls
    installed = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, (PEER, ParallelPEER)))
    keys = [*info["missing_keys"], *info["unexpected_keys"], *(m[0] for m in info.get("mismatched_keys", ()))]
    wrong = sorted(key for key in keys if key.startswith(installed))
    if wrong:
        renamed = ("; transformers releases before 4.49 rename parameters named *gamma* on load, PEER's "
                   "norm.gamma (pre_rmsnorm=True) included: upgrade transformers") if any("gamma" in k for k in wrong) else ""
        raise ValueError(f"path: the checkpoint at {path!r} does not hold the PEER layers its config describes "
                         f"(missing, unexpected or of another shape: {wrong}){renamed}")
    for layer in peer_modules(model).values():
        layer.backend = backend
    return model


# ---- finding the blocks and their feed-forward ------------------------------------------------------

def _hidden_size(config):
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"model: its config ({type(config).__name__}) has no hidden_size")


def _linear_shape(module):
    """(in, out) features of a Linear or of transformers' Conv1D (GPT-2's, weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return None


def _is_ffn(module, hidden):
    """Linear maps of which some widen `hidden` features to another width and some write `hidden`
    features: hidden -> inner -> hidden. (Attention has that shape too: it is told apart by name.)"""
    shapes = [shape for shape in map(_linear_shape, module.modules()) if shape is not None]
    widens = any(i == hidden and o != hidden for i, o in shapes)
    return len(shapes) >= 2 and widens and any(o == hidden for _, o in shapes)


def _find_ffn(block, hidden):
    """(name, module): the block's feed-forward of width `hidden` (see the module docstring)."""
    candidates = [(name, child) for name, child in block.named_children() if _is_ffn(child, hidden)]
    rules = (lambda name: name in _FFN_NAMES,
             lambda name: any(token in name.lower() for token in _FFN_NAMES),
             lambda name: not any(token in name.lower() for token in _NOT_FFN))
    for rule in rules:
        found = [(name, child) for name, child in candidates if rule(name)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"model: {type(block).__name__} has several feed-forward candidates "
                             f"{[name for name, _ in found]}")
    raise ValueError(f"model: found no feed-forward of width {hidden} among the children of {type(block).__name__} "
                     f"{[name for name, _ in block.named_children()]}")


def _decoder_blocks(model, hidden):
    """The decoder's ModuleList of blocks (see the module docstring); among several candidates the
    one inside model.get_decoder(), with config.num_hidden_layers blocks, the longest."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    in_decoder = {id(module) for module in decoder.modules()}
    best = None
    for blocks in model.modules():
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or len({type(b) for b in blocks}) != 1:
            continue
        try:
            _find_ffn(blocks[0], hidden)
        except ValueError:
            continue
        rank = (id(blocks) in in_decoder, len(blocks) == getattr(text, "num_hidden_layers", None), len(blocks))
        if best is None or rank > best[0]:
            best = (rank, blocks)
    if best is None:
        raise ValueError(f"model: found no list of decoder blocks with a feed-forward of width {hidden} "
                         f"in {type(model).__name__}")
    return best[1]


def _block_indices(layers, count):
    """layers (None, an int or ints; negative ones from the end) -> sorted distinct indices."""
    if layers is None:
        return [count // 2]
    chosen = [layers] if isinstance(layers, int) else list(layers)
    for index in chosen:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layers: expected block indices (ints), got {index!r}")
        if not -count <= index < count:
            raise ValueError(f"layers: expected block indices in [-{count}, {count}) ({count} blocks), got {index}")
    indices = sorted({index % count for index in chosen})
    if len(indices) != len(chosen) or not indices:
        raise ValueError(f"layers: expected one or more distinct blocks, got {layers!r}")
    return indices


def _install(blocks, hidden, layers, mode, peer_kwargs, backend, quantization=None):
    """Builds every PEER layer first (bad options raise before the model changes), then swaps them
    in: each on its feed-forward's device and in its dtype (a quantized one's: the default dtype).
    quantization: the dtype name of quantized expert tables (config.peer["quantization"], recorded
    by peer_kernels.quantize_), which the layers get unwritten, to be loaded."""
    made = []
    for index in layers:
        name, ffn = _find_ffn(blocks[index], hidden)
        weight = next(ffn.parameters())
        dtype = weight.dtype if weight.is_floating_point() else None
        peer = PEER(hidden, **peer_kwargs, backend=backend, device=weight.device, dtype=dtype)
        if quantization is not None:
            quantize.make_quantized(peer, quantize.dtype_of(quantization))
        # transformers' weight init skips flagged modules: the PEER layer initialises itself or is
        # loaded, and its names would trip the families' init rules (Gemma zeroes any *RMSNorm*'s weight)
        for module in peer.modules():
            module._is_hf_initialized = True
        made.append((blocks[index], name, ParallelPEER(ffn, peer) if mode == "parallel" else peer))
    for block, name, module in made:
        setattr(block, name, module)


_WITH_PEER = {}


def _with_peer(base):
    """A subclass of the transformers model class `base` whose __init__ installs the PEER layers
    that config.peer describes, so that transformers' from_pretrained loads their weights. Same
    name, qualname and module as `base`: transformers treats it as `base` (architectures in the
    config, no custom code)."""
    if base not in _WITH_PEER:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            settings, hidden = config.peer, _hidden_size(config)
            _install(_decoder_blocks(self, hidden), hidden, settings["layers"], settings["mode"],
                     settings["peer_kwargs"], "auto", settings.get("quantization"))

        _WITH_PEER[base] = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                                         "__qualname__": base.__qualname__})
    return _WITH_PEER[base]
