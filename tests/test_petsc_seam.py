"""The PETSc seam (hpcqml.petsc): options prefixes reach every object, a diverged KSP is one line
naming its prefix and reason, and objects are destroyed when an exception leaves their owner.

Real PETSc objects on COMM_SELF / COMM_WORLD; no mocks.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hpcqml.errors import NumericalError

PETSc = pytest.importorskip("petsc4py.PETSc")
MPI = pytest.importorskip("mpi4py.MPI")


@pytest.fixture
def options():
    """Set PETSc options for one test and remove them afterwards (the database is process-global)."""
    opts = PETSc.Options()
    names: list[str] = []

    def setter(name: str, value: str) -> None:
        opts[name] = value
        names.append(name)

    yield setter
    for name in names:
        opts.delValue(name)


def _tridiagonal(n: int) -> sp.csr_matrix:
    """The 1-D Laplacian (2 on the diagonal, -1 beside it): symmetric positive definite, float64."""
    return sp.diags([-np.ones(n - 1), 2.0 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr", dtype=np.float64)


def test_prefix_reaches_mat_vec_ksp_and_pc(options):
    """-seam_mat_type, -seam_vec_type, -seam_ksp_type and -seam_pc_type each change their own object."""
    from hpcqml.petsc import PetscOwner, aij_from_csr, make_ksp, vec_for

    options("seam_mat_type", "aijperm")
    options("seam_vec_type", "standard")
    options("seam_ksp_type", "cg")
    options("seam_pc_type", "jacobi")
    with PetscOwner() as owner:
        mat = aij_from_csr(_tridiagonal(6), 6, MPI.COMM_SELF, owner, "seam_")
        b = vec_for(mat, owner, "seam_", "left", np.ones(6))
        ksp = make_ksp(mat, owner, prefix="seam_")
        assert mat.getType() == "seqaijperm"            # default would be seqaij
        assert mat.getOptionsPrefix() == "seam_" and b.getOptionsPrefix() == "seam_"
        assert b.getType() == "seq"                     # "standard" on one rank is seq
        assert ksp.getType() == "cg" and ksp.getPC().getType() == "jacobi"   # defaults gmres / ilu
        # without options the suite's own choices stand
        other = aij_from_csr(_tridiagonal(6), 6, MPI.COMM_SELF, owner, "other_")
        assert other.getType() == "seqaij"
        assert make_ksp(other, owner, prefix="other_").getType() == "gmres"


def test_matrix_from_csr_holds_the_given_entries():
    """The AIJ matrix built from local CSR rows equals the scipy matrix exactly (a copy, no arithmetic)."""
    from hpcqml.petsc import PetscOwner, aij_from_csr

    rng = np.random.default_rng(3)
    A = (sp.random(7, 7, density=0.4, random_state=rng, format="csr") + sp.eye(7)).tocsr()
    A.sort_indices()
    with PetscOwner() as owner:
        mat = aij_from_csr(A, 7, MPI.COMM_SELF, owner, "seam_")
        dense = owner.own(mat.convert("dense"))
        np.testing.assert_array_equal(dense.getDenseArray(), A.toarray())


def test_carleman_prefix_reaches_the_case_matrices(options):
    """-qcm_mat_type reaches A and M of a Carleman case, and the solve still matches the forward iteration."""
    from hpcqml.carleman import generators as gen
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman.instance import lift
    from hpcqml.carleman.system import CarlemanCase

    options("qcm_mat_type", "aijperm")
    ode = gen.logistic(1.0, 1.0, 0.1, h=0.25)
    with CarlemanCase(ode, 2, 5, MPI.COMM_SELF) as case:
        assert case.A.getType() == "seqaijperm" and case.M.getType() == "seqaijperm"
        X = case.solve().X
    Y = ref.forward_iteration(ref.carleman_matrix(ode, 2), ref.carleman_rhs(ode, 2), lift(ode.u_in, 2), 5)
    # M is unit lower triangular and ILU(0) factors it exactly, so X is the forward iteration up to
    # rounding: entries O(0.1) through 5 steps of products, far below the 1e-12 relative tolerance
    np.testing.assert_allclose(X, Y, rtol=1e-12, atol=1e-14)


def test_diverged_ksp_is_one_line_naming_prefix_and_reason(options):
    """A KSP limited to one Richardson step without preconditioner diverges: one line, prefix and reason."""
    from hpcqml.petsc import PetscOwner, aij_from_csr, checked_solve, make_ksp, vec_for

    options("seam_ksp_type", "richardson")
    options("seam_pc_type", "none")
    options("seam_ksp_max_it", "1")
    with PetscOwner() as owner:
        mat = aij_from_csr(_tridiagonal(20), 20, MPI.COMM_SELF, owner, "seam_")
        b = vec_for(mat, owner, "seam_", "left", np.ones(20))
        x = vec_for(mat, owner, "seam_", "right")
        ksp = make_ksp(mat, owner, rtol=1e-12, prefix="seam_")
        with pytest.raises(NumericalError) as info:
            checked_solve(ksp, b, x)
    msg = str(info.value)
    assert "\n" not in msg
    # PETSc names -3 both DIVERGED_ITS and DIVERGED_MAX_IT (aliases)
    assert "prefix seam_" in msg and "reason -3, DIVERGED_" in msg and "after 1 iterations" in msg


def test_objects_are_destroyed_when_an_exception_leaves_the_owner():
    """Every object registered before the failure is destroyed (handle 0) when the with block is left."""
    from hpcqml.petsc import PetscOwner, aij_from_csr, make_ksp, vec_for

    made = []
    with pytest.raises(RuntimeError, match="planted"), PetscOwner() as owner:
        mat = aij_from_csr(_tridiagonal(5), 5, MPI.COMM_SELF, owner, "seam_")
        made += [mat, vec_for(mat, owner, "seam_"), make_ksp(mat, owner, prefix="seam_")]
        assert all(obj.handle != 0 for obj in made)
        raise RuntimeError("planted failure")
    assert [obj.handle for obj in made] == [0, 0, 0]


def test_matrix_is_owned_before_it_is_filled():
    """A PETSc failure while the CSR rows are inserted (a column beyond the matrix) leaves the half-made
    matrix with the owner, which destroys it: ownership starts at creation, not when the helper returns.
    """
    from hpcqml.petsc import PetscOwner, aij_from_csr

    bad = sp.csr_matrix((np.ones(3), np.array([0, 1, 9]), np.array([0, 1, 2, 3])), shape=(3, 10))
    owner = PetscOwner()
    with pytest.raises(PETSc.Error):
        aij_from_csr(bad, 3, MPI.COMM_SELF, owner, "seam_")
    made = list(owner._objects)
    assert len(made) == 1 and made[0].handle != 0
    owner.close()
    assert made[0].handle == 0


def test_failed_carleman_assembly_leaves_no_live_object():
    """A case whose M cannot be assembled (horizon beyond F0_t) destroys the A it already made."""
    from hpcqml.carleman import generators as gen
    from hpcqml.carleman.system import CarlemanCase
    from hpcqml.errors import UserError

    noisy = gen.with_f0_noise(gen.logistic(1.0, 1.0, 0.1, h=0.25), 0.01, 3, 0)   # F0(t) for t < 3 only
    case = CarlemanCase(noisy, 2, 6, MPI.COMM_SELF)
    with pytest.raises(UserError, match="F0_t covers 3 steps"):
        case.__enter__()     # M needs F0(t) up to t = 5
    assert case.A is not None and case.A.handle == 0
    assert case._objects == []


def test_gather_to_root_keeps_other_ranks_empty():
    """to_numpy_root: the whole vector on rank 0, None elsewhere; to_numpy_all: everywhere."""
    from hpcqml.parallel import block_bounds
    from hpcqml.petsc import PetscOwner, aij_from_csr, to_numpy_all, to_numpy_root, vec_for

    comm = MPI.COMM_WORLD
    n = 11
    r0, r1 = block_bounds(n, comm.Get_rank(), comm.Get_size())
    full = np.arange(n, dtype=np.float64) * 0.5
    with PetscOwner() as owner:
        mat = aij_from_csr(_tridiagonal(n)[r0:r1], n, comm, owner, "seam_")
        v = vec_for(mat, owner, "seam_", "left", full[r0:r1])
        root = to_numpy_root(v)
        np.testing.assert_array_equal(to_numpy_all(v), full)
    if comm.Get_rank() == 0:
        np.testing.assert_array_equal(root, full)
    else:
        assert root is None
