"""Lanczos on several probes in lockstep: one block product per step for all of them.

SLQ's probes are independent three-term recurrences.  Running them one after another costs
one pass over the data per Lanczos step and probe; advancing k of them together costs one
pass per step for all k, because a block product ``H [v_1 ... v_k]`` shares the forward and
backward work over the data (``matmat``).  Each probe keeps its own recurrence, its own
(sharded) Krylov basis and its own reorthogonalisation, with exactly the arithmetic of
:func:`hpcqml.hessian.lanczos.lanczos`, so a probe run in a block gives the result it gives
alone up to the rounding of the product itself (a block product may sum in another order).

A probe that breaks down (an invariant subspace) or reaches its step count leaves the block;
the others go on with a narrower product.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpcqml.hessian.lanczos import (
    Interrupted,
    LanczosResult,
    _broke_down,
    _check_arguments,
    _Dist,
    _result,
    _step,
    _unit_start,
)


@dataclass
class _Probe:
    """The running state of one probe's recurrence."""

    number: int
    v: torch.Tensor
    znorm2: float
    basis: torch.Tensor | None
    v_prev: torch.Tensor | None = None
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    breakdown: bool = False
    done: bool = False


def block_product(operator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> H V`` for an (n, k) block: the operator's ``matmat`` when it has one, else
    ``matvec`` column by column.
    """
    matmat = getattr(operator, "matmat", None)
    if matmat is not None:
        return matmat
    return lambda V: torch.stack([operator.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def lanczos_lockstep(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, comm: Any,
                     starts: Sequence[np.ndarray], probes: Sequence[int], steps: int = 100, reorth: str = "full",
                     state_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     basis_device: torch.device | str | None = None, rtol: float | None = None, label: str = "",
                     perf: Any = None, on_step: Callable[[int, int], None] | None = None,
                     interrupt: Callable[[], bool] | None = None) -> list[LanczosResult]:
    """Run ``steps`` Lanczos steps of every probe together, one ``matmat`` per step.

    Args:
        matmat: ``V -> H V`` on full (n, k) tensors on ``device``; collective over ``comm``.
        n: dimension of the operator.
        comm: communicator sharding each probe's basis (None = one process).
        starts: each probe's slice ``[lo, hi)`` of its unnormalised start vector.
        probes: the probe numbers (stored in the results, named in errors).
        steps: Lanczos steps m per probe (at most n).
        reorth: ``full`` or ``none``, as in :func:`hpcqml.hessian.lanczos.lanczos`.
        state_dtype: dtype of the bases and of the products.
        device: where the products run.
        basis_device: where the bases are held (default ``device``).
        rtol: breakdown threshold (default 100 eps of ``state_dtype``).
        label: what is measured (named in errors).
        perf: optional timer/counter object charged with communication time.
        on_step: ``on_step(done, total)`` after every block step (done counts block steps).
        interrupt: polled after every block step; True stops with :class:`Interrupted`.

    Returns:
        One :class:`LanczosResult` per probe, in the order of ``probes``.
    """
    _check_arguments(reorth, steps)
    if len(starts) != len(probes) or not probes:
        raise ValueError(f"lockstep Lanczos needs one start per probe (got {len(starts)} starts, {len(probes)} probes)")
    device = torch.device(device)
    bdev = torch.device(basis_device) if basis_device is not None else device
    dist = _Dist(comm, n, perf)
    m = min(int(steps), int(n))
    rtol = 100.0 * float(torch.finfo(state_dtype).eps) if rtol is None else rtol
    cols = max(1, (1 << 24) // max(1, m))
    state = []
    for number, z in zip(probes, starts, strict=True):
        v, znorm2 = _unit_start(z, dist, bdev, state_dtype)
        basis = None
        if reorth == "full":
            basis = torch.empty((m, dist.hi - dist.lo), dtype=state_dtype, device=bdev)
            basis[0] = v
        state.append(_Probe(int(number), v, znorm2, basis))
    for j in range(m):
        active = [p for p in state if not p.done]
        if not active:
            break
        block = torch.stack([dist.gather(p.v, device) for p in active], dim=1)
        products = matmat(block)
        del block
        for i, p in enumerate(active):
            where = f"{label + ', ' if label else ''}probe {p.number}, Lanczos step {j}"
            basis = None if p.basis is None else p.basis[:j + 1]
            alpha, beta, w = _step(products[:, i], p.v, p.v_prev, p.betas[-1] if p.betas else 0.0,
                                   basis, dist, bdev, cols, where)
            p.alphas.append(alpha)
            p.betas.append(beta)
            if j == m - 1:
                p.done = True
            elif _broke_down(p.alphas, p.betas, rtol):
                p.done = p.breakdown = True
            else:
                p.v_prev, p.v = p.v, (w / beta).to(state_dtype)
                if p.basis is not None:
                    p.basis[j + 1] = p.v
            del w
        del products
        if on_step is not None:
            on_step(j + 1, m)
        if interrupt is not None and interrupt():
            numbers = ", ".join(str(p.number) for p in state)
            raise Interrupted(f"probes {numbers} stopped after block step {j + 1} of {m}")
    return [_result(p.number, p.alphas, p.betas, p.breakdown or len(p.alphas) == n, p.znorm2) for p in state]
