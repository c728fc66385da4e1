"""Serial tests of hpcqml.carleman: instances, reference matrices, time stepping, bounds, spectra."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from hpcqml.carleman import generators as gen
from hpcqml.carleman import reference as ref
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, from_dict, kron_power, lift, to_dict
from hpcqml.errors import UserError
from hpcqml.stages._network import network_instance


def solve_block_system(ode, N, T, comm):
    """M X = B of the case solved by its owner (:class:`CarlemanCase`), which the qcm stage uses."""
    from hpcqml.carleman.system import CarlemanCase

    with CarlemanCase(ode, N, T, comm) as case:
        return case.solve()


def _cubic_instance(n: int = 2, seed: int = 3) -> PolynomialODE:
    rng = np.random.default_rng(seed)
    F = [sp.csr_matrix(rng.uniform(-0.1, 0.1, (n, 1)))]
    for ell in (1, 2, 3):
        F.append(sp.csr_matrix(rng.uniform(-0.2, 0.2, (n, n**ell))))
    return PolynomialODE(F=F, u_in=rng.uniform(-0.3, 0.3, n))


@pytest.mark.parametrize("make", [lambda: gen.random_quadratic(3, 0.7, 1), _cubic_instance])
def test_reference_rows_are_derivatives_of_kronecker_powers(make):
    """(A y_in + b)_j = sum_p u^{(x)p} (x) f(u) (x) u^{(x)(j-1-p)} exactly where truncation cuts nothing.

    Independent of the Kronecker construction: the right side is evaluated directly from f(u).
    """
    ode = make()
    N = 4
    A = ref.carleman_matrix(ode, N)
    u = ode.u_in
    lhs = A @ lift(u, N) + ref.carleman_rhs(ode, N)
    f = ode.rhs(u)
    start = 0
    for j in range(1, N + 1):
        if j + ode.q - 1 <= N:
            want = sum(np.kron(np.kron(kron_power(u, p), f), kron_power(u, j - 1 - p)) for p in range(j))
            np.testing.assert_allclose(lhs[start:start + ode.n**j], want, rtol=1e-13, atol=1e-15)
        start += ode.n**j
    assert A.shape == (carleman_dim(ode.n, N),) * 2


def test_linear_spectrum_is_sums_of_F1_eigenvalues():  # noqa: N802 - paper notation
    """F0 = F2 = 0: spec(A) = union_j {f_a1 + ... + f_aj} (eq. II.64), dense numpy check."""
    ode = gen.random_quadratic(3, 1.0, 4)
    lin = PolynomialODE(F=[ode.F[0], ode.F[1], sp.csr_matrix((3, 9))], u_in=ode.u_in)
    fa = np.linalg.eigvalsh(lin.F[1].toarray())
    want = np.sort(np.concatenate([np.sum(np.meshgrid(*([fa] * j), indexing="ij"), axis=0).ravel()
                                   for j in (1, 2, 3)]))
    got = np.sort(np.linalg.eigvals(ref.carleman_matrix(lin, 3).toarray()).real)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_block_system_solution_is_forward_iteration():
    ode = gen.scale_step(gen.random_quadratic(2, 1.0, 5), 0.3)
    N, T = 3, 7
    A = ref.carleman_matrix(ode, N)
    M, rhs = ref.block_system(A, ode, N, T)
    X = sp.linalg.spsolve_triangular(M.tocsr(), rhs, lower=True)
    Y = ref.forward_iteration(A, ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
    np.testing.assert_allclose(X.reshape(T + 1, -1), Y, rtol=1e-12, atol=1e-15)


def test_ksp_solution_matches_forward_iteration_single_rank():
    from mpi4py import MPI

    ode = _cubic_instance()
    ode = PolynomialODE(F=[0.3 * F for F in ode.F], u_in=ode.u_in)
    N, T = 3, 15
    res = solve_block_system(ode, N, T, MPI.COMM_SELF)
    A = ref.carleman_matrix(ode, N)
    Y = ref.forward_iteration(A, ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
    assert res.reason > 0 and res.iterations <= 2  # ILU(0) of a unit lower-triangular M is exact
    assert np.linalg.norm(res.X - Y) <= 1e-10 * np.linalg.norm(Y)
    # options with the qcm_ prefix reach the solver (setFromOptions): -qcm_ksp_type richardson
    from petsc4py import PETSc

    opts = PETSc.Options()
    opts["qcm_ksp_type"] = "richardson"
    try:
        res2 = solve_block_system(ode, N, T, MPI.COMM_SELF)
    finally:
        opts.delValue("qcm_ksp_type")
    assert res2.ksp_type == "richardson" and res2.reason > 0
    assert np.linalg.norm(res2.X - Y) <= 1e-10 * np.linalg.norm(Y)


def test_logistic_truncation_error_shrinks_geometrically():
    """u' = -a u - c u^2, dissipative (|1 - h a j| < 1 for all j <= N_ref): error vs N_ref run ~ rho^N."""
    ode = gen.logistic(1.0, 1.0, 0.3, h=0.05)
    T, N_ref = 60, 30
    yR = ts.carleman_trajectory(ode, N_ref, T)
    errs = np.array([np.max(np.abs(yR - ts.carleman_trajectory(ode, N, T))) for N in range(1, 8)])
    ratios = errs[1:] / errs[:-1]
    assert np.all(ratios < 0.5), ratios           # geometric, rate ~ c u0 / a = 0.3
    assert np.ptp(np.log(ratios)) < 0.7, ratios    # roughly constant rate
    # against the exact discrete map the error also falls, down to the discreteness floor
    u = ref.exact_recurrence(ode, T)[:, 0]
    total = [np.max(np.abs(u - ts.carleman_trajectory(ode, N, T)[:, 0])) for N in (1, 2, 3)]
    assert total[0] > total[1] > total[2]


def test_discreteness_error_is_first_order_in_step():
    """Sec. V B: Carleman stepping with I+A misses du (x) du, so at fixed time the error is O(h)."""
    ode = gen.logistic(1.0, 1.0, 0.3, h=1.0)
    out = ts.discreteness_scaling(ode, N_ref=12, horizon=4.0, steps=[0.1, 0.05, 0.025])  # 12 * 0.1 < 2: stable
    assert 0.85 < float(out["slope"]) < 1.15, out
    split = ts.error_split(gen.logistic(1.0, 1.0, 0.3, h=0.05), 3, 20, 40)
    np.testing.assert_allclose(split["total"], split["truncation"] + split["discreteness"], atol=1e-15)


def test_bounds_and_stability_warning():
    ode = gen.logistic(1.0, 1.0, 0.3, h=0.05)
    norms = ode.norms()
    np.testing.assert_allclose(norms, [0.0, 0.05, 0.05])
    assert ts.bound_II57(2, 1.0, 0.5, norms) == pytest.approx(3 * 2 * 0.5**3 * 0.05)
    assert np.isnan(ts.order_II60(1e-3, 1.0, 1.5, norms))
    with pytest.warns(RuntimeWarning, match="unstable"):
        assert not ts.check_stability(gen.logistic(1.0, 0.0, 0.1, h=0.6), 2)
    assert ts.check_stability(ode, 4)


def test_order_II60_makes_bound_II57_small():  # noqa: N802 - paper notation
    """With ||u_bar|| < 1, N from eq. II.60 satisfies N u^{N+1} <= u^{N/2} (eq. II.59) so II.57 <= eps."""
    norms = np.array([0.0, 0.1, 0.02])
    A_norm, u_bar, eps = 0.2, 0.3, 1e-8
    N = int(ts.order_II60(eps, A_norm, u_bar, norms))
    assert ts.bound_II57(N, 1.0 / A_norm, u_bar, norms) <= eps
    # II.60 is conservative only by the factor 2 of eq. II.59: half the order is not enough
    assert ts.bound_II57(N // 2 - 1, 1.0 / A_norm, u_bar, norms) > eps


def test_random_quadratic_follows_sec_IIIC():  # noqa: N802 - paper notation
    ode = gen.random_quadratic(6, 0.5, 11)
    h = np.sort(-np.linalg.eigvalsh(ode.F[1].toarray()))
    assert np.all(h[:3] < 0) and np.all(h[:3] > -0.01) and np.all(h[3:] > 0) and np.all(h[3:] < 1)
    F2 = ode.F[2].toarray()
    assert F2.shape == (6, 36) and np.abs(F2).max() <= 0.015 and ode.F[0].nnz == 0
    sparse = gen.sparse_quadratic(7, 0.5, 11)
    np.testing.assert_allclose(sparse.F[1].toarray(), sparse.F[1].toarray().T, atol=1e-15)
    assert sparse.F[1].getnnz(axis=1).max() <= 2
    hs = np.sort(-np.linalg.eigvalsh(sparse.F[1].toarray()))
    assert np.sum(hs > 0) == 4 and np.all(hs < 1) and np.all(hs > -0.01)


def test_dict_roundtrip_and_hdf5(tmp_path):
    ode = _cubic_instance()
    back = from_dict(to_dict(ode))
    for a, b in zip(ode.F, back.F, strict=True):
        assert (a != b).nnz == 0
    path = tmp_path / "inst.h5"
    with h5py.File(path, "w") as fh:
        for k, v in to_dict(ode).items():
            fh.create_dataset(k, data=v)
    with h5py.File(path, "r") as fh:
        again = from_dict(fh)
    np.testing.assert_array_equal(again.u_in, ode.u_in)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_malformed_instances_give_one_line_errors(tmp_path):
    good = to_dict(_cubic_instance())
    with pytest.raises(UserError) as e:
        PolynomialODE(F=[sp.csr_matrix((2, 1)), sp.csr_matrix((2, 3))], u_in=np.zeros(2))
    assert "F1" in _one_line(e) and "shape" in _one_line(e)
    with pytest.raises(UserError) as e:
        PolynomialODE(F=[sp.csr_matrix((2, 1)), sp.csr_matrix([[np.nan, 0], [0, 1]])], u_in=np.zeros(2))
    assert "NaN" in _one_line(e)
    with pytest.raises(UserError) as e:
        PolynomialODE(F=[sp.csr_matrix((2, 1)), sp.identity(2)], u_in=np.array([0.0, np.nan]))
    assert "u_in" in _one_line(e)
    # files: NaN data, wrong indptr length, out-of-range columns, missing block
    cases = {
        "nan": {**good, "F2/data": np.where(np.arange(good["F2/data"].size) == 0, np.nan, good["F2/data"])},
        "indptr": {**good, "F1/indptr": good["F1/indptr"][:-1]},
        "cols": {**good, "F3/indices": good["F3/indices"] + 100},
        "missing": {k: v for k, v in good.items() if not k.startswith("F2/")},
    }
    for name, d in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as fh:
            for k, v in d.items():
                fh.create_dataset(k, data=v)
        with h5py.File(path, "r") as fh, pytest.raises(UserError) as e:
            from_dict(fh)
        _one_line(e)


def test_network_instance_matches_autograd_derivatives():
    """F1 = -eta H and F2 = -(eta/2) D3 checked against torch.autograd.functional.hessian + finite differences."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    k, eta = 3, 0.1
    ode = network_instance(model, torch.nn.functional.cross_entropy, x, y, k, eta)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    idx = torch.topk(flat.abs(), k).indices
    shapes = [p.shape for p in model.parameters()]

    def loss_at(z):
        w = flat.clone().index_put((idx,), flat[idx] + z)
        ps, off = [], 0
        for s in shapes:
            m = int(np.prod(s))
            ps.append(w[off:off + m].reshape(s))
            off += m
        h = torch.tanh(x @ ps[0].T + ps[1])
        return torch.nn.functional.cross_entropy(h @ ps[2].T + ps[3], y)

    z0 = torch.zeros(k, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(loss_at, z0).numpy()
    H = torch.autograd.functional.hessian(loss_at, z0).numpy()
    np.testing.assert_allclose(ode.F[0].toarray().ravel(), -eta * g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ode.F[1].toarray(), -eta * H, rtol=1e-10, atol=1e-14)
    d = 1e-4
    D3 = np.stack([(torch.autograd.functional.hessian(loss_at, z0 + d * e).numpy()
                    - torch.autograd.functional.hessian(loss_at, z0 - d * e).numpy()) / (2 * d)
                   for e in torch.eye(k, dtype=torch.float64)], axis=-1)  # D3[a, b, c]
    np.testing.assert_allclose(ode.F[2].toarray(), -0.5 * eta * D3.reshape(k, k * k), atol=1e-8)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_network_instance_batchnorm_mode_matches_hand_written_normalisation(mode):
    """F0, F1, F2 of a Linear-BatchNorm-Tanh-Linear network in either BatchNorm mode against autograd of a
    hand-written forward pass: running statistics (eval) or the batch's own biased mean and variance
    (train); the running statistics are not changed by either."""
    import torch

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    model.train()
    for _ in range(3):   # running statistics that differ from the test batch's
        model(2.0 + torch.randn(16, 3, dtype=torch.float64))
    model.eval()
    bn = model[1]
    run_mean, run_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    k, eta = 3, 0.1
    ode = network_instance(model, torch.nn.functional.cross_entropy, x, y, k, eta, batchnorm=mode)
    assert torch.equal(bn.running_mean, run_mean) and torch.equal(bn.running_var, run_var)
    assert not model.training
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    idx = torch.topk(flat.abs(), k).indices
    shapes = [p.shape for p in model.parameters()]

    def loss_at(z):
        w = flat.clone().index_put((idx,), flat[idx] + z)
        ps, off = [], 0
        for shape in shapes:
            m = int(np.prod(shape))
            ps.append(w[off:off + m].reshape(shape))
            off += m
        h = x @ ps[0].T + ps[1]
        mean, var = (h.mean(0), h.var(0, unbiased=False)) if mode == "train" else (run_mean, run_var)
        h = torch.tanh((h - mean) / torch.sqrt(var + bn.eps) * ps[2] + ps[3])
        return torch.nn.functional.cross_entropy(h @ ps[4].T + ps[5], y)

    z0 = torch.zeros(k, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(loss_at, z0).numpy()
    H = torch.autograd.functional.hessian(loss_at, z0).numpy()
    # float64 autograd of the same function in a different order of operations: rounding only
    np.testing.assert_allclose(ode.F[0].toarray().ravel(), -eta * g, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(ode.F[1].toarray(), -eta * H, rtol=1e-9, atol=1e-13)
    d = 1e-4   # central differences of the Hessian: O(d^2 |D5|) ~ 1e-8
    D3 = np.stack([(torch.autograd.functional.hessian(loss_at, z0 + d * e).numpy()
                    - torch.autograd.functional.hessian(loss_at, z0 - d * e).numpy()) / (2 * d)
                   for e in torch.eye(k, dtype=torch.float64)], axis=-1)
    np.testing.assert_allclose(ode.F[2].toarray(), -0.5 * eta * D3.reshape(k, k * k), atol=1e-8)
    if mode == "train":   # the two modes are different operators here (measured: 76 % of the largest entry)
        other = network_instance(model, torch.nn.functional.cross_entropy, x, y, k, eta, batchnorm="eval")
        diff = np.abs(other.F[1].toarray() - ode.F[1].toarray()).max()
        assert diff > 0.1 * np.abs(ode.F[1].toarray()).max()


# ---- time-varying constant term F0(t) = F0 + F0_t[t] ("SGD noise") ----------------------

def _noisy_instance(n: int = 3, T: int = 6, seed: int = 4) -> PolynomialODE:
    """Quadratic + cubic instance whose F0 and F0_t have different, partly cancelling supports.

    F0 lives on row 0, F0_t on rows 0 and n-1 (row 1 stays empty for n >= 3), and at t = 2 the
    noise cancels F0 exactly, so A(2) has an explicit zero on the shared pattern.
    """
    rng = np.random.default_rng(seed)
    F0 = np.zeros((n, 1))
    F0[0, 0] = 0.02
    F = [sp.csr_matrix(F0)] + [sp.csr_matrix(rng.uniform(-0.1, 0.1, (n, n**ell))) for ell in (1, 2, 3)]
    noise = np.zeros((T, n))
    noise[:, 0] = 0.01 * rng.standard_normal(T)
    noise[:, n - 1] = 0.01 * rng.standard_normal(T)
    noise[2, 0] = -0.02
    return PolynomialODE(F=F, u_in=rng.uniform(-0.2, 0.2, n), F0_t=noise)


def test_f0_t_changes_only_the_F0_blocks_of_A():  # noqa: N802 - paper notation
    """A(t) - A = sum_p I^{(x)p} (x) xi_t (x) I^{(x)(j-1-p)} in blocks (j, j-1), checked by direct kron of u-powers."""
    ode = _noisy_instance()
    N, n = 4, ode.n
    A = ref.carleman_matrix(ode, N)
    u = np.random.default_rng(0).uniform(-1, 1, n)
    y = lift(u, N)
    for t in range(ode.T_max):
        xi = ode.F0_t[t]
        dA = ref.carleman_matrix(ode, N, t) - A
        got = dA @ y
        start = 0
        for j in range(1, N + 1):
            want = np.zeros(n**j) if j == 1 else sum(
                np.kron(np.kron(kron_power(u, p), xi), kron_power(u, j - 1 - p)) for p in range(j))
            np.testing.assert_allclose(got[start:start + n**j], want, rtol=1e-13, atol=1e-15)
            start += n**j
        np.testing.assert_array_equal(ref.carleman_rhs(ode, N, t)[:n], ode.F[0].toarray().ravel() + xi)
    assert ode.f0_support().tolist() == [0, n - 1]


@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_f0_t_petsc_rows_equal_reference(N):
    """Local CSR rows of A(t) and of M (any row range) equal the Kronecker reference to 1e-14, one pattern for all t."""
    from hpcqml.carleman import petsc_assembly as pa

    ode = _noisy_instance()
    T = ode.T_max
    D = carleman_dim(ode.n, N)
    patterns = set()
    for t in range(T):
        got = pa.carleman_local_csr(ode, N, 0, D, t)
        diff = abs(got - ref.carleman_matrix(ode, N, t))
        assert (diff.max() if diff.nnz else 0.0) <= 1e-14
        patterns.add((got.indptr.tobytes(), got.indices.tobytes()))
    assert len(patterns) == 1  # the union support gives every A(t) the same sparsity pattern
    M_ref, rhs_ref = ref.block_system(ref.carleman_matrix(ode, N), ode, N, T)
    total = (T + 1) * D
    for R0, R1 in [(0, total), (1, total // 3), (total // 3, total - 2), (D - 1, 2 * D + 1)]:
        loc = pa.block_system_local_csr(ode, N, T, R0, R1)
        diff = abs(loc - M_ref[R0:R1])
        assert (diff.max() if diff.nnz else 0.0) <= 1e-14
        np.testing.assert_array_equal(pa.block_rhs_local(ode, N, T, R0, R1), rhs_ref[R0:R1])
    # the noise really enters M: it differs from the noise-free block system
    plain = PolynomialODE(F=ode.F, u_in=ode.u_in)
    M0, rhs0 = ref.block_system(ref.carleman_matrix(plain, N), plain, N, T)
    assert np.abs(rhs0 - rhs_ref).max() > 1e-3
    if N >= 2:
        assert abs(M0 - M_ref).max() > 1e-3


def test_f0_t_ksp_equals_forward_iteration_and_triangular_solve():
    from mpi4py import MPI

    ode = _noisy_instance(n=2, T=9)
    N, T = 3, 9
    res = solve_block_system(ode, N, T, MPI.COMM_SELF)
    Y = ref.forward_iteration_t(ode, N, T)
    assert res.reason > 0
    assert np.linalg.norm(res.X - Y) <= 1e-10 * np.linalg.norm(Y)
    M, rhs = ref.block_system(None, ode, N, T)
    X = sp.linalg.spsolve_triangular(M.tocsr(), rhs, lower=True).reshape(T + 1, -1)
    np.testing.assert_allclose(X, Y, rtol=1e-12, atol=1e-15)
    # step by step: y(t+1) = (I + A(t)) y(t) + b(t)
    for t in range(T):
        np.testing.assert_allclose(Y[t + 1], Y[t] + ref.carleman_matrix(ode, N, t) @ Y[t]
                                   + ref.carleman_rhs(ode, N, t), rtol=1e-14, atol=1e-16)
    Yp = ts.petsc_forward_iteration_t(ode, N, T, MPI.COMM_SELF)
    np.testing.assert_allclose(Yp, Y, rtol=1e-12, atol=1e-15)


def test_f0_t_linear_ode_carleman_is_exact():
    """q = 1, N = 1: the Carleman system is the recurrence itself, noise included (1e-12)."""
    from mpi4py import MPI

    rng = np.random.default_rng(8)
    n, T = 3, 12
    F1 = 0.2 * rng.uniform(-1, 1, (n, n))
    ode = PolynomialODE(F=[sp.csr_matrix(rng.uniform(-0.05, 0.05, (n, 1))), sp.csr_matrix(F1)],
                        u_in=rng.uniform(-1, 1, n), F0_t=0.1 * rng.standard_normal((T, n)))
    u = np.empty((T + 1, n))
    u[0] = ode.u_in
    for t in range(T):  # written out independently of PolynomialODE.rhs
        u[t + 1] = u[t] + ode.F[0].toarray().ravel() + ode.F0_t[t] + F1 @ u[t]
    np.testing.assert_allclose(ref.exact_recurrence(ode, T), u, rtol=1e-14, atol=1e-15)
    res = solve_block_system(ode, 1, T, MPI.COMM_SELF)
    assert np.max(np.abs(res.X - u)) <= 1e-12 * max(1.0, np.max(np.abs(u)))
    plain = PolynomialODE(F=ode.F, u_in=ode.u_in)
    assert np.max(np.abs(ref.exact_recurrence(plain, T) - u)) > 1e-2  # the noise matters


def test_f0_t_nonlinear_carleman_converges_to_noisy_recurrence():
    """With noise on, the error of y_1 against the exact noisy recurrence of eq. II.1 shrinks with N."""
    ode = gen.logistic(1.0, 1.0, 0.2, h=0.05)
    ode = PolynomialODE(F=ode.F, u_in=ode.u_in, F0_t=0.002 * np.random.default_rng(1).standard_normal((20, 1)))
    u = ref.exact_recurrence(ode, 20)
    errs = [np.max(np.abs(ts.carleman_trajectory(ode, N, 20) - u)) for N in (1, 2, 3)]
    assert errs[2] < errs[1] < errs[0]


def test_f0_noise_generator_and_roundtrip(tmp_path):
    base = gen.random_quadratic(3, 0.7, 5)
    noisy = gen.random_quadratic(3, 0.7, 5, noise=0.3, T=400)
    assert base.F0_t is None and gen.random_quadratic(3, 0.7, 5, noise=0.0, T=7).F0_t is None
    assert noisy.F0_t.shape == (400, 3) and noisy.F0_t.dtype == np.float64
    for a, b in zip(base.F, noisy.F, strict=True):
        assert (a != b).nnz == 0  # noise on leaves every other draw unchanged
    np.testing.assert_array_equal(base.u_in, noisy.u_in)
    assert 0.25 < noisy.F0_t.std() < 0.35 and abs(noisy.F0_t.mean()) < 0.05
    np.testing.assert_array_equal(noisy.F0_t, gen.f0_noise(3, 0.3, 400, 5))
    assert not np.array_equal(noisy.F0_t, gen.f0_noise(3, 0.3, 400, 6))
    assert gen.with_f0_noise(base, 0.0, 5, 1) is base
    np.testing.assert_allclose(gen.scale_step(noisy, 0.5).F0_t, 0.5 * noisy.F0_t)
    path = tmp_path / "noisy.h5"
    with h5py.File(path, "w") as fh:
        for k, v in to_dict(noisy).items():
            fh.create_dataset(k, data=v)
    with h5py.File(path, "r") as fh:
        assert fh["F0_t"].shape == (400, 3)
        again = from_dict(fh)
    np.testing.assert_array_equal(again.F0_t, noisy.F0_t)
    assert "F0_t" not in to_dict(base) and from_dict(to_dict(base)).F0_t is None


def test_malformed_f0_t_gives_one_line_errors(tmp_path):
    ode = _cubic_instance()
    bad = {"shape": np.zeros((4, 3)), "vector": np.zeros(2), "empty": np.zeros((0, 2)),
           "nan": np.array([[0.0, np.nan]]), "inf": np.array([[np.inf, 0.0]]), "ragged": [[0.0, 1.0], [2.0]]}
    for name, val in bad.items():
        with pytest.raises(UserError) as e:
            PolynomialODE(F=ode.F, u_in=ode.u_in, F0_t=val)
        assert "F0_t" in _one_line(e), name
    short = PolynomialODE(F=ode.F, u_in=ode.u_in, F0_t=np.zeros((3, 2)))
    with pytest.raises(UserError) as e:
        ref.exact_recurrence(short, 4)
    assert "F0_t covers 3 steps" in _one_line(e)
    with pytest.raises(UserError) as e:
        ref.block_system(None, short, 2, 5)
    _one_line(e)
    with pytest.raises(UserError) as e:
        gen.f0_noise(2, -1.0, 3, 0)
    _one_line(e)
    good = to_dict(_cubic_instance())
    for name, val in {"shape": np.zeros((3, 5)), "nan": np.full((3, 2), np.nan), "text": np.bytes_(b"abc")}.items():
        path = tmp_path / f"f0t_{name}.h5"
        with h5py.File(path, "w") as fh:
            for k, v in {**good, "F0_t": val}.items():
                fh.create_dataset(k, data=v)
        with h5py.File(path, "r") as fh, pytest.raises(UserError) as e:
            from_dict(fh)
        assert "F0_t" in _one_line(e), name


def test_carleman_case_destroys_its_petsc_objects_also_on_error():
    """Every Mat/Vec/KSP/EPS/SVD of a case is destroyed when the with-block ends by an exception."""
    from mpi4py import MPI

    from hpcqml.carleman.system import CarlemanCase

    ode = gen.scale_step(gen.random_quadratic(2, 0.5, 1), 0.25)
    with pytest.raises(RuntimeError, match="inside"):
        with CarlemanCase(ode, 2, 5, MPI.COMM_SELF) as case:
            facts = case.solve()
            eigs, _ = case.eigenvalues()
            norms = case.norms()
            case.condition(norms.norm_IA)
            objects = list(case._objects)
            assert facts.reason > 0 and eigs.shape == (6,)
            kinds = {type(obj).__name__ for obj in objects}
            assert {"Mat", "Vec", "KSP", "EPS", "SVD"} <= kinds
            assert all(obj.handle != 0 for obj in objects)
            raise RuntimeError("inside the case")
    assert all(obj.handle == 0 for obj in objects)
    assert case._objects == []
    np.testing.assert_allclose(facts.X, ref.forward_iteration(ref.carleman_matrix(ode, 2), ref.carleman_rhs(ode, 2),
                                                              lift(ode.u_in, 2), 5), rtol=1e-10, atol=1e-16)


def test_diverged_ksp_is_a_numerical_error():
    """A KSP that stops before converging raises NumericalError (exit 1), not a user error."""
    from mpi4py import MPI
    from petsc4py import PETSc

    from hpcqml.errors import NumericalError

    ode = gen.scale_step(gen.random_quadratic(2, 0.5, 1), 0.25)
    opts = PETSc.Options()
    opts["qcm_ksp_type"] = "richardson"
    opts["qcm_pc_type"] = "none"
    opts["qcm_ksp_max_it"] = "1"
    try:
        with pytest.raises(NumericalError, match="did not converge"):
            solve_block_system(ode, 2, 8, MPI.COMM_SELF)
    finally:
        for key in ("qcm_ksp_type", "qcm_pc_type", "qcm_ksp_max_it"):
            opts.delValue(key)
