"""Gaussian-kernel smoothing of an SLQ spectral measure on a grid.

Given pooled nodes ``theta_i`` and weights ``w_i`` (sum 1), the smoothed density is

    rho(lambda) = sum_i w_i exp(-(lambda - theta_i)^2 / (2 sigma^2)) / (sigma sqrt(2 pi)).

Width rule (stored with every density): ``sigma = width_factor * (theta_max - theta_min)``
(default width_factor = 0.01), floored at ``min_width`` (default 1e-6) so a measure
concentrated on one value still has a density.  The grid has ``points`` (default 256, as
in the paper) equally spaced values on ``[theta_min - 5 sigma, theta_max + 5 sigma]``, so
less than 1e-6 of each kernel's mass falls outside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcqml.errors import UserError

WIDTH_RULE = ("sigma = max(width_factor * (theta_max - theta_min), min_width); "
              "grid = linspace(theta_min - 5 sigma, theta_max + 5 sigma, points)")


@dataclass
class Density:
    """A smoothed spectral density and the width rule that made it."""

    grid: np.ndarray      # (points,) eigenvalue lambda
    rho: np.ndarray       # (points,) density, integrates to ~1 over the grid
    sigma: float
    width_factor: float
    min_width: float
    rule: str = WIDTH_RULE


def kernel_width(theta_min: float, theta_max: float, width_factor: float = 0.01,
                 min_width: float = 1e-6) -> float:
    """The stated width rule: ``max(width_factor * (theta_max - theta_min), min_width)``."""
    return float(max(width_factor * (theta_max - theta_min), min_width))


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, points: int = 256,
                     width_factor: float = 0.01, min_width: float = 1e-6) -> Density:
    """Smooth the measure ``sum_i w_i delta(theta_i)`` with a Gaussian kernel on a grid."""
    x = np.asarray(nodes, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    ok = ~(np.isnan(x) | np.isnan(w))
    x, w = x[ok], w[ok]
    if x.size == 0:
        raise UserError("spectral density needs at least one Ritz node")
    if points < 2:
        raise UserError(f"density grid points = {points}: must be >= 2")
    if width_factor <= 0 or min_width <= 0:
        raise UserError("density width_factor and min_width must be > 0")
    sigma = kernel_width(float(x.min()), float(x.max()), width_factor, min_width)
    grid = np.linspace(x.min() - 5 * sigma, x.max() + 5 * sigma, int(points))
    rho = density_on_grid(x, w, grid, sigma)
    return Density(grid=grid, rho=rho, sigma=sigma, width_factor=float(width_factor), min_width=float(min_width))


def density_on_grid(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """``rho`` on a given grid for a given kernel width (the sum in the module docstring).

    Args:
        nodes: node positions (NaN entries are skipped).
        weights: node masses, same length.
        grid: evaluation points.
        sigma: kernel width (> 0).

    Returns:
        float64 array of ``grid``'s shape.
    """
    x = np.asarray(nodes, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    ok = ~(np.isnan(x) | np.isnan(w))
    x, w = x[ok], w[ok]
    grid = np.asarray(grid, dtype=np.float64)
    rho = np.zeros_like(grid)
    norm = 1.0 / (sigma * np.sqrt(2 * np.pi))
    for s in range(0, x.size, 4096):
        d = (grid[:, None] - x[None, s:s + 4096]) / sigma
        rho += (np.exp(-0.5 * d * d) * w[None, s:s + 4096]).sum(axis=1) * norm
    return rho
