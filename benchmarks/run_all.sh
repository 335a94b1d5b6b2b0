#!/usr/bin/env bash
# Every benchmark, one after the other (they must not share the machine), ~35 min on 2 cores
# (bench_series generates a 22 GB series under $TMPDIR first, ~5 min, and removes it after).
# Each writes benchmarks/<name>.md and benchmarks/out/<name>.csv; RESULTS.md quotes them.
set -euo pipefail
cd "$(dirname "$0")"
python bench_ops.py
python bench_svd.py --backends cpu,torch
python bench_track.py
python bench_io.py
python bench_adapters.py
python bench_lowrank.py
python bench_series.py
