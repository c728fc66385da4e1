"""Small, fast checks of the embedding and clock helpers of ``hpcqml.hhl.statevector``.

Written to kill the mutants that survived ``make mutation`` (docs/testing.md).  Each value is
compared with numpy's dense solver or eigen-decomposition, or with a number worked out by hand
in the test's docstring (paper Sec. II C, eq. II.84-II.86).
"""
from __future__ import annotations

import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl import statevector as sv


def _spd(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return Q @ np.diag(np.linspace(0.4, 2.0, n)) @ Q.T, rng.standard_normal(n)


def test_is_symmetric_at_its_relative_threshold():
    """Symmetric when max |M - M^T| <= 1e-12 * max |M| (the floor 1e-300 only for tiny matrices).

    1e-12 and 0 off the diagonal of a unit diagonal: the difference is exactly 1e-12 = the
    threshold (symmetric); 1.5e-12 is not.  Scaling the diagonal to 4 raises the threshold to
    4e-12, so 3e-12 is symmetric there.  A matrix whose only entry is 1.5e-312 (subnormal) is
    judged against 1e-12 * 1e-300 = 1e-312 and is not symmetric; the zero matrix is."""
    assert sv.is_symmetric(np.array([[1.0, 1e-12], [0.0, 1.0]]))
    assert not sv.is_symmetric(np.array([[1.0, 1.5e-12], [0.0, 1.0]]))
    assert sv.is_symmetric(np.array([[4.0, 3e-12], [0.0, 4.0]]))
    assert not sv.is_symmetric(np.array([[4.0, 5e-12], [0.0, 4.0]]))
    assert not sv.is_symmetric(np.array([[0.0, 1.5e-312], [0.0, 0.0]]))
    assert sv.is_symmetric(np.zeros((3, 3)))


@pytest.mark.parametrize("size,want", [(1, 2), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16)])
def test_padded_dim(size, want):
    """The smallest power of two >= size, and at least 2 (one qubit)."""
    assert sv.padded_dim(size) == want


def test_embedded_dim_matches_the_embedding():
    """3 x 3 symmetric: D = 4; 3 x 3 non-symmetric: the dilation has size 6, D = 8."""
    M, B = _spd(3, 0)
    assert sv.embedded_dim(M) == sv.embed(M, B).dim == 4
    N = M + np.triu(np.ones((3, 3)), 1)
    assert sv.embedded_dim(N) == sv.embed(N, B).dim == 8


@pytest.mark.parametrize("symmetric", [True, False])
def test_embedding_carries_the_dense_solution(symmetric):
    """With x = numpy.linalg.solve(M, B): H (scale * embed_solution(x)) = b, solution_part gives x
    back, and exact_state is the normalised embedded x (eq. II.85).  H has spectral norm 1
    (padding eigenvalue 1 included) and the spectrum is that of M / ||M|| (or of the dilation)."""
    M, B = _spd(3, 1)
    if not symmetric:
        M = M + np.triu(np.ones((3, 3)), 1)
    x = np.linalg.solve(M, B)
    s = sv.embed(M, B)
    assert s.dilated is (not symmetric) and s.n == 3
    z = s.embed_solution(x)
    np.testing.assert_allclose(s.H @ z * s.scale, s.b, atol=1e-12 * np.abs(s.b).max())
    np.testing.assert_allclose(s.solution_part(z), x, rtol=0, atol=0)
    want = z / np.linalg.norm(z)
    np.testing.assert_allclose(s.exact_state(), want, atol=1e-12)
    assert np.linalg.norm(s.H, 2) == pytest.approx(1.0, abs=1e-12)
    dense = M if symmetric else np.block([[np.zeros((3, 3)), M], [M.T, np.zeros((3, 3))]])
    w = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(np.sort(s.spectrum), w / np.abs(w).max(), atol=1e-12)
    assert s.scale == pytest.approx(np.abs(w).max(), rel=1e-12)
    # padding: the eigenvalues of H beyond the system are exactly 1 and carry no amplitude
    pad = sorted(set(range(s.dim)) - set(range(dense.shape[0])))
    np.testing.assert_array_equal(np.diag(s.H)[pad], 1.0)
    np.testing.assert_array_equal(s.b[pad], 0.0)


def test_embed_solution_refuses_a_wrong_length():
    s = sv.embed(np.eye(2), np.ones(2))
    with pytest.raises(UserError, match=r"^solution has length 3, expected 2$"):
        s.embed_solution(np.ones(3))


def test_the_eigen_decomposition_is_required_and_left_out_of_repr():
    """eigenvalues/eigenvectors are required fields; repr leaves the arrays out (they can be D x D)."""
    s = sv.embed(np.eye(2), np.ones(2))
    text = repr(s)
    assert "eigenvalues" not in text and "eigenvectors" not in text and "spectrum" not in text
    with pytest.raises(TypeError):
        sv.HermitianSystem(H=s.H, b=s.b, n=2, dilated=False, scale=1.0, eigenvalues=s.eigenvalues)


def test_embed_error_messages():
    """Each refusal is one line that starts with "HHL:" and names the cause."""
    cases = [
        ((np.ones((2, 3)), np.ones(2)), r"^HHL: M must be square, got shape \(2, 3\)$"),
        ((np.eye(3), np.ones(2)), r"^HHL: right-hand side has length 2, M is 3 x 3$"),
        ((np.array([[1.0, np.inf], [0.0, 1.0]]), np.ones(2)), r"^HHL: M or B contains NaN or Inf$"),
        ((np.eye(2), np.zeros(2)), r"^HHL: right-hand side B is zero, \|B> is undefined$"),
        ((np.zeros((2, 2)), np.ones(2)), r"^HHL: M is the zero matrix$"),
    ]
    for args, msg in cases:
        with pytest.raises(UserError, match=msg):
            sv.embed(*args)
    with pytest.raises(UserError, match=r"^HHL: need at least 2 clock qubits, got 1$"):
        sv.default_t0(1)


def test_default_t0_and_default_c_by_hand():
    """t0 = pi (1 - 2/N_c): c = 2 gives pi/2.  C = min(2 pi / (t0 N_c), 1): c = 2, t0 = 0.5 gives
    min(pi, 1) = 1; c = 3, t0 = pi/2 gives 2 pi / (4 pi) = 0.5; with kappa_a = 0.5 (1/kappa_a = 2)
    the cap 1 applies, with kappa_a = 1.6 it is max(0.5, 0.625) = 0.625."""
    assert sv.default_t0(2) == pytest.approx(np.pi / 2, rel=1e-15)
    assert sv.default_C(2, 0.5) == 1.0
    assert sv.default_C(3, np.pi / 2) == pytest.approx(0.5, rel=1e-15)
    assert sv.default_C(3, np.pi / 2, kappa_a=0.5) == 1.0
    assert sv.default_C(3, np.pi / 2, kappa_a=1.6) == pytest.approx(0.625, rel=1e-15)


def test_exact_t0_by_hand():
    """t0 = 2 pi m / N_c for the least m in 1..N_c/2-1 with |m lam - round(m lam)| <= tol m.

    - lam = (1, -1, 0): m = 1 already works, t0 = 2 pi / 8;
    - lam = (0.5, -0.25) with tol = 0 at c = 4 (m up to 7): m = 4, t0 = pi / 2 (exact arithmetic);
    - lam = 0.5 + 6e-10 at c = 3: m = 2 is off by 1.2e-9 <= 2e-9 = tol m, so t0 = pi / 2;
    - lam = 0.5 + 1.5e-9 at c = 3: m = 2 is off by 3e-9 > 2e-9 and m = 3 by 0.5: None."""
    assert sv.exact_t0(np.array([1.0, -1.0, 0.0]), 3) == pytest.approx(2 * np.pi / 8, rel=1e-15)
    assert sv.exact_t0(np.array([0.5, -0.25]), 4, tol=0.0) == pytest.approx(np.pi / 2, rel=1e-15)
    assert sv.exact_t0(np.array([0.5 + 6e-10]), 3) == pytest.approx(np.pi / 2, rel=1e-15)
    assert sv.exact_t0(np.array([0.5 + 1.5e-9]), 3) is None


def test_clock_t0_default_mapping():
    """Without a mapping argument clock_t0 uses default_t0; the identity's eigenvalue 1 sits at
    phi N_c = t0 N_c / (2 pi) = N_c/2 - 1, an integer, so the grid flag is True."""
    s = sv.embed(np.eye(2), np.ones(2))
    t0, exact = sv.clock_t0(s, 3)
    assert t0 == sv.default_t0(3) and exact is True
    with pytest.raises(UserError, match="^HHL: clock mapping must be one of default, exact, got 'x'$"):
        sv.clock_t0(s, 3, "x")


def test_on_clock_grid_tolerance_by_hand():
    """y = lam t0 N_c / (2 pi) must be within tol * max(1, max |y|) of an integer (tol 1e-9).

    c = 2, t0 = pi/2 makes y = lam (up to ~4e-16): 1 + 0.5e-9 is on the grid, 1 + 1.5e-9 and
    1.5e-9 are not.  c = 3, t0 = pi/2 makes y = 2 lam: 1 + 0.75e-9 is off by 1.5e-9 <= 2e-9, on
    the grid.  With tol = 0 an exactly zero eigenvalue (y = 0) still counts."""
    t0 = np.pi / 2
    assert sv.on_clock_grid(np.array([1.0 + 0.5e-9, -1.0]), 2, t0)
    assert not sv.on_clock_grid(np.array([1.0 + 1.5e-9, -1.0]), 2, t0)
    assert not sv.on_clock_grid(np.array([1.5e-9]), 2, t0)
    assert sv.on_clock_grid(np.array([1.0 + 0.75e-9]), 3, t0)
    assert sv.on_clock_grid(np.array([0.0]), 2, t0, tol=0.0)


def test_hhl_result_repr_leaves_out_the_large_arrays():
    """clock_blocks (branches x N_c x D) and basis (D x D) are optional and not in repr."""
    s = sv.embed(np.eye(2), np.ones(2))
    r = sv.simulate_hhl(s, 3)
    text = repr(r)
    assert "clock_blocks" not in text and "basis" not in text
    bare = sv.HHLResult(state=r.state, state_well=None, state_ill=None, p_success=r.p_success,
                        p_ancilla=r.p_ancilla, leakage=r.leakage, clock_qubits=3, t0=r.t0, C=r.C,
                        kappa_a=None, qubits=r.qubits)
    assert bare.clock_blocks is None and bare.basis is None


def test_density_fidelity_needs_both_blocks_and_basis():
    s = sv.embed(np.eye(2), np.ones(2))
    r = sv.simulate_hhl(s, 3)
    half = sv.HHLResult(state=r.state, state_well=None, state_ill=None, p_success=r.p_success,
                        p_ancilla=r.p_ancilla, leakage=r.leakage, clock_qubits=3, t0=r.t0, C=r.C,
                        kappa_a=None, qubits=r.qubits, basis=r.basis)
    with pytest.raises(ValueError, match=r"^density_fidelity_with: this result keeps no clock_blocks/basis$"):
        half.density_fidelity_with(np.ones(2))


def test_two_clock_qubits_invert_the_identity_exactly():
    """c = 2 is the smallest clock: t0 = pi/2 makes t0 N_c = 2 pi, so the clock values are
    lam~ = y' in {0, 1, -2, -1} and the identity's eigenvalue 1 sits on y' = 1.  C = 1 is allowed
    (C <= 1) and the amplitude C/1 = 1: p_success = 1 and the state is |b>/||b|| (eq. II.85)."""
    b = np.array([3.0, 4.0])
    s = sv.embed(np.eye(2), b)
    for C in (None, 1.0):
        r = sv.simulate_hhl(s, 2, C=C)
        assert r.C == 1.0 and r.t0 == pytest.approx(np.pi / 2, rel=1e-15)
        assert r.p_success == pytest.approx(1.0, abs=1e-12)
        assert r.fidelity_with(b) == pytest.approx(1.0, abs=1e-12)
    r = sv.simulate_hhl(s, 3, t0=0.5, C=0.25)   # any t0 in (0, pi) is accepted, also below 1
    assert r.t0 == 0.5 and r.C == 0.25


@pytest.mark.parametrize("diag", [(1.0, -1.0 / 3.0), (-1.0, 1.0 / 3.0)])
def test_rotation_saturates_at_amplitude_one(diag):
    """c = 3, default t0 = 3 pi/4: lam~ = 2 pi y' / (t0 8) = y'/3, so eigenvalues +-1 and -+1/3 sit on
    y' = +-3 and -+1.  With C = 1/2 (above the smallest clock value 1/3) the amplitude C/lam~ is
    +-1/2 for |lam| = 1 and would be -+3/2 for |lam| = 1/3: it saturates at magnitude 1 with its sign.
    b = (1, 1)/sqrt(2): p_success = (1/2)(1/4) + (1/2)(1) = 5/8, state ∝ (sign(lam_1)/2, sign(lam_2))."""
    s = sv.embed(np.diag(diag), np.ones(2))
    r = sv.simulate_hhl(s, 3, C=0.5)
    assert r.p_success == pytest.approx(5.0 / 8.0, abs=1e-12)
    want = np.array([np.sign(diag[0]) / 2.0, np.sign(diag[1])])
    assert r.fidelity_with(want) == pytest.approx(1.0, abs=1e-12)


def test_truncation_threshold_is_strict():
    """Truncated HHL flags ill the clock values with |lam~| < 1/kappa_a (eq. II.86).  With c = 2 and
    t0 = pi/2, lam~ = y' exactly; kappa_a = 1 puts the identity's eigenvalue exactly on the threshold:
    it is well (inverted with C = 1), so |ill> carries nothing.  kappa_a = 0.5 (threshold 2) makes
    it ill: passed with amplitude C = min(max(1, 2), 1) = 1."""
    b = np.array([3.0, 4.0])
    s = sv.embed(np.eye(2), b)
    r = sv.simulate_hhl(s, 2, kappa_a=1.0)
    assert np.linalg.norm(r.state_ill) <= 1e-12
    assert abs(np.vdot(b / 5.0, r.state_well)) ** 2 == pytest.approx(1.0, abs=1e-12)
    r = sv.simulate_hhl(s, 2, kappa_a=0.5)
    assert np.linalg.norm(r.state_well) <= 1e-12 and r.C == 1.0
    assert abs(np.vdot(b / 5.0, r.state_ill)) ** 2 == pytest.approx(1.0, abs=1e-12)


def test_circuit_parameter_errors_are_one_line():
    s = sv.embed(np.eye(2), np.ones(2))
    cases = [
        (dict(clock_qubits=1), r"^HHL: clock_qubits must be an integer >= 2, got 1$"),
        (dict(clock_qubits=3, kappa_a=0.0), r"^HHL: kappa_a must be > 0, got 0\.0$"),
        (dict(clock_qubits=3, t0=0.0), r"^HHL: t0 must lie in \(0, pi\) \(eigenvalues \+-1 alias beyond\), got 0\.0$"),
        (dict(clock_qubits=3, C=0.0), r"^HHL: rotation constant C must lie in \(0, 1\], got 0\.0$"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(UserError, match=msg):
            sv.simulate_hhl(s, **kwargs)


def test_post_selection_threshold_and_message():
    """M = diag(1, 0) with b on the zero eigenvalue: the clock reads y' = 0, nothing is inverted and
    p_success = 0 exactly: refused.  On the identity with c = 2 (eigenvalue on y' = 1, amplitude C)
    p_success = C^2: C = 1.2e-150 gives 1.44e-300, just above the 1e-300 floor, and is kept."""
    s = sv.embed(np.diag([1.0, 0.0]), np.array([0.0, 1.0]))
    with pytest.raises(UserError, match=r"^HHL: post-selection probability is zero \(no eigenvalue was inverted\)$"):
        sv.simulate_hhl(s, 3)
    r = sv.simulate_hhl(sv.embed(np.eye(2), np.ones(2)), 2, C=1.2e-150)
    assert r.p_success == pytest.approx(1.44e-300, rel=1e-10)


def test_truncated_state_stacks_well_and_ill():
    """Truncated runs return [well; ill] (flag the most significant qubit) and count the flag qubit:
    system 1 + clock 2 + ancilla 1 + flag 1 = 5."""
    s = sv.embed(np.eye(2), np.array([3.0, 4.0]))
    r = sv.simulate_hhl(s, 2, kappa_a=1.0)
    assert r.state.shape == (4,)
    np.testing.assert_array_equal(r.state, np.concatenate([r.state_well, r.state_ill]))
    assert r.qubits == {"system": 1, "clock": 2, "ancilla": 1, "flag": 1, "total": 5}
    assert sv.simulate_hhl(s, 2).state.shape == (2,)


def test_solution_norm_estimate_saturation_threshold():
    """c = 3, t0 = pi/2: lam~ = y'/2, the identity's eigenvalue 1 sits on y' = 2 and the smallest
    clock value is 2 pi / (t0 8) = 1/2.  Then p_success = C^2 and ||x|| = sqrt(p) ||B|| / C = ||B|| = 5
    for any C up to 1/2 (with a relative slack of 1e-12); above it the rotation may saturate: NaN."""
    s = sv.embed(np.eye(2), np.array([3.0, 4.0]))
    for C in (0.25, 0.5, 0.5 * (1.0 + 0.5e-12)):
        r = sv.simulate_hhl(s, 3, C=C, t0=np.pi / 2)
        assert sv.estimate_solution_norm(s, r) == pytest.approx(5.0, rel=1e-12)
    for C in (0.5 * (1.0 + 1.5e-12), 0.6, 0.75, 1.0):
        r = sv.simulate_hhl(s, 3, C=C, t0=np.pi / 2)
        assert np.isnan(sv.estimate_solution_norm(s, r))


def test_memory_estimate_by_hand():
    """5 D^2 doubles plus 16 bytes * 2^c * D * (2 + 2 branches): D = 4, c = 3 gives
    640 + 16 * 8 * 4 * 4 = 2688 bytes (plain) and 640 + 16 * 8 * 4 * 6 = 3712 (truncated)."""
    assert sv.memory_estimate_bytes(4, 3) == 2688
    assert sv.memory_estimate_bytes(4, 3, truncated=True) == 3712
