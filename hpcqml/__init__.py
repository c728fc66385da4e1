"""hpcqml: distributed benchmarks for Hessian spectra and the classical side of quantum training.

Covers pruned networks' Hessian spectra and Carleman training, usable as a pipeline
(``hpcqml run``) or as a library.

Library entry points (imported on first use: ``import hpcqml`` stays light):
``hpcqml.slq`` (from :mod:`hpcqml.hessian.slq`), ``hpcqml.Spectrum`` (from :mod:`hpcqml.hessian.spectrum`),
``hpcqml.HessianLinearOperator`` (from :mod:`hpcqml.hessian.hvp`).  See docs/library.md.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"slq": "hpcqml.hessian.slq", "Spectrum": "hpcqml.hessian.spectrum",
         "HessianLinearOperator": "hpcqml.hessian.hvp"}


def __getattr__(name: str) -> Any:
    """Import a library entry point's module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
