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

Across runs a probe's running state can be taken out of the engine (:meth:`LanczosEngine.export`,
a dict of plain values and CPU tensors that ``torch.save`` writes) and put back into a new one
(:meth:`LanczosEngine.restore`, or :meth:`LanczosEngine.offer` to put it back only when the
probe is first advanced); advancing the restored probe continues the same recurrence.
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
    #: the reorthogonalisation's column-chunk width of the last advance (0: not advanced yet)
    cols: int = 0


#: version of the dict :meth:`LanczosEngine.export` returns
STATE_FORMAT = 1

#: what a state must agree on with the engine it is restored into
_STATE_KEYS = ("n", "group_size", "lo", "hi", "dtype", "reorth")


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
        #: states handed to :meth:`offer`, restored when their probe is first advanced
        self.offered: dict[int, dict[str, Any]] = {}

    def holds(self, number: int) -> bool:
        """Whether probe ``number`` is held (started, restored or offered, and not released)."""
        return int(number) in self.states or int(number) in self.offered

    def steps(self, number: int) -> int:
        """Lanczos steps probe ``number`` has taken so far (0 when not held)."""
        p = self.states.get(int(number))
        if p is None:
            offered = self.offered.get(int(number))
            return 0 if offered is None else int(offered["alphas"].numel())
        return len(p.alphas)

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
        self.offered.pop(int(number), None)

    def _cols(self, m: int) -> int:
        """Coordinates per column chunk of the reorthogonalisation sums for an advance to ``m`` steps."""
        return max(1, (1 << 24) // max(1, self.chunk_steps or m))

    def describe(self) -> dict[str, Any]:
        """What a state must match to be restored here: n, the group size, this rank's slice
        ``[lo, hi)``, the basis dtype and the reorthogonalisation.
        """
        return {"n": self.n, "group_size": self.dist.size, "lo": self.dist.lo, "hi": self.dist.hi,
                "dtype": str(self.state_dtype).replace("torch.", ""), "reorth": self.reorth}

    def export(self, number: int) -> dict[str, Any]:
        """Probe ``number``'s running state as plain values and CPU tensors (copies).

        Keys: ``format``; what :meth:`describe` gives (n, group_size, lo, hi, dtype, reorth);
        ``cols`` (the column-chunk width of its last advance, 0 if none); ``probe``;
        ``alphas``, ``betas`` (float64, one entry per step j taken); ``znorm2`` (``||z||^2``
        of the start vector); ``broke``; ``v`` (this rank's slice of the next Lanczos vector
        v_{j+1}, None when the recurrence cannot go on); ``v_prev`` (v_j, None before the
        first step); ``basis`` (rows ``v_1 .. v_j`` of this rank's slice with full
        reorthogonalisation and a ``v`` to go on from, else None).

        Memory: a copy of the basis rows, ``j * (hi - lo)`` values of the state dtype.
        """
        p = self._probe(int(number))
        j = len(p.alphas)

        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True).contiguous()
        basis = cpu(p.basis[:j]) if p.basis is not None and p.v is not None else None
        return {"format": STATE_FORMAT, **self.describe(), "cols": int(p.cols), "probe": int(p.number),
                "alphas": torch.tensor(p.alphas, dtype=torch.float64),
                "betas": torch.tensor(p.betas, dtype=torch.float64),
                "znorm2": float(p.znorm2), "broke": bool(p.broke),
                "v": cpu(p.v), "v_prev": cpu(p.v_prev), "basis": basis}

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Why ``state`` (from :meth:`export`) cannot be restored into this engine, or None."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            return f"not a Lanczos state of format {STATE_FORMAT}"
        mine = self.describe()
        for key in _STATE_KEYS:
            if state.get(key) != mine[key]:
                return f"{key} {state.get(key)!r} differs from this run's {mine[key]!r}"
        nloc = self.dist.hi - self.dist.lo
        alphas, betas = state.get("alphas"), state.get("betas")
        if not (isinstance(alphas, torch.Tensor) and isinstance(betas, torch.Tensor)
                and alphas.dtype == betas.dtype == torch.float64 and alphas.dim() == betas.dim() == 1
                and alphas.numel() == betas.numel() and alphas.numel() >= 1):
            return "the coefficients alphas/betas are not two float64 vectors of one length (>= 1)"
        j = alphas.numel()
        if not isinstance(state.get("znorm2"), float) or not isinstance(state.get("broke"), bool):
            return "znorm2 (a float) or broke (a bool) is missing"
        v, v_prev, basis = state.get("v"), state.get("v_prev"), state.get("basis")
        for name, t in (("v", v), ("v_prev", v_prev)):
            if t is not None and not (isinstance(t, torch.Tensor) and tuple(t.shape) == (nloc,)):
                return f"{name} is not a vector of this rank's {nloc} coordinates"
        if v is not None and v_prev is None:
            return "v_prev is missing"
        if v is not None and self.reorth == "full":
            if not (isinstance(basis, torch.Tensor) and tuple(basis.shape) == (j, nloc)):
                return f"the basis is not {j} rows of this rank's {nloc} coordinates"
        if v is None and not state.get("broke") and j < self.n:
            return "no next vector, but no breakdown either"
        if v is not None and state.get("broke"):
            return "a breakdown, but a next vector too"
        return None

    def restore(self, number: int, state: dict[str, Any], steps: int | None = None) -> None:
        """Hold probe ``number`` with the running state ``state`` (from :meth:`export`).

        Advancing it then continues the exported recurrence: the same operations as if it
        had never stopped.  The alphas/betas are bit for bit those of an uninterrupted run
        when the reorthogonalisation sums are chunked alike, i.e. the state's ``cols``
        equals this engine's (``2**24 // chunk_steps``, so the same ``chunk_steps``), or
        this rank's slice ``hi - lo`` is at most both widths (one chunk either way); with
        other chunk boundaries they agree to the rounding of the float64 sums.

        Args:
            number: the probe number (the state's own ``probe`` is not checked against it).
            state: the exported state (tensors on any device; copied to this engine's).
            steps: room for this many basis vectors (default: the steps taken plus one).

        Raises:
            ValueError: the state does not fit this engine (:meth:`mismatch` says why).
        """
        self._check(number, state)
        self._install(number, state, steps)

    def _check(self, number: int, state: dict[str, Any]) -> None:
        """Raise ValueError naming why ``state`` does not fit this engine (:meth:`mismatch`)."""
        why = self.mismatch(state)
        if why is not None:
            raise ValueError(f"{self.label + ': ' if self.label else ''}probe {number}: cannot restore: {why}")

    def _install(self, number: int, state: dict[str, Any], steps: int | None) -> None:
        """Hold probe ``number`` with ``state``, already checked (:meth:`restore`)."""
        alphas = [float(a) for a in state["alphas"].tolist()]
        betas = [float(b) for b in state["betas"].tolist()]
        j = len(alphas)

        def here(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=self.bdev, dtype=self.state_dtype).clone()
        v = here(state["v"])
        basis = None
        if self.reorth == "full" and v is not None:
            rows = min(max(j + 1, int(steps or 0)), self.n)
            basis = torch.empty((rows, self.dist.hi - self.dist.lo), dtype=self.state_dtype, device=self.bdev)
            basis[:j].copy_(state["basis"])  # into place (same dtype, checked): no second copy on the device
            if j < rows:
                basis[j] = v
        self.offered.pop(int(number), None)
        self.states[int(number)] = _Probe(int(number), v, float(state["znorm2"]), basis,
                                          v_prev=here(state["v_prev"]), alphas=alphas, betas=betas,
                                          broke=bool(state["broke"]), cols=int(state.get("cols", 0)))

    def offer(self, number: int, state: dict[str, Any]) -> None:
        """Hold probe ``number`` as ``state`` without copying it yet: it is restored
        (:meth:`restore`) when the probe is first advanced, so a state read lazily from a
        file (``torch.load(mmap=True)``) takes memory only while its probe is in a block.

        Raises:
            ValueError: the state does not fit this engine.
        """
        self._check(number, state)
        self.states.pop(int(number), None)
        self.offered[int(number)] = state

    def _probe(self, number: int, steps: int | None = None) -> _Probe:
        """The held state of probe ``number``, restoring an offered one first."""
        state = self.offered.pop(number, None)
        if state is not None:  # checked when it was offered
            self._install(number, state, steps)
        return self.states[number]

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
        probes = [self._probe(int(k), m) for k in numbers]
        cols = self._cols(m)
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
                p.cols = cols
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
        p = self._probe(int(number))
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
