#!/usr/bin/env bash
# `make bench`: the CPU benchmarks, one after the other. Each prints its table and appends
# it with provenance to results/bench.h5. The GPU scripts (gpu_*.py) are run by hand on a
# GPU node (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mpi=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
export OMP_NUM_THREADS=1
echo "== H.v routes, PyHessian, SLQ basis memory: 1 rank, then 2 ranks"
for n in 1 2; do "${mpi[@]}" -n "$n" "$py" benchmarks/bench_hvp.py --model resnet20-w1 --batch 64 --micro 32; done
echo "== training step, 1 vs 2 ranks"
"$py" benchmarks/bench_train_step.py
echo "== Carleman assembly and solve vs the scipy reference, 1 vs 2 ranks, and the 10^7-unknown run"
"$py" benchmarks/bench_carleman.py --n 40 --scale
echo "== library Hessian operator vs curvlinops and PyHessian; CLI start-up"
"$py" benchmarks/bench_library.py
echo "== spectrum stage on 1 and 2 ranks, probes one at a time and in lockstep; then what two ranks sharing this machine cost each other, and alpha-beta of its MPI (feed both to perf_model.py --check)"
"$py" benchmarks/bench_spectrum_scaling.py
"$py" benchmarks/bench_corun.py
"${mpi[@]}" -n 2 "$py" benchmarks/perf_model.py --measure
