"""python -m bench [--preset paper|sweep|cpu|smoke|decode] [--device auto|cuda|cpu] [--out DIR] [--shapes I ...] ...
python -m bench --distributed P [--timeout SECONDS] [--preset ...]
python -m bench --compare A.json B.json"""
import argparse
import dataclasses
import datetime
import os
import sys

import torch

from . import cases, distributed, profile, providers, report, run, timing

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(cases.PRESETS),
                        help="paper (the paper's headline shape), sweep (N, T, d, h*k around it), cpu (small), smoke "
                             "(tiny: checks every provider's wiring), decode (the paper's layer in inference at "
                             "1, 8, 64 and 512 tokens per step, fp32 on a CPU). Default: paper on a GPU, cpu "
                             "otherwise")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: cuda when available; without a GPU, paper and sweep fall back to cpu")
    parser.add_argument("--shapes", nargs="+", type=int, metavar="I",
                        help="only these of the preset's shapes, by index (0 = the first; sweep: 0 is the paper's)")
    parser.add_argument("--ops", nargs="+", choices=(*cases.OPS, "decode"),
                        help="default: the preset's (decode: the decode preset's, the layer's inference step)")
    parser.add_argument("--modes", nargs="+", choices=cases.MODES, help="default: the preset's")
    parser.add_argument("--providers", nargs="+", choices=list(providers.PROVIDERS),
                        help="default: all but those the preset leaves out")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for <preset>-<time>.json/.csv/.png")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a CPU shared with "
                                                    "other work, fewer threads than cores avoid stalled parallel regions")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="show two result files side by side")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing providers, print the layer's per-kernel times (torch.profiler) for "
                             "the preset's first shape, and on a GPU peer_fused's schedules' wall and kernel times")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same run at interpreter sizes on the CPU (cases.dry_run), one timed repetition: "
                             "checks a GPU run's code path without a GPU; needs TRITON_INTERPRET=1 set")
    parser.add_argument("--distributed", type=int, metavar="P",
                        help="instead: the layer with its tables sharded over P processes (torchrun; one GPU each, "
                             "or gloo on a CPU): per-rank step time and bytes communicated")
    parser.add_argument("--timeout", type=float, default=distributed.TIMEOUT_SECONDS, metavar="SECONDS",
                        help="with --distributed: the process group's timeout, how long a rank waits for a stuck "
                             "peer before it fails (default: %(default)s; torch's own is 30 min for gloo, 10 for "
                             "NCCL)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.compare:
        print(report.compare(*args.compare))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        sys.exit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and has_cuda) else "cpu")
    preset_name = args.preset or ("paper" if device.type == "cuda" else "cpu")
    if args.device == "auto" and device.type == "cpu" and preset_name in ("paper", "sweep"):
        print(f"no GPU: running the cpu preset instead of {preset_name} (--device cpu forces it)")
        preset_name = "cpu"
    preset = cases.PRESETS[preset_name]
    if args.shapes:
        preset = dataclasses.replace(preset, shapes=tuple(preset.shapes[i] for i in args.shapes))
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" or device.type != "cpu":
            sys.exit("--dry-run: needs TRITON_INTERPRET=1 and the CPU (--device cpu)")
        preset = cases.dry_run(preset)
        timing.CPU_REPS = (1, 1)
    if args.profile:
        profile.profile_layer(preset, device)
        profile.profile_fused_schedules(preset, device)
        return 0
    left_out = {} if args.providers else dict(preset.left_out)
    names = args.providers or [name for name in providers.PROVIDERS if name not in left_out]
    stem = f"{preset_name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.distributed:
        if device.type == "cuda" and torch.cuda.device_count() < args.distributed:
            sys.exit(f"--distributed {args.distributed}: only {torch.cuda.device_count()} GPUs")
        return distributed.launch(args.distributed, preset_name, device, args.out,
                                  f"distributed{args.distributed}-{stem}", args.timeout)

    def save(meta, rows, skipped):
        report.write(args.out, stem, meta, report.add_speedups(rows), skipped)

    meta, rows, skipped = run.run(preset, preset_name, device, args.ops or preset.ops, args.modes or preset.modes,
                                  names, left_out, save)
    save(meta, rows, skipped)
    print()
    print(report.table(meta, rows))
    if skipped:
        print("\nskipped (provider/op[/mode]: why):")
        where = {}
        for s in skipped:
            where.setdefault(s["reason"], []).append("/".join(filter(None, (s["provider"], s["op"], s["mode"]))))
        for reason, cases_skipped in where.items():
            print(f"  {', '.join(cases_skipped)}: {reason}")
    print(f"\nresults: {os.path.join(args.out, stem)}.json (.csv)")
    if not args.no_plots:
        path = report.plot(args.out, stem, rows)
        if path:
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
