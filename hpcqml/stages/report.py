"""``report`` stage: figures and report.md from this run's results file (last in a pipeline)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hpcqml.config import Field
from hpcqml.stages import Stage, StageContext, register

SCHEMA = {
    "out": Field(str, "", doc="folder for figures and report.md; empty = OUTPUT with -report instead of .h5"),
}


def run(ctx: StageContext) -> None:
    """Write the figures and report.md of this run's results file (rank 0)."""
    from hpcqml.report import make_report

    output = ctx.config.output_path()
    out = Path(ctx.cfg["out"]) if ctx.cfg["out"] else output.with_name(output.stem + "-report")
    summary = None
    if ctx.rank == 0:
        summary = make_report([output], out, quiet=ctx.quiet, writer=ctx.store.invocation)
    figures = [p.name for p in summary.figures] if summary else []
    skipped = [f"{k}: {v}" for k, v in summary.skipped.items()] if summary else []
    ctx.store.commit("report", attrs={"directory": str(out), "figures": ", ".join(figures),
                                      "skipped": "; ".join(skipped)})


def reads(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The report reads every other stage's results."""
    return tuple(name for name in sections if name not in ("run", "report"))


register(Stage(name="report", schema=SCHEMA, run=run, order=90, reads=reads,
               doc="figures and report.md from the results file"))
