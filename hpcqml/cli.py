"""Command line: ``hpcqml run|validate|info|<stage>|models|data synth|jobs|report``.

Errors reach the user as one line on stderr and a non-zero exit (2 for bad input,
1 for anything else); ``--debug`` adds the traceback. Under ``mpirun`` an error on any
rank aborts every rank.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from hpcqml import __version__
from hpcqml.errors import UserError

#: commands provided by other modules: name -> (module, add_arguments, handler, help)
TOOL_COMMANDS = {
    "models": ("hpcqml.models", "add_arguments", "cli_list", "list model names with exact parameter counts"),
    "jobs": ("hpcqml.jobs", "add_arguments", "cli_main", "render SLURM/PBS job scripts from a run config"),
    "report": ("hpcqml.report", "add_arguments", "cli_main", "figures and report.md from a results file"),
}
SYNTH = ("hpcqml.data.synth", "add_arguments", "cli_synth")


def _tool(spec: tuple[str, ...]):
    try:
        module = importlib.import_module(spec[0])
    except ImportError as exc:
        if exc.name and exc.name.startswith(spec[0]):
            return None
        raise
    if not hasattr(module, spec[2]):
        return None
    return module


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (TOML), e.g. jobs/configs/demo.toml")
    p.add_argument("--output", help="results file (overrides [run] output)")
    p.add_argument("--workdir", help="checkpoint/artifact folder (overrides [run] workdir)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again even if OUTPUT exists with another config (deletes it and its workdir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), repeatable")


def build_parser() -> argparse.ArgumentParser:
    from hpcqml.stages import load_all

    parser = argparse.ArgumentParser(prog="hpcqml", description="hpcqml: distributed benchmarks of Hessian spectra of pruned networks and of quantum Carleman training.")
    parser.add_argument("--version", action="version", version=f"hpcqml {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the stages a config names, in order")
    _add_run_options(p)
    p.add_argument("--stages", help="comma-separated subset of stages to run (default: [run] stages)")
    p = sub.add_parser("validate", help="check a config and print it resolved")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p = sub.add_parser("info", help="summarise a results file")
    p.add_argument("results")
    p.add_argument("--depth", type=int, default=3, help="levels of the group tree to show")

    for name, stage in sorted(load_all().items()):
        if name in TOOL_COMMANDS:
            continue
        doc = stage.doc or f"run the {name} stage alone"
        if name == "data":
            doc += "; 'hpcqml data synth --out DIR' writes a synthetic CIFAR-100-layout data set"
        p = sub.add_parser(name, help=doc)
        _add_run_options(p)
    for name, spec in TOOL_COMMANDS.items():
        module = _tool(spec)
        p = sub.add_parser(name, help=spec[3] + ("" if module else " (not yet available)"))
        if module is not None:
            getattr(module, spec[1])(p)
            p.set_defaults(tool_handler=getattr(module, spec[2]))
        elif name in load_all():
            _add_run_options(p)
    return parser


def _config(args, schemas):
    from hpcqml.config import load_config

    overrides = list(getattr(args, "overrides", []))
    if getattr(args, "output", None):
        overrides.append(f'run.output="{args.output}"')
    if getattr(args, "workdir", None):
        overrides.append(f'run.workdir="{args.workdir}"')
    return load_config(args.config, schemas, overrides)


def _dispatch(args, argv: Sequence[str]) -> int:
    from hpcqml.stages import load_all, schemas

    if args.command == "validate":
        cfg = _config(args, schemas())
        print(f"# {args.config}: valid; sha256 {cfg.sha256()}")
        print(cfg.resolved_toml())
        return 0
    if args.command == "info":
        from hpcqml.info import summarize

        print(summarize(args.results, max_depth=args.depth))
        return 0
    if args.command in TOOL_COMMANDS and hasattr(args, "tool_handler"):
        return int(args.tool_handler(args) or 0)
    if args.command in TOOL_COMMANDS and args.command not in load_all():
        raise UserError(f"'hpcqml {args.command}' is not yet available in this version")

    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline

    comm = world()
    cfg = _config(args, schemas())
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    else:
        stages = [args.command]
    path = run_pipeline(cfg, comm, stages, overwrite=args.overwrite, quiet=args.quiet, argv=["hpcqml", *argv])
    if comm.Get_rank() == 0 and not args.quiet:
        print(f"hpcqml: results in {path}", file=sys.stderr)
    return 0


def split_petsc_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate PETSc-style options (``-ksp_type gmres``, ``-log_view``) from ours.

    A PETSc option is a single-dash word longer than one letter; a following token that
    does not start with a dash is its value.
    """
    ours, petsc = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and not token.startswith("--") and len(token) > 2 and token[1].isalpha():
            petsc.append(token)
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                petsc.append(argv[i + 1])
                i += 1
        else:
            ours.append(token)
        i += 1
    return ours, petsc


def main(argv: Sequence[str] | None = None) -> int:
    argv, petsc_options = split_petsc_options(list(sys.argv[1:] if argv is None else argv))
    if petsc_options:
        # PETSc reads PETSC_OPTIONS when it initialises, i.e. at the first petsc4py import.
        os.environ["PETSC_OPTIONS"] = " ".join([os.environ.get("PETSC_OPTIONS", ""), *petsc_options]).strip()
    debug = "--debug" in argv
    comm = None
    try:
        # 'hpcqml data synth ...' is a tool; 'hpcqml data CONFIG' is the stage.
        rest = [a for a in argv if a not in ("--debug", "--quiet")]
        if rest[:2] == ["data", "synth"]:
            module = _tool(SYNTH)
            if module is None:
                raise UserError("'hpcqml data synth' is not yet available in this version")
            p = argparse.ArgumentParser(prog="hpcqml data synth")
            getattr(module, SYNTH[1])(p)
            return int(getattr(module, SYNTH[2])(p.parse_args(rest[2:])) or 0)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command not in ("validate", "info") and args.command not in TOOL_COMMANDS:
            from hpcqml.parallel import world

            comm = world()
        return _dispatch(args, argv)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - one line, non-zero exit, all ranks down
        from hpcqml.parallel import report_error_and_abort

        if comm is None and "mpi4py.MPI" in sys.modules:
            comm = sys.modules["mpi4py.MPI"].COMM_WORLD
        report_error_and_abort(comm, exc, debug=debug, code=2 if isinstance(exc, UserError) else 1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
