"""One GPU session's checks and measurements in one command, sized to the lease: run from the
repository root (bench/gpu_session.sh does), writing into $OUT:

    python3 bench/gpu_session.py [--budget-s 480] [--out DIR] [--dry-run | --plan]

Stages, in order; each is estimated first (tests/configs.py counts the kernel specialisations it
compiles that no earlier stage compiled, each at compile_s(): Triton compiles one kernel at a time
per process), and a stage that would not end within the budget is not started:
  env     versions, nvidia-smi, the wheels carried for peer-pytorch
  tests   pytest -m gpu (correctness first), its results as gpu-tests.xml
  paper   bench's paper preset: the layer, the fused and the expert op, forward and forward+backward,
          every provider that decides a default, and the copy bandwidth (paper-*.json / .csv)
  decode  bench's decode preset: the layer's inference step on the decode and the token-tile
          schedules (which decide tuning's decode_tokens), with int8 / fp8 tables, against
          peer-pytorch and a dense feed-forward, at those of 1, 8, 64 and 512 tokens that still fit
          (decode-*.json / .csv)
  profile the layer's kernels and peer_fused's schedules, wall against kernel time (in the log)
  sweep   the sweep preset's shapes that still fit, fused op schedules (sweep-*.json / .csv)
Everything printed goes to session.log as well: at most 8 files in $OUT, none in a subfolder. The
exit status is 1 when a stage's command failed (each stage runs all the same).

--dry-run runs the same stages on a CPU without a GPU: pytest runs the gpu tests' dry run (their
harness at interpreter sizes, PEER_GPU_DRY_RUN=1: tests/conftest.py), the bench runs at interpreter
sizes (bench --dry-run), the budget is counted on the GPU estimates: the plan, the commands, the
tests' harness and the files are checked before a GPU sees them.
"""
import time

STARTED = time.monotonic()   # the budget counts from here, before the imports

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, the repository instead of bench/, whose profile.py would shadow the stdlib's; and
# tests/ (configs)
if os.path.abspath(sys.path[0]) == os.path.join(ROOT, "bench"):
    sys.path[0] = ROOT
sys.path.append(os.path.join(ROOT, "tests"))

import configs  # noqa: E402
from bench import cases, providers  # noqa: E402

# Where the carried wheels of peer-pytorch, einx and frozendict may be (the GPU image lacks them; it
# has einops): shared/wheels travels inside the checkout, ../shared/wheels beside it does not.
WHEEL_DIRS = ("shared/wheels", "../shared/wheels", ".whl")

# Compile seconds of one specialisation, from tests/aot.py's compile_s under triton 3.6 on a loaded
# 2-core machine (2026-12-07, every config of configs.selectable(90)), by what dominates them, the
# sorting networks of k' = 16 lists: the token-tile retrieval with level selection (22-58 s), the
# token-tile retrieval or one-pass kernel otherwise (8-34 s), the decode ones or any at k' <= 8
# (1-6 s); an expert, table-gradient, backward, sum or optimizer kernel takes a second or two.
LEVEL_SELECT_S, LONG_LIST_S, SHORT_LIST_S, OTHER_S = 45.0, 30.0, 6.0, 1.5
SELECTING_KERNELS = ("product_key_topk_kernel", "peer_fused_kernel", "key_slice_topk_kernel",
                     "merge_key_slices_kernel")
# What the gpu tests do besides Triton compiles (estimates): test_csrc's CUDA extension build (nvcc
# and the bindings against torch's headers), once per process that runs one of its two tests;
# inductor compiles (test_experts' op, test_generation's models as CUDA graphs); the paper shapes'
# float64 oracle and three schedules; any other test's run.
TEST_EXTRA_S = {"test_csrc.py::test_cuda_fused_matches_reference[dtype0]": 120.0,
                "test_csrc.py::test_cuda_fused_matches_reference[dtype1]": 120.0,
                "test_experts.py::test_torch_compile_inductor": 45.0,
                "test_fused.py::test_gpu_bfloat16_at_paper_shapes": 30.0,
                **{f"test_generation.py::test_cuda_graph_generation[{tables}]": 60.0
                   for tables in ("float", "int8", "fp8")}}
TEST_RUN_S, PYTEST_START_S = 5.0, 15.0
# tests/conftest.py's xdist_group("gpu_memory"): one process runs these one after the other
GPU_MEMORY_GROUP = ("test_fused.py::test_gpu_bfloat16_at_paper_shapes", "test_experts.py::test_large_row_offsets")
# A bench process: imports and the copy bandwidth; per op the workload and the reference; per
# provider and op the check, the timed series (GPU_WARMUP_MS + GPU_BUDGET_MS per mode series) and
# the peak-memory pass.
BENCH_START_S, BENCH_OP_S, BENCH_PROVIDER_S, PROFILE_S = 15.0, 5.0, 4.0, 30.0
TEST_WORKERS = 4   # pytest-xdist processes on the GPU machine's 16 cores
STOP_GRACE_S = 15.0

PAPER_OPS = ("experts", "fused", "layer")
PAPER_PROVIDERS = ("reference", "embedding_bag", "peer-pytorch", "triton", "triton-1pass", "triton-2kernel",
                   "triton-overlap", "triton-atomic")
DECODE_PROVIDERS = ("reference", "decode", "token-tiles", "int8", "fp8", "peer-pytorch", "dense-ffn")
SWEEP_OPS = ("fused",)
SWEEP_PROVIDERS = ("triton-1pass", "triton-2kernel", "triton-overlap")
MODES = ("forward", "forward+backward")


def compile_s(job):
    """Estimated seconds to compile one tests/configs.py job."""
    c = job["constexprs"]
    if job["kernel"] not in SELECTING_KERNELS:
        return OTHER_S
    if c["KS_PAD"] < 16 or job["kernel"] in ("key_slice_topk_kernel", "merge_key_slices_kernel"):
        return SHORT_LIST_S
    return LEVEL_SELECT_S if c.get("LEVEL_SELECT") else LONG_LIST_S


@dataclasses.dataclass
class Stage:
    name: str
    commands: list          # argv lists, run one after the other
    estimate_s: float
    why: str                # what the estimate counts
    compiles: set = dataclasses.field(default_factory=set)   # tests/configs.py keys it compiles
    env: dict = dataclasses.field(default_factory=dict)       # on top of the session's


class Session:
    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.log_file = open(os.path.join(self.out, "session.log"), "a", encoding="utf-8")
        self.started = []          # the stages started (planned, with --plan), in order
        self.failed = []           # (stage, command) of every command that exited non-zero
        self.compiled = set()      # tests/configs.py keys of the kernels compiled so far
        self.arch = 90             # the lent GPUs' (H100, H200); the env stage prints the device's
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, self.env.get("PYTHONPATH")]))
        if args.dry_run:
            self.env["TRITON_INTERPRET"] = "1"

    def log(self, line=""):
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def elapsed(self):
        if self.args.dry_run or self.args.plan:   # the clock of the estimates
            return sum(stage.estimate_s for stage in self.started)
        return time.monotonic() - STARTED

    def run(self, argv, env=None):
        """Runs argv with its output into the log, line by line; returns its exit status. On a GPU a
        command still running when the budget ends gets SIGINT (pytest and bench keep what they
        finished), then SIGKILL after STOP_GRACE_S: the session ends within its budget whatever
        an estimate missed."""
        self.log("$ " + " ".join(argv))
        try:
            child = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        except OSError as error:
            self.log(f"  cannot run {argv[0]}: {error}")
            return 127
        timers = []
        if not self.args.dry_run:
            left = max(0.0, self.args.budget_s - self.elapsed())
            timers = [threading.Timer(left, child.send_signal, (signal.SIGINT,)),
                      threading.Timer(left + STOP_GRACE_S, child.kill)]
            for timer in timers:
                timer.start()
        for line in child.stdout:
            self.log(line.rstrip("\n"))
        status = child.wait()
        for timer in timers:
            timer.cancel()
        return status

    def stage(self, stage):
        """Runs a stage if its estimate fits what is left of the budget. Returns whether it ran."""
        left = self.args.budget_s - self.elapsed()
        self.log(f"\n== {stage.name}: estimated {stage.estimate_s:.0f} s ({stage.why}); {left:.0f} s left")
        if stage.estimate_s > left:
            self.log(f"== {stage.name}: not started: it would not end within the budget")
            return False
        self.compiled |= stage.compiles
        self.started.append(stage)
        if self.args.plan:
            for argv in stage.commands:
                self.log("   " + " ".join(argv))
            return True
        started = time.monotonic()
        statuses = [self.run(argv, stage.env) for argv in stage.commands]
        self.failed += [(stage.name, " ".join(argv)) for argv, status in zip(stage.commands, statuses) if status]
        self.log(f"== {stage.name}: exit {statuses}, took {time.monotonic() - started:.0f} s "
                 f"(estimated {stage.estimate_s:.0f} s)")
        return True

    # ---- the carried wheels ------------------------------------------------------------------------

    def install_wheels(self):
        """pip-installs the carried pure-Python wheels into a folder outside the repository and $OUT,
        on PYTHONPATH for every command after this."""
        for folder in WHEEL_DIRS:
            wheels = sorted(glob.glob(os.path.join(ROOT, folder, "*.whl")))
            if wheels:
                break
        else:
            self.log(f"no wheels in {', '.join(WHEEL_DIRS)}: the peer-pytorch rows will be skipped")
            return
        target = tempfile.mkdtemp(prefix="peer-kernels-site-")
        status = self.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", target, *wheels])
        if status == 0:
            self.env["PYTHONPATH"] = os.pathsep.join([target, self.env["PYTHONPATH"]])
            self.log(f"installed {', '.join(os.path.basename(w) for w in wheels)} into {target}")

    # ---- estimates ---------------------------------------------------------------------------------

    def new_compiles(self, jobs):
        """(keys, seconds) of the jobs no earlier stage compiled."""
        fresh = {configs.key(job): job for job in jobs if configs.key(job) not in self.compiled}
        return set(fresh), sum(compile_s(job) for job in fresh.values())

    def bench_stage(self, name, preset, ops, names, shapes=None, modes=MODES):
        """The stage of one bench process over a preset's shapes (all, or those indexed)."""
        selected = preset if shapes is None else dataclasses.replace(
            preset, shapes=tuple(preset.shapes[i] for i in shapes))
        keys, seconds = self.new_compiles(configs.bench(selected, self.arch, ops, names))
        runs = sum(1 for _ in selected.shapes for op in ops for name in names if providers.supports(name, op))
        total = BENCH_START_S + len(selected.shapes) * len(ops) * BENCH_OP_S + runs * BENCH_PROVIDER_S + seconds
        argv = [sys.executable, "-m", "bench", "--preset", name, "--ops", *ops, "--modes", *modes,
                "--providers", *names, "--out", self.out, "--no-plots"]
        if shapes is not None:
            argv += ["--shapes", *map(str, shapes)]
        argv += ["--device", "cpu", "--dry-run"] if self.args.dry_run else ["--device", "cuda"]
        return Stage(name, [argv], total, f"{len(keys)} kernels to compile ({seconds:.0f} s), {runs} provider x "
                                          f"op cases over {len(selected.shapes)} shape(s)", keys)

    def fitting_stage(self, name, preset, ops, names, indices, modes=MODES):
        """The bench stage of those of the preset's shapes (by index, in order) that still fit, each
        with the ones before it; runs it, or says that none fits."""
        chosen, planned = [], None
        left = self.args.budget_s - self.elapsed()
        for index in indices:
            trial = self.bench_stage(name, preset, ops, names, chosen + [index], modes)
            if trial.estimate_s <= left:
                chosen.append(index)
                planned = trial
        if chosen:
            self.stage(planned)
        else:
            self.log(f"\n== {name}: no shape of the {name} preset fits what is left")

    # ---- stages ------------------------------------------------------------------------------------

    def tests_stage(self):
        """pytest -m gpu, in TEST_WORKERS processes where pytest-xdist is there (the GPU image has
        it; the estimate assumes it in a dry run or a plan): the estimate is the larger of the
        slowest process's share (a test's compiles and its TEST_EXTRA_S; a group's together) and
        all of it spread over the processes. Each test's compiles count in full: two processes may
        compile one kernel both."""
        parallel = importlib.util.find_spec("xdist") is not None
        workers = TEST_WORKERS if parallel or self.args.dry_run or self.args.plan else 1
        tests = configs.gpu_tests(self.arch)
        costs = {name: TEST_EXTRA_S.get(name, TEST_RUN_S) for name in set(tests) | set(TEST_EXTRA_S)}
        keys = set()
        for name, jobs in tests.items():
            fresh, seconds = self.new_compiles(jobs)
            costs[name] += seconds
            keys |= fresh
        grouped = sum(costs.pop(name) for name in GPU_MEMORY_GROUP)
        spread = (sum(costs.values()) + grouped) / workers
        estimate = PYTEST_START_S + max(spread, grouped, *costs.values())
        argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rA", "-p", "no:cacheprovider",
                "--junitxml", os.path.join(self.out, "gpu-tests.xml"), "tests"]
        if parallel:
            argv += ["-n", str(workers), "--dist", "loadgroup"]
        env = {"PEER_GPU_DRY_RUN": "1"} if self.args.dry_run else {}
        return Stage("tests", [argv], estimate, f"{len(keys)} kernels to compile over {workers} processes, the CUDA "
                                                f"extension; slowest process {max(grouped, *costs.values()):.0f} s",
                     keys, env)

    def main(self):
        mode = " (dry run on the CPU, clock = the estimates)" if self.args.dry_run else ""
        self.log(f"gpu_session {datetime.datetime.now().isoformat(timespec='seconds')}: budget "
                 f"{self.args.budget_s:.0f} s{mode}, out {self.out}")
        if not self.args.plan:
            self.install_wheels()
        versions = [
            [sys.executable, "-c", "import torch, triton, platform; print('python', platform.python_version(), "
             "'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); "
             "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', "
             "torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"],
            [sys.executable, "-c", "import importlib.util; print('peer-pytorch importable:', all("
             "importlib.util.find_spec(name) for name in ('PEER_pytorch', 'einx', 'frozendict')))"]]
        # a CPU has no nvidia-smi
        self.stage(Stage("env", versions if self.args.dry_run else [["nvidia-smi"]] + versions, 10.0, "versions"))

        self.stage(self.tests_stage())

        self.stage(self.bench_stage("paper", cases.PRESETS["paper"], PAPER_OPS, PAPER_PROVIDERS))
        decode = cases.PRESETS["decode"]
        self.fitting_stage("decode", decode, ("decode",), DECODE_PROVIDERS, range(len(decode.shapes)), ("forward",))
        profile = [sys.executable, "-m", "bench", "--preset", "paper", "--profile"]
        profile += ["--device", "cpu", "--dry-run"] if self.args.dry_run else ["--device", "cuda"]
        self.stage(Stage("profile", [profile], PROFILE_S, "the kernels the paper stage compiled"))
        # the sweep's shapes but the paper's (its first)
        sweep = cases.PRESETS["sweep"]
        self.fitting_stage("sweep", sweep, SWEEP_OPS, SWEEP_PROVIDERS, range(1, len(sweep.shapes)))
        self.log(f"\nfiles in {self.out}: {', '.join(sorted(os.listdir(self.out)))}")
        for name, command in self.failed:
            self.log(f"failed in {name}: {command}")
        return 1 if self.failed else 0


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds this command may take (default 480: 8 minutes of a 15-minute lease)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "out", "gpu"))
    parser.add_argument("--dry-run", action="store_true", help="the same stages on a CPU (see above)")
    parser.add_argument("--plan", action="store_true", help="print the stages and their estimates, run nothing")
    return parser.parse_args(argv)


def main(argv=None):
    return Session(parse(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
