"""The kernel configurations that something here makes a GPU compile (tests/configs.py: the
gpu-marked tests, the bench presets a GPU session runs, small widths) compile, with the Triton that
tests/aot.py compiles with: the installed one, or PEER_AOT_TRITON's (the GPU image's 3.6, say).
Spills, loads and loops are asserted by each kernel's own tests at the shapes they are about
(test_retrieval, test_experts, test_fused, test_decode, test_quantize, test_optim), which the suite
runs; here, that every selected config compiles at all, and a failure names the config and the
compiler's error.

It takes minutes of compiling, so it runs when asked: PEER_AOT=1 compiles, for sm_90 (the lent
GPUs' H100 / H200), one config per variant (configs.unique with alignment=False: configs that
differ only in which runtime ints are multiples of 16 compile alike but for the hints), at most
MAX_COMPILES of them, so that the time stays bounded and a change that makes the launchers select
more fails here until the bound is raised knowingly; PEER_AOT=all compiles every config of
configs.selectable, the sweep preset's too, for sm_80 as well (about 3x the jobs). .ci/run runs
PEER_AOT=1 under triton 3.6 beside the suite. Triton caches each compile (~/.triton/cache, per
version): a second run compiles nothing again.
"""
import os

import pytest

import aot
import configs

MODE = os.environ.get("PEER_AOT", "")
# configs.unique(configs.selectable(90), alignment=False) held 115 variants (2026-12-07), which one
# compile process took 178 s to compile under triton 3.6 on an idle 2-core machine (cold cache).
MAX_COMPILES = 125


def selected(arch):
    jobs = [dict(job, disassemble=False) for job in configs.selectable(arch, sweep=MODE == "all")]
    return jobs if MODE == "all" else configs.unique(jobs, alignment=False)


@pytest.mark.aot
@pytest.mark.skipif(MODE not in ("1", "all"), reason="minutes of compiling: PEER_AOT=1 (sm_90) or PEER_AOT=all")
@pytest.mark.parametrize("arch", aot.ARCHS if MODE == "all" else (90,), ids=lambda arch: f"sm_{arch}")
def test_every_selected_config_compiles(arch):
    jobs = selected(arch)
    assert MODE == "all" or len(jobs) <= MAX_COMPILES, f"{len(jobs)} configs to compile, more than MAX_COMPILES"
    reports = aot.compile_report(jobs, keep_going=True)
    failed = [f"{aot.describe(job)} {job['signature']}: {stats['error']}"
              for job, stats in zip(jobs, reports) if "error" in stats]
    assert not failed, f"{len(failed)} of {len(jobs)} configs do not compile with triton {reports[0]['triton']}:\n" + \
        "\n".join(failed)
