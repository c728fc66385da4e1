"""MPI tests of the distributed Carleman assembly, KSP solve and SLEPc spectra.

Every rank runs the same collective calls in the same order; results must equal the serial
scipy/numpy reference (hence the 1-rank numbers) under mpirun -n 1, 2 and 3.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from mpi4py import MPI

from hpcqml.carleman import generators as gen
from hpcqml.carleman import petsc_assembly as pa
from hpcqml.carleman import reference as ref
from hpcqml.carleman import spectra
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE, lift
from hpcqml.carleman.system import CarlemanCase
from hpcqml.parallel import block_bounds
from hpcqml.petsc import PetscOwner

COMM = MPI.COMM_WORLD


def to_scipy_all(mat) -> sp.csr_matrix:
    """Gather a distributed AIJ matrix to a scipy CSR on every rank (small matrices)."""
    r0, r1 = mat.getOwnershipRange()
    indptr, indices, data = mat.getValuesCSR()
    comm = mat.getComm().tompi4py()
    parts = comm.allgather((np.asarray(indptr, np.int64), np.asarray(indices, np.int64), np.asarray(data)))
    m, n = mat.getSize()
    blocks = [sp.csr_matrix((d, i, p), shape=(p.shape[0] - 1, n)) for p, i, d in parts]
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def solve_block_system(ode, N, T, comm):
    """M X = B solved by the case's owner (:class:`CarlemanCase`), as the qcm stage does."""
    with CarlemanCase(ode, N, T, comm) as case:
        return case.solve()


def _cubic(n: int = 2, seed: int = 7) -> PolynomialODE:
    rng = np.random.default_rng(seed)
    F = [sp.csr_matrix(rng.uniform(-0.1, 0.1, (n, 1)))]
    for ell in (1, 2, 3):
        dense = rng.uniform(-0.2, 0.2, (n, n**ell))
        dense[rng.random(dense.shape) < 0.3] = 0.0  # some sparsity
        F.append(sp.csr_matrix(dense))
    return PolynomialODE(F=F, u_in=rng.uniform(-0.3, 0.3, n))


INSTANCES = {"q2": lambda: gen.random_quadratic(3, 0.7, 1), "q3": _cubic,
             "q2_sparse": lambda: gen.sparse_quadratic(5, 0.8, 2)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(INSTANCES))
@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_assembly_equals_reference(name, N):
    ode = INSTANCES[name]()
    A, stats = pa.assemble_carleman(ode, N, COMM)
    want = ref.carleman_matrix(ode, N)
    got = to_scipy_all(A)
    assert got.shape == want.shape == (stats.rows, stats.rows)
    diff = abs(got - want)
    assert (diff.max() if diff.nnz else 0.0) <= 1e-14
    assert stats.nnz == got.nnz and stats.exact_preallocation
    r0, r1 = A.getOwnershipRange()
    assert (r0, r1) == block_bounds(stats.rows, COMM.rank, COMM.size)
    A.destroy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["q2", "q3"])
def test_block_system_and_ksp_equal_forward_iteration(name):
    ode = INSTANCES[name]()
    ode = PolynomialODE(F=[0.3 * F for F in ode.F], u_in=ode.u_in)
    N, T = 3, 12
    M, B, stM = pa.assemble_block_system(ode, N, T, COMM)
    assert stM.exact_preallocation and stM.rows == (T + 1) * ref.carleman_matrix(ode, N).shape[0]
    A_ref = ref.carleman_matrix(ode, N)
    M_ref, rhs_ref = ref.block_system(A_ref, ode, N, T)
    assert abs(to_scipy_all(M) - M_ref).max() <= 1e-14
    np.testing.assert_array_equal(pa.to_numpy_all(B), rhs_ref)
    M.destroy()
    B.destroy()
    res = solve_block_system(ode, N, T, COMM)
    Y = ref.forward_iteration(A_ref, ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
    assert res.reason > 0
    assert res.iterations <= COMM.size + 2  # nilpotent preconditioned operator, see timestepping doc
    assert np.linalg.norm(res.X - Y) <= 1e-10 * np.linalg.norm(Y)
    A, _ = pa.assemble_carleman(ode, N, COMM)
    Yp = ts.petsc_forward_iteration(A, ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
    np.testing.assert_allclose(Yp, Y, rtol=1e-12, atol=1e-15)
    A.destroy()


@pytest.mark.timeout(120)
def test_eigenvalues_norms_and_kappa_match_dense():
    ode = gen.scale_step(gen.random_quadratic(3, 1.0, 2), 0.25)
    N, T = 2, 6
    Ad = ref.carleman_matrix(ode, N).toarray()
    sv = np.linalg.svd(ref.block_system(ref.carleman_matrix(ode, N), ode, N, T)[0].toarray(), compute_uv=False)
    with CarlemanCase(ode, N, T, COMM) as case:
        eigs, method = case.eigenvalues()
        dense = np.linalg.eigvals(Ad)
        assert eigs.shape == dense.shape and "lapack" in method
        assert np.max(np.min(np.abs(eigs[:, None] - dense[None, :]), axis=1)) < 1e-10
        dis, div = spectra.dissipative_counts(eigs)
        assert (dis, div) == (int(np.sum(np.abs(1 + dense) < 1)), int(np.sum(np.abs(1 + dense) >= 1)))
        norms = case.norms(tol=1e-12)
        assert norms.norm_IA == pytest.approx(np.linalg.norm(np.eye(len(Ad)) + Ad, 2), rel=1e-9)
        assert norms.norm_A == pytest.approx(np.linalg.norm(Ad, 2), rel=1e-9)
        assert norms.norm_IA < 1.0
        # Lanczos for the largest singular value beyond dense_limit agrees with the dense one
        norm_IA_lanczos, m = spectra.singular_value(case.identity_plus_A(), case, "largest", tol=1e-12, dense_limit=0)
        assert "trlanczos" in m and norm_IA_lanczos == pytest.approx(norms.norm_IA, rel=1e-9)
        rep = case.condition(norms.norm_IA, tol=1e-12)
        assert rep.kappa == pytest.approx(sv[0] / sv[-1], rel=1e-8)
        assert rep.kappa <= rep.bound_II83 == 2 * (T + 1) and rep.holds_II83    # eq. II.83
        assert rep.kappa <= rep.bound_general * (1 + 1e-12) and rep.holds_general  # eq. II.81
        # the iterative (Lanczos) smallest singular value agrees with the dense one too
        smin, m = spectra.singular_value(case.M, case, "smallest", tol=1e-12, dense_limit=0)
        assert "trlanczos" in m and smin == pytest.approx(sv[-1], rel=1e-8)
        smin2, m2 = spectra.smallest_singular_value_by_inverse(case.M, case, tol=1e-12)
        assert "M^-1" in m2 and smin2 == pytest.approx(sv[-1], rel=1e-8)
        objects = list(case._objects)
    assert all(obj.handle == 0 for obj in objects)


@pytest.mark.timeout(120)
def test_zero_carleman_matrix_is_exact_on_every_rank_count():
    """A = 0 (F1 = F2 = 0): eigenvalues and ‖A‖ are exactly 0, κ(M) that of the bidiagonal of I and -I."""
    n, N, T = 2, 2, 5
    ode = PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.csr_matrix((n, n)), sp.csr_matrix((n, n * n))],
                        u_in=np.array([0.1, 0.2]))
    B = np.eye(T + 1) - np.eye(T + 1, k=-1)
    s = np.linalg.svd(B, compute_uv=False)
    with CarlemanCase(ode, N, T, COMM) as case:
        eigs, method = case.eigenvalues(dense_limit=0)
        assert method == "zero matrix (exact)" and np.all(eigs == 0)
        norms = case.norms(dense_limit=0)
        assert norms.norm_A == 0.0 and norms.norm_IA == pytest.approx(1.0, rel=1e-10)
        for dense_limit in (0, 10_000):  # Lanczos + inverse iteration, and dense LAPACK
            rep = case.condition(norms.norm_IA, tol=1e-12, dense_limit=dense_limit)
            assert rep.kappa == pytest.approx(s[0] / s[-1], rel=1e-9)
        X = case.solve().X
    np.testing.assert_allclose(X, np.tile(lift(ode.u_in, N), (T + 1, 1)), rtol=1e-12)


@pytest.mark.timeout(120)
def test_extremal_eigenvalues_beyond_dense_limit():
    ode = gen.scale_step(gen.random_quadratic(4, 0.7, 3), 0.25)
    with PetscOwner() as owner:
        A, _ = pa.assemble_carleman(ode, 3, COMM, owner=owner)
        eigs, method = spectra.eigenvalues(A, owner, dense_limit=10, nev=4, tol=1e-12)
    dense = np.linalg.eigvals(ref.carleman_matrix(ode, 3).toarray())
    assert "krylovschur" in method
    assert np.max(eigs.real) == pytest.approx(np.max(dense.real), abs=1e-9)
    assert np.min(eigs.real) == pytest.approx(np.min(dense.real), abs=1e-9)
    A.destroy()


def _noisy(name: str, T: int) -> PolynomialODE:
    """INSTANCES[name] scaled by 0.3 with F0 on row 0 and SGD noise F0_t on rows 0 and n-1 (union support)."""
    ode = INSTANCES[name]()
    n = ode.n
    F0 = np.zeros((n, 1))
    F0[0, 0] = 0.01
    noise = np.zeros((T, n))
    rng = np.random.default_rng(11)
    noise[:, 0] = 0.02 * rng.standard_normal(T)
    noise[:, n - 1] = 0.02 * rng.standard_normal(T)
    return PolynomialODE(F=[sp.csr_matrix(F0)] + [0.3 * F for F in ode.F[1:]], u_in=ode.u_in, F0_t=noise)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["q2", "q3"])
@pytest.mark.parametrize("N", [1, 2, 3])
def test_f0_t_block_system_equals_reference_and_forward_iteration(name, N):
    T = 5
    ode = _noisy(name, T)
    for t in (0, T - 1):
        At, st = pa.assemble_carleman(ode, N, COMM, t=t)
        diff = abs(to_scipy_all(At) - ref.carleman_matrix(ode, N, t))
        assert (diff.max() if diff.nnz else 0.0) <= 1e-14 and st.exact_preallocation
        At.destroy()
    M, B, stM = pa.assemble_block_system(ode, N, T, COMM)
    M_ref, rhs_ref = ref.block_system(None, ode, N, T)
    diff = abs(to_scipy_all(M) - M_ref)
    assert (diff.max() if diff.nnz else 0.0) <= 1e-14
    assert stM.exact_preallocation and stM.rows == M_ref.shape[0]
    np.testing.assert_array_equal(pa.to_numpy_all(B), rhs_ref)
    M.destroy()
    B.destroy()
    res = solve_block_system(ode, N, T, COMM)
    Y = ref.forward_iteration_t(ode, N, T)
    assert res.reason > 0 and res.iterations <= COMM.size + 2
    assert np.linalg.norm(res.X - Y) <= 1e-10 * np.linalg.norm(Y)
    Yp = ts.petsc_forward_iteration_t(ode, N, T, COMM)
    np.testing.assert_allclose(Yp, Y, rtol=1e-12, atol=1e-15)


@pytest.mark.timeout(120)
def test_case_objects_are_destroyed_on_every_rank_after_an_error():
    ode = gen.scale_step(gen.random_quadratic(3, 0.7, 1), 0.25)
    with pytest.raises(ZeroDivisionError):
        with CarlemanCase(ode, 2, 4, COMM) as case:
            case.solve()
            case.norms()
            objects = list(case._objects)
            raise ZeroDivisionError("an error inside the case")
    assert objects and all(obj.handle == 0 for obj in objects)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["q2", "q3"])
@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_discrete_lift_assembly_and_ksp_equal_reference(name, noise):
    """The exact lift of the map (lift_kind = "discrete"): distributed A_d equals the recursive-Kronecker
    reference, and the KSP solution of its M equals the serial iteration y(t+1) = L y(t) + c."""
    from hpcqml.carleman import discrete

    ode = INSTANCES[name]()
    ode = PolynomialODE(F=[0.3 * F for F in ode.F], u_in=ode.u_in)
    N, T = 3, 6
    ode = gen.with_f0_noise(ode, noise, T, 1)
    A, stats = pa.assemble_carleman(ode, N, COMM, lift_kind="discrete")
    diff = abs(to_scipy_all(A) - discrete.reference_matrix(ode, N)[0])
    assert (diff.max() if diff.nnz else 0.0) <= 1e-14 and stats.exact_preallocation
    A.destroy()
    with CarlemanCase(ode, N, T, COMM, lift_kind="discrete") as case:
        X = case.solve().X
    # KSP rtol 1e-12 on unit lower-triangular M of norm <= 3: same numbers as one rank to 1e-12
    np.testing.assert_allclose(X, discrete.trajectory(ode, N, T), rtol=0, atol=1e-12)


def test_solution_gathered_to_root_only():
    """solve(gather="root"): rank 0 holds the same X as the all-ranks gather, the others hold nothing."""
    ode = gen.scale_step(gen.random_quadratic(3, 0.5, 2), 0.25)
    with CarlemanCase(ode, 2, 5, COMM) as case:
        X_all = case.solve().X
        X_root = case.solve(gather="root").X
    if COMM.Get_rank() == 0:
        # the same KSP solve twice on the same ranks; 1e-13 allows for a reduction order that is not fixed
        np.testing.assert_allclose(X_root, X_all, rtol=1e-13, atol=1e-15)
    else:
        assert X_root is None


def test_distributed_errors_match_the_gathered_ones(monkeypatch):
    """With X left distributed (above the store-whole limit) eta_1, y_1 and ||eta(t)|| equal the
    values computed from the gathered X (eq. II.8).

    Both reports solve M X = B afresh with the same KSP on the same ranks; eta_1 and y_1 are the
    solution's numbers moved, and ||eta(t)|| is a sum of squares added over ranks instead of one
    norm, which differs by a few ulps: 1e-13 relative covers both.
    """
    from hpcqml.carleman import analysis
    from hpcqml.carleman.cases import random_instance

    cfg = {"T": 6, "N": [2], "N_ref": 0, "ref_max_dim": 20000, "eps": 1e-3, "dense_limit": 3000, "nev": 20,
           "svd_tol": 1e-10, "ksp_rtol": 1e-12, "kappa": False, "power_norm_flops": 2e9}
    ode = random_instance("random", 3, 0.5, 4, eta=0.25, u_scale=0.1)
    case = analysis.CaseReference(cfg, "t", ode, {"seed": 4})
    whole = analysis.order_report(case, cfg, 2, COMM)
    monkeypatch.setattr(analysis, "STORE_WHOLE_LIMIT", 0)
    split = analysis.order_report(case, cfg, 2, COMM)
    np.testing.assert_allclose(split.arrays["eta1"], whole.arrays["eta1"], rtol=1e-13, atol=1e-18)
    np.testing.assert_allclose(split.arrays["eta_norm"], whole.arrays["eta_norm"], rtol=1e-13, atol=1e-18)
    if COMM.Get_rank() == 0:
        np.testing.assert_allclose(split.arrays["y"], whole.arrays["y"][:, :3], rtol=1e-13, atol=1e-18)
    else:
        assert "y" not in split.arrays and "y" not in whole.arrays
