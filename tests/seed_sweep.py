"""Runs tests once per seed (PEER_TEST_SEED) in one process and counts the failures of each, so a
tolerance that holds for one seed or one CPU's summation order only shows up. Run by hand:

    python tests/seed_sweep.py --seeds 100 --threads 1 [pytest selection ...]

MKL reads MKL_CBWR when the process starts, so `bash tests/seed_sweep.sh` runs this under the MKL
default and MKL_CBWR=COMPATIBLE (another summation order), with 1 and 2 threads each.
"""
import argparse
import collections
import os
import sys
import time

import pytest

DEFAULT = ["tests/test_experts.py", "tests/test_fused.py", "tests/test_retrieval.py", "tests/test_csrc.py",
           "tests/test_module.py", "tests/test_backends.py", "-k", "not aot and not killed and not compiler"]


class Failures:
    def __init__(self):
        self.by_test = collections.Counter()
        self.runs = collections.Counter()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome == "failed":
            self.runs[report.nodeid] += report.when == "call"
            if report.failed:
                self.by_test[report.nodeid] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args, selection = parser.parse_known_args()
    import torch

    torch.set_num_threads(args.threads)
    failures = Failures()
    start = time.time()
    for seed in range(args.seeds):
        os.environ["PEER_TEST_SEED"] = str(seed)
        pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:logging", "--no-header", "-o", "console_output_style=classic",
                     *(selection or DEFAULT)], plugins=[failures])
    print(f"\nseeds 0..{args.seeds - 1}, {args.threads} thread(s), MKL_CBWR={os.environ.get('MKL_CBWR', 'default')}, "
          f"{time.time() - start:.0f} s: {len(failures.runs)} tests, {sum(failures.by_test.values())} failures")
    for nodeid, count in failures.by_test.most_common():
        print(f"  {count:4d} / {failures.runs[nodeid]}  {nodeid}")
    return 1 if failures.by_test else 0


if __name__ == "__main__":
    sys.exit(main())
