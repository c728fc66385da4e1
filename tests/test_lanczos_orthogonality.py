"""The Krylov basis of :func:`hpcqml.hessian.lanczos.lanczos` is orthonormal under full reorthogonalisation.

The basis is never returned, but every basis vector ``v_j`` passes through the product:
``matvec`` is called exactly on ``v_1, ..., v_k``. Recording those inputs gives ``V_k`` and
the checks ``||V_k^T V_k - I||`` and ``V_k^T H V_k = T_k`` need nothing from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import lanczos, rademacher_slice

torch.set_num_threads(1)

N = 300
STEPS = 120


def _spread_matrix() -> np.ndarray:
    """Symmetric ``Q diag(d) Q^T`` with a few large, well separated eigenvalues.

    The extreme Ritz values converge within a few dozen steps; the plain three-term
    recurrence then loses orthogonality (Paige's theorem), which is what reorthogonalisation
    must prevent.
    """
    rng = np.random.default_rng(7)
    d = np.concatenate([np.geomspace(1e-3, 1.0, N - 5), [5.0, 10.0, 20.0, 40.0, 100.0]])
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (q * d) @ q.T


def _recorded_basis(H: np.ndarray, reorth: str, dtype: torch.dtype) -> tuple[np.ndarray, object]:
    """Run Lanczos on the dense ``H`` and return the vectors it multiplied (rows) and the result."""
    Ht = torch.from_numpy(H).to(dtype)
    seen: list[np.ndarray] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.detach().to(torch.float64).numpy().copy())
        return Ht @ v.to(dtype)

    z = rademacher_slice(N, 0, N, seed=11, probe=0)
    res = lanczos(matvec, N, None, z, steps=STEPS, reorth=reorth, state_dtype=dtype)
    return np.array(seen), res


@pytest.mark.parametrize("dtype, tol", [
    # float64: a Gram-Schmidt pass against orthonormal vectors leaves ~k*eps = 120*1.1e-16 ~ 1e-14;
    # the bound 1e-10 is four orders above that and ten below the O(1) loss without it.
    (torch.float64, 1e-10),
    # float32 storage: every stored vector is rounded to eps32 = 6e-8, so entries of V^T V - I
    # are ~sqrt(n) * eps32 ~ 1e-6 each and the spectral norm at most k times that ~ 1e-4.
    (torch.float32, 1e-3),
])
def test_full_reorthogonalisation_keeps_the_basis_orthonormal(dtype, tol):
    H = _spread_matrix()
    V, res = _recorded_basis(H, "full", dtype)
    k = res.steps
    assert V.shape == (k, N) and k == STEPS
    gram = V @ V.T
    assert np.linalg.norm(gram - np.eye(k), 2) < tol
    # V^T H V is the tridiagonal matrix the recurrence reported (same tolerance scaled by ||H|| = 100).
    T = np.diag(res.alpha) + np.diag(res.beta[:k - 1], 1) + np.diag(res.beta[:k - 1], -1)
    assert np.abs(V @ H @ V.T - T).max() < 100.0 * tol
    # The start vector is z/||z||.
    z = rademacher_slice(N, 0, N, seed=11, probe=0)
    np.testing.assert_allclose(V[0], z / np.linalg.norm(z), atol=10 * float(torch.finfo(dtype).eps))


def test_without_reorthogonalisation_the_basis_loses_orthogonality():
    """The same run with ``reorth = "none"`` is far from orthonormal: the check above can fail."""
    V, _ = _recorded_basis(_spread_matrix(), "none", torch.float64)
    assert np.linalg.norm(V @ V.T - np.eye(V.shape[0]), 2) > 0.5


def test_full_lanczos_reproduces_the_dense_spectrum():
    """``k = n`` full-reorthogonalised steps: the Ritz values are the eigenvalues and the Gauss
    weights the squared components of the start vector (ground truth from ``numpy.linalg.eigh``).
    """
    n = 40
    rng = np.random.default_rng(3)
    A = rng.standard_normal((n, n))
    H = (A + A.T) / 2
    lam, Q = np.linalg.eigh(H)
    z = rademacher_slice(n, 0, n, seed=5, probe=2)
    res = lanczos(lambda v: torch.from_numpy(H) @ v, n, None, z, steps=n, reorth="full",
                  state_dtype=torch.float64)
    assert res.steps == n and res.breakdown
    # Backward-stable tridiagonalisation: eigenvalue errors ~ n eps ||H|| ~ 40 * 2e-16 * 15 ~ 1e-13.
    np.testing.assert_allclose(res.nodes, lam, atol=1e-9)
    np.testing.assert_allclose(res.weights, (Q.T @ z) ** 2 / (z @ z), atol=1e-9)
    assert res.quad_form == pytest.approx(z @ H @ z, rel=1e-12, abs=1e-9)
