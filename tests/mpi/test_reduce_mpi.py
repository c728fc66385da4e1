"""The reducer's host path and the operator products that use it, under 1, 2 and 3 ranks."""
from __future__ import annotations

import pytest
import torch

from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.hessian.reduce import Reducer
from hpcqml.parallel import block_bounds, world

pytestmark = pytest.mark.timeout(300)


def test_host_reducer_sums_over_ranks():
    comm = world()
    size, rank = comm.Get_size(), comm.Get_rank()
    r = Reducer(comm, "cpu")
    assert r.backend == ("none" if size == 1 else "host")
    t = torch.arange(5, dtype=torch.float64) * (rank + 1)
    assert r.allreduce_(t) is t
    assert torch.equal(t, torch.arange(5, dtype=torch.float64) * (size * (size + 1) // 2))
    view = torch.ones(4, 3, dtype=torch.float32)[:, 1]  # non-contiguous: through a copy, result in place
    r.allreduce_(view)
    assert torch.equal(view, torch.full((4,), float(size)))


def test_sharded_vmap_block_product_equals_one_rank():
    comm = world()
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g)
    lo, hi = block_bounds(13, rank, size)
    kw = dict(route="func", vmap_width=3, micro_batch=4)
    sharded = HessianLinearOperator(net, (x[lo:hi], y[lo:hi]), torch.nn.CrossEntropyLoss(), comm=comm, **kw)
    whole = HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(), **kw)
    V = torch.randn(whole.n, 5, dtype=torch.float64, generator=g)
    got, want = sharded.matmat(V), whole.matmat(V)
    # float64, sums regrouped over shards and micro-batches: ~1e-15 of the scale; 1e-12 leaves room.
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
