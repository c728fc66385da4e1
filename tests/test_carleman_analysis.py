"""The typed order report of hpcqml.carleman.analysis: its numbers against independent dense
computations, and its HDF5 layout written once and read back unchanged.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

CFG = {"T": 8, "N": [2], "N_ref": 0, "ref_max_dim": 20000, "eps": 1e-3, "dense_limit": 3000, "nev": 20,
       "svd_tol": 1e-10, "ksp_rtol": 1e-12, "kappa": True, "power_norm_flops": 2e9}


@pytest.fixture(scope="module")
def report_and_case():
    from hpcqml.carleman import analysis
    from hpcqml.carleman.cases import random_instance

    ode = random_instance("random", 2, 0.5, 1, eta=0.25, u_scale=0.1)
    case = analysis.CaseReference(CFG, "t", ode, {"seed": 1})
    return analysis.order_report(case, CFG, 2, MPI.COMM_SELF, "paper"), case


def test_errors_and_kappa_match_dense_computations(report_and_case):
    """max ||eta_1||, ||I+A||, kappa(M) and ||(I+A)^t|| against numpy on the serial matrices."""
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman.instance import lift

    rep, case = report_and_case
    ode, N, T = case.ode, 2, CFG["T"]
    A = ref.carleman_matrix(ode, N)
    Y = ref.forward_iteration(A, ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
    u = ref.exact_recurrence(ode, T)
    err = np.linalg.norm(u - Y[:, : ode.n], axis=1)
    # the KSP solution equals the forward iteration to ~1e-16 relative (exact ILU of a unit lower
    # triangular M); errors are O(1e-4) here, so 1e-9 relative is generous
    np.testing.assert_allclose(rep.arrays["eta1_norm"], err, rtol=1e-9, atol=1e-15)
    assert rep.max_error == pytest.approx(float(err.max()), rel=1e-9)
    IA = np.eye(A.shape[0]) + A.toarray()
    # LAPACK SVD on both sides: agreement to a few ulps of ||I+A|| ~ 1
    assert rep.attrs["norm_I_plus_A"] == pytest.approx(np.linalg.norm(IA, 2), rel=1e-12)
    M, _ = ref.block_system(A, ode, N, T)
    assert rep.kappa == pytest.approx(np.linalg.cond(M.toarray()), rel=1e-8)   # kappa ~ 10: SVD error ~1e-15 kappa
    powers = [np.linalg.norm(np.linalg.matrix_power(IA, t), 2) for t in range(T + 1)]
    np.testing.assert_allclose(rep.power_norms, powers, rtol=1e-12)
    assert set(rep.flags.values()) <= {"true", "false", "not evaluated"}
    assert all(rep.flags[name] == "false" for name in rep.violated)


def test_group_round_trip(tmp_path, report_and_case):
    """to_group then from_group gives the same attributes and arrays; every dataset has units."""
    from hpcqml.carleman.analysis import OrderReport

    rep, _ = report_and_case
    with h5py.File(tmp_path / "r.h5", "w") as fh:
        rep.to_group(fh.create_group("qcm/t/N_2"))
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        g = fh["qcm/t/N_2"]
        assert all("units" in d.attrs and "description" in d.attrs for d in g.values())
        back = OrderReport.from_group(g)
    assert back.N == 2 and back.lift == "paper"
    assert set(back.attrs) == set(rep.attrs)
    for key, val in rep.attrs.items():
        if isinstance(val, float) and np.isnan(val):
            assert np.isnan(back.attrs[key])
        else:
            assert back.attrs[key] == val, key
    assert set(back.arrays) == set(rep.arrays)
    for key, val in rep.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], val)
