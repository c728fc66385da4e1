"""Top-k eigenpairs (thick-restart Lanczos) and deflated SLQ against exact dense computations."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian.eigenpairs import (
    DeflatedOperator,
    deflated_probe,
    deflated_slq,
    top_eigenpairs,
)
from hpcqml.hessian.hvp import HessianLinearOperator

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


class Dense:
    """A dense symmetric matrix as an operator (float64 products)."""

    def __init__(self, A: np.ndarray) -> None:
        self.A = torch.from_numpy(np.ascontiguousarray(A))
        self.n = A.shape[0]
        self.dtype = torch.float64

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.A @ v


def hessian_like(n: int, seed: int, outliers=(10.0, 8.0, 5.0, 4.0, -2.0, -1.5)) -> tuple[np.ndarray, np.ndarray]:
    """A random-basis matrix with a bulk near 0 and separated outliers of both signs."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([rng.normal(0.0, 0.05, n - len(outliers)), outliers])
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T), np.sort(lam)


def wanted(ev: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "largest":
        return np.sort(ev[-k:])
    if which == "smallest":
        return np.sort(ev[:k])
    if which == "largest_magnitude":
        return np.sort(ev[np.argsort(-np.abs(ev))[:k]])
    top, bottom = (k + 1) // 2, k // 2
    return np.sort(np.concatenate([ev[:bottom], ev[len(ev) - top:]]))


@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends", "largest_magnitude"])
@pytest.mark.parametrize("k", [1, 4])
def test_against_numpy_eigh(which, k):
    A, _ = hessian_like(150, seed=k)
    ev, vecs = np.linalg.eigh(A)
    pairs = top_eigenpairs(Dense(A), k, which, seed=3)
    norm = np.abs(ev).max()
    # the outliers are separated (gap >= 0.5 from the rest, |H| = 10), so with residual r <= tol |H|
    # (1.5e-7 here) the eigenvalue error is below r^2/gap ~ 1e-13 (Kato-Temple); 1e-10 |H| leaves room
    np.testing.assert_allclose(pairs.values, wanted(ev, k, which), rtol=0, atol=1e-10 * norm)
    U = pairs.gather_vectors()
    # independent residual check with the dense matrix, and against the exact eigenvectors
    res = np.linalg.norm(A @ U.T - U.T * pairs.values, axis=0)
    assert np.all(res <= pairs.tol * pairs.scale * (1 + 1e-6))
    np.testing.assert_allclose(res, pairs.residuals, rtol=1e-3, atol=1e-13 * norm)
    for i, lam in enumerate(pairs.values):
        j = int(np.argmin(np.abs(ev - lam)))
        # sin(angle) <= r/gap (Davis-Kahan) with gap >= 0.5: below 1e-6
        assert abs(abs(U[i] @ vecs[:, j]) - 1.0) < 1e-9
    assert U.shape == (k, 150) and pairs.vectors.shape == (k, 150)
    np.testing.assert_array_equal(pairs.gather_vector(k - 1), U[k - 1])


def test_against_scipy_eigsh_on_clustered_bulk():
    """Wanted values inside the bulk (no gap): restarts are needed; eigsh agrees."""
    A, ev = hessian_like(200, seed=5)
    pairs = top_eigenpairs(Dense(A), 6, "smallest", ncv=20, max_restarts=300, seed=1)
    ref = scipy.sparse.linalg.eigsh(A, k=6, which="SA", tol=1e-12, v0=np.ones(200), return_eigenvectors=False)
    assert pairs.restarts > 0
    # every value lies within its residual of an eigenvalue (residual bound, no gap assumption)
    for lam, r in zip(pairs.values, pairs.residuals, strict=True):
        assert np.min(np.abs(ev - lam)) <= r + 1e-12
    # and it is the wanted one: within 1e-6 of eigsh (bulk spacing ~1e-3, r <= 1.5e-7)
    np.testing.assert_allclose(pairs.values, np.sort(ref), rtol=0, atol=1e-6)


def test_small_network_hessian():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (40,), generator=g)
    H = HessianLinearOperator(net, (x, y), torch.nn.functional.cross_entropy)
    params = [p.detach() for p in net.parameters()]
    flat0 = torch.cat([p.reshape(-1) for p in params])

    def loss(flat):
        ps, o = [], 0
        for p in params:
            ps.append(flat[o:o + p.numel()].view_as(p))
            o += p.numel()
        names = [k for k, _ in net.named_parameters()]
        out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    dense = torch.autograd.functional.hessian(loss, flat0).numpy()
    ev = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    for which in ("largest", "both_ends"):
        pairs = top_eigenpairs(H, 3, which)
        # eigenvalue within its explicit residual of the exact one (Hessian products and the dense
        # Hessian agree to ~1e-15); residuals <= 1.5e-8 |H|
        np.testing.assert_allclose(pairs.values, wanted(ev, 3, which), rtol=0,
                                   atol=float(pairs.residuals.max()) + 1e-12)


def test_not_converged_raises_naming_residuals():
    A, _ = hessian_like(200, seed=5)
    with pytest.raises(NumericalError, match=r"not converged after 1 restarts.*residuals \["):
        top_eigenpairs(Dense(A), 6, "smallest", ncv=8, max_restarts=1)


def test_progress_callback_counts_products():
    A, _ = hessian_like(120, seed=2)
    calls = []
    pairs = top_eigenpairs(Dense(A), 3, "largest", on_progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == list(range(1, pairs.products + 1))
    assert all(t == calls[0][1] and d <= t for d, t in calls)


@pytest.mark.parametrize("kw, msg", [
    (dict(k=0), "k = 0"), (dict(k=200), "k = 200"), (dict(which="top"), "which = 'top'"),
    (dict(tol=0.0), "tol = 0.0"), (dict(ncv=3), "ncv = 3"), (dict(max_restarts=-1), "max_restarts"),
])
def test_bad_input(kw, msg):
    A, _ = hessian_like(100, seed=0)
    args = dict(k=4, which="largest") | kw
    with pytest.raises(UserError, match=re.escape(msg)):
        top_eigenpairs(Dense(A), args.pop("k"), **args)


def test_whole_space_and_invariant_start():
    """ncv = n (exact after one pass) and an operator with few distinct eigenvalues (breakdowns)."""
    A, ev = hessian_like(12, seed=4)
    pairs = top_eigenpairs(Dense(A), 12, "largest")
    np.testing.assert_allclose(pairs.values, ev, rtol=0, atol=1e-12 * np.abs(ev).max())
    D = np.diag(np.repeat([3.0, 1.0, -1.0], 20))  # Krylov space of dimension 3 from any start
    pairs = top_eigenpairs(Dense(D), 5, "largest", ncv=10)
    np.testing.assert_allclose(pairs.values, [1.0, 3.0, 3.0, 3.0, 3.0], rtol=0, atol=1e-12)


def test_deflated_operator_is_p_h_p():
    A, _ = hessian_like(60, seed=1)
    pairs = top_eigenpairs(Dense(A), 4, "largest_magnitude")
    U = pairs.gather_vectors()
    P = np.eye(60) - U.T @ U
    v = np.random.default_rng(0).standard_normal(60)
    out = DeflatedOperator(Dense(A), pairs).matvec(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(out, P @ A @ P @ v, rtol=0, atol=1e-12 * np.abs(A).sum())


def test_deflated_measure_is_unbiased_over_all_rademacher_probes():
    """Exhaustive expectation: all 2^n Rademacher vectors, n = 10, k = 2, m = 2 steps.

    For degree < 2m = 4 the mean of the per-probe measures equals tr(A^j)/n exactly (up to
    rounding, ~1e-13 relative); the ratio normalisation (n-k)/n is visibly biased.
    """
    n, k, m = 10, 2, 2
    A, ev = hessian_like(n, seed=7, outliers=(3.0, -2.0))
    pairs = top_eigenpairs(Dense(A), k, "largest_magnitude")
    defl = DeflatedOperator(Dense(A), pairs)
    grid = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    moments = np.zeros(4)
    ratio = np.zeros(4)
    for number, z in enumerate(grid):
        p = deflated_probe(defl, z, number, m)
        assert p.steps == m and not p.breakdown
        atoms = np.sum(pairs.values[None, :] ** np.arange(4)[:, None], axis=1) / n
        gauss = np.sum(p.weights[None, :] * p.nodes[None, :] ** np.arange(4)[:, None], axis=1)
        moments += atoms + p.slq_mass * gauss
        ratio += atoms + (n - k) / n * gauss
    moments /= grid.shape[0]
    ratio /= grid.shape[0]
    exact = np.array([np.sum(ev ** j) / n for j in range(4)])
    np.testing.assert_allclose(moments, exact, rtol=1e-11, atol=1e-12)
    # the normalised variant is biased: first moment off by 2.5e-4 here (deterministic: every
    # probe enumerated), eleven orders of magnitude above the rounding of the sums
    assert np.max(np.abs(ratio - exact)[1:]) > 1e-4


def test_deflated_spectrum_rows_and_estimates():
    A, ev = hessian_like(200, seed=3)
    pairs = top_eigenpairs(Dense(A), 6, "largest_magnitude")
    result = deflated_slq(Dense(A), pairs, probes=5, steps=15, seed=2)
    spec = result.spectrum()
    assert spec.nodes.shape == (5, 6 + 15)
    np.testing.assert_allclose(spec.nodes[:, :6], np.broadcast_to(pairs.values, (5, 6)))
    np.testing.assert_allclose(spec.weights[:, :6], 1.0 / 200)
    # Hutchinson on the complement: sum(atoms) + y^T H y; exact for the atoms part
    # each row's mass is (k + ||Pz||^2)/n
    for row, p in enumerate(result.probes):
        assert np.isclose(np.nansum(spec.weights[row]), (6 + p.start_norm2) / 200, rtol=1e-12)
    # E(t) with the cutoff above the bulk keeps only the atoms: exact, no probe variance
    est = spec.error_proxy(10, convention="paper", cutoff=1.0)
    keep = ev[np.abs(ev) >= 1.0]
    exact = np.mean(np.abs(1.0 - keep) ** 10)
    assert np.isclose(est.value, exact, rtol=1e-9) and est.stderr < 1e-9 * exact


def test_deflated_slq_bad_input():
    A, _ = hessian_like(30, seed=0)
    pairs = top_eigenpairs(Dense(A), 2, "largest")
    full = deflated_slq(Dense(A), pairs, probes=1, steps=40)  # at most n - k = 28 steps, then exact
    assert full.probes[0].steps == 28 and full.probes[0].breakdown
    with pytest.raises(UserError, match="at least one probe"):
        deflated_slq(Dense(A), pairs, probes=0, steps=3)
    with pytest.raises(UserError, match="size 30 cannot deflate one of size 20"):
        deflated_slq(Dense(A[:20, :20]), pairs, probes=1, steps=3)


def test_library_doc_eigenpairs_example_runs(tmp_path, monkeypatch):
    """The python block under the eigenpairs heading of docs/library.md runs as written."""
    text = (REPO / "docs" / "library.md").read_text()
    section = text.split("## Extreme eigenpairs and deflated SLQ", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    example = tmp_path / "eigenpairs_example.py"
    example.write_text(block)
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(example), run_name="__doc_example__")
    pairs, result = scope["pairs"], scope["deflated"]
    assert np.all(pairs.residuals <= pairs.tol * pairs.scale)
    assert result.spectrum().probe_count == 4


class Dense32(Dense):
    """The same matrix with float32 products (the pipeline's parameter dtype)."""

    def __init__(self, A: np.ndarray) -> None:
        super().__init__(A)
        self.A = self.A.to(torch.float32)
        self.dtype = torch.float32


def test_float32_products_converge_to_their_precision():
    A, ev = hessian_like(150, seed=6)
    pairs = top_eigenpairs(Dense32(A), 4, "both_ends")
    assert pairs.tol == pytest.approx(np.sqrt(np.finfo(np.float32).eps))
    # float32 products carry errors ~ sqrt(n) eps32 |H| ~ 1e-5 |H|; the certified residual bound
    # (<= 3.5e-4 |H|) plus that error bounds the distance to the exact eigenvalue
    np.testing.assert_allclose(pairs.values, wanted(ev, 4, "both_ends"), rtol=0,
                               atol=float(pairs.residuals.max()) + 1e-4 * np.abs(ev).max())
    result = deflated_slq(Dense32(A), pairs, probes=2, steps=10)
    assert np.all(np.isfinite(result.spectrum().nodes))
