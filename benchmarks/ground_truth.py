"""Ground truth for the SLQ estimates: proven brackets and interval coverage on known spectra.

Cases (each a symmetric H with a known eigen-decomposition):

* synthetic Hessian-like spectra ``H = Q diag(lambda) Q^T`` with ``Q`` a product of three
  Householder reflections (so n = 10^4 costs O(n) per product): a bulk near 0 of width
  0.003-0.3, outliers of both signs, and eigenvalues exactly on the thresholds (0, +-cutoff,
  2/eta, -delta); n from 10^2 to 10^4;
* exact Hessians (float64, torch.func.hessian) of small real networks on random data.

For every case SLQ runs with ``n_v`` probes and ``m`` steps; for every estimate we check:

1. ``bracket``: every per-probe quadrature bracket holds the probe-exact value
   ``z^T f(H) z/||z||^2`` (same probe, exact eigen-decomposition; ratios per probe), and
   the pooled bracket holds the probe-exact pooled value (a false certification otherwise);
2. ``coverage``: the combined interval holds the exact value over all of H (``tr f(H)/n``;
   ratios of such traces) - nominal 95 %;
3. ``exact``: where Gauss is exact (E(t) without cutoff, t < 2m, every eigenvalue below
   1/eta) the quadrature bracket is a point (relative width below 1e-10);
4. the reason each unresolved estimate gives (mass at a threshold, bracket too wide,
   sampling) is counted in the table.

Run ``python benchmarks/ground_truth.py [--cases 200]``: prints a markdown table and writes
it to ``benchmarks/records/ground_truth.md``.  The test suite runs a small set
(``tests/test_ground_truth.py``).
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hpcqml.hessian.lanczos import rademacher_slice
from hpcqml.hessian.slq import slq
from hpcqml.hessian.spectrum import Estimate, Spectrum

ETA = 0.05          # 2/eta = 40: inside the outlier range
CUTOFF = 0.4
DELTA = 0.01


class KnownOperator:
    """``H = Q diag(lam) Q^T`` with ``Q`` the product of Householder reflections ``I - 2 u u^T``."""

    def __init__(self, lam: np.ndarray, reflectors: np.ndarray) -> None:
        self.lam = np.asarray(lam, dtype=np.float64)
        self.U = np.asarray(reflectors, dtype=np.float64)   # (r, n), unit rows
        self.n = self.lam.size
        self.dtype = torch.float64

    def qt(self, v: np.ndarray) -> np.ndarray:
        """``Q^T v`` (reflections applied in reverse order)."""
        for u in self.U[::-1]:
            v = v - 2.0 * u * (u @ v)
        return v

    def q(self, v: np.ndarray) -> np.ndarray:
        """``Q v``."""
        for u in self.U:
            v = v - 2.0 * u * (u @ v)
        return v

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        x = v.detach().cpu().numpy().astype(np.float64)
        return torch.from_numpy(self.q(self.lam * self.qt(x)))

    def probe_measure(self, z: np.ndarray) -> np.ndarray:
        """Weights ``(q_i . z)^2/||z||^2`` of the probe's spectral measure on ``lam``."""
        c = self.qt(z)
        return c * c / float(z @ z)


class DenseKnown(KnownOperator):
    """A dense symmetric matrix with its eigen-decomposition (the network Hessians)."""

    def __init__(self, H: np.ndarray) -> None:
        lam, V = np.linalg.eigh(H)
        self.lam, self.V, self.H = lam, V, torch.from_numpy(H)
        self.n = lam.size
        self.dtype = torch.float64

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.H @ v

    def probe_measure(self, z: np.ndarray) -> np.ndarray:
        c = self.V.T @ z
        return c * c / float(z @ z)


@dataclass
class Case:
    """One ground-truth case."""

    name: str
    op: KnownOperator
    probes: int
    steps: int
    seed: int


def synthetic_case(rng: np.random.Generator, index: int) -> Case:
    """A Hessian-like spectrum: bulk near 0, outliers of both signs, atoms on the thresholds."""
    n = int(rng.choice([100, 300, 1000, 3000, 10000]))
    width = float(rng.choice([0.003, 0.03, 0.3]))
    n_pos, n_neg = max(2, n // 50), max(1, n // 200)
    top = float(rng.choice([15.0, 60.0]))   # below 1/eta = 20 (Gauss exact for E(t < 2m)) or beyond 2/eta
    lam = np.concatenate([rng.normal(0.0, width, n - n_pos - n_neg), rng.uniform(0.5, top, n_pos),
                          -rng.uniform(0.05, 3.0, n_neg)])
    on = rng.integers(0, 4)            # how many threshold atoms, each a few eigenvalues
    for x in [0.0, CUTOFF, -CUTOFF, -DELTA, 2.0 / ETA][:int(on) + 1]:
        if x > top:
            continue
        k = int(rng.integers(1, max(2, n // 100)))
        lam[rng.choice(n - n_pos - n_neg, k, replace=False)] = x
    u = rng.standard_normal((3, n))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    steps = int(rng.choice([10, 16, 20]))
    probes = int(rng.choice([4, 6]))
    return Case(f"synthetic-{index} n={n} w={width:g}", KnownOperator(lam, u), probes, min(steps, n), index)


def network_case(index: int) -> Case:
    """The exact Hessian of the mean cross-entropy of a small MLP on random data."""
    g = torch.Generator().manual_seed(index)
    torch.manual_seed(index)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x = torch.randn(64, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    params = {k: p.detach() for k, p in net.named_parameters()}
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps, o = {}, 0
        for k, p in params.items():
            ps[k] = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, ps, (x,)), y)

    H = torch.func.hessian(loss)(flat0).numpy()
    H = 0.5 * (H + H.T) * 200.0        # scaled so outliers cross 2/eta and the cutoff
    return Case(f"mlp-{index} n={H.shape[0]}", DenseKnown(H), 4, 20, 1000 + index)


@dataclass
class Quantity:
    """An estimate and its exact per-probe parts: ``num``/``den`` functions of (lam, weights)."""

    name: str
    estimate: Callable[[Spectrum], Estimate]
    kind: str                    # mean, ratio or fraction (as Spectrum pools it)
    num: Callable[[np.ndarray, np.ndarray], float]
    den: Callable[[np.ndarray, np.ndarray], float] | None = None
    exact_when: Callable[[Case, np.ndarray], bool] | None = None


def _power(t: float, k: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.abs(1.0 - k * x) ** t


def quantities() -> list[Quantity]:
    """The estimates checked for every case (eta convention with ETA, cutoff CUTOFF)."""
    def plus(c: float) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda x, w: float(w[(np.abs(x) >= c) & (x > 0) & (x < 2 / ETA)].sum())

    def minus(c: float) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda x, w: float(w[(np.abs(x) >= c) & ~((x > 0) & (x < 2 / ETA))].sum())

    def proxy(t: float, c: float) -> Quantity:
        f = _power(t, ETA)

        def exact(case: Case, steps: np.ndarray, t: float = t, c: float = c) -> bool:
            return c == 0 and t < 2 * int(steps.min()) and float(case.op.lam.max()) < 1 / ETA
        return Quantity(f"E({t:g}) c={c:g}", lambda s, t=t, c=c: s.error_proxy(t, "eta", ETA, c), "ratio",
                        lambda x, w, c=c, f=f: float(np.sum(w[np.abs(x) >= c] * f(x[np.abs(x) >= c]))),
                        lambda x, w, c=c: float(w[np.abs(x) >= c].sum()), exact)
    return [
        Quantity("negative mass", lambda s: s.negative_mass(0.0), "mean", lambda x, w: float(w[x < 0].sum())),
        Quantity(f"negative mass delta={DELTA:g}", lambda s: s.negative_mass(DELTA), "mean",
                 lambda x, w: float(w[x < -DELTA].sum())),
        Quantity("Delta+/Delta", lambda s: s.dissipative_fraction("eta", ETA, CUTOFF), "fraction",
                 plus(CUTOFF), minus(CUTOFF)),
        Quantity("eq. II.93", lambda s: s.overlap_ii93("eta", ETA), "fraction", plus(0.0), minus(0.0)),
        proxy(10, 0.0), proxy(100, 0.0), proxy(10, CUTOFF), proxy(100, CUTOFF),
    ]


def _pool(kind: str, num: np.ndarray, den: np.ndarray | None) -> float:
    if kind == "mean":
        return float(num.mean())
    if kind == "ratio":
        return float(num.mean() / den.mean())
    return float(num.mean() / (num.mean() + den.mean()))


def evaluate(case: Case, quants: list[Quantity]) -> list[dict]:
    """Run SLQ on one case and check every quantity; one row per quantity."""
    spec = slq(case.op, probes=case.probes, steps=case.steps, seed=case.seed)
    lam = case.op.lam
    uniform = np.full(lam.size, 1.0 / lam.size)
    measures = [case.op.probe_measure(rademacher_slice(case.op.n, 0, case.op.n, case.seed, int(p)))
                for p in spec.probes]
    rows = []
    for q in quants:
        est = q.estimate(spec)
        num = np.array([q.num(lam, w) for w in measures])
        den = None if q.den is None else np.array([q.den(lam, w) for w in measures])
        if q.kind == "mean":
            per = num
        elif q.kind == "ratio":
            per = num / den
        else:
            per = num / (num + den)
        pooled = _pool(q.kind, num, den)
        truth = _pool(q.kind, np.array([q.num(lam, uniform)]),
                      None if q.den is None else np.array([q.den(lam, uniform)]))
        slack = 1e-9 * max(1.0, abs(pooled))
        lo_p, hi_p = np.array(est.per_probe_low), np.array(est.per_probe_high)
        bracket_ok = bool(np.all(lo_p - slack <= per) and np.all(per <= hi_p + slack)
                          and est.res_low - slack <= pooled <= est.res_high + slack)
        covered = bool(est.low <= truth <= est.high) if np.isfinite(est.low) else None
        exact = q.exact_when(case, spec.steps) if q.exact_when else False
        width = (est.res_high - est.res_low) / max(abs(est.value), 1e-300)
        rows.append(dict(case=case.name, quantity=q.name, bracket_ok=bracket_ok, covered=covered,
                         resolved=est.resolved, exact=exact, point=bool(exact and width < 1e-10),
                         false_certification=bool(est.resolved and not bracket_ok), note=est.note))
    return rows


def cases(count: int, networks: int = 4, seed: int = 2026) -> list[Case]:
    """``count`` cases: ``networks`` network Hessians, the rest synthetic."""
    rng = np.random.default_rng(seed)
    return [network_case(i) for i in range(networks)] + [synthetic_case(rng, i) for i in range(count - networks)]


def summarize(rows: list[dict]) -> list[str]:
    """The markdown table: per quantity, cases, bracket failures, false certifications,
    coverage, resolved share, point brackets where Gauss is exact, and the reasons given
    for the unresolved ones (mass at a threshold, bracket too wide, sampling)."""
    lines = ["| quantity | cases | bracket excludes probe-exact | false certifications | "
             "coverage of exact (nominal 95 %) | resolved | exact-case point brackets | "
             "unresolved: threshold / bracket / sampling |",
             "|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["quantity"] for r in rows))
    for name in names + ["all"]:
        sel = [r for r in rows if name in ("all", r["quantity"])]
        cov = [r["covered"] for r in sel if r["covered"] is not None]
        ex = [r for r in sel if r["exact"]]
        lines.append(f"| {name} | {len(sel)} | {sum(not r['bracket_ok'] for r in sel)} | "
                     f"{sum(r['false_certification'] for r in sel)} | "
                     f"{100 * np.mean(cov):.1f} % ({len(cov)}) | {sum(r['resolved'] for r in sel)} | "
                     f"{sum(r['point'] for r in ex)}/{len(ex)} | "
                     f"{sum('mass at threshold' in r['note'] for r in sel if not r['resolved'])} / "
                     f"{sum('bracket wider' in r['note'] for r in sel if not r['resolved'])} / "
                     f"{sum(r['note'].startswith('sampling') for r in sel if not r['resolved'])} |")
    return lines


def main() -> None:
    """Run the suite and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "records" / "ground_truth.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quants = quantities()
    rows: list[dict] = []
    start = time.time()
    all_cases = cases(args.cases)
    for i, case in enumerate(all_cases):
        rows.extend(evaluate(case, quants))
        done = i + 1
        rate = done / (time.time() - start)
        print(f"\r{done}/{len(all_cases)} cases, {rate:.2f}/s, ETA {(len(all_cases) - done) / rate:.0f} s",
              end="", flush=True)
    print()
    head = [f"Ground truth, {len(all_cases)} cases ({time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{platform.node()}, {platform.processor() or platform.machine()}, "
            f"{time.time() - start:.0f} s):", ""]
    table = head + summarize(rows)
    failed = [f"{r['case']}: {r['quantity']}" for r in rows if not r["bracket_ok"]]
    if failed:
        table += ["", "Brackets excluding the probe-exact value: " + "; ".join(failed)]
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
