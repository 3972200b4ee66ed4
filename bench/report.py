"""Results out: speed-ups, the stdout table, JSON/CSV files, optional plots, and --compare."""
import csv
import json
import os
import statistics

try:
    from tabulate import tabulate
except ImportError:  # the table still prints, plainly
    tabulate = None

BASELINES = {"speedup_vs_reference": "reference", "speedup_vs_peer_pytorch": "peer-pytorch"}


def add_speedups(rows):
    """Each row's median time against the reference's and peer-pytorch's in the same (shape, op,
    mode) group: baseline ms / row ms, > 1 is faster. None where the baseline has no row."""
    medians = {(r["shape"], r["op"], r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for row in rows:
        for column, baseline in BASELINES.items():
            base = medians.get((row["shape"], row["op"], row["mode"], baseline))
            row[column] = base / row["median_ms"] if base else None
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def text_table(headers, body):
    if tabulate is not None:
        return tabulate(body, headers=headers, disable_numparse=True, stralign="right")
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *body)]
    lines = [headers, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def _iqr_percent(row):
    """Interquartile range of the timed repetitions as a percentage of their median: how noisy."""
    times = row["times_ms"]
    if len(times) < 2:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return 100 * (q3 - q1) / row["median_ms"]


def table(meta, rows):
    """One table per shape: op, mode, provider, median ms, speed-ups, GB/s and its share of the copy
    bandwidth, TFLOP/s and its share of the matmul rate, peak memory, and the check's error."""
    headers = ["op", "mode", "provider", "ms", "IQR %", "x ref", "x peer-pt", "GB/s", "% copy", "TFLOP/s", "% mm",
               "peak MiB", "rel err"]
    out = [f"{meta['device_name']}: copy {meta['copy_gbps']:.1f} GB/s, {meta['matmul_dtype']} matmul "
           f"{meta['matmul_tflops']:.3f} TFLOP/s, torch {meta['torch']}, "
           f"triton {meta['triton']}, commit {meta['git_commit']}, {meta['date']}"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        body = []
        for r in (r for r in rows if r["shape"] == shape):
            error = _fmt(r["error"], ".1e") + ("" if r["checked_dtype"] == r["shape_dtype"] else " (fp32)")
            body.append([r["op"], r["mode"], r["provider"], _fmt(r["median_ms"], ".3f"), _fmt(_iqr_percent(r), ".0f"),
                         _fmt(r["speedup_vs_reference"], ".2f"), _fmt(r["speedup_vs_peer_pytorch"], ".2f"),
                         _fmt(r["gbps"], ".1f"), _fmt(r["copy_fraction"] and 100 * r["copy_fraction"], ".1f"),
                         _fmt(r["tflops"], ".3f"), _fmt(r["compute_fraction"] and 100 * r["compute_fraction"], ".1f"),
                         _fmt(r["peak_bytes"] and r["peak_bytes"] / 2 ** 20, ".1f"),
                         error])
        out += ["", shape, text_table(headers, body)]
    notes = ["", "ms: median; IQR %: interquartile range / median; x ref / x peer-pt: their ms / this ms (> 1 is faster); GB/s: expert-row bytes "
             "(T*h*k*2*d*bytes, x2 backward, x3 both and step) / ms; % copy: of the copy bandwidth above; % mm: TFLOP/s "
             "(matmul flops) of the matmul rate above, for rows in its dtype; peak "
             "MiB: memory allocated at the peak beyond the inputs (GPU: max_memory_allocated; CPU: the running sum "
             "of the profiler's allocation records, per op), for a step plus the parameters and the optimizer "
             "state; rel err: relative RMS error against the reference, outputs and gradients (a step: its "
             "forward); (fp32): within tolerance only when run in float32."]
    if any(r["op"] == "decode" for r in rows):
        notes.append("decode: the layer's inference step (eval, no_grad); GB/s counts what a step must read (the "
                     "query projection, the keys and the T*h*k rows of both tables), so % copy is the step's share "
                     "of that bytes floor at the copy bandwidth (100 / % copy: how many times the floor it takes) and % mm "
                     "its share of the compute floor (its flops at the matmul rate; the larger share is the floor that "
                     "binds); "
                     "dense-ffn: a dense d -> h*k -> d feed-forward (the same active parameters), not checked.")
    return "\n".join(out + notes)


def write(out_dir, stem, meta, rows, skipped):
    """<stem>.json (everything, raw timings included) and <stem>.csv (one line per row)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
    if rows:
        columns = [c for c in rows[0] if c != "times_ms"] + ["times_ms"]
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "times_ms": " ".join(f"{t:.5g}" for t in r["times_ms"])})
    return base + ".json"


def plot(out_dir, stem, rows, log=print):
    """<stem>.png: time and GB/s against N, one line per provider, one row of panels per (op, mode);
    only groups whose shapes differ in N alone. Skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed")
        return None
    fixed = ("shape_T", "shape_d", "shape_h", "shape_k", "shape_k_sub", "shape_dk", "shape_dtype")
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]) + tuple(r[c] for c in fixed), []).append(r)
    groups = {key: group for key, group in groups.items() if len({r["shape_n"] for r in group}) > 1}
    if not groups:
        return None
    figure, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (key, group), (left, right) in zip(groups.items(), axes):
        for name in dict.fromkeys(r["provider"] for r in group):
            line = sorted((r for r in group if r["provider"] == name), key=lambda r: r["shape_n"])
            n_experts = [r["shape_n"] ** 2 for r in line]
            left.plot(n_experts, [r["median_ms"] for r in line], marker="o", label=name)
            if line[0]["gbps"] is not None:
                right.plot(n_experts, [r["gbps"] for r in line], marker="o", label=name)
        for ax, ylabel in ((left, "median ms"), (right, "gather GB/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N experts")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{key[0]} {key[1]}, T={key[2]} d={key[3]} h={key[4]} k={key[5]}", fontsize=9)
        left.set_yscale("log")
        left.legend(fontsize=8)
    figure.tight_layout()
    path = os.path.join(out_dir, stem + ".png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compare(path_a, path_b):
    """Rows of two result files side by side, matched on (shape, op, mode, provider)."""
    loaded = []
    for path in (path_a, path_b):
        with open(path) as f:
            loaded.append(json.load(f))
    (a, b) = loaded
    lines = [f"A: {path_a}: {a['meta']['device_name']}, commit {a['meta']['git_commit']}, {a['meta']['date']}",
             f"B: {path_b}: {b['meta']['device_name']}, commit {b['meta']['git_commit']}, {b['meta']['date']}"]
    b_rows = {(r["shape"], r["op"], r["mode"], r["provider"]): r for r in b["rows"]}
    body = []
    for r in a["rows"]:
        other = b_rows.pop((r["shape"], r["op"], r["mode"], r["provider"]), None)
        b_ms = other["median_ms"] if other else None
        body.append([r["shape"], r["op"], r["mode"], r["provider"], _fmt(r["median_ms"], ".3f"), _fmt(b_ms, ".3f"),
                     _fmt(b_ms and r["median_ms"] / b_ms, ".2f")])
    for (shape, op, mode, provider), r in b_rows.items():
        body.append([shape, op, mode, provider, "-", _fmt(r["median_ms"], ".3f"), "-"])
    headers = ["shape", "op", "mode", "provider", "A ms", "B ms", "B speed-up (A ms / B ms)"]
    return "\n".join(lines + ["", text_table(headers, body)])

