"""Hessian spectra of neural networks by distributed stochastic Lanczos quadrature.

Public names (imported on first use, so ``import hpcqml.hessian`` does not import torch):

``HessianLinearOperator``  the Hessian of any ``loss_fn(output, target)`` over tensors or a
                           ``DataLoader`` as a linear operator (``@``, ``matvec``, ``matmat``,
                           ``to_scipy``), data sharded over an optional MPI communicator.
``CurvatureOperator``      the base class; a product route is one subclass
                           (``DoubleBackwardHessian``, ``FuncHessian``).
``param_space``            the coordinate subspace (all parameters or a pruning mask's support).
``slq``, ``Spectrum``      stochastic Lanczos quadrature returning a spectrum with proven
                           brackets and sampling intervals (optionally adaptive).

Modules
-------
``hvp``      exact Hessian-vector products of a loss over a data set, micro-batched,
             data-sharded over an MPI communicator.
``lanczos``  Lanczos with float64 recurrence coefficients and full reorthogonalisation
             against a Krylov basis sharded by parameter slices across ranks.
``slq``      ``slq`` on any symmetric operator: Rademacher probes, probe groups, Hutchinson trace.
``spectrum`` the ``Spectrum`` and ``Estimate`` types (numpy only, no torch): proven quadrature
             brackets, Student t sampling intervals, combined intervals, ``next_growth``.
``quadrature`` Chebyshev-Markov-Stieltjes and Gauss-Radau bounds of one probe's spectral
             measure from its Lanczos matrix (numpy only).
``eigenpairs`` ``top_eigenpairs`` (thick-restart Lanczos with checked residuals, basis sharded
             as in SLQ) and deflated SLQ (the outliers exactly, the rest by SLQ on P H P).
``curvature`` the GGN, the empirical and Monte-Carlo Fisher on the same operator base, and
             ``build_curvature`` (any of them, or Hessian - GGN, by name; per block).
``blocks``   parameter blocks (``layer``, ``module`` or name patterns) and block-diagonal products.
``algebra``  operator algebra: sums, scalings, compositions, transposes, ``to_scipy``.
``lockstep`` Lanczos on several probes at once, one block product per step.
``density``  Gaussian-kernel spectral density on a grid (width rule stored).
``proxy``    error proxy of eq. III.10-III.13, dissipative fraction (eq. II.28) and
             time limit (eq. II.34).

Shared definitions live in the low layer :mod:`hpcqml.modes`: the dissipative-mode test
``|1 + a| < 1``, the representative a_+ and the formulas of eq. II.92 and eq. II.93
(``Spectrum.dissipative_fraction`` and ``Spectrum.overlap_ii93`` evaluate them on SLQ
masses with a = -lambda or a = -eta*lambda).

Every kernel takes its MPI communicator as an argument; none reads files or configs.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CurvatureOperator": "hvp", "HessianLinearOperator": "hvp",
    "DoubleBackwardHessian": "hvp", "FuncHessian": "hvp", "ParamSpace": "hvp", "param_space": "hvp",
    "slq": "slq", "Spectrum": "spectrum", "Estimate": "spectrum",
    "top_eigenpairs": "eigenpairs", "Eigenpairs": "eigenpairs", "deflated_slq": "eigenpairs",
    "DeflatedSLQ": "eigenpairs", "DeflatedOperator": "eigenpairs",
    "GGNLinearOperator": "curvature", "EmpiricalFisherLinearOperator": "curvature",
    "MCFisherLinearOperator": "curvature", "build_curvature": "curvature",
    "BlockDiagonalOperator": "blocks", "partition": "blocks", "lanczos_lockstep": "lockstep",
}

__all__ = ["BlockDiagonalOperator", "CurvatureOperator", "DeflatedOperator", "DeflatedSLQ", "DoubleBackwardHessian",
           "Eigenpairs", "EmpiricalFisherLinearOperator", "Estimate", "FuncHessian", "GGNLinearOperator",
           "HessianLinearOperator", "MCFisherLinearOperator", "ParamSpace", "Spectrum",
           "build_curvature", "deflated_slq", "lanczos_lockstep", "param_space", "partition", "slq",
           "top_eigenpairs"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
