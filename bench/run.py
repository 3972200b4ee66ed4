"""The benchmark loop: for each shape, op and provider, check the provider against the reference
once (outputs, and gradients when a backward mode is asked for), then time all modes in one series
of training-step iterations and keep a row per mode."""
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
import time

import torch

from . import cases, providers, timing

FP32_CHECK_TOKENS = 2048
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def environment(device, preset_name):
    return {
        "preset": preset_name, "device": str(device), "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "peer_pytorch": _version("peer-pytorch"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"), "argv": sys.argv[1:],
    }


def _free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class _Checker:
    """The reference's outputs and gradients on the check inputs, computed once per workload, and
    each provider's relative RMS errors against them."""

    def __init__(self, op, workload, check_tokens):
        self.op, self.workload, self.check_tokens = op, workload, check_tokens
        whole = not check_tokens or check_tokens >= workload.shape.T
        self.data = workload if whole else workload.for_check(check_tokens)
        self.fp32 = None
        self._expected = {}

    def _reference(self, data, with_grads):
        key = (id(data), with_grads)
        if key not in self._expected:
            runner = providers.build("reference", self.op, data)
            inputs = data.inputs(0)
            outputs = cases.call(self.op, runner, inputs, data.shape)
            grads = cases.backward(self.op, runner, inputs, outputs) if with_grads else None
            self._expected[key] = (tuple(o.detach() for o in outputs), grads)
        return self._expected[key]

    def _errors(self, runner, data, with_grads):
        """{False: error of the outputs, True: of outputs and gradients (when with_grads)}."""
        expected_outputs, expected_grads = self._reference(data, with_grads)
        inputs = data.inputs(0)
        outputs = cases.call(self.op, runner, inputs, data.shape)
        errors = {False: cases.output_error(self.op, outputs, expected_outputs, inputs, data.shape)}
        if with_grads:
            grads = cases.backward(self.op, runner, inputs, outputs)
            errors[True] = max(errors[False], cases.grad_error(grads, expected_grads))
        return errors

    def check(self, name, runner, with_grads):
        """{with_grads: (error at the bench dtype, the dtype the check passed in, or None)}. A provider
        that computes in the input dtype and fails is checked again in float32."""
        shape = self.workload.shape
        tolerance = tolerance_of(runner, shape)
        errors = self._errors(runner, self.data, with_grads)
        errors32 = {}
        if max(errors.values()) > tolerance and runner.native_precision and shape.dtype != "float32":
            if self.fp32 is None:  # float32 copies of the tables: a few thousand tokens show the function
                self.fp32 = self.workload.for_check(min(self.check_tokens or FP32_CHECK_TOKENS, FP32_CHECK_TOKENS),
                                                    torch.float32)
            errors32 = self._errors(providers.build(name, self.op, self.fp32), self.fp32, with_grads)
        verdicts = {}
        for key, error in errors.items():
            if error <= tolerance:
                verdicts[key] = (error, shape.dtype)
            elif errors32.get(key, math.inf) <= cases.TOLERANCE[torch.float32]:
                verdicts[key] = (error, "float32")
            else:
                verdicts[key] = (error, None)
        return verdicts


def tolerance_of(runner, shape):
    """The relative RMS error a provider's check allows: its own, or the bench dtype's."""
    return runner.tolerance or cases.TOLERANCE[shape.torch_dtype]


def _verdicts(checker, name, runner, with_grads, shape):
    """{with_grads: (error, dtype the check passed in, None) or (error, None, why it gets no row)};
    (None, the bench dtype, None) for a provider of another function (Runner.unchecked)."""
    if runner.unchecked:
        return {key: (None, shape.dtype, None) for key in {False, with_grads}}
    try:
        checked = checker.check(name, runner, with_grads)
    except Exception as failure:  # e.g. an unsupported dtype or option, out of memory
        return {key: (None, None, _first_line(failure)) for key in {False, with_grads}}
    verdicts = {}
    for key, (error, dtype) in checked.items():
        what = "outputs and gradients" if key else "outputs"
        reason = None if dtype else (f"wrong {what}: relative RMS error {error:.3g} > "
                                     f"{tolerance_of(runner, shape):g} against the reference")
        verdicts[key] = (error, dtype, reason)
    return verdicts


def _optimizer_step(runner):
    for optimizer in runner.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _phases(op, runner, shape, with_backward):
    """One iteration: the forward (autograd recording, as in training), then maybe the backward; the
    step op's backward fills .grad and an optimizer step follows."""
    forward = [lambda inputs: (inputs, cases.call(op, runner, inputs, shape))]
    if op == "step":
        return forward + [lambda state: state[1][0].backward(state[0]["dy"]), lambda _: _optimizer_step(runner)]
    if not with_backward:
        return forward
    return forward + [lambda state: cases.backward(op, runner, *state)]


def _resident_bytes(runner):
    """What a training step keeps between steps: the module's parameters and the optimizer state."""
    tensors = {id(p): p for p in runner.fn.parameters()}
    for optimizer in runner.optimizers:
        for state in optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_modes(device, op, runner, workload, modes, warm):
    """{mode: (times in ms, peak bytes)} from one series of iterations: forward and backward are
    timed in the same training-step iterations, forward+backward is their sum per iteration; a
    step's time is its forward, backward and optimizer step, its peak what the iteration allocates
    on top of the parameters and the optimizer state, which it includes.
    warm: the check already ran this runner at these shapes (timing.measure). A decode step is timed
    cold (timing.measure): its bytes floor counts every byte it reads as read from memory."""
    with_backward = any(mode != "forward" for mode in modes)
    phases = _phases(op, runner, workload.shape, with_backward)
    items = [workload.inputs(i) for i in range(len(workload.sets))]
    series = timing.measure(device, items, phases, warm, cold=op == "decode")
    peaks = timing.peak_memory_bytes(device, phases, items[0])
    if op == "step":
        return {"step": ([sum(parts) for parts in zip(*series)], max(peaks) + _resident_bytes(runner))}
    measured = {"forward": (series[0], peaks[0])}
    if with_backward:
        measured["backward"] = (series[1], peaks[1])
        measured["forward+backward"] = ([f + b for f, b in zip(*series)], peaks[1])
    return {mode: measured[mode] for mode in modes}


def make_row(op, mode, shape, name, times, peak, error, checked_dtype, meta, *, unchecked=False):
    """One result row; its fractions are of the copy bandwidth and the matmul rate in `meta`, the
    latter only for rows in the matmul's dtype. A provider of another function (`unchecked`) gets
    no bytes or flops: the op's counts are not its work."""
    ms = timing.median(times)
    gather = None if unchecked else cases.gather_bytes(op, shape, mode)
    gbps = gather / (ms * 1e-3) / 1e9 if gather else None
    tflops = None if unchecked else cases.flops(op, shape, mode) / (ms * 1e-3) / 1e12
    in_matmul_dtype = tflops is not None and shape.dtype == meta["matmul_dtype"]
    return {
        "op": op, "mode": mode, "shape": shape.label(), **{f"shape_{k}": v for k, v in vars(shape).items()},
        "provider": name, "median_ms": ms, "reps": len(times), "times_ms": times,
        "gather_bytes": gather, "gbps": gbps, "copy_fraction": gbps / meta["copy_gbps"] if gbps else None,
        "tflops": tflops, "compute_fraction": tflops / meta["matmul_tflops"] if in_matmul_dtype else None,
        "peak_bytes": peak, "error": error, "checked_dtype": checked_dtype,
    }


def run(preset, preset_name, device, ops, modes, names, left_out, on_result, log=print):
    """Runs every case; calls on_result(meta, rows, skipped) after each, so partial results survive
    a run that is stopped."""
    meta = environment(device, preset_name)
    meta["copy_gbps"] = timing.copy_bandwidth_gbps(device)
    meta["matmul_tflops"] = timing.matmul_tflops(device)
    meta["matmul_dtype"] = str(timing.MATMUL_DTYPES[device.type]).removeprefix("torch.")
    log(f"device: {meta['device_name']}; copy bandwidth {meta['copy_gbps']:.1f} GB/s; "
        f"{meta['matmul_dtype']} matmul {meta['matmul_tflops']:.3f} TFLOP/s; "
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}")
    rows, skipped = [], []

    def skip(shape, op, name, mode, reason):
        skipped.append({"shape": shape.label(), "op": op, "provider": name, "mode": mode, "reason": reason})
        log(f"  skip {op:9s} {mode or 'all modes':16s} {name:14s} {reason}")
        on_result(meta, rows, skipped)

    for name, why in left_out.items():
        skipped.append({"shape": "*", "op": "*", "provider": name, "mode": None, "reason": f"left out: {why}"})
        log(f"  skip {name}: left out by the {preset_name} preset ({why}); add it with --providers")
    for shape in preset.shapes_on(device):
        log(f"shape {shape.label()}")
        for op in ops:
            try:
                workload = cases.make_workload(op, shape, device, cases.num_input_sets(op, shape, device))
                checker = _Checker(op, workload, preset.check_tokens)
            except torch.cuda.OutOfMemoryError as error:
                skip(shape, op, "*", None, _first_line(error))
                _free_memory(device)
                continue
            op_modes = cases.modes_of(op, modes)
            for name in names:
                if not providers.supports(name, op) or not op_modes:
                    continue
                try:
                    runner = providers.build(name, op, workload)
                except Exception as failure:  # Unavailable says why; anything else is the provider's failure
                    skip(shape, op, name, None,
                         str(failure) if isinstance(failure, providers.Unavailable) else _first_line(failure))
                    _free_memory(device)
                    continue
                started = time.perf_counter()
                # a step is checked on its forward (its gradients are the layer op's, checked there)
                graded = op != "step" and any(m != "forward" for m in op_modes)
                verdicts = _verdicts(checker, name, runner, graded, shape)
                _free_memory(device)

                def verdict(mode):
                    return verdicts[graded and mode != "forward"]

                good = [mode for mode in op_modes if verdict(mode)[2] is None]
                for mode in op_modes:
                    if mode not in good:
                        skip(shape, op, name, mode, verdict(mode)[2])
                try:
                    warm = checker.data is workload
                    measured = measure_modes(device, op, runner, workload, good, warm) if good else {}
                except Exception as failure:  # a provider failing on one case loses its rows, not the run
                    for mode in good:
                        skip(shape, op, name, mode, _first_line(failure))
                    measured = {}
                    _free_memory(device)
                seconds = time.perf_counter() - started
                for mode, (times, peak) in measured.items():
                    error, checked_dtype, _ = verdict(mode)
                    rows.append(make_row(op, mode, shape, name, times, peak, error, checked_dtype, meta,
                                         unchecked=runner.unchecked))
                    passed = "" if checked_dtype == shape.dtype else f" (passed in {checked_dtype})"
                    checked = "unchecked" if error is None else f"err {error:.1e}{passed}"
                    log(f"  {op:9s} {mode:16s} {name:14s} {rows[-1]['median_ms']:10.3f} ms  {checked}"
                        f"  [{seconds:.1f} s]")
                on_result(meta, rows, skipped)
                del runner
                _free_memory(device)
            del workload, checker
            _free_memory(device)
    return meta, rows, skipped
