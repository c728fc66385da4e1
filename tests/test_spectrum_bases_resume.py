"""Krylov bases kept on disk: a later run extends the stored probes instead of rerunning them.

Unit part: :meth:`LanczosEngine.export` / :meth:`LanczosEngine.restore` on a dense float64
operator, against an uninterrupted recurrence.  Stage part: the spectrum stage on a tiny
ResNet (synthetic data, as in ``test_spectrum_adaptive``): a run with ``max_lanczos_steps =
8`` and a second with 16 must spend only the 8 added products per probe and store what one
run with a budget of 16 stores; damaged or foreign basis files make the probe rerun.

Work is counted twice: the Hessian products of the stage (``/perf/spectrum`` counter
``hvp_products``, this invocation's) and every recurrence started from scratch
(:meth:`LanczosEngine.start`, wrapped).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import rademacher_slice
from hpcqml.hessian.lockstep import LanczosEngine, column_product
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages._bases import checksum, label_dir, shard_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hessian_stage import config, make_workdir

torch.set_num_threads(1)
LABEL = "step_000000"
PROBES = 2
#: E(100) in the paper convention at tolerance 0: its quadrature bracket stays far wider than
#: its sampling interval at 8 and 16 steps, so the steps grow to the budget and stop there
GROW = dict(lanczos_steps=8, probes=PROBES, resolve=["error_proxy"], proxy_t=[100], convention="paper",
            resolution_rel=0.0)


# ---- the engine -------------------------------------------------------------------------

def _matrix(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([rng.normal(0.0, 0.1, n - 4), [-2.0, -1.0, 3.0, 7.0]])
    a = (q * lam) @ q.T
    return torch.from_numpy(0.5 * (a + a.T))


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_export_then_restore_continues_the_same_recurrence(reorth, tmp_path):
    """Advance 5 steps, export (through a torch file), restore into a new engine, advance to
    10: the coefficients equal 10 steps straight exactly (float64 dense products, the same
    chunk widths, so the same operations in the same order)."""
    n = 40
    A = _matrix(n, 0)
    product = column_product(lambda v: A @ v)
    starts = {p: rademacher_slice(n, 0, n, seed=5, probe=p) for p in (0, 1)}

    def engine() -> LanczosEngine:
        return LanczosEngine(n, None, reorth=reorth, state_dtype=torch.float64, chunk_steps=10)

    straight = engine()
    for p, z in starts.items():
        straight.start(p, z, 10)
    ref = straight.advance(product, [0, 1], 10)

    first = engine()
    for p, z in starts.items():
        first.start(p, z, 5)
    first.advance(product, [0, 1], 5)
    for p in starts:
        torch.save(first.export(p), tmp_path / f"p{p}.pt")
    second = engine()
    second.restore(0, torch.load(tmp_path / "p0.pt", weights_only=True))
    second.offer(1, torch.load(tmp_path / "p1.pt", weights_only=True, mmap=True))
    assert second.holds(1) and second.steps(1) == 5 and 1 not in second.states   # offered: not copied yet
    got = second.advance(product, [0, 1], 10)
    for g, r in zip(got, ref, strict=True):
        assert g.steps == r.steps == 10
        np.testing.assert_array_equal(g.alpha, r.alpha)
        np.testing.assert_array_equal(g.beta, r.beta)


def test_restore_refuses_a_state_of_another_engine():
    """n, the slice, the dtype and the reorthogonalisation must match; the reason is named."""
    A = _matrix(12, 1)
    e = LanczosEngine(12, None, state_dtype=torch.float64)
    e.start(0, rademacher_slice(12, 0, 12, seed=1, probe=0), 4)
    e.advance(column_product(lambda v: A @ v), [0], 4)
    state = e.export(0)
    for other, word in ((LanczosEngine(13, None, state_dtype=torch.float64), "n "),
                        (LanczosEngine(12, None, state_dtype=torch.float32), "dtype"),
                        (LanczosEngine(12, None, reorth="none", state_dtype=torch.float64), "reorth")):
        assert word in (other.mismatch(state) or "")
        with pytest.raises(ValueError, match="cannot restore"):
            other.restore(0, state)
    cut = {**state, "basis": state["basis"][:2]}
    assert "basis" in (LanczosEngine(12, None, state_dtype=torch.float64).mismatch(cut) or "")


# ---- the stage --------------------------------------------------------------------------


def coefficients(path):
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{LABEL}"]
        return {p: (g[f"probe_{p:03d}/alpha"][()], g[f"probe_{p:03d}/beta"][()]) for p in range(PROBES)}


def products(path):
    """Hessian products of the last spectrum invocation (one rank, one group)."""
    with h5py.File(path, "r") as fh:
        return fh["perf/spectrum/counters/hvp_products"][()].tolist()


def steps_of(path):
    with h5py.File(path, "r") as fh:
        return fh[f"spectrum/{LABEL}/result"].attrs["lanczos_steps"]


def assert_same_recurrence(got, ref):
    """The extended probes against one run with the larger budget.  Both do the same float32
    products on the same vectors, and with n far below 2^24 / 16 both reduce the
    reorthogonalisation sums in one column chunk, so on one machine they agree bit for bit.
    The tolerance leaves room for a product whose summation order is not fixed (a threaded
    BLAS): one unit in the last place of a float32 vector (6e-8 relative) grows to a few
    times that over 16 steps, and 1e-6 relative of the largest coefficient bounds it with a
    wide margin, while a wrong basis (another probe, or stale rows) changes the coefficients
    at order one."""
    for p in ref:
        for g, r in zip(got[p], ref[p], strict=True):
            assert g.shape == r.shape == (16,)
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6 * np.abs(r).max())


@pytest.fixture(scope="module")
def fresh16(tmp_path_factory):
    """Coefficients of one run that grows 8 -> 16 steps within itself (the reference)."""
    tmp = tmp_path_factory.mktemp("fresh16")
    make_workdir(tmp, steps=(0,))
    path = run_pipeline(config(tmp, **GROW, max_lanczos_steps=16), world(), quiet=True)
    assert steps_of(path) == 16
    return coefficients(path)


def first_run(tmp_path, name="run", seed=3, probes=PROBES):
    """A run with a step budget of 8 (nothing to extend in memory) and ``keep_bases = "yes"``:
    bases written to disk for a later run that raises the budget."""
    make_workdir(tmp_path, steps=(0,), name=name)
    path = run_pipeline(config(tmp_path, name=name, seed=seed, **{**GROW, "probes": probes}, max_lanczos_steps=8,
                               keep_bases="yes"), world(), quiet=True)
    assert steps_of(path) == 8 and products(path) == [8.0 * probes]
    where = label_dir(tmp_path / f"{name}.work", LABEL)
    assert sorted(f.name for f in where.iterdir()) == [shard_name(p, 0, 1) for p in range(probes)]
    return path, where


def test_a_larger_budget_extends_the_stored_probes_from_disk(tmp_path, started, fresh16, capsys):
    """Run 2 with max_lanczos_steps = 16 starts no probe and takes (16 - 8) products per probe;
    its probes equal one run with the budget 16; the files now hold 16 steps."""
    path, where = first_run(tmp_path)
    started.clear()
    capsys.readouterr()
    run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16), world(), quiet=False)
    log = capsys.readouterr().err
    assert f"probes [0, 1] extended from 8 steps (Krylov bases read from {where})" in log
    assert started == []
    assert steps_of(path) == 16 and products(path) == [(16.0 - 8.0) * PROBES]
    assert_same_recurrence(coefficients(path), fresh16)
    state = torch.load(where / shard_name(0, 0, 1), weights_only=True)
    assert state["alphas"].numel() == 16 and tuple(state["basis"].shape)[0] == 16


def test_damaged_files_make_the_probes_rerun(tmp_path, started, fresh16, capsys):
    """A truncated file and one with a flipped byte in its basis: both probes are rerun with
    16 steps (no crash), the log names why, and the result equals one run with the budget 16."""
    path, where = first_run(tmp_path)
    cut = where / shard_name(0, 0, 1)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    flipped = where / shard_name(1, 0, 1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the basis rows are nearly all of the file
    flipped.write_bytes(bytes(data))
    started.clear()
    capsys.readouterr()
    run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16), world(), quiet=False)
    log = capsys.readouterr().err
    assert "probes [0, 1] stored with fewer steps are rerun with 16" in log
    assert f"probe 0: {cut.name} unreadable" in log
    # torch.load may read a flipped byte without complaint (then the checksum finds it) or refuse it
    assert (f"probe 1: {flipped.name} is damaged (checksum)" in log or f"probe 1: {flipped.name} unreadable" in log)
    assert started == [0, 1] and products(path) == [16.0 * PROBES]
    assert_same_recurrence(coefficients(path), fresh16)
    # the rerun wrote sound files again
    assert torch.load(cut, weights_only=True)["alphas"].numel() == 16


def test_files_of_another_recurrence_make_the_probes_rerun(tmp_path, started, fresh16, capsys):
    """Bases from a run with another seed (another batch and other probes) and a file whose
    coefficients differ from the stored probe's (checksum made to match): both rerun."""
    path, where = first_run(tmp_path)
    _, other = first_run(tmp_path, name="other", seed=4, probes=1)
    shutil.copy(other / shard_name(0, 0, 1), where / shard_name(0, 0, 1))
    target = where / shard_name(1, 0, 1)
    state = torch.load(target, weights_only=True)
    state["alphas"][3] += 1e-3
    state["crc32"] = checksum(state)
    torch.save(state, target)
    started.clear()
    capsys.readouterr()
    run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16), world(), quiet=False)
    log = capsys.readouterr().err
    assert "probe 0: probe_000.rank0of1.pt is of probe_seed" in log
    assert "probe 1: probe_001.rank0of1.pt: its 8-step coefficients are not those stored" in log
    assert started == [0, 1] and products(path) == [16.0 * PROBES]
    assert_same_recurrence(coefficients(path), fresh16)


def test_auto_writes_nothing_without_a_budget_to_grow_and_no_neither_writes_nor_reads(tmp_path, started):
    """``auto`` with max_lanczos_steps = lanczos_steps writes no bases (the steps cannot grow in
    this run); a later run with ``no`` and a larger budget then reruns the probes and writes
    nothing either."""
    make_workdir(tmp_path, steps=(0,))
    path = run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=8), world(), quiet=True)
    assert not label_dir(tmp_path / "run.work", LABEL).exists()
    started.clear()
    run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16, keep_bases="no"), world(), quiet=True)
    assert started == [0, 1] and products(path) == [16.0 * PROBES]
    assert not label_dir(tmp_path / "run.work", LABEL).exists()


def test_recomputed_stage_deletes_the_old_bases(tmp_path):
    """A changed result setting (lanczos_steps) recomputes the stage: the bases of the old
    probes go (probe 2 is not measured again, so its file must be gone)."""
    make_workdir(tmp_path, steps=(0,))
    run_pipeline(config(tmp_path, lanczos_steps=6, probes=3, keep_bases="yes"), world(), quiet=True)
    where = label_dir(tmp_path / "run.work", LABEL)
    assert (where / shard_name(2, 0, 1)).is_file()
    run_pipeline(config(tmp_path, lanczos_steps=5, probes=2, keep_bases="yes"), world(), quiet=True)
    assert sorted(f.name for f in where.iterdir()) == [shard_name(p, 0, 1) for p in range(2)]
    assert torch.load(where / shard_name(0, 0, 1), weights_only=True)["alphas"].numel() == 5


def test_a_run_killed_during_a_step_growth_resumes_from_disk(tmp_path, started, fresh16, monkeypatch):
    """A run with the budget 16 killed while extending its committed 8-step probes: the
    resumed run extends them from disk (no probe starts again) and stores what one
    uninterrupted run stores."""
    make_workdir(tmp_path, steps=(0,))
    real = LanczosEngine.advance

    def killed(self, product, numbers, steps, **kw):
        if steps > 8:
            raise KeyboardInterrupt("simulated kill")
        return real(self, product, numbers, steps, **kw)

    monkeypatch.setattr(LanczosEngine, "advance", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16), world(), quiet=True)
    monkeypatch.setattr(LanczosEngine, "advance", real)
    assert started == [0, 1]
    started.clear()
    path = run_pipeline(config(tmp_path, **GROW, max_lanczos_steps=16), world(), quiet=True)
    assert started == [] and steps_of(path) == 16
    assert products(path) == [(16.0 - 8.0) * PROBES]
    assert_same_recurrence(coefficients(path), fresh16)
