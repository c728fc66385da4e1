"""Probes in lockstep equal probes run alone (up to the product's rounding).

The reference is :func:`hpcqml.hessian.lanczos.lanczos` run on each probe separately, and
the exact Gauss rule of a dense symmetric matrix.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.lockstep import block_product, lanczos_lockstep


def _matrix(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([rng.normal(0.0, 0.1, n - 4), [-2.0, -1.0, 3.0, 7.0]])
    return torch.from_numpy((q * lam) @ q.T)


def test_lockstep_equals_each_probe_alone():
    n, m = 60, 15
    A = _matrix(n, 0)
    starts = [rademacher_slice(n, 0, n, seed=3, probe=p) for p in range(4)]
    block = lanczos_lockstep(lambda V: A @ V, n, None, starts, probes=[0, 1, 2, 3], steps=m,
                             state_dtype=torch.float64)
    for p, z in enumerate(starts):
        alone = lanczos(lambda v: A @ v, n, None, z, steps=m, state_dtype=torch.float64, probe=p)
        got = block[p]
        assert got.probe == p and got.steps == alone.steps
        # same arithmetic per probe; only A @ V against A @ v may round differently (~1e-15 relative)
        np.testing.assert_allclose(got.alpha, alone.alpha, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(got.beta, alone.beta, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(got.nodes, alone.nodes, rtol=1e-10, atol=1e-12)


def test_a_probe_that_breaks_down_leaves_the_block():
    """A start vector inside a 3-dimensional invariant subspace stops after 3 steps (breakdown);
    the other probe runs its full count, and both agree with running alone.
    """
    n = 30
    lam = np.linspace(-1.0, 2.0, n)
    A = torch.from_numpy(np.diag(lam))
    z_small = np.zeros(n)
    z_small[[0, 5, 9]] = 1.0
    z_full = rademacher_slice(n, 0, n, seed=1, probe=0)
    got = lanczos_lockstep(lambda V: A @ V, n, None, [z_small, z_full], probes=[7, 8], steps=10,
                           state_dtype=torch.float64)
    assert got[0].steps == 3 and got[0].breakdown
    np.testing.assert_allclose(np.sort(got[0].nodes), lam[[0, 5, 9]], atol=1e-12)  # exact Gauss rule
    assert got[1].steps == 10 and not got[1].breakdown
    alone = lanczos(lambda v: A @ v, n, None, z_full, steps=10, state_dtype=torch.float64)
    np.testing.assert_allclose(got[1].alpha, alone.alpha, rtol=1e-12, atol=1e-14)


def test_block_product_falls_back_to_matvec():
    A = _matrix(12, 1)

    class OnlyMatvec:
        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return A @ v

    V = torch.from_numpy(np.random.default_rng(0).standard_normal((12, 3)))
    torch.testing.assert_close(block_product(OnlyMatvec())(V), A @ V)


def test_network_hessian_in_lockstep_matches_sequential():
    """The Hessian of a small network in float64: matmat shares the passes over the data."""
    from hpcqml.hessian.hvp import HessianLinearOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    op = HessianLinearOperator(model, (x, y), torch.nn.CrossEntropyLoss(), route="double-backward")
    n = op.n
    starts = [rademacher_slice(n, 0, n, seed=5, probe=p) for p in range(3)]
    got = lanczos_lockstep(block_product(op), n, None, starts, probes=[0, 1, 2], steps=10,
                           state_dtype=torch.float64)
    for p, z in enumerate(starts):
        alone = lanczos(op.matvec, n, None, z, steps=10, state_dtype=torch.float64)
        np.testing.assert_allclose(got[p].nodes, alone.nodes, rtol=1e-9, atol=1e-11)


def test_mismatched_starts_and_probes_are_refused():
    with pytest.raises(ValueError, match="one start per probe"):
        lanczos_lockstep(lambda V: V, 4, None, [np.ones(4)], probes=[0, 1], steps=2)
