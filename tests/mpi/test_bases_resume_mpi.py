"""Krylov bases on disk under P ranks: each rank of a probe group writes its slice of the
basis, and a later run with a larger step budget reads the slices back and extends the
stored probes, giving the coefficients one rank gives.

Run under ``-n 2`` (one group of two ranks: every basis split in two) and ``-n 3`` (two
groups, of two ranks and of one).  The step budget grows 8 -> 16 between the runs and E(100)
in the paper convention at tolerance 0 asks for every step of it.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.hessian.lockstep import LanczosEngine
from hpcqml.parallel import block_bounds
from hpcqml.runner import run_pipeline
from hpcqml.stages._bases import label_dir, shard_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_hessian_stage import config, make_workdir

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD
LABEL = "step_000000"
PROBES = 2
GROW = dict(lanczos_steps=8, probes=PROBES, resolve=["error_proxy"], proxy_t=[100], convention="paper",
            resolution_rel=0.0)


def coefficients(path):
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{LABEL}"]
        return {p: (g[f"probe_{p:03d}/alpha"][()], g[f"probe_{p:03d}/beta"][()]) for p in range(PROBES)}


@pytest.mark.timeout(600)
def test_bases_split_over_ranks_extend_like_one_rank(monkeypatch):
    size, rank = COMM.Get_size(), COMM.Get_rank()
    groups = 1 if size == 2 else 2
    tmp = Path(COMM.bcast(tempfile.mkdtemp(prefix="hpcqml-bases-") if rank == 0 else None))
    make_workdir(tmp, steps=(0,), name=f"serial{rank}")
    if rank == 0:
        make_workdir(tmp, steps=(0,), name="par")
    COMM.Barrier()
    # the one-rank reference on every rank at once: one run growing 8 -> 16 in memory
    serial = run_pipeline(config(tmp, name=f"serial{rank}", **GROW, max_lanczos_steps=16), MPI.COMM_SELF,
                          quiet=True)
    par = run_pipeline(config(tmp, name="par", groups=groups, **GROW, max_lanczos_steps=8, keep_bases="yes"), COMM,
                       quiet=True)

    real, started = LanczosEngine.start, []

    def counting(self, number, *args, **kw):
        started.append(number)
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", counting)
    where = label_dir(tmp / "par.work", LABEL)
    listed = sorted(f.name for f in where.iterdir()) if rank == 0 else None
    run_pipeline(config(tmp, name="par", groups=groups, **GROW, max_lanczos_steps=16), COMM, quiet=True)
    # no probe started again on any rank
    assert COMM.allgather(started) == [[]] * size
    try:
        if rank == 0:
            check(serial, par, where, listed, groups)
    finally:  # every rank waits for rank 0's checks, pass or fail
        COMM.Barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def check(serial: Path, par: Path, where: Path, listed: list[str], groups: int) -> None:
    size = COMM.Get_size()
    members = [[r for r in range(size) if r * groups // size == g] for g in range(groups)]
    expect = sorted(shard_name(p, i, len(members[p % groups])) for p in range(PROBES)
                    for i in range(len(members[p % groups])))
    assert listed == expect                               # one file per probe per rank of its group
    with h5py.File(par, "r") as fh:
        n = int(fh[f"spectrum/{LABEL}/result"].attrs["n"])
        assert fh[f"spectrum/{LABEL}/result"].attrs["lanczos_steps"] == 16
        # the second run: 8 added products per probe, each rank doing its group's probes
        assert set(fh["perf/spectrum/counters/hvp_products"][()].tolist()) == {8.0 * PROBES / groups}
    for p in range(PROBES):
        gsize = len(members[p % groups])
        for i in range(gsize):
            state = torch.load(where / shard_name(p, i, gsize), weights_only=True)
            lo, hi = block_bounds(n, i, gsize)
            assert (state["lo"], state["hi"], state["group_size"]) == (lo, hi, gsize)
            assert tuple(state["basis"].shape) == (16, hi - lo)
    # float32 products summed in another order over the ranks: the coefficients agree with
    # one rank to ~1e-6 relative per step, grown over 16 steps; 1e-4 of the largest is the
    # sharded-SLQ tolerance of the other MPI tests
    ref, got = coefficients(serial), coefficients(par)
    for p in range(PROBES):
        for g, r in zip(got[p], ref[p], strict=True):
            assert g.shape == r.shape == (16,)
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


@pytest.mark.timeout(600)
def test_a_file_missing_on_one_rank_reruns_that_probe_on_its_whole_group(monkeypatch):
    """Probe 0 belongs to group 0, which holds world ranks 0 and 1 under -n 2 (one group) and
    -n 3 (two groups): with rank 1's file of it gone, both ranks of that group must agree to
    rerun it (no hang, no half-restored probe), and every other probe is extended."""
    size, rank = COMM.Get_size(), COMM.Get_rank()
    groups = 1 if size == 2 else 2
    tmp = Path(COMM.bcast(tempfile.mkdtemp(prefix="hpcqml-bases-") if rank == 0 else None))
    if rank == 0:
        make_workdir(tmp, steps=(0,), name="par")
    COMM.Barrier()
    par = run_pipeline(config(tmp, name="par", groups=groups, **GROW, max_lanczos_steps=8, keep_bases="yes"), COMM,
                       quiet=True)
    where = label_dir(tmp / "par.work", LABEL)
    if rank == 0:
        (where / shard_name(0, 1, 2)).unlink()
    COMM.Barrier()
    real, started = LanczosEngine.start, []

    def counting(self, number, *args, **kw):
        started.append(number)
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", counting)
    run_pipeline(config(tmp, name="par", groups=groups, **GROW, max_lanczos_steps=16), COMM, quiet=True)
    starts = COMM.allgather(started)
    try:
        assert starts[0] == [0] and starts[1] == [0] and all(s == [] for s in starts[2:]), starts
        with h5py.File(par, "r") as fh:
            assert fh[f"spectrum/{LABEL}/result"].attrs["lanczos_steps"] == 16
    finally:
        COMM.Barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
