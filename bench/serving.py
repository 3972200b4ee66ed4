"""Serving measurements: tokens per second of transformers' generate() on a small model with PEER
(peer_kernels.transformers.apply_peer), its tables float or quantized, against the same model with
its dense feed-forward. (The layer's int8 / fp8 rows are bench providers: bench/providers.py.)

    python -m bench.serving [--device cpu|cuda] [--compile none|default|reduce-overhead] [--threads N]
"""
import argparse
import dataclasses
import statistics
import sys
import time

import torch


# ---- generate() ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerateCase:
    """A small Llama (built from its config: no download) and a greedy generation."""
    hidden: int = 256
    intermediate: int = 1024
    layers: int = 4
    attention_heads: int = 4
    vocab: int = 1024
    batch: int = 1
    prompt: int = 16
    new_tokens: int = 64
    # the PEER layer in the middle block: n*n experts, heads, experts per head, sub-key dim
    num_experts: int = 256 ** 2
    peer_heads: int = 4
    experts_per_head: int = 8
    dim_key: int = 64


def _model(case, variant, device):
    """(model, label): the dense Llama, or the same weights with the middle block's feed-forward
    replaced by PEER, its tables float or quantized."""
    import transformers

    from peer_kernels import quantize_
    from peer_kernels.transformers import apply_peer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden,
                                      intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                                      num_attention_heads=case.attention_heads, num_key_value_heads=case.attention_heads,
                                      max_position_embeddings=case.prompt + case.new_tokens)
    model = transformers.LlamaForCausalLM(config)
    if variant != "dense":
        apply_peer(model, num_experts=case.num_experts, heads=case.peer_heads,
                   num_experts_per_head=case.experts_per_head, dim_key=case.dim_key, query_norm="layernorm")
    if variant in ("peer-int8", "peer-fp8"):
        quantize_(model, {"peer-int8": torch.int8, "peer-fp8": torch.float8_e4m3fn}[variant])
    return model.to(device).eval()


VARIANTS = ("dense", "peer", "peer-int8", "peer-fp8")


def generate_tokens_per_second(case, variant, device, compile_mode, repeats=5):
    """{variant, compile, tokens_per_s (median), times_s, ...}: greedy generate() with the static
    KV cache, the forward compiled (compile_mode: "none", "default", or "reduce-overhead": CUDA
    graphs), timed after a first untimed call (compilation) over `repeats` calls."""
    model = _model(case, variant, device)
    if compile_mode != "none":
        model.forward = torch.compile(model.forward, mode=compile_mode)
    prompt = torch.randint(0, case.vocab, (case.batch, case.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    options = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0,
                   cache_implementation="static")

    def generate():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    first, out = generate()
    assert out.shape == (case.batch, case.prompt + case.new_tokens), out.shape
    times = [generate()[0] for _ in range(repeats)]
    tokens = case.batch * case.new_tokens
    return {"variant": variant, "compile": compile_mode, "batch": case.batch, "new_tokens": case.new_tokens,
            "tokens_per_s": tokens / statistics.median(times), "times_s": times, "first_call_s": first,
            "parameters": sum(p.numel() for p in model.parameters())}


def generate_rows(device, compile_mode, case=GenerateCase(), variants=VARIANTS, log=print):
    """One row per variant (fp8 only where it runs: CPUs, and GPUs of sm_89 or newer)."""
    rows = []
    for variant in variants:
        if variant == "peer-fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            log(f"  skip {variant}: float8_e4m3fn tables need sm_89 or newer")
            continue
        torch.compiler.reset()
        row = generate_tokens_per_second(case, variant, device, compile_mode)
        spread = f"{min(row['times_s']):.3f}-{max(row['times_s']):.3f} s"
        log(f"  generate {variant:9s} compile={compile_mode:15s} {row['tokens_per_s']:8.1f} tokens/s "
            f"(median of {len(row['times_s'])} calls, {spread}; first call {row['first_call_s']:.1f} s)")
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--compile", default=None, choices=("none", "default", "reduce-overhead"),
                        help="how the forward is compiled (default: reduce-overhead on a GPU, none on a CPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    compile_mode = args.compile or ("reduce-overhead" if device.type == "cuda" else "none")
    case = GenerateCase()
    print(f"generate(): {case}\ndevice {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    generate_rows(device, compile_mode, case, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
