"""Carleman bounds and error splits checked against their definitions, evaluated independently.

"measured <= bound" alone passes for any inflated bound; here every stored bound is
recomputed with numpy from the definition (the a-posteriori bound of the discrete map,
docs/science.md; eq. II.8 for the lifted error, eq. V.20-V.22 for the split) and from a
dense eigen/singular-value decomposition of the Carleman matrix, and compared entry by entry.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_cli
from hpcqml.carleman import reference as ref
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import from_dict, lift


def _power_sum_bound(norm: float, r: np.ndarray) -> np.ndarray:
    """``B(t) = sum_{s<t} norm^(t-1-s) r(s)``, t = 0..T, as the explicit double sum."""
    T = r.size
    return np.array([sum(norm ** (t - 1 - s) * r[s] for s in range(t)) for t in range(T + 1)])


@pytest.mark.parametrize("norm", [0.0, 0.7, 1.0, 1.3])
def test_discrete_bound_is_the_power_sum(norm):
    r = np.array([0.5, 0.0, 2.0, 1e-3, 0.25, 3.0])
    # Horner's rule and the double sum differ only by rounding: a few ulps of B(T) <= 30.
    np.testing.assert_allclose(ts.discrete_bound(norm, r), _power_sum_bound(norm, r), rtol=1e-13, atol=0)


def test_discrete_bound_is_attained_by_aligned_residuals():
    """Tightness on the worst case: with I + A = s * I (a scaled identity, ||I+A|| = s) and all
    residuals pointing the same way, eta(t+1) = s eta(t) + r(t) has ||eta(t)|| = B(t) exactly,
    so any inflation of B is visible as a mismatch with a trajectory, not only with a formula.
    """
    s = 0.9
    r = np.array([1.0, 0.5, 0.25, 2.0])
    direction = np.array([0.6, 0.8])
    eta = [np.zeros(2)]
    for rs in r:
        eta.append(s * eta[-1] + rs * direction)
    np.testing.assert_allclose(ts.discrete_bound(s, r), [np.linalg.norm(e) for e in eta], rtol=1e-14)


@pytest.fixture(scope="module")
def qcm_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qcm")
    cfg = tmp / "qcm.toml"
    cfg.write_text(f'[run]\noutput = "{tmp / "out.h5"}"\nstages = ["qcm"]\n\n[qcm]\n'
                   "n = 2\nf = [0.5]\nseeds = [3]\nN = [1, 2, 3]\nT = 8\neta = 0.5\nstep_sizes = []\nN_ref = 5\n")
    res = run_cli("--quiet", "run", str(cfg))
    assert res.returncode == 0, res.stderr
    return tmp / "out.h5"


def _case(fh):
    (label,) = list(fh["qcm"])
    return fh[f"qcm/{label}"]


@pytest.mark.parametrize("N", [1, 2, 3])
def test_stage_bound_norm_and_residuals_match_the_definitions(qcm_file, N):
    with h5py.File(qcm_file, "r") as fh:
        case = _case(fh)
        ode = from_dict(case["instance"])
        g = case[f"N_{N}"]
        T = int(g.attrs["T"])
        u = ref.exact_recurrence(ode, T)
        A = ref.carleman_matrix(ode, N).toarray()
        b = ref.carleman_rhs(ode, N)
        D = A.shape[0]
        # ||I + A||_2 from LAPACK (relative error ~ D eps); the stage may use SLEPc, tol 1e-10.
        norm_IA = np.linalg.norm(np.eye(D) + A, 2)
        assert g.attrs["norm_I_plus_A"] == pytest.approx(norm_IA, rel=1e-8)
        # r(t) = lift(u(t+1)) - (I + A) lift(u(t)) - b: the lifted exact trajectory's one-step defect.
        r = np.array([np.linalg.norm(lift(u[t + 1], N) - (np.eye(D) + A) @ lift(u[t], N) - b) for t in range(T)])
        np.testing.assert_allclose(g["residual_norm"][()], r, rtol=1e-9, atol=1e-15)
        bound = _power_sum_bound(norm_IA, r)
        # Values are O(u^2) ~ 1e-2; relative 1e-8 covers the norm's tolerance times T powers.
        np.testing.assert_allclose(g["bound_discrete"][()], bound, rtol=1e-8, atol=1e-15)
        assert g.attrs["bound_discrete"] == pytest.approx(bound[-1], rel=1e-8)
        # Ground truth under the bound: the lifted error of the stored Carleman solution (eq. II.8).
        eta = np.array([np.linalg.norm(lift(u[t], N) - g["y"][t]) for t in range(T + 1)])
        np.testing.assert_allclose(g["eta_norm"][()], eta, rtol=1e-8, atol=1e-14)
        assert np.all(eta <= bound * (1 + 1e-9) + 1e-13)
        assert g.attrs["holds_discrete"] == "true"  # three-valued: "true", "false" or "not evaluated"


@pytest.mark.parametrize("N", [1, 2, 3])
def test_stage_split_matches_independent_trajectories(qcm_file, N):
    """truncation = y1^(N_ref) - y1^(N), discreteness = u - y1^(N_ref) (eq. V.20-V.22), each
    against forward iterations of the dense reference Carleman map (not against each other).
    """
    with h5py.File(qcm_file, "r") as fh:
        case = _case(fh)
        ode = from_dict(case["instance"])
        T, N_ref = int(case[f"N_{N}"].attrs["T"]), int(case.attrs["N_ref"])
        u = ref.exact_recurrence(ode, T)

        def y1(order: int) -> np.ndarray:
            y = ref.forward_iteration(ref.carleman_matrix(ode, order), ref.carleman_rhs(ode, order),
                                      lift(ode.u_in, order), T)
            return y[:, : ode.n]

        # The stored split comes from the KSP solve (rtol 1e-12 of values ~0.1), not from forward
        # iteration; the absolute tolerance 1e-12 is that solve accuracy.
        np.testing.assert_allclose(case[f"split/N_{N}/truncation"][()], y1(N_ref) - y1(N), rtol=0, atol=1e-12)
        np.testing.assert_allclose(case[f"split/N_{N}/discreteness"][()], u - y1(N_ref), rtol=0, atol=1e-12)
        np.testing.assert_allclose(case[f"split/N_{N}/total"][()], u - y1(N), rtol=0, atol=1e-12)
        # Neither part is trivially zero here: each is at least 100x the tolerance above, so
        # swapping or dropping a part cannot pass.
        for part in ("truncation", "discreteness"):
            assert np.abs(case[f"split/N_{N}/{part}"][()]).max() > 1e-10


@pytest.mark.parametrize("N", [1, 2, 3])
def test_stage_mode_counts_match_dense_eigenvalues(qcm_file, N):
    """dissipative_modes = #{a : |1 + a| < 1} over the eigenvalues of the dense Carleman matrix (eq. II.28)."""
    with h5py.File(qcm_file, "r") as fh:
        case = _case(fh)
        ode = from_dict(case["instance"])
        g = case[f"N_{N}"]
        a = np.linalg.eigvals(ref.carleman_matrix(ode, N).toarray())
        growth = np.abs(1.0 + a)
        assert np.abs(growth - 1.0).min() > 1e-6   # no mode on the boundary: the count is well defined
        dissipative = int(np.sum(growth < 1.0))
        assert 0 < dissipative < a.size             # both kinds present: a swapped test would show
        assert g.attrs["dissipative_modes"] == dissipative
        assert g.attrs["divergent_modes"] == a.size - dissipative
        np.testing.assert_allclose(np.sort_complex(g["eigenvalues"][()]), np.sort_complex(a), atol=1e-10)


@pytest.mark.parametrize("N", [1, 2, 3])
def test_stage_a_priori_bounds_match_their_formulas(qcm_file, N):
    """Eq. II.57 and the kappa bounds (eq. II.81, II.83) from LAPACK norms of the dense matrices.

    ||A||, sigma_min(A), ||F_l|| and kappa(M) here come from numpy's SVD of the dense reference
    matrices (relative error ~ dim * eps ~ 1e-14); the stage's come from SLEPc/LAPACK on the
    PETSc matrices with tolerance svd_tol (1e-10 by default), hence rel = 1e-8.
    """
    with h5py.File(qcm_file, "r") as fh:
        case = _case(fh)
        ode = from_dict(case["instance"])
        g = case[f"N_{N}"]
        T = int(g.attrs["T"])
        u = ref.exact_recurrence(ode, T)
        A = ref.carleman_matrix(ode, N).toarray()
        sv = np.linalg.svd(A, compute_uv=False)
        u_bar = max(np.linalg.norm(u[t]) for t in range(T + 1))                    # eq. II.53
        F_norms = [np.linalg.norm(F.toarray(), 2) for F in ode.F]
        s = sum((ell - 1) * F_norms[ell] for ell in range(2, len(F_norms)))
        assert s > 0 and u_bar > 0
        # eq. II.57 with ||A||^-1 read as 1/||A|| and as ||A^-1|| = 1/sigma_min(A)
        assert g.attrs["bound_II57"] == pytest.approx(3 * N / sv[0] * u_bar ** (N + 1) * s, rel=1e-8)
        assert g.attrs["bound_II57_inverse_norm"] == pytest.approx(3 * N / sv[-1] * u_bar ** (N + 1) * s, rel=1e-8)
        M, _ = ref.block_system(ref.carleman_matrix(ode, N), ode, N, T)
        assert g.attrs["kappa_M"] == pytest.approx(np.linalg.cond(M.toarray()), rel=1e-8)
        nIA = np.linalg.norm(np.eye(A.shape[0]) + A, 2)
        assert g.attrs["kappa_bound_general"] == pytest.approx((1 + nIA) * sum(nIA ** t for t in range(T + 1)),
                                                               rel=1e-8)                                # eq. II.81
        assert g.attrs["kappa_bound_II83"] == 2 * (T + 1)                                                 # eq. II.83
        assert bool(g.attrs["kappa_bound_II83_applies"]) == (nIA < 1)
