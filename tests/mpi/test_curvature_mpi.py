"""GGN, Fishers, Hessian - GGN, BatchNorm train mode and blocks with the data sharded over
ranks give the 1-rank numbers.

Run under ``mpirun -n 2`` and ``-n 3``: each rank holds a strided shard of the samples
(unequal sizes, the count found by an allreduce) and also computes the serial reference on
all samples (comm = None).  Sums over ranks reorder float64 additions, so products agree to
~1e-15 relative; 1e-12 leaves three decades of margin.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch.utils.data import DataLoader, TensorDataset

import hpcqml
from hpcqml.hessian.blocks import BlockDiagonalOperator, partition
from hpcqml.hessian.curvature import KINDS, build_curvature

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD


def net_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 2, 4, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (31,), generator=g)
    mask = {"4.weight": torch.rand(3, 48, generator=g) < 0.5}
    return net, x, y, mask


def agree_everywhere(a: torch.Tensor) -> bool:
    everywhere = COMM.allgather(a.numpy())
    return all(np.array_equal(everywhere[0], o) for o in everywhere)


@pytest.mark.timeout(300)
def test_every_kind_and_block_sharded_equals_serial():
    net, x, y, mask = net_and_data()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    shard = DataLoader(TensorDataset(x[rank::size], y[rank::size]), batch_size=4)
    kw = dict(wrt="support", mask=mask, blocks="module", seed=5, mc_samples=2, route="double-backward")
    sharded = build_curvature(list(KINDS), net, shard, micro_batch=3, comm=COMM, **kw)
    serial = build_curvature(list(KINDS), net, (x, y), **kw)
    assert list(sharded) == list(serial)
    for name, op in sharded.items():
        V = torch.randn(op.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        a, b = op @ V, serial[name] @ V
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
        assert agree_everywhere(a), name


@pytest.mark.timeout(300)
def test_batchnorm_train_with_whole_batches_per_rank_equals_serial():
    """Train mode: the chunks define the statistics, so giving each rank whole batches
    (batch i on rank i % size) gives the serial operator over the same batches."""
    net, x, y, _ = net_and_data()
    batches = [(x[lo:lo + 6], y[lo:lo + 6]) for lo in range(0, 31, 6)]
    mine = batches[COMM.Get_rank()::COMM.Get_size()]
    ops = build_curvature(["hessian", "ggn"], net, mine, batchnorm="train", comm=COMM, route="func")
    ref = build_curvature(["hessian", "ggn"], net, batches, batchnorm="train", route="func")
    v = torch.randn(ops["ggn"].n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name in ops:
        assert torch.allclose(ops[name] @ v, ref[name] @ v, rtol=1e-12, atol=1e-14), name


@pytest.mark.timeout(300)
def test_slq_and_block_diagonal_sharded_equal_serial():
    net, x, y, mask = net_and_data()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    shard = (x[rank::size], y[rank::size])
    op = build_curvature("hessian-minus-ggn", net, shard, wrt="support", mask=mask, comm=COMM)["hessian-minus-ggn"]
    ref = build_curvature("hessian-minus-ggn", net, (x, y), wrt="support", mask=mask)["hessian-minus-ggn"]
    got = hpcqml.slq(op, probes=2, steps=10, seed=4, comm=COMM)
    want = hpcqml.slq(ref, probes=2, steps=10, seed=4)
    assert np.allclose(got.nodes, want.nodes, rtol=1e-8, atol=1e-10, equal_nan=True)
    g = build_curvature("ggn", net, shard, wrt="support", mask=mask, comm=COMM)["ggn"]
    gs = build_curvature("ggn", net, (x, y), wrt="support", mask=mask)["ggn"]
    D = BlockDiagonalOperator(g, partition(g.space, "layer"))
    Ds = BlockDiagonalOperator(gs, partition(gs.space, "layer"))
    v = torch.randn(g.n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(D @ v, Ds @ v, rtol=1e-12, atol=1e-14) and agree_everywhere(D @ v)
