#!/usr/bin/env bash
# One GPU session's checks and measurements, run on the GPU machine from the repository root:
#   bash bench/gpu_session.sh [all|tests|paper|sweep]      (default: all)
# Each stage alone fits a 10-minute command; run them as separate commands where that is the limit.
# Writes into $OUT (default bench/out/gpu): session.log, paper-*.json/.csv, sweep-*.json/.csv/.png.
# peer-pytorch and its dependencies einx and frozendict are not in the GPU image: carry them as wheels
# in .whl/ (bench/results/README.md says how); without them the peer-pytorch rows are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stage=${1:-all}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    if [[ $stage == all || $stage == tests ]]; then
        python3 -m pytest -q -m gpu tests
        python3 -m pytest -q tests
    fi
    if [[ $stage == all || $stage == paper ]]; then
        python3 -m bench --preset paper --profile
        python3 -m bench --preset paper --out "$OUT"
    fi
    if [[ $stage == all || $stage == sweep ]]; then python3 -m bench --preset sweep --out "$OUT"; fi
} 2>&1 | tee -a "$OUT/session.log"
