"""Small, fast checks of :mod:`hpcqml.hessian.lanczos` written against its mutants.

``make mutation MUTATION_TARGETS=lanczos`` (docs/testing.md) showed which changes to the module the
spectrum tests cannot see: the Rademacher draw (the other tests build their start vectors with
the same function), the arguments and their error messages, the breakdown threshold, the start
vector, the three-term recurrence without reorthogonalisation, the number of Gram-Schmidt passes,
the column chunks, the progress and stop callbacks (the sharded gather: tests/test_mut_lanczos_mpi.py). Each test here
compares with an independent computation: the documented draw rebuilt from numpy's generators,
a Lanczos recurrence written out in numpy, matrices whose recurrence coefficients are known
exactly, or the serial run for the sharded one. Inputs are chosen so that every decision the
code takes is far from a rounding-level boundary, or exact in binary floating point.

The Lanczos recurrence itself (``w_j = H v_j - alpha_j v_j - beta_{j-1} v_{j-1}``) is textbook
(Golub and Van Loan, section 10.1); the paper uses its Gauss quadrature for the spectral
quantities of eqs. II.28, II.93 and III.12-III.13, which the other spectrum tests check.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian import lanczos as lz
from hpcqml.hessian.lanczos import Interrupted, lanczos, rademacher_slice
torch.set_num_threads(1)

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
BLOCK = 2 ** 20          # the documented block length of the Rademacher draw


def _documented_draw(n: int, seed: int, probe: int) -> np.ndarray:
    """The whole probe as ``rademacher_slice`` documents it: block ``b`` of 2^20 coordinates
    from ``PCG64(SeedSequence([seed, probe, b]))``, int8 bits in {0, 1} mapped to 2 bits - 1."""
    parts = []
    for b in range(-(-n // BLOCK)):
        length = min(BLOCK, n - b * BLOCK)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, probe, b])))
        parts.append(2.0 * rng.integers(0, 2, size=length, dtype=np.int8) - 1.0)
    return np.concatenate(parts)


def _dense(H: np.ndarray):
    """``v -> H v`` in float64 for any state dtype."""
    Ht = torch.from_numpy(np.ascontiguousarray(H, dtype=np.float64))
    return lambda v: Ht @ v.to(torch.float64)


def _numpy_lanczos(H: np.ndarray, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` steps of Lanczos in float64 with two full Gram-Schmidt passes every step
    (written independently of the module: plain numpy, no chunks, no thresholds)."""
    Q = [z / np.linalg.norm(z)]
    alpha, beta = [], []
    for j in range(k):
        w = H @ Q[j]
        alpha.append(Q[j] @ w)
        B = np.array(Q)
        for _ in range(2):
            w = w - B.T @ (B @ w)
        beta.append(np.linalg.norm(w))
        Q.append(w / beta[-1])
    return np.array(alpha), np.array(beta)


def _random_symmetric(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return (A + A.T) / 2


# ---- the Rademacher probes -------------------------------------------------------------------

def test_rademacher_slices_are_the_documented_blocks_of_one_vector():
    """Across the first block boundary (n = 2^20 + 37) every slice is the same stretch of the
    documented draw: the whole, slices on either side of the boundary and across it, the last
    coordinate, and empty slices (at 0, inside, at n). Values are exactly +-1 in float64."""
    n, seed, probe = BLOCK + 37, 5, 3
    full = _documented_draw(n, seed, probe)
    assert set(np.unique(full)) == {-1.0, 1.0}
    got = rademacher_slice(n, 0, n, seed, probe)
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_array_equal(got, full)
    for lo, hi in ((0, 10), (BLOCK - 6, BLOCK + 6), (BLOCK, BLOCK + 20), (BLOCK + 1, n), (n - 1, n), (17, 17),
                   (0, 0), (n, n)):
        np.testing.assert_array_equal(rademacher_slice(n, lo, hi, seed, probe), full[lo:hi], err_msg=f"[{lo}, {hi})")
    # empty slices of a vector shorter than one block draw nothing (and do not fail)
    for lo in (0, 3, 10):
        assert rademacher_slice(10, lo, lo, seed, probe).shape == (0,)
    # the seed and the probe number both select the stream
    assert not np.array_equal(rademacher_slice(64, 0, 64, seed, probe + 1), full[:64])
    assert not np.array_equal(rademacher_slice(64, 0, 64, seed + 1, probe), full[:64])


def test_rademacher_slice_ending_at_the_first_coordinate_of_a_block_writes_it():
    """A slice whose last coordinate opens block 1 ([2^20 - 3, 2^20 + 1) and [2^20, 2^20 + 1))
    must draw that block too. The output buffer is allocated uninitialised, so a buffer of the
    same size filled with 7.0 is freed just before each call: numpy's allocator hands it back,
    and a coordinate left unwritten would show as 7.0 rather than by chance as +-1."""
    n = BLOCK + 5
    full = _documented_draw(n, 9, 1)
    for lo in (BLOCK - 3, BLOCK):
        filler = np.full(BLOCK + 1 - lo, 7.0)
        del filler
        np.testing.assert_array_equal(rademacher_slice(n, lo, BLOCK + 1, 9, 1), full[lo:BLOCK + 1])
    # and one ending just before a block boundary: [2^20 - 11, 2^20 - 1)
    np.testing.assert_array_equal(rademacher_slice(n, BLOCK - 11, BLOCK - 1, 9, 1), full[BLOCK - 11:BLOCK - 1])


@pytest.mark.parametrize("lo, hi", [(-1, 3), (4, 3), (0, 11)])
def test_rademacher_slice_refuses_a_slice_outside_the_vector(lo, hi):
    with pytest.raises(ValueError, match=rf"^bad slice \[{lo}, {hi}\) of 10$"):
        rademacher_slice(10, lo, hi, seed=0, probe=0)


# ---- arguments and the start vector ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"reorth": "partial"}, "reorth = 'partial': not one of full, none"),
    ({"steps": 0}, "lanczos steps = 0: must be >= 1"),
])
def test_bad_arguments_are_refused_with_their_message(kwargs, message):
    H = np.diag([1.0, 2.0, 3.0])
    with pytest.raises(UserError) as info:
        lanczos(_dense(H), 3, None, np.ones(3), **kwargs)
    assert str(info.value) == message


def test_start_slice_of_the_wrong_length_and_a_zero_start_are_refused():
    H = np.diag([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match=r"^start slice has shape \(3,\), expected \(5,\)$"):
        lanczos(_dense(H), 5, None, np.ones(3))
    with pytest.raises(UserError, match="^Lanczos start vector is zero$"):
        lanczos(_dense(H), 5, None, np.zeros(5))


def test_start_vector_is_normalised_and_the_hutchinson_sample_uses_its_norm():
    """A start vector with ||z||^2 = 0.030625 < 1 (not a Rademacher vector): the first product
    is taken on z/||z||, ``start_norm2`` is z^T z and ``quad_form`` is z^T H z, both exactly
    known here to the rounding of a few float64 operations (relative 1e-12 allowed)."""
    H = _random_symmetric(6, 1)
    z = np.array([0.1, -0.05, 0.0, 0.1, 0.05, -0.075])
    seen = []

    def matvec(v):
        seen.append(v.numpy().copy())
        return torch.from_numpy(H) @ v

    res = lanczos(matvec, 6, None, z, steps=3, state_dtype=torch.float64)
    np.testing.assert_allclose(seen[0], z / np.linalg.norm(z), rtol=0, atol=1e-15)
    assert res.start_norm2 == pytest.approx(0.030625, rel=1e-13)
    assert res.quad_form == pytest.approx(z @ H @ z, rel=1e-12)
    assert res.alpha[0] == pytest.approx(z @ H @ z / (z @ z), rel=1e-12)


def test_one_step_gives_the_rayleigh_quotient_and_the_residual_norm():
    """steps = 1: alpha_1 = v^T H v and beta_1 = ||H v - alpha_1 v||, worked out in numpy;
    T_1 has the single node alpha_1 with weight 1."""
    H = _random_symmetric(7, 2)
    z = rademacher_slice(7, 0, 7, seed=1, probe=0)
    v = z / np.linalg.norm(z)
    res = lanczos(_dense(H), 7, None, z, steps=1, reorth="none", state_dtype=torch.float64, probe=4)
    assert res.steps == 1 and res.probe == 4 and not res.breakdown
    assert res.alpha[0] == pytest.approx(v @ H @ v, rel=1e-12)
    assert res.beta[0] == pytest.approx(np.linalg.norm(H @ v - (v @ H @ v) * v), rel=1e-12)
    np.testing.assert_allclose(res.nodes, res.alpha, rtol=1e-15)
    np.testing.assert_allclose(res.weights, [1.0], rtol=1e-15)


def test_defaults_hundred_steps_full_basis_float32_probe_zero():
    """With every default: 100 steps on a 120-dimensional operator, probe 0, the unit roundoff
    of float32 (2^-24) and a float32 basis that full reorthogonalisation keeps orthonormal
    (the vectors passed to the product; bound 1e-3, see test_lanczos_orthogonality.py)."""
    H = np.diag(np.linspace(-1.0, 2.0, 120))
    seen = []

    def matvec(v):
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        seen.append(v.to(torch.float64).numpy().copy())
        return torch.from_numpy(H).to(torch.float32) @ v

    res = lanczos(matvec, 120, None, rademacher_slice(120, 0, 120, seed=2, probe=0))
    assert res.steps == 100 and res.probe == 0 and not res.breakdown
    assert res.unit_roundoff == 2.0 ** -24
    V = np.array(seen)
    assert np.linalg.norm(V @ V.T - np.eye(100), 2) < 1e-3


def test_a_result_built_without_a_unit_roundoff_records_none():
    """Results read back from a file are built without it: None ("not recorded"), which
    ``Spectrum.from_results`` then replaces by float64's unit roundoff."""
    one = np.ones(1)
    res = lz.LanczosResult(probe=0, alpha=one, beta=one, nodes=one, weights=one, residuals=one, steps=1,
                           breakdown=False, quad_form=1.0, start_norm2=1.0)
    assert res.unit_roundoff is None


def test_unit_roundoff_of_a_float64_basis():
    res = lanczos(_dense(np.diag([1.0, 2.0])), 2, None, np.ones(2), state_dtype=torch.float64)
    assert res.unit_roundoff == 2.0 ** -53


def test_more_steps_than_the_dimension_span_the_space():
    """steps = 50 > n = 6: n steps are taken and the run is marked as having found an invariant
    subspace (the whole space); the Ritz values are then the eigenvalues (numpy eigh)."""
    H = _random_symmetric(6, 3)
    res = lanczos(_dense(H), 6, None, rademacher_slice(6, 0, 6, 0, 0), steps=50, state_dtype=torch.float64)
    assert res.steps == 6 and res.breakdown
    np.testing.assert_allclose(res.nodes, np.linalg.eigvalsh(H), atol=1e-10)


# ---- the recurrence against numpy -----------------------------------------------------------

@pytest.mark.parametrize("reorth", ["full", "none"])
def test_recurrence_coefficients_match_a_numpy_lanczos(reorth):
    """8 steps on a 30 x 30 symmetric matrix in float64: alpha, beta and the quadrature
    (eigen-decomposition of T_8 by numpy: nodes, squared first components, |beta_8 S_8i|)
    agree with the numpy recurrence. Without reorthogonalisation the basis of 8 steps on
    this matrix stays orthogonal to ~1e-13, so both modes agree to 1e-9 (relative)."""
    n, k = 30, 8
    H = _random_symmetric(n, 4)
    z = rademacher_slice(n, 0, n, seed=3, probe=1)
    a_ref, b_ref = _numpy_lanczos(H, z, k)
    res = lanczos(_dense(H), n, None, z, steps=k, reorth=reorth, state_dtype=torch.float64)
    assert res.steps == k and not res.breakdown
    np.testing.assert_allclose(res.alpha, a_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.beta, b_ref, rtol=1e-9)
    T = np.diag(a_ref) + np.diag(b_ref[:-1], 1) + np.diag(b_ref[:-1], -1)
    theta, S = np.linalg.eigh(T)
    np.testing.assert_allclose(res.nodes, theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.weights, S[0] ** 2, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.residuals, np.abs(b_ref[-1] * S[-1]), rtol=1e-7, atol=1e-12)


def test_float32_basis_matches_the_float64_recurrence_to_float32_accuracy():
    """The same 8 steps with a float32 basis: alpha and beta within 1e-4 (relative) of the
    float64 numpy recurrence (rounding of each stored vector ~6e-8, grown by 8 steps)."""
    n, k = 30, 8
    H = _random_symmetric(n, 4)
    z = rademacher_slice(n, 0, n, seed=3, probe=1)
    a_ref, b_ref = _numpy_lanczos(H, z, k)
    for reorth in ("full", "none"):
        res = lanczos(_dense(H), n, None, z, steps=k, reorth=reorth, state_dtype=torch.float32)
        np.testing.assert_allclose(res.alpha, a_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.beta, b_ref, rtol=1e-4)


# ---- breakdown ------------------------------------------------------------------------------

def _coupled(b: float) -> np.ndarray:
    """4 x 4: e1 couples to e2 with weight b and nothing else; diag(1, 0, 2, 3). From e1:
    alpha_1 = 1 and beta_1 = b exactly, then alpha_2 = 0 and beta_2 = 0 (span{e1, e2} is invariant)."""
    H = np.diag([1.0, 0.0, 2.0, 3.0])
    H[0, 1] = H[1, 0] = b
    return H


@pytest.mark.parametrize("dtype, eps", [(torch.float64, EPS64), (torch.float32, EPS32)])
def test_default_breakdown_threshold_is_a_hundred_eps_of_the_basis_dtype(dtype, eps):
    """beta_1 / max|alpha| = b against the default rtol = 100 eps: b = 99.5 eps ends the run
    after one step, b = 100.5 eps does not (it ends one step later at the exact zero beta_2).
    Half a percent either side of the threshold is far beyond the rounding of beta_1."""
    e1 = np.array([1.0, 0.0, 0.0, 0.0])
    below = lanczos(_dense(_coupled(99.5 * eps)), 4, None, e1, steps=4, state_dtype=dtype)
    assert below.breakdown and below.steps == 1
    above = lanczos(_dense(_coupled(100.5 * eps)), 4, None, e1, steps=4, state_dtype=dtype)
    assert above.breakdown and above.steps == 2
    assert above.beta[1] == 0.0


def _path(c: float, a1: float = 0.0) -> np.ndarray:
    """5 x 5 path: from e1, alpha_1 = a1, beta_1 = 1, alpha_2 = 0, beta_2 = c, exactly."""
    H = np.zeros((5, 5))
    H[0, 0] = a1
    H[0, 1] = H[1, 0] = 1.0
    H[1, 2] = H[2, 1] = c
    H[2, 3] = H[3, 2] = 1.0
    H[3, 4] = H[4, 3] = 1.0
    return H


def test_breakdown_scale_includes_the_earlier_betas_and_the_threshold_is_inclusive():
    """All alpha = 0, so the scale is max(beta_1) = 1: with rtol = 1/4, beta_2 = 1/4 (exact in
    binary, equal to the threshold) is a breakdown, beta_2 = 0.3 is not; beta_1 = 1 itself is not
    (1 > 1/4 x max|alpha_1| = 0)."""
    e1 = np.eye(5)[0]
    at = lanczos(_dense(_path(0.25)), 5, None, e1, steps=5, rtol=0.25, state_dtype=torch.float64)
    assert at.breakdown and at.steps == 2
    np.testing.assert_array_equal(at.beta, [1.0, 0.25])
    past = lanczos(_dense(_path(0.3)), 5, None, e1, steps=4, rtol=0.25, state_dtype=torch.float64)
    assert not past.breakdown and past.steps == 4


def test_breakdown_scale_is_the_largest_of_all_earlier_betas():
    """Path with alpha = 0 and beta_1, beta_2, beta_3 = 1, 4, 1/2 (exact): at step 3 the scale is
    max(beta_1, beta_2) = 4, so with rtol = 1/4 the threshold is 1 and beta_3 = 1/2 is a
    breakdown (beta_1 alone would give 1/4 and let it pass)."""
    H = np.zeros((6, 6))
    for i, b in enumerate([1.0, 4.0, 0.5, 1.0, 1.0]):
        H[i, i + 1] = H[i + 1, i] = b
    res = lanczos(_dense(H), 6, None, np.eye(6)[0], steps=5, rtol=0.25, state_dtype=torch.float64)
    assert res.breakdown and res.steps == 3
    np.testing.assert_array_equal(res.beta, [1.0, 4.0, 0.5])


def test_breakdown_scale_without_earlier_betas_is_the_largest_alpha():
    """Step 1 has no earlier beta: the scale is |alpha_1| = 1/2, so with rtol = 1/4 a beta_1 of
    0.2 > 1/8 goes on (a scale of 1 would have stopped it), and a beta_1 of 0.1 < 1/8 stops."""
    H = np.diag([0.5, 0.0, 1.0])
    e1 = np.eye(3)[0]
    for b, stops in ((0.2, False), (0.1, True)):
        H[0, 1] = H[1, 0] = b
        res = lanczos(_dense(H), 3, None, e1, steps=2, rtol=0.25, state_dtype=torch.float64)
        assert res.breakdown is stops and res.steps == (1 if stops else 2)


def test_zero_operator_breaks_down_at_once():
    """H = 0: alpha_1 = beta_1 = 0 (scale 0): an invariant subspace at the first step."""
    res = lanczos(_dense(np.zeros((4, 4))), 4, None, np.ones(4), steps=3, state_dtype=torch.float64)
    assert res.breakdown and res.steps == 1 and res.alpha[0] == 0.0 and res.beta[0] == 0.0


# ---- callbacks and errors -------------------------------------------------------------------

def test_progress_is_reported_after_every_step():
    calls = []
    H = _random_symmetric(12, 5)
    lanczos(_dense(H), 12, None, np.ones(12), steps=5, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_interrupt_stops_after_the_step_that_asked():
    polls, calls = [], []

    def interrupt():
        polls.append(1)
        return len(polls) == 3

    H = _random_symmetric(12, 5)
    with pytest.raises(Interrupted) as info:
        lanczos(_dense(H), 12, None, np.ones(12), steps=5, probe=7, interrupt=interrupt,
                on_step=lambda done, total: calls.append(done))
    assert str(info.value) == "probe 7 stopped after Lanczos step 3 of 5"
    assert calls == [1, 2, 3]


@pytest.mark.parametrize("label, where", [("state 2", "state 2, probe 4, Lanczos step 2"),
                                          ("", "probe 4, Lanczos step 2"),
                                          (None, "probe 4, Lanczos step 2")])   # None: the default
def test_non_finite_product_names_the_label_probe_and_step(label, where):
    H = _random_symmetric(6, 6)
    count = []

    def matvec(v):
        count.append(1)
        out = torch.from_numpy(H) @ v.to(torch.float64)
        if len(count) == 3:
            out[1] = float("nan")
        return out

    with pytest.raises(NumericalError) as info:
        lanczos(matvec, 6, None, np.ones(6), steps=5, probe=4, **({} if label is None else {"label": label}))
    assert str(info.value) == f"Hessian-vector product is not finite (NaN/Inf) at {where}"


# ---- Gram-Schmidt passes and column chunks --------------------------------------------------

def test_projection_and_subtraction_in_column_chunks_equal_the_whole_products():
    """``_project`` (V w) and ``_subtract`` (w -= V^T c) over chunks of 1, 2, 3 and 7 columns of
    a 4 x 7 float32 basis equal the unchunked float64 products to rounding (1e-12)."""
    rng = np.random.default_rng(8)
    V = torch.from_numpy(rng.standard_normal((4, 7))).to(torch.float32)
    Vd = V.to(torch.float64).numpy()
    w0 = rng.standard_normal(7)
    coef = rng.standard_normal(4)
    for cols in (1, 2, 3, 7):
        np.testing.assert_allclose(lz._project(V, torch.from_numpy(w0), cols), Vd @ w0, rtol=1e-12, atol=1e-12)
        w = torch.from_numpy(w0.copy())
        lz._subtract(V, coef, w, cols)
        np.testing.assert_allclose(w.numpy(), w0 - Vd.T @ coef, rtol=1e-12, atol=1e-12)


def _passes(x: float, y: float, cols: int = 1) -> tuple[np.ndarray, float]:
    """``_reorthogonalise`` of w = (x, y, 0) against the single row sqrt(0.9) e1 (deliberately
    not unit length: each Gram-Schmidt pass multiplies the first component by 1 - 0.9 = 0.1,
    so the number of passes taken can be read off the result)."""
    V = torch.tensor([[np.sqrt(0.9), 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([x, y, 0.0], dtype=torch.float64)
    norm = lz._reorthogonalise(V, w, lz._Dist(None, 3), cols)
    return w.numpy(), norm


def test_second_gram_schmidt_pass_only_after_heavy_cancellation():
    """One pass when the norm falls by less than 1/sqrt(2), two when it falls by more, never three.

    * w = (0.01, 1): after one pass (0.001, 1), norm ratio ~1: stop.
    * w = (1, 0.845): ratio sqrt((0.01 + 0.714) / 1.714) = 0.650 < 0.707: a second pass
      (0.01, 0.845). (0.650 > 1/sqrt(3) = 0.577: a looser criterion would stop after one.)
    * w = (1, 0.01): ratios 0.10 then 0.14: exactly two passes, (0.01, 0.01).
    """
    for (x, y), want in (((0.01, 1.0), (0.001, 1.0)), ((1.0, 0.845), (0.01, 0.845)), ((1.0, 0.01), (0.01, 0.01))):
        for cols in (1, 3):
            w, norm = _passes(x, y, cols)
            np.testing.assert_allclose(w, [want[0], want[1], 0.0], rtol=1e-12, atol=1e-15, err_msg=f"{(x, y)}")
            assert norm == pytest.approx(np.hypot(*want), rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: with one device 'move there' and 'stay' agree")
def test_products_run_on_the_device_and_the_basis_where_asked():
    """device = "cuda": every product gets a CUDA vector; the basis on the CPU or (default) the
    GPU gives the CPU run's coefficients (float64, relative 1e-10)."""
    H = _random_symmetric(20, 7)
    Hc = torch.from_numpy(H).cuda()
    seen = []

    def matvec(v):
        seen.append(v.device.type)
        return Hc @ v.to(torch.float64)

    z = rademacher_slice(20, 0, 20, seed=1, probe=0)
    ref = lanczos(_dense(H), 20, None, z, steps=6, state_dtype=torch.float64)
    for basis in ("cpu", None):
        res = lanczos(matvec, 20, None, z, steps=6, state_dtype=torch.float64, device="cuda", basis_device=basis)
        np.testing.assert_allclose(res.alpha, ref.alpha, rtol=1e-10, atol=1e-12)
    assert set(seen) == {"cuda"}
