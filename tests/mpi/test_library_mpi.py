"""The library operator with its data sharded over ranks gives the 1-rank numbers.

Run under ``mpirun -n 2`` and ``-n 3``: each rank holds a strided shard of the samples as
its own DataLoader (shards of unequal size, the sample count found by an allreduce), and
every rank also computes the serial reference on all samples (comm = None).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from mpi4py import MPI
from torch.utils.data import DataLoader, TensorDataset

import hpcqml
from hpcqml.hessian import HessianLinearOperator

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD


def net_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 2, 4, 4, dtype=torch.float64, generator=g)
    t = torch.randn(31, 3, dtype=torch.float64, generator=g)
    return net, x, t


def operators(route: str = "double-backward"):
    """(sharded over COMM, serial) operators of the MSE loss ('mean' over every element)."""
    net, x, t = net_and_data()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    shard = DataLoader(TensorDataset(x[rank::size], t[rank::size]), batch_size=4)
    sharded = HessianLinearOperator(net, shard, torch.nn.MSELoss(), micro_batch=3, route=route, comm=COMM)
    serial = HessianLinearOperator(net, (x, t), torch.nn.MSELoss(), route="double-backward")
    return sharded, serial


@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ["double-backward", "func", "auto"])
def test_sharded_matmat_equals_serial(route):
    op, ref = operators(route)
    assert op.num_data == ref.num_data == 31
    V = torch.randn(ref.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a, b = op @ V, ref @ V
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    everywhere = COMM.allgather(a.numpy())
    assert all(np.array_equal(everywhere[0], o) for o in everywhere)  # identical on every rank
    assert len(set(COMM.allgather(op.route_used))) == 1  # auto: one choice for all ranks


@pytest.mark.timeout(120)
def test_sharded_to_scipy_eigsh_equals_serial():
    op, ref = operators()
    v0 = np.ones(ref.n)
    top = np.sort(scipy.sparse.linalg.eigsh(op.to_scipy(), k=2, which="LA", v0=v0, tol=1e-12,
                                            return_eigenvectors=False))
    exact = np.sort(scipy.sparse.linalg.eigsh(ref.to_scipy(), k=2, which="LA", v0=v0, tol=1e-12,
                                              return_eigenvectors=False))
    assert np.allclose(top, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.timeout(120)
def test_sharded_slq_equals_serial():
    op, ref = operators()
    got = hpcqml.slq(op, probes=2, steps=12, seed=4, comm=COMM)
    want = hpcqml.slq(ref, probes=2, steps=12, seed=4)
    assert np.allclose(got.nodes, want.nodes, rtol=1e-8, atol=1e-10, equal_nan=True)
    assert got.trace().value == pytest.approx(want.trace().value, rel=1e-10)
