"""Distributed H.v, sharded-basis Lanczos and probe groups give the 1-rank numbers.

Run under ``mpirun -n 1``, ``-n 2`` and ``-n 3``: every rank also computes the serial
reference (comm = None, whole batch) and compares (float64, tolerance 1e-9 relative).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.parallel import block_bounds
from hpcqml.hessian.slq import probe_groups, run_probes
from hpcqml.hessian.slq import slq
from hpcqml.hessian.spectrum import Spectrum

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD


def net_and_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 3, 5, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (31,), generator=g)
    return net, x, y


def sharded_operator(comm, micro=4):
    net, x, y = net_and_batch()
    size, rank = comm.Get_size(), comm.Get_rank()
    lo, hi = block_bounds(len(y), rank, size)
    return HessianLinearOperator(net, (x[lo:hi], y[lo:hi]), num_data=len(y), comm=comm, micro_batch=micro,
                           route="double-backward")


def serial_operator():
    net, x, y = net_and_batch()
    return HessianLinearOperator(net, (x, y), num_data=len(y), comm=None, micro_batch=len(y), route="double-backward")


@pytest.mark.timeout(120)
def test_sharded_product_equals_serial():
    op, ref = sharded_operator(COMM), serial_operator()
    v = torch.from_numpy(rademacher_slice(ref.n, 0, ref.n, seed=0, probe=0))
    a, b = op.matvec(v), ref.matvec(v)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    both = COMM.allgather(a.numpy())
    assert all(np.array_equal(both[0], o) for o in both)  # identical on every rank


@pytest.mark.timeout(120)
def test_sharded_basis_lanczos_equals_serial():
    op, ref = sharded_operator(COMM), serial_operator()
    n = ref.n
    lo, hi = block_bounds(n, COMM.Get_rank(), COMM.Get_size())
    got = lanczos(op.matvec, n, COMM, rademacher_slice(n, lo, hi, seed=3, probe=1), steps=25,
                  state_dtype=torch.float64, probe=1)
    exp = lanczos(ref.matvec, n, None, rademacher_slice(n, 0, n, seed=3, probe=1), steps=25,
                  state_dtype=torch.float64, probe=1)
    assert got.steps == exp.steps == 25
    assert np.allclose(got.alpha, exp.alpha, rtol=1e-9, atol=1e-12)
    assert np.allclose(got.beta, exp.beta, rtol=1e-9, atol=1e-12)
    assert np.allclose(got.nodes, exp.nodes, rtol=1e-9, atol=1e-12)
    assert np.allclose(got.weights, exp.weights, rtol=1e-7, atol=1e-12)
    assert got.quad_form == pytest.approx(exp.quad_form, rel=1e-12)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_probe_groups_give_same_spectrum(groups):
    groups = min(groups, COMM.Get_size())
    layout = probe_groups(COMM, groups)
    op = sharded_operator(layout.comm, micro=5)
    n = op.n
    got = run_probes(op.matvec, n, layout, [0, 1, 2], seed=7, steps=15, state_dtype=torch.float64)
    ref = serial_operator()
    exp = run_probes(ref.matvec, n, probe_groups(None, 1), [0, 1, 2], seed=7, steps=15,
                     state_dtype=torch.float64)
    assert [r.probe for r in got] == [0, 1, 2]
    for g, e in zip(got, exp, strict=True):
        assert np.allclose(g.nodes, e.nodes, rtol=1e-9, atol=1e-12)
        assert np.allclose(g.weights, e.weights, rtol=1e-7, atol=1e-12)
    sg, se = Spectrum.from_results(got, n), Spectrum.from_results(exp, n)
    assert sg.trace().value == pytest.approx(se.trace().value, rel=1e-10)
    assert sg.extremes()[1][0] == pytest.approx(se.extremes()[1][0], rel=1e-10)
    for conv in ("eta", "paper"):
        a, b = sg.error_proxy(20, conv, eta=0.1, cutoff=0.01), se.error_proxy(20, conv, eta=0.1, cutoff=0.01)
        assert a.value == pytest.approx(b.value, rel=1e-8)
        assert a.stderr == pytest.approx(b.stderr, rel=1e-6)
    if layout.comm is not COMM:
        layout.comm.Free()


@pytest.mark.timeout(120)
def test_public_slq_with_comm_equals_serial():
    """``slq(operator, comm=...)`` on the sharded operator gives the serial spectrum, and
    every derived estimate (with its standard error and bootstrap interval) is the same."""
    op, ref = sharded_operator(COMM), serial_operator()
    got = slq(op, probes=3, steps=12, seed=5, comm=COMM, dtype=torch.float64)
    exp = slq(ref, probes=3, steps=12, seed=5, dtype=torch.float64)
    np.testing.assert_allclose(got.nodes, exp.nodes, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.quad_forms, exp.quad_forms, rtol=1e-10)
    kw = dict(convention="eta", eta=0.5, cutoff=0.0)
    for a, b in ((got.trace(), exp.trace()), (got.negative_mass(), exp.negative_mass()),
                 (got.dissipative_fraction(**kw), exp.dissipative_fraction(**kw))):
        np.testing.assert_allclose([a.value, a.stderr, a.ci_low, a.ci_high],
                                   [b.value, b.stderr, b.ci_low, b.ci_high], rtol=1e-7, atol=1e-12)
        assert a.resolved == b.resolved


@pytest.mark.timeout(120)
def test_spectrum_stage_same_on_any_ranks_and_groups():
    """The stage on all ranks (2 probe groups when possible) equals a 1-rank run."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    import h5py

    from hpcqml.runner import run_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from test_hessian_stage import config, make_workdir

    tmp = Path(COMM.bcast(tempfile.mkdtemp(prefix="hess4_") if COMM.Get_rank() == 0 else None))
    rank = COMM.Get_rank()
    make_workdir(tmp, steps=(10,), name=f"serial{rank}")   # each run reads snapshots it made
    if rank == 0:
        make_workdir(tmp, steps=(10,), name="par")
    COMM.Barrier()
    groups = min(2, COMM.Get_size())
    serial = run_pipeline(config(tmp, name=f"serial{rank}", probes=3), MPI.COMM_SELF, quiet=True)
    par = run_pipeline(config(tmp, name="par", probes=3, groups=groups), COMM, quiet=True)
    with h5py.File(serial, "r") as a, h5py.File(par, "r") as b:
        ga, gb = a["spectrum/step_000010/result"], b["spectrum/step_000010/result"]
        np.testing.assert_allclose(gb["nodes"][()], ga["nodes"][()], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb["weights"][()], ga["weights"][()], rtol=1e-3, atol=1e-6)
        assert gb.attrs["trace"] == pytest.approx(ga.attrs["trace"], rel=1e-4)
        assert gb.attrs["groups"] == groups and gb.attrs["ranks"] == COMM.Get_size()
        for conv in ("eta", "paper"):
            np.testing.assert_allclose(gb[f"proxy/{conv}/log_nodes"][()], ga[f"proxy/{conv}/log_nodes"][()],
                                       rtol=1e-4, atol=1e-6)
    COMM.Barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
