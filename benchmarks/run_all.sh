#!/usr/bin/env bash
# `make bench`: every benchmark in this folder, one after the other. Each prints its table
# and appends to results/bench.h5. MPI benchmarks launch their own ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
for b in benchmarks/bench_*.py; do
  echo "== $b"
  "$py" "$b"
done
