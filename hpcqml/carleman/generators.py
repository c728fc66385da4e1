"""Instance generators: the random quadratic family of Sec. III C, a sparse variant for scale
runs and a scalar logistic-type map.  Reduced instances of a neural network (eq. II.65) need torch
and the Hessian operator and are built in the stage layer (:mod:`hpcqml.stages._network`).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman.instance import PolynomialODE
from hpcqml.errors import UserError


def _spectrum(n: int, f: float, rng: np.random.Generator, div_range: float = 0.01) -> np.ndarray:
    """Hessian eigenvalues h: round(f*n) from U(0,1) (dissipative), the rest from U(-div_range,0).

    The paper (Sec. III C) uses div_range = 0.01.
    """
    if not 0.0 <= f <= 1.0:
        raise UserError(f"random_quadratic: fraction f={f} must lie in [0, 1]")
    if not (np.isfinite(div_range) and div_range >= 0.0):
        raise UserError(f"random_quadratic: div_range={div_range} must be a finite number >= 0")
    npos = int(round(f * n))
    return np.concatenate([rng.uniform(0.0, 1.0, npos), rng.uniform(-div_range, 0.0, n - npos)])


def f0_noise(n: int, sigma: float, T: int, seed: int) -> np.ndarray:
    """SGD-noise sequence F0_t[t] = sigma * xi_t, xi_t ~ N(0, I_n) i.i.d., t = 0..T-1; (T, n) float64.

    Drawn from its own stream ``default_rng((seed, 0xF0))`` so the other draws of an instance
    with the same seed do not change when noise is switched on.
    """
    if not (np.isfinite(sigma) and sigma >= 0.0):
        raise UserError(f"f0_noise: sigma={sigma} must be a finite number >= 0")
    if T < 1:
        raise UserError(f"f0_noise: T={T} must be >= 1")
    return sigma * np.random.default_rng((seed, 0xF0)).standard_normal((T, n))


def with_f0_noise(ode: PolynomialODE, sigma: float, T: int, seed: int) -> PolynomialODE:
    """The instance with constant term F0(t) = F0 + sigma * xi_t (:func:`f0_noise`); sigma = 0 returns ``ode``."""
    if sigma == 0.0:
        return ode
    return PolynomialODE(F=list(ode.F), u_in=ode.u_in.copy(), F0_t=f0_noise(ode.n, sigma, T, seed),
                         meta={**ode.meta, "f0_noise": sigma})


def _rng(seed: int, stream: int | None) -> np.random.Generator:
    """``default_rng(seed)``, or ``default_rng((seed, stream))``: an independent stream per (seed, stream)."""
    return np.random.default_rng(seed if stream is None else (seed, stream))


def fraction_stream(f: float) -> int:
    """The stream of fraction f for independent draws per (f, seed): round(f * 10^6)."""
    return int(round(f * 1_000_000))


def random_quadratic(n: int, f: float, seed: int, u_scale: float = 0.1,
                     f2_scale: float = 0.015, noise: float = 0.0, T: int = 0,
                     div_range: float = 0.01, stream: int | None = None) -> PolynomialODE:
    """Sec. III C: F1 = -Q diag(h) Q^T (Q Haar-orthogonal), F2 ~ U(-0.015, 0.015)^{n x n^2}, F0 = 0.

    The eigenvalues of F1 are -h; a mode is dissipative when |1 - h| < 1.  ``u_in`` is drawn
    from U(-u_scale, u_scale) (the paper does not state it).  ``noise`` > 0 adds the SGD noise
    F0_t[t] ~ noise * N(0, I), t < T (:func:`f0_noise`, same seed), so F0(t) = F0_t[t].
    ``div_range`` widens the divergent eigenvalues to U(-div_range, 0) (paper: 0.01).
    ``stream`` (e.g. :func:`fraction_stream` of f) draws from ``default_rng((seed, stream))``, so that
    instances of different f with one seed are independent; None draws from ``default_rng(seed)``,
    where all f of one seed share their uniforms (and the divergent draws are nested).
    """
    if n < 1:
        raise UserError(f"random_quadratic: n={n} must be >= 1")
    rng = _rng(seed, stream)
    h = _spectrum(n, f, rng, div_range)
    g = rng.standard_normal((n, n))
    Q, R = np.linalg.qr(g)
    Q = Q * np.sign(np.diag(R))  # Haar measure
    F1 = -(Q * h) @ Q.T
    F2 = rng.uniform(-f2_scale, f2_scale, (n, n * n))
    u_in = rng.uniform(-u_scale, u_scale, n)
    ode = PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.csr_matrix(F1), sp.csr_matrix(F2)], u_in=u_in,
                        meta={"generator": "random", "n": n, "f": f, "seed": seed})
    return with_f0_noise(ode, noise, T, seed) if noise else ode


def sparse_quadratic(n: int, f: float, seed: int, f2_per_row: int = 4, u_scale: float = 0.1,
                     f2_scale: float = 0.015, div_range: float = 0.01, stream: int | None = None) -> PolynomialODE:
    """Sparse analogue of :func:`random_quadratic` for scale runs (n up to 10^2-10^3, Delta >= 10^6).

    F1 = -Q diag(h) Q^T with Q a random permutation times random Givens rotations on disjoint
    pairs (so F1 has <= 2 nonzeros per row and the same spectrum -h); F2 has ``f2_per_row``
    U(-0.015, 0.015) entries per row at random columns; F0 = 0.  ``stream``: as :func:`random_quadratic`.
    """
    rng = _rng(seed, stream)
    h = _spectrum(n, f, rng, div_range)
    perm = rng.permutation(n)
    rows, cols, vals = [], [], []
    for k in range(0, n - 1, 2):
        th = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(th), np.sin(th)
        i, j = perm[k], perm[k + 1]
        rows += [i, i, j, j]
        cols += [k, k + 1, k, k + 1]
        vals += [c, -s, s, c]
    if n % 2:
        rows.append(perm[n - 1])
        cols.append(n - 1)
        vals.append(1.0)
    Q = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    F1 = -(Q @ sp.diags(h) @ Q.T)
    r = np.repeat(np.arange(n), f2_per_row)
    c = rng.integers(0, n * n, n * f2_per_row)
    F2 = sp.csr_matrix((rng.uniform(-f2_scale, f2_scale, r.size), (r, c)), shape=(n, n * n))
    u_in = rng.uniform(-u_scale, u_scale, n)
    return PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.csr_matrix(F1), F2], u_in=u_in,
                         meta={"generator": "sparse", "n": n, "f": f, "seed": seed})


def logistic(a: float, c: float, u0: float, h: float = 1.0, cubic: float = 0.0) -> PolynomialODE:
    """Scalar map u(t+1) - u(t) = h(-a u - c u^2 - cubic u^3), n = 1 (step size h scales every F_l)."""
    F = [sp.csr_matrix((1, 1)), sp.csr_matrix([[-h * a]]), sp.csr_matrix([[-h * c]])]
    if cubic:
        F.append(sp.csr_matrix([[-h * cubic]]))
    return PolynomialODE(F=F, u_in=np.array([u0]), meta={"generator": "logistic", "a": a, "c": c, "h": h})


def scale_step(ode: PolynomialODE, h: float) -> PolynomialODE:
    """The same vector field with step size h: F_l -> h F_l and F0_t -> h F0_t (u_in unchanged)."""
    return PolynomialODE(F=[h * F for F in ode.F], u_in=ode.u_in.copy(), meta={**ode.meta, "h": h},
                         F0_t=None if ode.F0_t is None else h * ode.F0_t)
