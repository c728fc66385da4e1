"""Hessian spectra of neural networks by distributed stochastic Lanczos quadrature.

Public names (imported on first use, so ``import hpcqml.hessian`` does not import torch):

``HessianLinearOperator``  the Hessian of any ``loss_fn(output, target)`` over tensors or a
                           ``DataLoader`` as a linear operator (``@``, ``matvec``, ``matmat``,
                           ``to_scipy``), data sharded over an optional MPI communicator.
``HessianOperator``        the same for one tensor batch and the mean cross-entropy.
``CurvatureOperator``      the base class; a product route is one subclass
                           (``DoubleBackwardHessian``, ``FuncHessian``).
``param_space``            the coordinate subspace (all parameters or a pruning mask's support).
``slq``, ``Spectrum``      stochastic Lanczos quadrature returning a spectrum with uncertainties.

Modules
-------
``hvp``      exact Hessian-vector products of a loss over a data set, micro-batched,
             data-sharded over an MPI communicator.
``lanczos``  Lanczos with float64 recurrence coefficients and full reorthogonalisation
             against a Krylov basis sharded by parameter slices across ranks.
``slq``      ``slq`` on any symmetric operator: Rademacher probes, probe groups, Hutchinson trace.
``spectrum`` the ``Spectrum`` and ``Estimate`` types (numpy only, no torch).
``density``  Gaussian-kernel spectral density on a grid (width rule stored).
``proxy``    error proxy of eq. III.10-III.13, dissipative fraction (eq. II.28) and
             time limit (eq. II.34).

Shared definitions live in the low layer :mod:`hpcqml.modes`: the dissipative-mode test
``|1 + a| < 1``, the representative a_+ and the formulas of eq. II.92 and eq. II.93
(``Spectrum.dissipative_fraction`` and ``Spectrum.fidelity_ii93`` evaluate them on SLQ
masses with a = -lambda or a = -eta*lambda).

Every kernel takes its MPI communicator as an argument; none reads files or configs.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CurvatureOperator": "hvp", "HessianLinearOperator": "hvp", "HessianOperator": "hvp",
    "DoubleBackwardHessian": "hvp", "FuncHessian": "hvp", "ParamSpace": "hvp", "param_space": "hvp",
    "slq": "slq", "Spectrum": "spectrum", "Estimate": "spectrum",
}

__all__ = ["CurvatureOperator", "DoubleBackwardHessian", "Estimate", "FuncHessian", "HessianLinearOperator",
           "HessianOperator", "ParamSpace", "Spectrum", "param_space", "slq"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
