"""Lanczos recurrences extended in memory equal fresh runs, and SLQ in lockstep equals SLQ one
probe at a time (float64 products, exact small operators).

The reference for an extended recurrence is :func:`hpcqml.hessian.lanczos.lanczos` run from
scratch with the larger step count; the reference for lockstep is the same SLQ with
``lockstep = 1``.  Products are counted to check that a step growth from m to 2m costs m more
products per probe, not 2m.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.lockstep import LanczosEngine, column_product, lanczos_lockstep
from hpcqml.parallel import auto_width
from hpcqml.hessian.slq import slq


def _matrix(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([rng.normal(0.0, 0.1, n - 4), [-2.0, -1.0, 3.0, 7.0]])
    a = (q * lam) @ q.T
    return 0.5 * (a + a.T)


class Counted:
    """A dense symmetric operator that counts product columns (``matvec`` and ``matmat``)."""

    def __init__(self, a: np.ndarray) -> None:
        self.A = torch.from_numpy(a)
        self.n = a.shape[0]
        self.products = 0
        self.blocks: list[int] = []

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.A @ v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.products += V.shape[1]
        self.blocks.append(V.shape[1])
        return self.A @ V


def _same(got, ref, tol=1e-10):
    assert got.steps == ref.steps and got.breakdown == ref.breakdown
    np.testing.assert_allclose(got.alpha, ref.alpha, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.beta, ref.beta, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.nodes, ref.nodes, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.weights, ref.weights, rtol=tol, atol=tol)


@pytest.mark.parametrize("reorth", ["full", "none"])
@pytest.mark.parametrize("width", [1, 3])
def test_extended_recurrence_equals_a_fresh_longer_run(reorth, width):
    """m = 6 steps, then extended to 12 and to 20: each equals a fresh run of that length to
    1e-10 in float64, and the extension costs only the added steps."""
    n = 50
    op = Counted(_matrix(n, 0))
    starts = {p: rademacher_slice(n, 0, n, seed=4, probe=p) for p in range(3)}
    engine = LanczosEngine(n, None, reorth=reorth, state_dtype=torch.float64)
    for p, z in starts.items():
        engine.start(p, z, 6)
    product = op.matmat if width > 1 else column_product(op.matvec)
    for m, cost in ((6, 6), (12, 6), (20, 8)):
        before = op.products
        numbers = list(starts)
        got = []
        for s in range(0, 3, width):
            got += engine.advance(product, numbers[s:s + width], m)
        assert op.products - before == 3 * cost          # only the new steps are computed
        # the reference takes the same kind of product (a block product A @ V may round
        # differently from A @ v, and without reorthogonalisation such differences grow)
        if width == 1:
            fresh = [lanczos(lambda v: op.A @ v, n, None, starts[p], steps=m, reorth=reorth,
                             state_dtype=torch.float64, probe=p) for p in numbers]
        else:
            fresh = lanczos_lockstep(lambda V: op.A @ V, n, None, [starts[p] for p in numbers], numbers,
                                     steps=m, reorth=reorth, state_dtype=torch.float64)
        for res, ref in zip(got, fresh, strict=True):
            _same(res, ref)
    # the 6-step result of the 20-step recurrence is its leading part, as a fresh 6-step run
    fresh6 = lanczos(lambda v: op.A @ v, n, None, starts[0], steps=6, reorth=reorth, state_dtype=torch.float64)
    _same(engine.result(0, 6), fresh6, tol=1e-12 if width == 1 else 1e-10)


def test_extension_past_a_breakdown_stops_where_a_fresh_run_stops():
    """A start vector in a 3-dimensional invariant subspace: 3 steps (no breakdown reported at
    the last requested step, as a fresh run), extended to 8 it reports the breakdown at 3."""
    n = 30
    lam = np.linspace(-1.0, 2.0, n)
    a = np.diag(lam)
    z = np.zeros(n)
    z[[0, 5, 9]] = 1.0
    engine = LanczosEngine(n, None, state_dtype=torch.float64)
    engine.start(0, z, 3)
    mv = column_product(lambda v: torch.from_numpy(a) @ v)
    three = engine.advance(mv, [0], 3)[0]
    _same(three, lanczos(lambda v: torch.from_numpy(a) @ v, n, None, z, steps=3, state_dtype=torch.float64))
    eight = engine.advance(mv, [0], 8)[0]
    fresh = lanczos(lambda v: torch.from_numpy(a) @ v, n, None, z, steps=8, state_dtype=torch.float64)
    assert eight.steps == 3 and eight.breakdown and fresh.breakdown
    _same(eight, fresh)


def test_whole_space_spanned_then_no_more_steps():
    n = 8
    op = Counted(_matrix(n, 2))
    engine = LanczosEngine(n, None, state_dtype=torch.float64)
    engine.start(0, rademacher_slice(n, 0, n, seed=0, probe=0), 4)
    engine.advance(op.matmat, [0], 4)
    res = engine.advance(op.matmat, [0], 20)[0]      # at most n steps
    assert res.steps == n and res.breakdown
    np.testing.assert_allclose(np.sort(res.nodes), np.linalg.eigvalsh(op.A.numpy()), atol=1e-10)
    assert op.products == n


def test_lockstep_slq_equals_sequential_slq():
    """SLQ with 4 probes in lockstep blocks of 2 and 4 equals one probe at a time (1e-9)."""
    a = _matrix(60, 1)
    seq = Counted(a)
    ref = slq(seq, probes=4, steps=15, seed=2, lockstep=1)
    assert seq.blocks == [] and seq.products == 60      # matvec only, one product per step and probe
    for k in (2, 4):
        op = Counted(a)
        got = slq(op, probes=4, steps=15, seed=2, lockstep=k)
        assert op.products == 60 and set(op.blocks) == {k} and len(op.blocks) == 60 // k
        np.testing.assert_allclose(got.nodes, ref.nodes, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.weights, ref.weights, rtol=1e-9, atol=1e-12)
        assert got.trace().value == pytest.approx(ref.trace().value, rel=1e-12)


def test_adaptive_slq_extends_probes_instead_of_rerunning():
    """30 % of the eigenvalues exactly at the threshold 0 and an absolute tolerance of 0.01 on
    the negative mass: no step count resolves it, so the steps double 2 -> 4 -> 8 (the step
    budget).  16 probes cost 16 x 8 products, not 16 x (2 + 4 + 8), and the result equals a
    plain 8-step run to 1e-10."""
    rng = np.random.default_rng(2)
    ev = np.concatenate([np.full(14, -1.0), np.zeros(12), np.linspace(0.5, 2.0, 14)])
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    a = (q * ev) @ q.T
    a = 0.5 * (a + a.T)
    op = Counted(a)
    spec = slq(op, probes=16, steps=2, seed=3, requests=[lambda s: s.negative_mass()], max_steps=8,
               max_probes=16, resolution_mass=0.01, resolution_rel=0.0, lockstep=4)
    assert spec.stop_reason == "step budget" and int(spec.steps.max()) == 8
    assert op.products == 16 * 8
    ref = slq(Counted(a), probes=16, steps=8, seed=3, lockstep=1)
    np.testing.assert_allclose(spec.nodes, ref.nodes, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(spec.weights, ref.weights, rtol=1e-10, atol=1e-12)


def test_auto_width_follows_memory():
    # 100 steps x 1e6 values x 4 bytes = 400 MB per probe; half of 1.6 GB holds 2 bases
    assert auto_width(8, 100, 10**6, 1, 4, 1_600_000_000) == 2
    assert auto_width(8, 100, 10**6, 1, 4, 10**6) == 1           # never below 1
    assert auto_width(3, 100, 10**6, 1, 4, 0) == 3               # unknown memory: the probes, at most 8
    assert auto_width(20, 10, 100, 1, 4, 10**12) == 8


def test_bad_lockstep_is_refused():
    with pytest.raises(ValueError, match="lockstep = -1"):
        slq(Counted(_matrix(6, 0)), probes=2, steps=3, lockstep=-1)


def test_repeated_probe_numbers_are_refused():
    """A probe listed twice would be advanced twice per block step (its nodes silently wrong):
    slq, run_probes and the engine refuse it, naming the probe."""
    from hpcqml.hessian.slq import probe_groups, run_probes

    op = Counted(_matrix(12, 0))
    with pytest.raises(ValueError, match="probe 0 is listed more than once"):
        slq(op, probes=[0, 0], steps=6, lockstep=2)
    with pytest.raises(ValueError, match="probe 3 is listed more than once"):
        run_probes(op.matvec, 12, probe_groups(None, 1), [1, 3, 2, 3], seed=0, steps=4, width=2,
                   matmat=op.matmat)
    engine = LanczosEngine(12, None, state_dtype=torch.float64)
    engine.start(0, rademacher_slice(12, 0, 12, seed=0, probe=0), 4)
    with pytest.raises(AssertionError, match="repeated"):
        engine.advance(op.matmat, [0, 0], 4)
    assert op.products == 0                                   # refused before any product


def test_chunk_width_follows_the_step_budget(monkeypatch):
    """The reorthogonalisation sums run over column chunks of 2^24 // chunk_steps coordinates,
    the same at every step count: a recurrence advanced to 5 steps and extended to 12 takes
    the chunks a fresh 12-step run takes, and gives its numbers bit for bit."""
    import hpcqml.hessian.lanczos as lz

    n, chunk_steps = 60, (1 << 24) // 7                        # chunks of 7 coordinates
    widths: list[int] = []
    original = lz._project

    def recording(V, w, cols):
        widths.append(cols)
        return original(V, w, cols)

    monkeypatch.setattr(lz, "_project", recording)
    op = Counted(_matrix(n, 1))
    z = rademacher_slice(n, 0, n, seed=5, probe=0)
    extended = LanczosEngine(n, None, state_dtype=torch.float64, chunk_steps=chunk_steps)
    extended.start(0, z, 5)
    extended.advance(op.matmat, [0], 5)
    grown = extended.advance(op.matmat, [0], 12)[0]
    fresh = LanczosEngine(n, None, state_dtype=torch.float64, chunk_steps=chunk_steps)
    fresh.start(0, z, 12)
    once = fresh.advance(op.matmat, [0], 12)[0]
    assert widths and set(widths) == {7}
    assert np.array_equal(grown.alpha, once.alpha) and np.array_equal(grown.beta, once.beta)


def test_basis_plan_counts_the_bases_held():
    """The one memory rule of the stage and of validate: bases of max_steps vectors,
    ``width`` at once, or a group's probes when they are kept for a step growth."""
    from hpcqml.preflight import basis_plan

    per_basis = 40 * 1000 * 4                                  # 40 vectors x 1000 values x 4 bytes
    roomy = basis_plan(6, 10, 40, 1000, 1, 4, 10**9)
    assert (roomy.width, roomy.keep, roomy.bases, roomy.per_basis) == (6, True, 6, per_basis)
    assert roomy.total == 6 * per_basis and roomy.keep_bytes == 6 * per_basis
    # half of 5 bases' bytes holds 2 bases: width 2, and the 6 probes are not kept
    tight = basis_plan(6, 10, 40, 1000, 1, 4, 5 * per_basis)
    assert (tight.width, tight.keep, tight.bases) == (2, False, 2)
    fixed = basis_plan(6, 10, 10, 1000, 2, 4, 10**9, lockstep=3)       # no step growth, 2 shards
    assert (fixed.width, fixed.keep, fixed.bases, fixed.per_basis) == (3, False, 3, 10 * 500 * 4)
    assert basis_plan(2, 10, 10, 1000, 1, 4, 10**9, lockstep=5).width == 2   # at most a group's probes


def test_memory_per_rank_divides_the_node():
    """The host memory of this node over its ranks (one process here)."""
    from hpcqml.parallel import machine_memory_bytes, memory_per_rank

    got, where = memory_per_rank(None, "cpu")
    assert got == machine_memory_bytes() and "host memory / 1 rank" in where
