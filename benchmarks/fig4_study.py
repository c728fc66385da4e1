"""Fig. 4 study: the qcm stage on the random quadratic family with independent draws per (f, seed),
8 seeds, and the verdict over seeds of every (f, N) rate (docs/science.md, "Fig. 4").

Usage::

    python benchmarks/fig4_study.py [--out results/fig4_study.h5] [--seeds 8] [--ranks 1] [--lift paper]

Settings are those of jobs/configs/fig4.toml (n = 4, T = 300, eta = 0.25, u_in ~ U(-0.01, 0.01),
divergent lambda ~ U(-0.05, 0), N = 1..4, N_ref = 6) with ``draws = "independent"`` and
``lift = "paper"`` (``--lift both`` adds the exact lift of the map; its A_d is nearly dense at N = 4,
Delta = 340, so M has about 2.7e7 nonzeros per case and the run takes about 30 min on 2 cores).
The stage resumes: finished cases are skipped when the script is run again.
Prints one line per (f, N): median ratio fitted/predicted, its order-statistic interval over seeds,
the number of e-folds the fit window spans, and the verdict of
:func:`hpcqml.carleman.timestepping.rate_agreement`; and the median errors of both lifts at t = T.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

CONFIG = """[run]
name = "fig4-study"
output = "{out}"
stages = ["qcm"]
seed = 0

[qcm]
generator = "random"
n = 4
f = [1.0, 0.75, 0.5, 0.25]
seeds = [{seeds}]
N = [1, 2, 3, 4]
T = 300
eta = 0.25
u_scale = 0.01
div_range = 0.05
N_ref = 6
late_fraction = 0.5
step_sizes = []
kappa = false
draws = "independent"
lift = "{lift}"
"""


def summarise(path: Path) -> list[str]:
    """Verdict lines per (f, N) and the median final errors of both lifts."""
    from hpcqml.carleman.timestepping import rate_agreement

    lines = []
    with h5py.File(path, "r") as fh:
        groups: dict[tuple[float, int], list] = {}
        for case in fh["qcm"].values():
            r = case["rates"]
            t0, t1 = r.attrs["late_window"]
            for i, N in enumerate(r["N"][()]):
                groups.setdefault((float(case.attrs["f"]), int(N)), []).append(
                    (r["fitted"][()][i], r["predicted"][()][i], int(t1) - int(t0),
                     float(np.linalg.norm(case[f"split/N_{N}/total"][()][-1])),
                     float(np.linalg.norm(case[f"discrete_N_{N}/eta1"][()][-1]))
                     if f"discrete_N_{N}" in case else float("nan"),
                     float(np.linalg.norm(case[f"split/N_{N}/truncation"][()][-1]))))
        for (f, N), rows in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            a = np.array(rows, dtype=np.float64)
            v = rate_agreement(a[:, 0], a[:, 1], int(a[0, 2]))
            lines.append(f"f={f:g} N={N}: ratio {v['median']:.3f} [{v['low']:.3f}, {v['high']:.3f}] "
                         f"({v['coverage']:.0%}, {int(v['seeds'])} seeds), predicted {np.median(a[:, 1]):+.4f}/step, "
                         f"{v['efolds']:.2g} e-folds: {v['verdict']}; "
                         f"median at T: truncation {np.median(a[:, 5]):.2e}, "
                         f"|u-y1| paper {np.median(a[:, 3]):.2e}, discrete lift {np.median(a[:, 4]):.2e}")
    return lines


def main() -> int:
    """Run (or resume) the study and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/fig4_study.h5")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--lift", choices=("paper", "discrete", "both"), default="paper")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.with_suffix(".toml")
    cfg.write_text(CONFIG.format(out=out, seeds=", ".join(str(s) for s in range(args.seeds)), lift=args.lift))
    cmd = [sys.executable, "-m", "hpcqml", "run", str(cfg)]
    if args.ranks > 1:
        cmd = ["mpirun", "--oversubscribe", "-n", str(args.ranks)] + cmd
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"wall time {time.perf_counter() - t0:.1f} s on {args.ranks} rank(s)")
    print("\n".join(summarise(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
