#!/usr/bin/env bash
# tests/seed_sweep.py under two MKL summation orders (the default and MKL_CBWR=COMPATIBLE) with 1
# and 2 threads: bash tests/seed_sweep.sh [SEEDS] [pytest selection ...]. Run by hand; prints counts.
set -u
cd "$(dirname "$0")/.."
seeds=${1:-100}
shift || true
status=0
for cbwr in default COMPATIBLE; do
    for threads in 1 2; do
        if [[ $cbwr == default ]]; then unset MKL_CBWR; else export MKL_CBWR=$cbwr; fi
        out=$(python tests/seed_sweep.py --seeds "$seeds" --threads "$threads" "$@")
        rc=$?
        sed -n '/^seeds /,$p' <<<"$out"
        [[ $rc == 0 ]] || status=1
    done
done
exit $status
