"""Top-k eigenpairs and deflated SLQ with the data and the basis sharded give the 1-rank numbers.

Run under ``mpirun -n 1``, ``-n 2`` and ``-n 3``: every rank also computes the serial reference
(comm = None, whole batch) and compares.  Only the order of the slice sums differs between the
two, so the numbers agree to rounding amplified by the restarts: 1e-9 relative is far above it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.hessian.eigenpairs import deflated_slq, top_eigenpairs
from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.parallel import block_bounds

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD


def net_and_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (31,), generator=g)
    return net, x, y


def operator(comm):
    net, x, y = net_and_batch()
    if comm is None:
        return HessianLinearOperator(net, (x, y), num_data=len(y), comm=None, micro_batch=len(y),
                                     route="double-backward")
    lo, hi = block_bounds(len(y), comm.Get_rank(), comm.Get_size())
    return HessianLinearOperator(net, (x[lo:hi], y[lo:hi]), num_data=len(y), comm=comm, micro_batch=4,
                                 route="double-backward")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["largest", "both_ends"])
def test_sharded_eigenpairs_equal_serial(which):
    op, ref = operator(COMM), operator(None)
    pairs = top_eigenpairs(op, 4, which, comm=COMM, seed=2)
    serial = top_eigenpairs(ref, 4, which, seed=2)
    lo, hi = block_bounds(op.n, COMM.Get_rank(), COMM.Get_size())
    assert (pairs.lo, pairs.hi) == (lo, hi) and pairs.vectors.shape == (4, hi - lo)
    scale = np.abs(serial.values).max()
    np.testing.assert_allclose(pairs.values, serial.values, rtol=0, atol=1e-9 * scale)
    U, V = pairs.gather_vectors(COMM), serial.gather_vectors()
    dots = np.abs(np.sum(U * V, axis=1))
    np.testing.assert_allclose(dots, 1.0, rtol=0, atol=1e-9)
    for i in range(4):  # one whole vector at a time on rank 0 (for a row-by-row writer)
        row = pairs.gather_vector(i, COMM)
        if COMM.Get_rank() == 0:
            np.testing.assert_array_equal(row, U[i])
        else:
            assert row is None
    values = COMM.allgather(pairs.values)
    assert all(np.array_equal(values[0], v) for v in values)  # every rank holds the same values


@pytest.mark.timeout(300)
def test_sharded_deflated_slq_equals_serial():
    op, ref = operator(COMM), operator(None)
    pairs = top_eigenpairs(op, 3, "largest_magnitude", comm=COMM)
    serial = top_eigenpairs(ref, 3, "largest_magnitude")
    a = deflated_slq(op, pairs, probes=3, steps=12, seed=5, comm=COMM).spectrum()
    b = deflated_slq(ref, serial, probes=3, steps=12, seed=5).spectrum()
    scale = np.abs(serial.values).max()
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(a.weights, b.weights, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.quad_forms, b.quad_forms, rtol=1e-9, atol=1e-12)
