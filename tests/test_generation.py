"""Generation end to end: a transformers model with PEER (peer_kernels.transformers.apply_peer)
generating greedily with the static KV cache under torch.compile, on the C++ backend here (CPU) and
on Triton with CUDA graphs (mode="reduce-overhead") on a GPU; with float tables and with quantized
ones (peer_kernels.quantize_). Tiny models built from transformers' config classes: no downloads.

On a CPU the forward is compiled with the "aot_eager" backend: dynamo captures the whole decode
step, the PEER ops included (their fake implementations give the shapes), without the minutes that
inductor's code generation takes on two cores; bench/serving.py times inductor's."""
import copy

import pytest
import torch

from conftest import DEVICE, gpu_sizes
from peer_kernels import quantize_
from peer_kernels.transformers import apply_peer, peer_modules

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
PEER_OPTIONS = dict(heads=2, num_experts=64, num_experts_per_head=4, dim_key=8, query_norm="layernorm")
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")


def peer_llama(backend, device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
        return apply_peer(model, layers=[0, 2], backend=backend, **PEER_OPTIONS).eval()


def prompt(device="cpu"):
    return torch.randint(1, CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1),
                         device="cpu").to(device)


def on_backend(model, backend):
    """A copy of `model` whose PEER layers run on `backend`."""
    model = copy.deepcopy(model)
    for layer in peer_modules(model).values():
        layer.backend = backend
    return model


def compiled(model, **options):
    model.forward = torch.compile(model.forward, **options)
    return model


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_compiled_cpp_generation_gives_the_reference_tokens():
    model = peer_llama("reference")
    with torch.no_grad():
        expected = model.generate(prompt(), **GREEDY)
        actual = compiled(on_backend(model, "cpp"), backend="aot_eager", fullgraph=True).generate(prompt(), **GREEDY)
    assert expected.shape == (2, 7 + GREEDY["max_new_tokens"])
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_model_generates(dtype):
    """Greedy generation runs on the quantized model, compiled, and gives the tokens of the
    reference backend on the same quantized tables."""
    model = quantize_(peer_llama("reference"), dtype)
    with torch.no_grad():
        expected = model.generate(prompt(), **GREEDY)
        actual = compiled(on_backend(model, "cpp"), backend="aot_eager", fullgraph=True).generate(prompt(), **GREEDY)
    assert torch.equal(actual, expected)
    with pytest.raises(ValueError, match="quantize_"):
        model(prompt()).logits.sum().backward()    # training refuses: the forward raises first


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.int8, torch.float8_e4m3fn], ids=["float", "int8", "fp8"])
def test_cuda_graph_generation(dtype):
    """On a GPU: Triton, the decode steps as CUDA graphs (mode="reduce-overhead"), the same tokens
    as the eager model. The dry run compiles with aot_eager, as the CPU tests do (inductor's code
    generation takes minutes on two cores), and generates one token."""
    if dtype == torch.float8_e4m3fn and DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (8, 9):
        pytest.skip("float8_e4m3fn needs sm_89 or newer")
    greedy = dict(GREEDY, max_new_tokens=gpu_sizes(GREEDY["max_new_tokens"], 1))
    model = peer_llama("triton", DEVICE)
    if dtype is not None:
        quantize_(model, dtype)
    # transformers' caches make tensors on the default device and move them: the CPU, as outside
    # the dry run (tests/conftest.py makes it the meta device there)
    with torch.device("cpu"), torch.no_grad():
        expected = model.generate(prompt(DEVICE), **greedy)
        graphed = compiled(copy.deepcopy(model), **gpu_sizes(dict(mode="reduce-overhead"), dict(backend="aot_eager")))
        for _ in range(2):                        # the first call records the graphs
            actual = graphed.generate(prompt(DEVICE), **greedy)
    assert torch.equal(actual, expected)
