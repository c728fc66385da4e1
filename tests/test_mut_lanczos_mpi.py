"""The sharded Krylov basis of :func:`hpcqml.hessian.lanczos.lanczos` on two MPI ranks, from one test.

The mutation target ``lanczos`` (tests/mutation.sh) runs this last: it launches ``mpirun -n 2``
(about 10 s here), so that the allgather of the basis slices and its timers are checked in
the one-process test run too. tests/mpi/test_slq_mpi.py makes the same comparison for a real
Hessian under ``make test-mpi``.
"""
from __future__ import annotations

import subprocess
import textwrap

import pytest

from conftest import PYTHON, REPO, child_env, mpiexec

SHARDED = """
import time
import numpy as np
import torch
from mpi4py import MPI
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.parallel import block_bounds
from hpcqml.perf import StagePerf

torch.set_num_threads(1)
comm = MPI.COMM_WORLD
n = 37
rng = np.random.default_rng(4)
A = rng.standard_normal((n, n))
H = torch.from_numpy((A + A.T) / 2)
lo, hi = block_bounds(n, comm.Get_rank(), comm.Get_size())
for reorth in ("full", "none"):
    perf = StagePerf("spectrum")
    t0 = time.perf_counter()
    got = lanczos(lambda v: H @ v, n, comm, rademacher_slice(n, lo, hi, seed=6, probe=2), steps=12,
                  reorth=reorth, state_dtype=torch.float64, perf=perf)
    elapsed = time.perf_counter() - t0
    ref = lanczos(lambda v: H @ v, n, None, rademacher_slice(n, 0, n, seed=6, probe=2), steps=12,
                  reorth=reorth, state_dtype=torch.float64)
    assert got.steps == ref.steps == 12, (got.steps, ref.steps)
    np.testing.assert_allclose(got.alpha, ref.alpha, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.beta, ref.beta, rtol=1e-9)
    assert abs(got.quad_form - ref.quad_form) <= 1e-9 * abs(ref.quad_form)
    assert abs(got.start_norm2 - n) <= 1e-12 * n
    gathered = perf.counters["allgatherv_seconds"]
    assert 0.0 < gathered <= elapsed, (gathered, elapsed)
    assert 0.0 < perf.comm_seconds <= elapsed, (perf.comm_seconds, elapsed)
# without a perf object the gathers are not timed (and nothing fails)
plain = lanczos(lambda v: H @ v, n, comm, rademacher_slice(n, lo, hi, seed=6, probe=2), steps=5,
                state_dtype=torch.float64)
np.testing.assert_allclose(plain.alpha, ref.alpha[:5], rtol=1e-9, atol=1e-12)
print("rank", comm.Get_rank(), "ok")
"""


@pytest.mark.timeout(180)
def test_sharded_basis_on_two_ranks_equals_the_serial_run(tmp_path):
    """Two MPI ranks (n = 37: shards of 19 and 18) give the serial recurrence coefficients
    (relative 1e-9) with and without reorthogonalisation, and charge their gathers to the
    communication time: the summed gather time is positive and no longer than the whole call
    (and a run without a perf object times nothing).
    The same comparison for a real Hessian runs in tests/mpi/test_slq_mpi.py under ``make test-mpi``.
    """
    script = tmp_path / "sharded.py"
    script.write_text(textwrap.dedent(SHARDED))
    out = subprocess.run([*mpiexec(), "-n", "2", PYTHON, str(script)], capture_output=True, text=True,
                         timeout=170, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count(" ok") == 2, out.stdout
