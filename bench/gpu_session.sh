#!/usr/bin/env bash
# One GPU session in one command (bench/gpu_session.py says what it runs and how long each stage
# takes), from anywhere: bash bench/gpu_session.sh [--budget-s S] [--plan | --dry-run]. Writes into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_session.py "$@"
