"""peer_kernels.transformers: apply_peer and from_pretrained on tiny models of every supported family,
built from transformers' config classes (no downloads)."""
import json

import pytest
import torch
from packaging.version import Version

from peer_kernels import PEER, quantize_
from peer_kernels.transformers import ParallelPEER, apply_peer, from_pretrained, peer_modules

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
VERSION = Version(transformers.__version__).release
# before 4.49 (transformers PR #35615) from_pretrained renamed every parameter named *gamma*,
# PEER's pre-norm's norm.gamma included: from_pretrained must raise there
RENAMES_GAMMA = VERSION < (4, 49)

OPTIONS = dict(heads=2, num_experts=64, num_experts_per_head=4, dim_key=8, query_norm="layernorm",
               pre_rmsnorm=not RENAMES_GAMMA, backend="reference")
DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {  # family: (config class, model class, options beyond DECODER)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
}


def tiny(family):
    """(config, model class) of a 3-block model of width 32 (GPT-2 spells its sizes its own way)."""
    config_name, model_name, extra = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    if extra is None:
        config = config_cls(n_embd=32, n_layer=3, n_head=2, n_positions=64, vocab_size=128, eos_token_id=0,
                            bos_token_id=0)
    else:
        config = config_cls(**DECODER, **extra)
    return config, model_cls


def tokens(batch=2, length=7):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("mode", ["replace", "parallel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, mode, tmp_path):
    """apply_peer on the middle block; training lowers the loss and reaches PEER; save_pretrained ->
    from_pretrained gives the same logits and the same generated tokens; the caller's config is
    left alone."""
    config, cls = tiny(family)
    model = apply_peer(cls(config), mode=mode, **OPTIONS)
    assert not hasattr(config, "peer")
    ffn = blocks_of(model)[1].mlp
    layer = ffn if mode == "replace" else ffn.peer
    assert isinstance(layer, PEER) and layer.dim == 32 and layer.pre_rmsnorm == OPTIONS["pre_rmsnorm"]
    assert mode == "replace" or isinstance(ffn, ParallelPEER) and not isinstance(ffn.ffn, PEER)
    assert list(peer_modules(model).values()) == [layer]
    assert not any(isinstance(blocks_of(model)[i].mlp, (PEER, ParallelPEER)) for i in (0, 2))
    assert model.config.peer == {"layers": [1], "mode": mode,
                                 "peer_kwargs": {k: v for k, v in OPTIONS.items() if k != "backend"}}

    ids = tokens()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    model.eval()
    model.save_pretrained(tmp_path)
    assert "backend" not in json.loads((tmp_path / "config.json").read_text())["peer"]["peer_kwargs"]
    restored = from_pretrained(transformers.AutoModelForCausalLM, tmp_path, backend="reference")
    assert type(restored) is cls
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
    generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = model.generate(ids, **generate)
    assert generated.shape == (2, 11)
    assert torch.equal(restored.generate(ids, **generate), generated)


def test_layers_select_blocks_and_negative_indices_count_from_the_end():
    config, cls = tiny("llama")
    model = apply_peer(cls(config), layers=[0, -1], **OPTIONS)
    assert sorted(peer_modules(model)) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert model.config.peer["layers"] == [0, 2]
    model = apply_peer(cls(config), layers=2, **OPTIONS)
    assert list(peer_modules(model)) == ["model.layers.2.mlp"]


def test_blocks_and_ffn_are_found_by_structure_not_by_name():
    """The same model with its feed-forward renamed: found by shape, attention left alone."""
    config, cls = tiny("llama")
    model = cls(config)
    for block in model.model.layers:
        block.add_module("zz_fn", block.mlp)
        del block.mlp
    attention = model.model.layers[1].self_attn
    apply_peer(model, **OPTIONS)
    assert list(peer_modules(model)) == ["model.layers.1.zz_fn"]
    assert model.model.layers[1].self_attn is attention


def test_multimodal_model_gets_peer_in_its_language_model():
    """Gemma 3 with a vision tower: the longer list of vision blocks is not the decoder."""
    if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
        pytest.skip("no Gemma 3 in this transformers")
    text = dict(DECODER, num_hidden_layers=2, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=16,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = apply_peer(transformers.Gemma3ForConditionalGeneration(config), **OPTIONS)
    assert list(peer_modules(model)) == ["model.language_model.layers.1.mlp"]
    assert model(input_ids=tokens()).logits.shape == (2, 7, 128)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="augment"), ValueError, "mode: expected one of"),
    (dict(layers=[3]), ValueError, r"layers: expected block indices in \[-3, 3\) \(3 blocks\), got 3"),
    (dict(layers=[1, -2]), ValueError, "layers: expected one or more distinct blocks"),
    (dict(layers=[]), ValueError, "layers: expected one or more distinct blocks"),
    (dict(layers=["1"]), TypeError, "layers: expected block indices"),
    (dict(dim=32), TypeError, "dim: apply_peer takes it from the model"),
    (dict(dtype=torch.float64), TypeError, "dtype: apply_peer takes it from the model"),
    (dict(num_experts=torch.tensor(64)), TypeError, "num_experts: expected a JSON value"),
    (dict(num_experts=50), ValueError, "num_experts: expected a perfect square"),
])
def test_bad_arguments_raise_before_the_model_changes(kwargs, error, match):
    config, cls = tiny("llama")
    model = cls(config)
    before = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        apply_peer(model, **{**OPTIONS, **kwargs})
    assert [type(m) for m in model.modules()] == before and not hasattr(model.config, "peer")


def test_applying_twice_is_an_error():
    config, cls = tiny("llama")
    model = apply_peer(cls(config), **OPTIONS)
    with pytest.raises(ValueError, match="model: it has PEER layers already"):
        apply_peer(model, layers=[0], **OPTIONS)


def test_checkpoint_without_its_peer_weights_raises(tmp_path):
    """A PEER weight missing from the checkpoint must not come back as uninitialised memory."""
    from safetensors.torch import load_file, save_file

    config, cls = tiny("llama")
    apply_peer(cls(config), **OPTIONS).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.w_up"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold the PEER layers.*model\.layers\.1\.mlp\.w_up"):
        from_pretrained(cls, tmp_path)


@pytest.mark.skipif(not RENAMES_GAMMA, reason="this transformers loads parameters named gamma as they are")
def test_renamed_gamma_raises_on_old_transformers(tmp_path):
    config, cls = tiny("llama")
    apply_peer(cls(config), **{**OPTIONS, "pre_rmsnorm": True}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.norm\.gamma.*rename parameters named \*gamma\*"):
        from_pretrained(cls, tmp_path)


def test_checkpoint_without_peer_settings_says_what_to_do(tmp_path):
    config, cls = tiny("llama")
    cls(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no PEER settings.*call apply_peer"):
        from_pretrained(cls, tmp_path)


def test_from_pretrained_passes_dtype_and_backend_through(tmp_path):
    config, cls = tiny("qwen2")
    apply_peer(cls(config), mode="parallel", **OPTIONS).save_pretrained(tmp_path)
    dtype = {"dtype" if VERSION >= (4, 56) else "torch_dtype": torch.bfloat16}
    model = from_pretrained(cls, tmp_path, backend="cpp", **dtype)
    layer, = peer_modules(model).values()
    assert layer.w_down.dtype == torch.bfloat16 and layer.backend == "cpp"
    with pytest.raises(ValueError, match="backend: expected one of"):
        from_pretrained(cls, tmp_path, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_model_round_trip(dtype, tmp_path):
    """quantize_ records its dtype in config.peer; from_pretrained rebuilds the layers quantized and
    loads their tables and scales: the same logits and tokens. Loaded in bfloat16, the tables and
    scales keep their dtypes."""
    config, cls = tiny("llama")
    model = quantize_(apply_peer(cls(config), mode="parallel", **OPTIONS), dtype).eval()
    assert model.config.peer["quantization"] == str(dtype).removeprefix("torch.")
    model.save_pretrained(tmp_path)
    restored = from_pretrained(transformers.AutoModelForCausalLM, tmp_path, backend="reference")
    layer, = peer_modules(restored).values()
    assert layer.w_down.dtype == layer.w_up.dtype == dtype and layer.w_up_scale.dtype == torch.float32
    ids = tokens()
    generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
        assert torch.equal(restored.generate(ids, **generate), model.generate(ids, **generate))
    dtype_arg = {"dtype" if VERSION >= (4, 56) else "torch_dtype": torch.bfloat16}
    layer, = peer_modules(from_pretrained(cls, tmp_path, **dtype_arg)).values()
    assert layer.keys.dtype == torch.bfloat16 and layer.w_down.dtype == dtype
    assert layer.w_down_scale.dtype == torch.float32


def _llama(**options):
    config, cls = tiny("llama")
    torch.manual_seed(0)
    return apply_peer(cls(config), **{**OPTIONS, **options}).double().train()


def _gradients(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    model, ids = _llama(), tokens()
    loss, grads = _gradients(model, ids)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed_loss, checkpointed = _gradients(model, ids)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():   # float64: the recomputed forward is the same computation
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_torch_compile_gives_the_same_loss_and_gradients():
    model, ids = _llama(), tokens()
    loss, grads = _gradients(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss, compiled_grads = _gradients(compiled, ids)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[f"_orig_mod.{name}"], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_autocast_trains_with_fp32_parameters():
    config, cls = tiny("llama")
    model = apply_peer(cls(config), **OPTIONS).train()
    layer, = peer_modules(model).values()
    seen = {}
    layer.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].dtype, y=output.dtype))
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert seen["y"] == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_peft_lora_on_other_modules():
    """LoRA everywhere but the PEER query projection (exclude_modules); PEER is frozen by peft
    and trains again once unfrozen."""
    peft = pytest.importorskip("peft", minversion="0.14")   # exclude_modules
    config, cls = tiny("llama")
    model = apply_peer(cls(config), mode="parallel", **OPTIONS)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", exclude_modules=["to_queries"])
    tuned = peft.get_peft_model(model, lora)
    adapted = {name.split("model.layers.", 1)[1] for name, m in tuned.named_modules() if hasattr(m, "lora_A")}
    assert "1.mlp.ffn.up_proj" in adapted and "0.self_attn.q_proj" in adapted
    assert not any("peer" in name for name in adapted)
    layer, = peer_modules(tuned).values()
    assert not any(p.requires_grad for p in layer.parameters())
    layer.requires_grad_(True)
    ids = tokens()
    tuned(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
