"""Stochastic Lanczos quadrature (SLQ) over Rademacher probes, optionally in probe groups.

For Rademacher probes ``z_l`` (l = 1..n_v) and ``v_l = z_l/sqrt(n)``, Lanczos on ``H`` from
``v_l`` gives Gauss nodes ``theta_{l,i}`` and weights ``tau_{l,i}``; the spectral measure

    mu(lambda) = (1/n) sum_k delta(lambda - lambda_k)
              ~= (1/n_v) sum_l sum_i tau_{l,i} delta(lambda - theta_{l,i})

is unbiased in expectation over the probes for every polynomial of degree < 2m.  The
Hutchinson samples are ``z_l^T H z_l = n alpha_{l,1}``.  The quantities derived from the
pooled probes, with their uncertainties, are defined once in
:mod:`hpcqml.hessian.spectrum`.

Probe groups: the ranks of ``comm`` are split into G contiguous groups
(``comm.Split``); group g runs the probes ``l`` with ``l mod G = g``, k at a time in
lockstep (one block product per Lanczos step for k probes, :mod:`hpcqml.hessian.lockstep`),
with the data and the Krylov bases sharded over its own ranks.  Probe ``l`` is always drawn
from ``(seed, l)``, so results do not depend on the number of ranks, groups or k (up to the
rounding of the products).  Adaptive runs keep each probe's recurrence, so a step growth
extends it instead of running it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.lanczos import Interrupted, LanczosResult, rademacher_slice
from hpcqml.hessian.lockstep import LanczosEngine, block_product, column_product
from hpcqml.parallel import auto_width
from hpcqml.hessian.spectrum import GROW_STEPS, Estimate, Spectrum, next_growth, pad  # noqa: F401  (pad re-exported)
from hpcqml.parallel import block_bounds, memory_per_rank


@dataclass
class GroupLayout:
    """Where this rank sits: ``comm`` is its probe group, ``index`` of ``count`` groups."""

    comm: Any
    index: int
    count: int
    world: Any

    def owned(self, probes: Sequence[int]) -> list[int]:
        """The probes of ``probes`` that this rank's group runs: probe ``l`` belongs to group
        ``l mod G``, whatever list it comes in, so a probe extended later (in memory or from
        its Krylov basis on disk) is extended by the group that holds its recurrence.
        """
        return [p for p in probes if p % self.count == self.index]


def probe_groups(world: Any, groups: int = 1) -> GroupLayout:
    """Split ``world`` into ``groups`` contiguous near-equal groups (collective)."""
    size = 1 if world is None else world.Get_size()
    if groups < 1 or groups > size:
        raise UserError(f"probe groups = {groups}: must be between 1 and the number of ranks ({size})")
    if world is None:
        return GroupLayout(comm=None, index=0, count=1, world=None)
    rank = world.Get_rank()
    color = rank * groups // size
    sub = world.Split(color, rank) if groups > 1 else world
    return GroupLayout(comm=sub, index=color, count=groups, world=world)


class ProbesInterrupted(Exception):
    """A stop was requested; ``done`` lists the probes finished (and handed to ``on_round``)."""

    def __init__(self, done: list[int], remaining: list[int]) -> None:
        super().__init__(f"stopped with probes {done} finished and {remaining} not run")
        self.done = done
        self.remaining = remaining


def run_probes(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, layout: GroupLayout,
               probes: Sequence[int], seed: int, steps: int = 100, reorth: str = "full",
               state_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               basis_device: torch.device | str | None = None, label: str = "",
               on_round: Callable[[list[LanczosResult]], None] | None = None,
               perf: Any = None, on_step: Callable[[int | str, int, int], None] | None = None,
               should_stop: Callable[[Any], bool] | None = None, width: int = 1,
               matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
               engine: LanczosEngine | None = None) -> list[LanczosResult]:
    """Run SLQ for the listed probe numbers; collective over ``layout.world``.

    Every group runs its own probes (probe ``l`` on group ``l mod G``) ``width`` at a time
    in lockstep: one block product per Lanczos step for the block (:mod:`hpcqml.hessian.lockstep`).
    A probe the ``engine`` already holds with fewer steps is extended, not rerun.

    Args:
        matvec: the product, collective over ``layout.comm`` (the group).
        n: operator dimension.
        layout: the probe groups (:func:`probe_groups`).
        probes: probe numbers to run; probe ``l`` starts from ``rademacher_slice(.., seed, l)``.
        seed: probe seed.
        steps: Lanczos steps per probe.
        reorth: ``full`` or ``none``.
        state_dtype: dtype of the basis and of the products.
        device: where the products run.
        basis_device: where the basis is held.
        label: what is measured (named in errors).
        perf: optional timer/counter object.
        on_round: called on every rank with the probes finished in a round (gathered), so a
            caller can commit them collectively.
        on_step: ``on_step(probe, done, total)`` after every Lanczos step (progress); ``probe``
            is the probe number, or for a block of several the numbers as text (``"0-3"``).
        should_stop: ``should_stop(comm)``, collective over ``comm``: polled over the group
            after every Lanczos step and over ``layout.world`` after every round.
        width: probes advanced together (1 = one after another, each product a ``matvec``).
        matmat: the block product ``V -> H V`` used when ``width > 1`` (default: ``matvec``
            column by column).
        engine: the recurrences held from earlier calls, over ``layout.comm`` (default: a
            new one that keeps nothing).

    Returns:
        All results, sorted by probe.

    Raises:
        ValueError: a probe number listed twice.
        ProbesInterrupted: ``should_stop`` said so; finished probes went to ``on_round`` first.
    """
    probes = [int(p) for p in probes]
    _check_unique(probes)
    if int(width) < 1:
        raise UserError(f"lockstep width = {width}: must be >= 1")
    if engine is None:
        engine = LanczosEngine(n, layout.comm, reorth=reorth, state_dtype=state_dtype, device=device,
                               basis_device=basis_device, label=label, perf=perf, keep=False,
                               chunk_steps=min(int(steps), int(n)))
    product = column_product(matvec) if width == 1 or matmat is None else matmat
    out: list[LanczosResult] = []
    G, k = layout.count, int(width)
    grank = 0 if layout.comm is None else layout.comm.Get_rank()
    gsize = 1 if layout.comm is None else layout.comm.Get_size()
    lo, hi = block_bounds(n, grank, gsize)
    mine = layout.owned(probes)
    per_group = [sum(1 for p in probes if p % G == g) for g in range(G)]
    rounds = max(-(-c // k) for c in per_group)
    for r in range(rounds):
        block = mine[r * k:(r + 1) * k]
        results: list[LanczosResult] | None = []
        if block:
            for p in block:
                if not engine.holds(p):
                    engine.start(p, rademacher_slice(n, lo, hi, seed, p), steps)
            name: int | str = block[0] if len(block) == 1 else _names(block)
            step_cb = None if on_step is None else (lambda done, total, name=name: on_step(name, done, total))
            stop_cb = None if should_stop is None else (lambda: should_stop(layout.comm))
            try:
                results = engine.advance(product, block, steps, on_step=step_cb, interrupt=stop_cb)
            except Interrupted:
                results = None
        payload = (results is None, results if grank == 0 or G == 1 else None)
        gathered = layout.world.allgather(payload) if G > 1 else [payload]
        done = sorted((x for _, part in gathered if part for x in part), key=lambda x: x.probe)
        if on_round is not None and done:
            on_round(done)
        out.extend(done)
        interrupted = any(stopped for stopped, _ in gathered)
        if interrupted or (should_stop is not None and should_stop(layout.world)):
            finished = sorted(x.probe for x in out)
            raise ProbesInterrupted(finished, [p for p in probes if p not in finished])
    return sorted(out, key=lambda x: x.probe)


def _names(block: Sequence[int]) -> str:
    """Probe numbers as short text: ``0-3`` for a run of consecutive numbers, else ``0,2,5``."""
    if list(block) == list(range(block[0], block[0] + len(block))):
        return f"{block[0]}-{block[-1]}"
    return ",".join(map(str, block))


def _check_unique(probes: Sequence[int]) -> None:
    """Refuse a probe number listed twice (its recurrence would be advanced twice per step)."""
    seen: set[int] = set()
    for p in probes:
        if p in seen:
            raise ValueError(f"probe {p} is listed more than once in {list(probes)}; give each probe number once")
        seen.add(p)


def operator_size(operator: Any) -> int:
    """``n`` of an operator: its int attribute ``n``, else ``shape[0]`` of a square ``shape``."""
    n = getattr(operator, "n", None)
    if n is None:
        shape = tuple(getattr(operator, "shape", ()))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError("operator needs an int attribute n or a square shape (n, n)")
        n = shape[0]
    if int(n) < 1:
        raise ValueError(f"operator size n = {n}: must be >= 1")
    return int(n)


def slq(operator: Any, *, probes: int | Sequence[int], steps: int, seed: int = 0, comm: Any = None,
        reorth: str = "full", dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        basis_device: torch.device | str | None = None,
        on_step: Callable[[int | str, int, int], None] | None = None,
        requests: Sequence[Callable[[Spectrum], Estimate]] | None = None, tol: float | None = None,
        max_steps: int | None = None, max_probes: int | None = None, lockstep: int | None = None,
        **settings: Any) -> Spectrum:
    """Stochastic Lanczos quadrature of a symmetric operator, optionally adaptive.

    Args:
        operator: anything with an int ``n`` (or ``shape == (n, n)``) and
            ``matvec(v: torch.Tensor) -> torch.Tensor`` on full length-n vectors;
            collective over ``comm`` when one is given (e.g.
            :class:`hpcqml.hessian.hvp.HessianLinearOperator`).
        probes: number of Rademacher probes (numbered 0..probes-1), or the probe numbers
            (each at most once).
        steps: Lanczos steps per probe (at most n).
        seed: probe seed; probe ``l`` is ``rademacher_slice(n, .., seed, l)``.
        comm: MPI communicator the operator is collective over (None: one process); the
            Krylov basis is sharded over it.
        reorth: ``full`` or ``none``.
        dtype: dtype of the basis and of the vectors passed to ``matvec`` (default: the
            operator's ``dtype`` attribute, else float64).
        device: where ``matvec`` takes its vectors (default: the operator's ``device``, else CPU).
        basis_device: where the Krylov basis lives (default ``device``).
        on_step: ``on_step(probe, done, total)`` after every Lanczos step (``probe``: the
            number, or the block's numbers as text in lockstep).
        lockstep: probes advanced together, one ``matmat`` per Lanczos step for all of them
            (1 = one after another, each product a ``matvec``); None or 0 = as many as fit
            in half the memory per rank for their Krylov bases
            (:func:`hpcqml.parallel.memory_per_rank`), at most
            :data:`hpcqml.parallel.MAX_AUTO_WIDTH`.  The results equal those of
            probes run one after another up to the rounding of the block product.
        requests: the estimates an adaptive run must resolve, each a function of the
            spectrum (e.g. ``lambda s: s.negative_mass(0.01)``); given together with
            ``max_steps`` or ``max_probes`` (or ``tol``) the run is adaptive.
        tol: relative tolerance of the requests (sets ``resolution_rel``; the absolute ones
            are the settings ``resolution_mass`` and ``resolution_abs``).
        max_steps: step budget per probe of an adaptive run (default ``steps``).
        max_probes: probe budget of an adaptive run (default ``probes``).
        **settings: :class:`Spectrum` settings (``confidence``, ``resolution_mass``,
            ``resolution_rel``, ``resolution_abs``, ``interval``, ``unit_roundoff``; the
            last defaults to that of ``dtype``).

    Returns:
        The :class:`Spectrum`; after an adaptive run ``stop_reason`` is ``resolved``,
        ``step budget`` or ``probe budget``.  An adaptive run keeps every probe's recurrence
        (with ``reorth = "full"`` its Krylov basis) in memory, so a step growth from m to m'
        costs m' - m products per probe.

    Raises:
        ValueError: ``steps`` larger than ``n`` or below 1, no probes, a repeated probe
            number, a budget below the start, or adaptive options without ``requests``.
    """
    n = operator_size(operator)
    if not 1 <= int(steps) <= n:
        raise ValueError(f"Lanczos steps = {steps}: must be between 1 and the operator size n = {n}")
    numbers = list(range(int(probes))) if isinstance(probes, (int, np.integer)) else [int(p) for p in probes]
    if not numbers:
        raise ValueError("slq needs at least one probe")
    _check_unique(numbers)
    state_dtype = dtype or getattr(operator, "dtype", None) or torch.float64
    dev = device if device is not None else getattr(operator, "device", "cpu")
    settings.setdefault("unit_roundoff", float(torch.finfo(state_dtype).eps) / 2.0)
    if tol is not None:
        settings["resolution_rel"] = float(tol)

    adaptive = requests is not None or tol is not None or max_steps is not None or max_probes is not None
    if lockstep is not None and int(lockstep) < 0:
        raise ValueError(f"lockstep = {lockstep}: must be >= 0 (0 = from memory, 1 = one probe at a time)")
    width = int(lockstep or 0)
    if width == 0:
        shards = 1 if comm is None else comm.Get_size()
        itemsize = torch.empty((), dtype=state_dtype).element_size()
        top = max(int(steps), int(max_steps or steps)) if reorth == "full" else 2
        available = memory_per_rank(comm, basis_device or dev)[0]
        width = auto_width(max(len(numbers), int(max_probes or 0)), min(top, n), n, shards, itemsize, available)
    # the chunk width of the reorthogonalisation follows the step budget, so a recurrence
    # extended to m steps rounds as one run with m steps from the start
    engine = LanczosEngine(n, comm, reorth=reorth, state_dtype=state_dtype, device=dev, basis_device=basis_device,
                           keep=adaptive, chunk_steps=min(max(int(steps), int(max_steps or steps)), n))
    matmat = block_product(operator)

    def run(nums: list[int], k: int) -> list[LanczosResult]:
        return run_probes(operator.matvec, n, probe_groups(comm, 1), nums, int(seed), steps=k, reorth=reorth,
                          state_dtype=state_dtype, device=dev, basis_device=basis_device, on_step=on_step,
                          width=width, matmat=matmat, engine=engine)

    if not adaptive:
        return Spectrum.from_results(run(numbers, int(steps)), n, **settings)
    if not requests:
        raise ValueError("an adaptive slq run needs requests: the estimates to resolve")
    budget = Budget(int(steps), len(numbers), min(int(max_steps or steps), n), int(max_probes or len(numbers)))
    if budget.max_steps < budget.steps or budget.max_probes < budget.probes:
        raise ValueError(f"slq budgets (max_steps = {budget.max_steps}, max_probes = {budget.max_probes}) "
                         f"below the start (steps = {budget.steps}, probes = {budget.probes})")
    return adaptive_slq(run, n, numbers, budget, requests, settings)


@dataclass
class Budget:
    """Where an adaptive SLQ run stands: current steps and probe count, and their budgets."""

    steps: int
    probes: int
    max_steps: int
    max_probes: int


def grow(budget: Budget, need: str | None) -> str | None:
    """Apply :func:`next_growth`'s answer to ``budget`` (doubling, capped by the budget).

    Returns:
        None when it grew (run again), else the stop reason: ``resolved``, ``step budget``
        or ``probe budget``.
    """
    if need is None:
        return "resolved"
    if need == GROW_STEPS:
        if budget.steps >= budget.max_steps:
            return "step budget"
        budget.steps = min(2 * budget.steps, budget.max_steps)
        return None
    if budget.probes >= budget.max_probes:
        return "probe budget"
    budget.probes = min(2 * budget.probes, budget.max_probes)
    return None


def adaptive_slq(run: Callable[[list[int], int], list[LanczosResult]], n: int, numbers: list[int],
                 budget: Budget, requests: Sequence[Callable[[Spectrum], Estimate]],
                 settings: dict[str, Any]) -> Spectrum:
    """Grow Lanczos steps and probes until every request is resolved or a budget ends.

    Each round asks :func:`hpcqml.hessian.spectrum.next_growth` which part dominates the
    unresolved estimates: more steps (every probe's recurrence is extended to the doubled
    step count when ``run`` holds it, as :func:`slq`'s does; else it is rerun) or more probes
    (the new probe numbers continue after the largest one; probes already run are kept).

    Args:
        run: ``run(probe_numbers, steps)`` runs (or extends) those probes.
        n: operator dimension.
        numbers: the starting probe numbers.
        budget: start and budgets (changed in place).
        requests: the estimates to resolve.
        settings: :class:`Spectrum` settings.

    Returns:
        The last spectrum, its ``stop_reason`` set.
    """
    done: dict[int, LanczosResult] = {}
    while True:
        while len(numbers) < budget.probes:
            numbers.append(max(numbers) + 1)
        todo = [p for p in numbers if p not in done or done[p].steps < budget.steps and not done[p].breakdown]
        for r in run(todo, budget.steps) if todo else []:
            done[r.probe] = r
        spec = Spectrum.from_results([done[p] for p in numbers], n, **settings)
        reason = grow(budget, next_growth([req(spec) for req in requests]))
        if reason is not None:
            spec.stop_reason = reason
            return spec
