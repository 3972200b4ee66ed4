"""A small byte-level language model trained on the Python standard library's own source code,
with a dense feed-forward or a PEER layer in its middle block (X. O. He, "Mixture of A Million
Experts", arXiv 2407.04153), compared on held-out perplexity and on the paper's Table 2 measures of
expert usage.

    python examples/train_lm.py                    # --preset gpu with a CUDA device, else --preset cpu
    python examples/train_lm.py --preset smoke     # seconds: everything runs
    python examples/train_lm.py --quantize         # also the trained PEER models' perplexity with
                                                   # int8 and fp8 expert tables (peer_kernels.quantize_)

It runs offline on a fresh machine: the corpus is the .py files of the standard library of the
Python that runs it (about 30 MB; every tenth file is held out for evaluation). Needs torch and
peer_kernels; matplotlib, if installed, draws the curves.

Variants (`--variants`), identical but for the middle block's feed-forward:
  dense    a dense MLP (dim -> width -> dim) with as many weights as PEER uses for one token (its
           active parameters: the heads*k retrieved experts, 2*dim each, and the query projection)
  peer_bn  PEER with the paper's query BatchNorm
  peer     PEER without a query norm: Table 2 of the paper finds query BatchNorm raises the share of
           experts used and lowers the KL divergence of their usage from uniform
The other blocks have dense 4*dim MLPs. Expert usage is counted over the evaluation text
(`layer.track_usage`, `layer.usage_stats()`). With --quantize, each trained PEER model is evaluated
again on the same text with its expert tables quantized (a copy; int8, and float8_e4m3fn where it
runs: a CPU or a GPU of sm_89 or newer), for inference as served. In training, batch normalisation mixes the statistics
of all the tokens of a batch, later ones included (a causal LM should not see them); evaluation
uses its running statistics, so the reported perplexities have no such leak.

Output: a table on stdout, <out>/results.json, and <out>/curves.png (train and eval loss per step).
"""
import argparse
import copy
import json
import math
import pathlib
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import peer_kernels

# Beside the script rather than in the working directory, so a run from a clone's root leaves no
# untracked folder behind (.gitignore has examples/out/).
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "train_lm"

PRESETS = {
    # dim, blocks, attention heads, context, batch, steps, learning rate; PEER: n*n experts, heads, k, dim_key
    "smoke": dict(dim=32, blocks=3, heads=2, context=32, batch=4, steps=6, lr=3e-3, corpus_mb=0.3, eval_batches=2,
                  evals=2, num_experts=16 ** 2, peer_heads=2, experts_per_head=4, dim_key=16),
    "cpu": dict(dim=64, blocks=4, heads=4, context=64, batch=16, steps=400, lr=3e-3, corpus_mb=8,
                eval_batches=16, evals=4, num_experts=64 ** 2, peer_heads=4, experts_per_head=8, dim_key=16),
    "gpu": dict(dim=512, blocks=8, heads=8, context=512, batch=32, steps=4000, lr=1e-3, corpus_mb=0,
                eval_batches=100, evals=10, num_experts=512 ** 2, peer_heads=8, experts_per_head=16, dim_key=128),
}
VARIANTS = ("dense", "peer_bn", "peer")


# ---- data -----------------------------------------------------------------------------------------

def corpus(megabytes):
    """(train, eval) uint8 tensors of the standard library's .py files; megabytes=0: all of them."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise SystemExit(f"no .py files under {root}: this Python has no standard library source")
    parts, size = ([], []), 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        parts[i % 10 == 0].append(data)
        size += len(data)
        if megabytes and size >= megabytes * 1e6:
            break
    return tuple(torch.frombuffer(bytearray(b"\n".join(p)), dtype=torch.uint8) for p in parts)


def windows(data, starts, context):
    """(inputs, targets) int64 (len(starts), context): the bytes from each start and the next ones."""
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---- model ----------------------------------------------------------------------------------------

def mlp(dim, width):
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = ffn

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self, dim, blocks, heads, context, middle_ffn):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        ffns = [mlp(dim, 4 * dim) for _ in range(blocks)]
        ffns[blocks // 2] = middle_ffn
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for ffn in ffns)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.position[:ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def middle_ffn(variant, p, backend):
    """The middle block's feed-forward, and its active parameters (the weights one token uses)."""
    dim, h, k, dk = p["dim"], p["peer_heads"], p["experts_per_head"], p["dim_key"]
    active = h * k * 2 * dim + dim * 2 * h * dk
    if variant == "dense":
        width = round(active / (2 * dim))
        return mlp(dim, width), 2 * dim * width + width + dim
    query_norm = "batchnorm" if variant == "peer_bn" else None
    layer = peer_kernels.PEER(dim, heads=h, num_experts=p["num_experts"], num_experts_per_head=k, dim_key=dk,
                              query_norm=query_norm, backend=backend)
    return layer, active


# ---- training -------------------------------------------------------------------------------------

def progress(step, total, start, text):
    """A one-line progress bar on stderr."""
    width = 30
    done = width * step // total
    rate = step / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r  [{'#' * done}{'.' * (width - done)}] {step}/{total} {rate:.1f} it/s  {text}   ")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def quantized_dtypes(device):
    """The table dtypes peer_kernels.quantize_ runs with on `device`."""
    fp8 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)
    return {"int8": torch.int8, **({"fp8": torch.float8_e4m3fn} if fp8 else {})}


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten()).item()
    model.train()
    return total / len(batches)


def run(variant, p, train, held_out, device, backend, quantize=False):
    torch.manual_seed(0)
    ffn, active = middle_ffn(variant, p, backend)
    model = ByteLM(p["dim"], p["blocks"], p["heads"], p["context"], ffn).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    warmup = max(1, p["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, p["steps"]) / p["steps"])))
    batches = torch.Generator().manual_seed(1)   # the same text for every variant
    autocast = device.type == "cuda"
    every = max(1, p["steps"] // p["evals"])
    curve = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    start = time.perf_counter()
    for step in range(1, p["steps"] + 1):
        starts = torch.randint(0, len(train) - p["context"] - 1, (p["batch"],), generator=batches)
        inputs, targets = windows(train, starts, p["context"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve["step"].append(step)
        curve["train_loss"].append(loss.item())
        if step % every == 0 or step == p["steps"]:
            if step == p["steps"] and variant != "dense":
                ffn.track_usage = True   # the last evaluation counts the experts it retrieves
            curve["eval_step"].append(step)
            curve["eval_loss"].append(evaluate(model, held_out, device, autocast))
        progress(step, p["steps"], start, f"{variant}: loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    loss = curve["eval_loss"][-1]
    result = {"variant": variant, "parameters": sum(t.numel() for t in model.parameters()),
              "middle_ffn_active_parameters": active, "seconds": seconds, "eval_loss": loss,
              "eval_perplexity": math.exp(loss), "eval_bits_per_byte": loss / math.log(2), "curve": curve}
    if variant != "dense":
        stats = ffn.usage_stats()
        result.update(used_fraction=stats["used_fraction"], kl_from_uniform=stats["kl_from_uniform"])
    if quantize and variant != "dense":
        for name, dtype in quantized_dtypes(device).items():
            served = peer_kernels.quantize_(copy.deepcopy(model), dtype)
            result[f"eval_perplexity_{name}"] = math.exp(evaluate(served, held_out, device, autocast))
    return result


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        c = r["curve"]
        smooth, ema = [], c["train_loss"][0]
        for loss in c["train_loss"]:
            ema = 0.95 * ema + 0.05 * loss
            smooth.append(ema)
        left.plot(c["step"], smooth, label=r["variant"])
        right.plot(c["eval_step"], c["eval_loss"], marker="o", label=r["variant"])
    left.set(title="train loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    right.set(title="held-out loss", xlabel="step", ylabel="cross-entropy (nats/byte)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--backend", default="auto", help="peer_kernels backend (default auto)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for results.json and curves.png (default examples/out/train_lm, git-ignored)")
    parser.add_argument("--quantize", action="store_true",
                        help="also evaluate each trained PEER model with int8 (and fp8) expert tables")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset], **({"steps": args.steps} if args.steps else {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, held = corpus(p["corpus_mb"])
    eval_starts = torch.randint(0, len(held) - p["context"] - 1, (p["eval_batches"], p["batch"]),
                                generator=torch.Generator().manual_seed(2))
    held_out = [windows(held, s, p["context"]) for s in eval_starts]
    print(f"corpus: {len(train) / 1e6:.1f} MB train, {len(held) / 1e6:.1f} MB held out (the standard library's "
          f".py files); preset {args.preset} on {device}, {p['steps']} steps of {p['batch']}x{p['context']} bytes")
    results = [run(variant, p, train, held_out, device, args.backend, args.quantize) for variant in args.variants]

    quantized = [f"eval_perplexity_{name}" for name in quantized_dtypes(device)] if args.quantize else []
    print(f"\n{'variant':8} {'params':>9} {'active FFN':>10} {'eval ppl':>9} {'bits/byte':>9} "
          f"{'experts used':>12} {'KL(usage|uniform)':>17} {'time':>7}"
          + "".join(f" {'ppl ' + key.rsplit('_', 1)[1]:>9}" for key in quantized))
    for r in results:
        usage = f"{100 * r['used_fraction']:11.1f}% {r['kl_from_uniform']:17.3f}" if "used_fraction" in r else \
            f"{'-':>12} {'-':>17}"
        print(f"{r['variant']:8} {r['parameters']:9d} {r['middle_ffn_active_parameters']:10d} "
              f"{r['eval_perplexity']:9.3f} {r['eval_bits_per_byte']:9.3f} {usage} {r['seconds']:6.0f}s"
              + "".join(f" {r[key]:9.3f}" if key in r else f" {'-':>9}" for key in quantized))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"preset": args.preset, "settings": p, "device": str(device),
                                                  "torch": torch.__version__, "results": results}, indent=1))
    print(f"results: {out / 'results.json'}")
    plot(results, out / "curves.png")
    return results


if __name__ == "__main__":
    main()
