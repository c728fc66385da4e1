"""Lanczos on several probes in lockstep, and recurrences kept in memory so they can be extended.

SLQ's probes are independent three-term recurrences.  Running them one after another costs
one pass over the data per Lanczos step and probe; advancing k of them together costs one
pass per step for all k, because a block product ``H [v_1 ... v_k]`` shares the forward and
backward work over the data (``matmat``).  Each probe keeps its own recurrence, its own
(sharded) Krylov basis and its own reorthogonalisation, with exactly the arithmetic of
:func:`hpcqml.hessian.lanczos.lanczos`, so a probe run in a block gives the result it gives
alone up to the rounding of the product itself (a block product may sum in another order).

:class:`LanczosEngine` holds each probe's running state (its basis slice, the next Lanczos
vector and the coefficients so far) between calls.  Asking for more steps later *extends*
the recurrence: going from m to m' steps costs m' - m products, and the extended recurrence
is the one a fresh m'-step run of the same engine settings computes, bit for bit (the same
operations in the same order: the column-chunk width of the reorthogonalisation sums is
fixed by the engine's ``chunk_steps``, the step budget, not by the steps taken so far, so an
extended run and a resumed one that reruns its probes round alike).  The m-step result of
a longer recurrence is its leading part: ``alpha[:m]``, ``beta[:m]`` (``beta[m-1]`` is the
m-step residual norm).

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
    """The running state of one probe's recurrence.

    ``v`` is the next Lanczos vector (this rank's slice; None once the recurrence cannot
    go on: a breakdown or all n dimensions spanned); with full reorthogonalisation
    ``basis[:len(alphas)]`` holds ``v_1 .. v_j`` and, when it has room, ``basis[len(alphas)]``
    holds ``v`` too.
    """

    number: int
    v: torch.Tensor | None
    znorm2: float
    basis: torch.Tensor | None
    v_prev: torch.Tensor | None = None
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    broke: bool = False


def block_product(operator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> H V`` for an (n, k) block: the operator's ``matmat`` when it has one, else
    ``matvec`` column by column.
    """
    matmat = getattr(operator, "matmat", None)
    if matmat is not None:
        return matmat
    return column_product(operator.matvec)


def column_product(matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> H V`` from ``matvec`` one column at a time (a width-1 block is exactly one
    ``matvec``, so a probe run alone is computed as :func:`hpcqml.hessian.lanczos.lanczos` does).
    """
    return lambda V: torch.stack([matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


class LanczosEngine:
    """Lanczos recurrences of several probes, advanced together and extended on request.

    Args:
        n: dimension of the operator.
        comm: communicator sharding each probe's basis (None = one process).
        reorth: ``full`` or ``none``, as in :func:`hpcqml.hessian.lanczos.lanczos`.
        state_dtype: dtype of the bases and of the products.
        device: where the products run.
        basis_device: where the bases are held (default ``device``).
        rtol: breakdown threshold (default 100 eps of ``state_dtype``).
        label: what is measured (named in errors).
        perf: optional timer/counter object charged with communication time.
        keep: keep each probe's state after its result is returned (so it can be extended);
            False frees it at once.
        chunk_steps: the step count the reorthogonalisation's column-chunk width is derived
            from (``2^24 // chunk_steps`` coordinates per chunk, so the float64 temporaries stay
            near 128 MiB); give the step budget, so every call rounds alike however the steps
            were reached.  None: the steps of each :meth:`advance` call.

    Memory: with ``reorth = "full"`` each held probe keeps ``m`` vectors of this rank's
    ``ceil(n / P)`` coordinates in ``state_dtype`` (m its step count so far).
    """

    def __init__(self, n: int, comm: Any, reorth: str = "full", state_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", basis_device: torch.device | str | None = None,
                 rtol: float | None = None, label: str = "", perf: Any = None, keep: bool = True,
                 chunk_steps: int | None = None) -> None:
        _check_arguments(reorth, 1)
        if chunk_steps is not None and int(chunk_steps) < 1:
            raise ValueError(f"chunk_steps = {chunk_steps}: must be >= 1")
        self.n = int(n)
        self.reorth = reorth
        self.state_dtype = state_dtype
        self.device = torch.device(device)
        self.bdev = torch.device(basis_device) if basis_device is not None else self.device
        self.dist = _Dist(comm, self.n, perf)
        self.rtol = 100.0 * float(torch.finfo(state_dtype).eps) if rtol is None else float(rtol)
        self.label = label
        self.keep = keep
        self.chunk_steps = None if chunk_steps is None else int(chunk_steps)
        self.states: dict[int, _Probe] = {}

    def holds(self, number: int) -> bool:
        """Whether probe ``number`` is held (started and not released)."""
        return int(number) in self.states

    def steps(self, number: int) -> int:
        """Lanczos steps probe ``number`` has taken so far (0 when not held)."""
        p = self.states.get(int(number))
        return 0 if p is None else len(p.alphas)

    def start(self, number: int, z_local: np.ndarray, steps: int) -> None:
        """Start probe ``number`` from its unnormalised start slice ``z_local`` (room for
        ``steps`` basis vectors; more is allocated when it is extended).
        """
        v, znorm2 = _unit_start(z_local, self.dist, self.bdev, self.state_dtype)
        basis = None
        if self.reorth == "full":
            basis = torch.empty((min(max(1, int(steps)), self.n), self.dist.hi - self.dist.lo),
                                dtype=self.state_dtype, device=self.bdev)
            basis[0] = v
        self.states[int(number)] = _Probe(int(number), v, znorm2, basis)

    def release(self, number: int) -> None:
        """Free probe ``number``'s state (it cannot be extended afterwards)."""
        self.states.pop(int(number), None)

    def _room(self, p: _Probe, m: int) -> None:
        """Grow ``p``'s basis to ``m`` rows, keeping its vectors and the pending ``v``."""
        if p.basis is None or p.basis.shape[0] >= m:
            return
        j = len(p.alphas)
        grown = torch.empty((m, p.basis.shape[1]), dtype=p.basis.dtype, device=p.basis.device)
        kept = min(j + 1, p.basis.shape[0])
        grown[:kept] = p.basis[:kept]
        if p.v is not None and j < m:
            grown[j] = p.v
        p.basis = grown

    def advance(self, product: Callable[[torch.Tensor], torch.Tensor], numbers: Sequence[int], steps: int,
                on_step: Callable[[int, int], None] | None = None,
                interrupt: Callable[[], bool] | None = None) -> list[LanczosResult]:
        """Bring the held probes ``numbers`` to ``steps`` Lanczos steps, one block product per step.

        Args:
            product: ``V -> H V`` on full (n, k) tensors on ``device``; collective over ``comm``.
            numbers: probes to advance (each started with :meth:`start` or held from before),
                no number twice.
            steps: the step count m to reach (at most n).  A probe already past ``m`` takes no
                step and gives its leading m-step result.
            on_step: ``on_step(done, total)`` after every block step.
            interrupt: polled after every block step; True stops with :class:`Interrupted`
                (the states stay held and consistent, so a later call goes on).

        Returns:
            One :class:`LanczosResult` per probe, in the order of ``numbers``.
        """
        _check_arguments(self.reorth, steps)
        m = min(int(steps), self.n)
        assert len({int(k) for k in numbers}) == len(numbers), f"probe numbers repeated in {list(numbers)}"
        probes = [self.states[int(k)] for k in numbers]
        cols = max(1, (1 << 24) // max(1, self.chunk_steps or m))
        for p in probes:
            self._room(p, m)
        dist, bdev, label = self.dist, self.bdev, self.label
        while True:
            active = [p for p in probes if p.v is not None and len(p.alphas) < m]
            if not active:
                break
            block = torch.stack([dist.gather(p.v, self.device) for p in active], dim=1)  # type: ignore[arg-type]
            products = product(block)
            del block
            for i, p in enumerate(active):
                j = len(p.alphas)
                where = f"{label + ', ' if label else ''}probe {p.number}, Lanczos step {j}"
                basis = None if p.basis is None else p.basis[:j + 1]
                assert p.v is not None
                alpha, beta, w = _step(products[:, i], p.v, p.v_prev, p.betas[-1] if p.betas else 0.0,
                                       basis, dist, bdev, cols, where)
                p.alphas.append(alpha)
                p.betas.append(beta)
                if j + 1 >= self.n:
                    p.v = None  # the whole space is spanned
                elif _broke_down(p.alphas, p.betas, self.rtol):
                    p.v, p.broke = None, True
                else:
                    p.v_prev, p.v = p.v, (w / beta).to(self.state_dtype)
                    if p.basis is not None and j + 1 < p.basis.shape[0]:
                        p.basis[j + 1] = p.v
                del w
            del products
            if on_step is not None:
                on_step(max(len(p.alphas) for p in active), m)
            if interrupt is not None and interrupt():
                names = ", ".join(str(p.number) for p in probes)
                raise Interrupted(f"probes {names} stopped after Lanczos step "
                                  f"{max(len(p.alphas) for p in active)} of {m}")
        out = [self.result(p.number, m) for p in probes]
        if not self.keep:
            for p in probes:
                self.release(p.number)
        return out

    def result(self, number: int, steps: int) -> LanczosResult:
        """The ``steps``-step result of probe ``number`` (or fewer: where it broke down).

        A breakdown is reported, as a fresh run of ``steps`` steps would, when it happened
        before the last of those steps; spanning all n dimensions is one too.
        """
        p = self.states[int(number)]
        m = min(int(steps), len(p.alphas))
        broke = p.broke and len(p.alphas) < int(steps)
        out = _result(p.number, p.alphas[:m], p.betas[:m], broke or m == self.n, p.znorm2)
        out.unit_roundoff = float(torch.finfo(self.state_dtype).eps) / 2.0
        return out


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
    if len(set(int(p) for p in probes)) != len(probes):
        raise ValueError(f"lockstep Lanczos probes {list(probes)}: a probe number is repeated")
    engine = LanczosEngine(n, comm, reorth=reorth, state_dtype=state_dtype, device=device,
                           basis_device=basis_device, rtol=rtol, label=label, perf=perf, keep=False,
                           chunk_steps=min(int(steps), int(n)))
    for number, z in zip(probes, starts, strict=True):
        engine.start(number, z, steps)
    return engine.advance(matmat, probes, steps, on_step=on_step, interrupt=interrupt)
