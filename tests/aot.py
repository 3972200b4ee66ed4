"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) proves the math but accepts code that would never compile;
these helpers prove the kernels are real: each one is compiled for sm_80 / sm_90 and its cubin is
disassembled with the cuobjdump shipped inside the triton wheel, so tests can assert on register
use, local-memory spills (STL/LDL) and global load widths (LDG.E.128, LDGSTS.E.128).

Under the interpreter `@triton.jit` returns interpreter objects that cannot be compiled, so tests
call `compile_report(jobs)`, which runs the compiles in a fresh Python process with the
interpreter switched off and returns plain dicts. In a process without the interpreter (e.g. on a
GPU machine) `compile_kernel` / `sass_stats` can also be used directly.

PEER_AOT_TRITON=DIR makes those processes compile with the Triton installed into DIR (`pip install
--no-deps --target DIR triton==3.6.0`: the GPU image's) instead of the one installed; every stats
dict names the version that compiled it ("triton"). PEER_AOT_WORKERS: how many (default 2; .ci/run
takes 1 for the compiles it runs beside the suite).

A job is a dict:
    module      "peer_kernels.kernels.experts"   (importable; the kernel is an attribute)
    kernel      "experts_fwd_kernel"
    signature   {"x_ptr": "*bf16", "T": "i32", ...}   runtime args; omitted constexprs are added
    constexprs  {"BLOCK_D": 128, ...}
    arch        80 | 90 (default 90); num_warps (4); num_stages (3)
    disassemble whether to count SASS instructions (default True; see sass_stats)
    aligned     names of runtime args assumed divisible by 16, like Triton's own specialization
                does at launch for 16-byte aligned pointers and ints that are multiples of 16;
                default: every pointer argument (torch allocations are 256-byte aligned).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)
WORKERS = int(os.environ.get("PEER_AOT_WORKERS", "2"))
REPO_ROOT = Path(__file__).resolve().parent.parent


def _bin_dir():
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_kernel(kernel, signature, constexprs=None, arch=90, num_warps=4, num_stages=3, aligned=None):
    """Compiles a JITFunction for GPUTarget("cuda", arch, 32); returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    missing = [a for a in kernel.arg_names if a not in signature]
    if missing:
        raise ValueError(f"signature: no type for kernel arguments {missing}")
    if aligned is None:
        aligned = [n for n, t in signature.items() if t.startswith("*")]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target, options=options)


def _cuobjdump(cubin, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_bin_dir() / "cuobjdump"), flag, f.name], check=True,
                              capture_output=True, text=True).stdout


def sass(compiled):
    """The SASS text of a CompiledKernel."""
    return _cuobjdump(compiled.asm["cubin"], "-sass")


def _instructions(sass_text):
    # SASS lines look like `/*0120*/  @!P0 LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;`
    out = []
    for line in sass_text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _opcodes(sass_text):
    return [op for _, op, _ in _instructions(sass_text)]


LDG128 = r"LDG(\.\w+)*\.128(\.\w+)*"


def loops(sass_text):
    """The loops of a kernel, one dict per backward branch (BRA to an earlier address), in address
    order: instructions in its body, how many are MMAs (HMMA / HGMMA), local-memory spills and
    128-bit global loads."""
    instructions = _instructions(sass_text)
    found = []
    for address, op, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and target and int(target.group(1), 16) <= address:
            body = [o for a, o, _ in instructions if int(target.group(1), 16) <= a <= address]
            found.append({"instructions": len(body),
                          "mma": sum(1 for o in body if re.match(r"HG?MMA", o)),
                          "spills": sum(1 for o in body if re.match(r"(STL|LDL)", o)),
                          "ldg128": sum(1 for o in body if re.fullmatch(LDG128, o))})
    return found


def sass_stats(compiled, disassemble=True):
    """What tests assert on. Always (cheap): registers and local-memory bytes (spills show up as
    LOCAL > 0) from `cuobjdump -res-usage`, and atomics from the PTX. With disassemble (~1 s per
    kernel): instruction counts from the SASS (STL/LDL spill traffic, LDG widths, stores) and
    per-loop counts (loops)."""
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stats = {
        "registers": int(regs.group(1)) if regs else -1,
        "local_bytes": int(local.group(1)) if local else -1,
        "shared_bytes": compiled.metadata.shared,
        "atomics": len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:red|atom)\.", compiled.asm["ptx"], re.M)),
    }
    if disassemble:
        text = sass(compiled)
        ops = _opcodes(text)

        def count(pattern):
            return sum(1 for op in ops if re.fullmatch(pattern, op))

        stats.update({
            "stl": count(r"STL(\..*)?"),
            "ldl": count(r"LDL(\..*)?"),
            "ldg128": count(LDG128),
            "ldg64": count(r"LDG(\.\w+)*\.64(\.\w+)*"),
            "ldgsts128": count(r"LDGSTS(\.\w+)*\.128(\.\w+)*"),   # cp.async of 16 bytes into shared memory
            "ldg": count(r"LDG(\..*)?"),
            "stg": count(r"STG(\..*)?"),
            "sass_atomics": count(r"(RED|REDG|ATOM|ATOMG)(\..*)?"),
            "instructions": len(ops),
            "loops": loops(text),
        })
    return stats


def _run_job(job):
    import importlib
    import time

    import triton
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    started = time.perf_counter()
    compiled = compile_kernel(kernel, job["signature"], job.get("constexprs"), job.get("arch", 90),
                              job.get("num_warps", 4), job.get("num_stages", 3), job.get("aligned"))
    compile_s = time.perf_counter() - started
    return dict(sass_stats(compiled, job.get("disassemble", True)), compile_s=compile_s, triton=triton.__version__)


def compile_report(jobs, workers=WORKERS, job_timeout=600, keep_going=False):
    """Compiles every job in `workers` subprocesses with the interpreter off; returns one stats dict
    per job (see sass_stats), in order. A job that fails raises with the compiler's error, or with
    keep_going gives {"error": that error, "triton": the version} and the others go on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PEER_AOT_TRITON"), str(REPO_ROOT),
                                                      env.get("PYTHONPATH")]))
    chunks = [jobs[i::workers] for i in range(workers)]
    argv = [sys.executable, __file__] + (["--keep-going"] if keep_going else [])
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              cwd=REPO_ROOT, text=True) for _ in chunks]
    outputs = [p.communicate(json.dumps(chunk), timeout=job_timeout * max(1, len(chunk)))
               for p, chunk in zip(procs, chunks)]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"AOT compile failed:\n{err[-6000:]}")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    return [results[i % workers][i // workers] for i in range(len(jobs))]


def ctas_per_sm(registers, num_warps):
    """Resident CTAs per SM (sm_80 / sm_90) from the register file (64K 32-bit registers, allocated
    per warp in units of 256), the warp slots (64) and the CTA slots (32)."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 64 // num_warps, 32)


def describe(job):
    """A short label for assertion messages."""
    consts = ",".join(f"{k}={v}" for k, v in sorted((job.get("constexprs") or {}).items()))
    return (f"{job['kernel']}[sm_{job.get('arch', 90)} w{job.get('num_warps', 4)} "
            f"s{job.get('num_stages', 3)} {consts}]")


if __name__ == "__main__":
    import triton
    results = []
    for job in json.loads(sys.stdin.read()):
        try:
            results.append(_run_job(job))
        except Exception as exc:  # name the job: a bare MLIR error does not say which config failed
            if "--keep-going" not in sys.argv:
                raise RuntimeError(f"{describe(job)}: {exc}") from exc
            results.append({"error": f"{type(exc).__name__}: {exc}"[-3000:], "triton": triton.__version__})
    print(json.dumps(results))
