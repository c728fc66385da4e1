"""``hpcqml jobs``: SLURM/PBS job scripts for run configs (see docs/cluster.md).

    hpcqml jobs render CONFIG --scheduler slurm|pbs --nodes N --ranks-per-node R
                       [--gpus-per-node G] --time HH:MM:SS [--mem 64G] [--scaling 1,2,4,8]
                       [--out PATH]
    hpcqml jobs standard [--check]

``render`` writes one script (to ``--out`` or stdout) or, with ``--scaling``, one script per
rank count plus ``submit_all.sh`` into the directory ``--out``.  ``standard`` rewrites the
checked-in scripts ``jobs/slurm/*.sbatch`` and ``jobs/pbs/*.pbs`` (``--check``: only report
whether they are up to date).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcqml.errors import UserError
from hpcqml.jobs.render import (SCHEDULERS, JobSpec, check_spec, parse_scaling, read_config_sections,
                                render, scaling_jobs, standard_specs, submit_all_script)

__all__ = ["add_arguments", "cli_main", "JobSpec", "render"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``render`` and ``standard`` sub-commands to the ``jobs`` parser."""
    sub = parser.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    p = sub.add_parser("render", help="write a SLURM/PBS job script for a run config",
                       description="Write a batch job script that runs 'hpcqml run CONFIG' under MPI, "
                                   "checkpoints on a warning signal before the wall time and requeues; "
                                   "a cancel (SIGTERM: scancel, qdel) checkpoints and stops without requeue.")
    p.add_argument("config", help="run config (TOML), e.g. jobs/configs/demo.toml")
    p.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    p.add_argument("--nodes", type=int, required=True, help="nodes (ignored with --scaling: derived)")
    p.add_argument("--ranks-per-node", type=int, required=True, help="MPI ranks per node")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    p.add_argument("--cpus-per-rank", type=int, default=1, help="cores per rank = OMP threads (default 1)")
    p.add_argument("--time", required=True, help="wall time HH:MM:SS")
    p.add_argument("--mem", default="", help="memory per node, e.g. 64G (default: the scheduler's)")
    p.add_argument("--scaling", default="", help="comma-separated total rank counts: one job each")
    p.add_argument("--weak", action="append", default=[], metavar="SECTION.KEY",
                   help="with --scaling: multiply this config value by ranks/first count (weak scaling)")
    p.add_argument("--out", default="", help="script path (default stdout); with --scaling a directory")
    p.add_argument("--output", default="", help="results file (default: the config's [run] output)")
    p.add_argument("--name", default="", help="job name (default: the config file's stem)")
    p.add_argument("--partition", default="", help="SLURM partition / PBS queue")
    p.add_argument("--account", default="", help="account to charge")
    p.add_argument("--modules", default="", help="modules to 'module load' before activating the venv")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed on to 'hpcqml run --set', repeatable")
    p.add_argument("--stages", default="", help="passed on to 'hpcqml run --stages'")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the wall time at which the run is told to checkpoint and the job "
                        "requeues (default 300)")
    p.add_argument("--no-validate", action="store_true",
                   help="only check the config's TOML syntax, not its sections against the stages")
    p = sub.add_parser("standard", help="rewrite the checked-in jobs/slurm and jobs/pbs scripts")
    p.add_argument("--check", action="store_true", help="only check that they are up to date")
    p.add_argument("--root", default=".", help="repository root (default .)")


def _write(path: Path, text: str) -> None:
    """Write a job script atomically, executable as the umask allows (never through a symlink)."""
    from hpcqml.io import atomic_write_bytes, executable_mode

    atomic_write_bytes(path, text.encode(), mode=executable_mode())


def _cli_render(args: argparse.Namespace) -> int:
    sections = read_config_sections(args.config, validate=not args.no_validate, overrides=args.overrides)
    run = sections.get("run", {}) if isinstance(sections.get("run", {}), dict) else {}
    output = args.output or str(run.get("output") or f"results/{Path(args.config).stem}.h5")
    spec = JobSpec(config=args.config, scheduler=args.scheduler, nodes=args.nodes,
                   ranks_per_node=args.ranks_per_node, time=args.time, output=output,
                   name=args.name or Path(args.config).stem, gpus_per_node=args.gpus_per_node,
                   cpus_per_rank=args.cpus_per_rank, mem=args.mem, signal_lead=args.signal_lead,
                   partition=args.partition, account=args.account, modules=args.modules,
                   overrides=tuple(args.overrides), stages=args.stages,
                   script_path=args.out if args.out and not args.scaling else "")
    check_spec(spec)
    if not args.scaling:
        if args.weak:
            raise UserError("--weak needs --scaling")
        text = render(spec)
        if args.out:
            _write(Path(args.out), text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0
    if not args.out:
        raise UserError("--scaling writes several scripts: name a directory with --out")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory (--scaling writes a directory)")
    jobs = scaling_jobs(spec, parse_scaling(args.scaling), out_dir, args.weak, sections)
    for job in jobs:
        _write(job.path, render(job.spec))
        print(f"wrote {job.path}  ({job.ranks} ranks on {job.spec.nodes} node(s) -> {job.spec.output})")
    _write(out_dir / "submit_all.sh", submit_all_script(jobs, args.scheduler))
    print(f"wrote {out_dir / 'submit_all.sh'}")
    return 0


def _cli_standard(args: argparse.Namespace) -> int:
    root = Path(args.root)
    stale = []
    for scheduler in SCHEDULERS:
        for rel, spec in standard_specs(scheduler):
            text = render(spec)
            path = root / rel
            if path.is_file() and path.read_text() == text:
                continue
            stale.append(str(rel))
            if not args.check:
                _write(path, text)
                print(f"wrote {rel}")
    if args.check:
        if stale:
            print("out of date (run 'hpcqml jobs standard'): " + ", ".join(stale))
            return 1
        print("job scripts up to date")
    return 0


def cli_main(args: argparse.Namespace) -> int:
    """Dispatch ``hpcqml jobs SUBCOMMAND``."""
    command = getattr(args, "jobs_command", None)
    if command == "render":
        return _cli_render(args)
    if command == "standard":
        return _cli_standard(args)
    raise UserError("hpcqml jobs: name a sub-command: render or standard (see 'hpcqml jobs --help')")

