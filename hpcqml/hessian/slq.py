"""Stochastic Lanczos quadrature (SLQ) over Rademacher probes, optionally in probe groups.

For Rademacher probes ``z_l`` (l = 1..n_v) and ``v_l = z_l/sqrt(n)``, Lanczos on ``H`` from
``v_l`` gives Gauss nodes ``theta_{l,i}`` and weights ``tau_{l,i}``; the spectral measure

    mu(lambda) = (1/n) sum_k delta(lambda - lambda_k)
              ~= (1/n_v) sum_l sum_i tau_{l,i} delta(lambda - theta_{l,i})

is unbiased in expectation over the probes for every polynomial of degree < 2m.  The
Hutchinson estimate of the trace is the mean of ``z_l^T H z_l = n alpha_{l,1}`` with
standard error ``std(ddof=1)/sqrt(n_v)``; the spectral mass below zero is
``(1/n_v) sum_l sum_{theta_{l,i} < 0} tau_{l,i}``.

Probe groups: the ranks of ``comm`` are split into G contiguous groups
(``comm.Split``); in each round group g runs probe ``probes[round*G + g]`` with the data
and the Krylov basis sharded over its own ranks.  Probe ``l`` is always drawn from
``(seed, l)``, so results do not depend on the number of ranks or groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.lanczos import LanczosResult, lanczos, rademacher_slice, slice_bounds


@dataclass
class GroupLayout:
    """Where this rank sits: ``comm`` is its probe group, ``index`` of ``count`` groups."""

    comm: Any
    index: int
    count: int
    world: Any


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


def run_probes(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, layout: GroupLayout,
               probes: Sequence[int], seed: int, steps: int = 100, reorth: str = "full",
               state_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               basis_device: torch.device | str | None = None, label: str = "",
               on_round: Callable[[list[LanczosResult]], None] | None = None,
               perf: Any = None) -> list[LanczosResult]:
    """Run SLQ for the listed probe numbers; collective over ``layout.world``.

    ``matvec`` must be collective over ``layout.comm`` (the group).  After each round the
    finished probes are gathered on every rank and ``on_round(results)`` is called on every
    rank (so a caller can commit them collectively).  Returns all results sorted by probe.
    """
    probes = list(probes)
    out: list[LanczosResult] = []
    G = layout.count
    gcomm = layout.comm
    grank = 0 if gcomm is None else gcomm.Get_rank()
    gsize = 1 if gcomm is None else gcomm.Get_size()
    lo, hi = slice_bounds(n, grank, gsize)
    for start in range(0, len(probes), G):
        batch = probes[start:start + G]
        mine = None
        if layout.index < len(batch):
            p = batch[layout.index]
            z = rademacher_slice(n, lo, hi, seed, p)
            mine = lanczos(matvec, n, gcomm, z, steps=steps, reorth=reorth, state_dtype=state_dtype,
                           device=device, basis_device=basis_device, probe=p, label=label, perf=perf)
        if G > 1:
            gathered = layout.world.allgather(mine if grank == 0 else None)
            done = sorted((r for r in gathered if r is not None), key=lambda r: r.probe)
        else:
            done = [mine]
        if on_round is not None:
            on_round(done)
        out.extend(done)
    return sorted(out, key=lambda r: r.probe)


def pad(rows: Iterable[np.ndarray], width: int) -> np.ndarray:
    """Stack 1-D arrays into (len, width) float64 padded with NaN."""
    rows = list(rows)
    out = np.full((len(rows), width), np.nan, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out


@dataclass
class SpectrumSummary:
    """Pooled SLQ results of one model state (see module docstring for the formulas)."""

    n: int
    nodes: np.ndarray          # (n_v, m) NaN-padded
    weights: np.ndarray        # (n_v, m) NaN-padded, each row sums to 1
    residuals: np.ndarray      # (n_v, m)
    steps: np.ndarray          # (n_v,) int
    breakdown: np.ndarray      # (n_v,) bool
    probes: np.ndarray         # (n_v,) int
    trace: float
    trace_se: float
    quad_forms: np.ndarray     # (n_v,) z^T H z
    mass_below_zero: float
    lambda_min: float
    lambda_min_residual: float
    lambda_max: float
    lambda_max_residual: float

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All (node, weight/n_v) pairs as flat arrays: the SLQ measure (total mass 1)."""
        ok = ~np.isnan(self.nodes)
        return self.nodes[ok], (self.weights / self.nodes.shape[0])[ok]

    def moment(self, k: int) -> float:
        """k-th moment of the SLQ measure, an estimate of tr(H^k)/n."""
        x, w = self.pooled()
        return float(np.sum(w * x ** k))


def summarize(results: Sequence[LanczosResult], n: int) -> SpectrumSummary:
    """Pool per-probe results into the spectrum summary (extremes over all probes)."""
    if not results:
        raise UserError("no SLQ probes to summarise")
    results = sorted(results, key=lambda r: r.probe)
    width = max(r.steps for r in results)
    nodes = pad((r.nodes for r in results), width)
    weights = pad((r.weights for r in results), width)
    residuals = pad((r.residuals for r in results), width)
    q = np.array([r.quad_form for r in results], dtype=np.float64)
    se = float(np.std(q, ddof=1) / np.sqrt(q.size)) if q.size > 1 else float("nan")
    below = float(np.mean([np.sum(r.weights[r.nodes < 0]) for r in results]))
    imin = np.nanargmin(nodes)
    imax = np.nanargmax(nodes)
    return SpectrumSummary(
        n=int(n), nodes=nodes, weights=weights, residuals=residuals,
        steps=np.array([r.steps for r in results], dtype=np.int64),
        breakdown=np.array([r.breakdown for r in results], dtype=bool),
        probes=np.array([r.probe for r in results], dtype=np.int64),
        trace=float(np.mean(q)), trace_se=se, quad_forms=q, mass_below_zero=below,
        lambda_min=float(nodes.flat[imin]), lambda_min_residual=float(residuals.flat[imin]),
        lambda_max=float(nodes.flat[imax]), lambda_max_residual=float(residuals.flat[imax]))
