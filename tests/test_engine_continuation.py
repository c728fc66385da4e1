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
from hpcqml.hessian.lockstep import LanczosEngine, auto_width, column_product, lanczos_lockstep
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
