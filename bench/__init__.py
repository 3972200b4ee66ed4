"""peer_kernels microbenchmarks: `python -m bench` (see `python -m bench --help` and README.md).

Modules: cases (shapes, presets, ops, inputs, checks, byte and flop counts), providers (the
implementations compared), timing (events / wall clock, medians, peak memory, copy bandwidth),
run (the loop), report (table, JSON/CSV, plots, --compare).
"""
