#!/usr/bin/env bash
# Run pytest on one MPI rank: rank 0 prints as usual; the other ranks print their log
# only when they fail, so a run shows one summary but no failure goes unseen.
# Usage (from the Makefile): mpirun -n N bash tests/mpi_pytest.sh PYTHON PYTEST-ARGS...
py="$1"; shift
rank="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}"
if [ "$rank" = 0 ]; then
  exec "$py" -m pytest "$@"
fi
log="$(mktemp)"
"$py" -m pytest "$@" >"$log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "---- rank $rank failed (exit $rc):"; cat "$log"
fi
rm -f "$log"
exit $rc
