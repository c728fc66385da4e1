"""Command line: ``hpcqml run|validate|info|<stage>|models|data synth|jobs|report|verify``.

Errors reach the user as one line on stderr and a non-zero exit (2 for bad input,
1 for anything else); ``--debug`` adds the traceback. Under ``mpirun`` an error on any
rank aborts every rank. ``--help``, ``validate`` and ``info`` import neither torch nor
matplotlib nor mpi4py unless the config needs them (they start in well under a second).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeVar

from hpcqml import __version__
from hpcqml.errors import InputFileError, UserError

if TYPE_CHECKING:
    from hpcqml.config import RunConfig, Schema

T = TypeVar("T")

#: commands provided by other modules: name -> (module, add_arguments, handler, help)
TOOL_COMMANDS = {
    "models": ("hpcqml.models", "add_arguments", "cli_list", "list model names with exact parameter counts"),
    "jobs": ("hpcqml.jobs", "add_arguments", "cli_main", "render SLURM/PBS job scripts from a run config"),
    "report": ("hpcqml.report", "add_arguments", "cli_main", "figures and report.md from a results file"),
    "calibrate": ("hpcqml.calibrate", "add_arguments", "cli_main",
                  "time a gradient and an H.v of the configured model here, for validate's time estimates"),
    "verify": ("hpcqml.verify", "add_arguments", "cli_main",
               "read every dataset of a results file through its checksum and check its structure"),
}
#: ``hpcqml data synth|fetch``: tools, not the data stage (module, add_arguments, handler)
DATA_TOOLS = {"synth": ("hpcqml.data.synth", "add_arguments", "cli_synth"),
              "fetch": ("hpcqml.data.fetch", "add_arguments", "cli_fetch")}
#: commands that never start MPI
SERIAL_COMMANDS = ("validate", "info")

EPILOG = """\
PETSc options may appear anywhere on the command line, before or after the config
(hpcqml run CONFIG -qcm_ksp_type gmres -log_view). Each solver has its own prefix:
  -qcm_ksp_*, -qcm_pc_*, -qcm_eps_*, -qcm_svd_*   Carleman systems of the qcm stage
  -qcm_inv_ksp_*, -qcm_inv_pc_*                     inverse iteration for sigma_min(M) in kappa(M)
  -hhl_ksp_*, -hhl_pc_*                             solves of the hhl stage
Options no solver used are reported in one warning line at the end of the run; a value
PETSc rejects (e.g. -qcm_ksp_type gmrez) is a one-line error naming it.
"""


def _stage_docs() -> dict[str, str]:
    """Stage names and the first line of each stage module's docstring, without importing
    the modules (which load torch).
    """
    import hpcqml.stages as stages

    docs = {}
    for info in pkgutil.iter_modules(stages.__path__):
        if info.name.startswith("_"):
            continue
        source = Path(stages.__path__[0], f"{info.name}.py")
        try:
            doc = ast.get_docstring(ast.parse(source.read_text())) or ""
        except (OSError, SyntaxError):
            doc = ""
        docs[info.name] = _first_sentence(doc, info.name) or f"run the {info.name} stage alone"
    return docs


def _first_sentence(doc: str, stage: str) -> str:
    """The first sentence of a stage docstring as plain text for ``--help``: the first
    paragraph joined, reST backticks dropped, the "Stage ``x``:" lead-in removed.
    """
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    text = paragraph.replace("``", "").replace("`", "")
    for lead in (f"Stage {stage}: ", f"{stage} stage: "):
        if text.startswith(lead):
            text = text[len(lead):]
    # a sentence ends at ". " unless the word before is an abbreviation (Sec., eq., Fig., e.g.)
    match = re.search(r"(?<!\bSec)(?<!\beq)(?<!\bFig)(?<!\be\.g)(?<!\bi\.e)\. ", text)
    text = text if match is None else text[:match.start() + 1]
    text = text.replace("%", "%%")  # argparse formats help with %
    return text[:1].upper() + text[1:] if text else ""


def _add_common(p: argparse.ArgumentParser) -> None:
    """``--quiet``/``--debug`` also after the command (not resetting them when absent)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars or info lines")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (TOML), e.g. jobs/configs/demo.toml")
    p.add_argument("--output", help="results file (overrides [run] output)")
    p.add_argument("--workdir", help="checkpoint/artifact folder (overrides [run] workdir)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: delete OUTPUT and the work directory hpcqml made for it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), repeatable")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s tool module is imported (none for ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="hpcqml", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="hpcqml: distributed benchmarks of Hessian spectra of pruned networks and of "
                    "quantum Carleman training.")
    parser.add_argument("--version", action="version", version=f"hpcqml {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the stages a config names, in order")
    _add_run_options(p)
    p.add_argument("--stages", help="comma-separated subset of stages to run (default: [run] stages)")
    _add_common(p)
    p = sub.add_parser("validate", help="check a config, estimate its resources and print it resolved")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--explain", action="store_true",
                   help="print every key's documentation, type, default and value in this config")
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks the run will use (for the estimates)")
    p.add_argument("--memory-per-rank", type=float, default=0.0, metavar="GIB",
                   help="memory a rank may use, GiB (default: this machine's memory / ranks)")
    p.add_argument("--calibration", metavar="FILE",
                   help="'hpcqml calibrate' output for time estimates (default: calibration.json beside the results)")
    _add_common(p)
    p = sub.add_parser("info", help="summarise a results file")
    p.add_argument("results")
    p.add_argument("--all", dest="full", action="store_true",
                   help="also every provenance detail, performance record and the group tree")
    p.add_argument("--depth", type=int, default=3, help="levels of the group tree to show (with --all)")
    _add_common(p)

    for name, doc in sorted(_stage_docs().items()):
        if name in TOOL_COMMANDS:
            continue
        if name == "data":
            doc = doc.rstrip(".") + ("; 'hpcqml data fetch --dest DIR' downloads CIFAR-100 (or --from FILE), "
                    "'hpcqml data synth --out DIR' writes a synthetic stand-in")
        p = sub.add_parser(name, help=doc)
        _add_run_options(p)
        _add_common(p)
    for name, spec in TOOL_COMMANDS.items():
        p = sub.add_parser(name, help=spec[3])
        _add_common(p)
        if name == command:
            module = importlib.import_module(spec[0])
            getattr(module, spec[1])(p)
            p.set_defaults(tool_handler=getattr(module, spec[2]))
    return parser


def _config(args: argparse.Namespace, schemas: Mapping[str, Schema]) -> RunConfig:
    from hpcqml.config import load_config
    from hpcqml.stages import reads

    overrides = list(getattr(args, "overrides", []))
    if getattr(args, "output", None):
        overrides.append(f'run.output="{args.output}"')
    if getattr(args, "workdir", None):
        overrides.append(f'run.workdir="{args.workdir}"')
    return load_config(args.config, schemas, overrides, reads=reads())


def _time_estimates(cfg: RunConfig, calibration: str | None, ranks: int) -> list[str]:
    """Wall-time lines from a calibration file (``--calibration``, else the default beside
    the results file), or a line saying how to get one.
    """
    from hpcqml.calibrate import default_path, estimate_lines, load, model_of

    path = Path(calibration) if calibration else default_path(cfg)
    if not calibration and not path.is_file():
        return [f"time: not estimated (no calibration at {path}; run 'hpcqml calibrate {cfg.source}')"]
    cal = load(path)
    model, classes = model_of(cfg)
    if not cal.matches(model, classes, "cuda" if cfg.run.get("device") == "cuda" else "cpu"):
        return [f"time: not estimated ({path} is for {cal.model}, {cal.classes} classes on {cal.device}, "
                f"not this config's {model}, {classes} classes)"]
    return estimate_lines(cfg, cal, ranks)


def _validate(args: argparse.Namespace) -> int:
    from hpcqml.config import explain
    from hpcqml.preflight import preflight
    from hpcqml.stages import estimates, pipeline, schemas

    sch = schemas()
    cfg = _config(args, sch)
    if args.explain:
        print(explain(sch, cfg, pipeline()))
    found = preflight(cfg, ranks=max(args.ranks, 1), memory_per_rank=args.memory_per_rank * 2**30,
                      estimates=estimates())
    found.estimates.extend(_time_estimates(cfg, args.calibration, max(args.ranks, 1)))
    if found.errors:
        for line in found.estimates:  # what it would cost, even though it cannot run yet
            print(f"# estimate: {line}")
        raise UserError(f"config {args.config}: " + "; ".join(found.errors))
    print(f"# {args.config}: valid; sha256 {cfg.sha256()}")
    for line in found.estimates:
        print(f"# estimate: {line}")
    for line in found.warnings:
        print(f"hpcqml: warning: {line}", file=sys.stderr)
    print(cfg.resolved_toml())
    return 0


def _read_or_name_damage(paths: Sequence[str], read: Callable[[], T]) -> T:
    """``read()``, with a failure on a damaged results file turned into one line naming the
    damaged group (found by :func:`hpcqml.verify.damage_of`); other failures unchanged.
    """
    try:
        return read()
    except UserError:
        raise
    except Exception:
        from hpcqml.verify import damage_of, damage_summary

        for path in paths:
            try:
                problems = damage_of(path)
            except UserError:
                raise
            except Exception:  # noqa: BLE001 - unreadable even for the checker: the first error stands
                break
            if problems:
                raise InputFileError(damage_summary(path, problems)) from None
        raise


def _dispatch(args: argparse.Namespace, argv: Sequence[str], petsc_options: Sequence[str]) -> int:
    if args.command == "validate":
        return _validate(args)
    if args.command == "info":
        from hpcqml.info import summarize

        from hpcqml.verify import in_child

        print(in_child(args.results, lambda: _read_or_name_damage(
            [args.results], lambda: summarize(args.results, max_depth=args.depth, full=args.full))))
        return 0
    if args.command == "report":
        from hpcqml.verify import require_intact

        for path in args.results:  # damaged bytes are named before any figure is drawn
            require_intact(path)
        return int(_read_or_name_damage(args.results, lambda: args.tool_handler(args)) or 0)
    if args.command in TOOL_COMMANDS:
        return int(args.tool_handler(args) or 0)

    from hpcqml.parallel import init_petsc, world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import schemas

    comm = world()
    init_petsc(petsc_options)
    cfg = _config(args, schemas())
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    else:
        stages = [args.command]
    path = run_pipeline(cfg, comm, stages, overwrite=args.overwrite, quiet=args.quiet,
                        argv=["hpcqml", *argv], petsc_options=petsc_options)
    if comm.Get_rank() == 0 and not args.quiet:
        print(f"hpcqml: results in {path}", file=sys.stderr)
    return 0


def _commands() -> set[str]:
    return {"run", "validate", "info", *TOOL_COMMANDS, *_stage_docs()}


def _takes_value(token: str, commands: set[str]) -> bool:
    """Whether ``token``, following a PETSc option, is that option's value: not a command,
    not an option, not a config or results file.
    """
    from hpcqml.parallel import is_number_token

    if is_number_token(token):
        return True  # -qcm_ksp_rtol -5, -qcm_eps_target -0.5: a negative number is a value
    return not (token.startswith("-") or token in commands
                or token.endswith((".toml", ".h5", ".hdf5")))


def split_petsc_options(argv: Sequence[str], commands: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Separate PETSc-style options (``-ksp_type gmres``, ``-log_view``) from ours.

    A PETSc option is a single-dash word longer than one letter; the next token is its
    value unless it is an option, a command name or a ``.toml``/``.h5`` path (so
    ``hpcqml validate -ksp_monitor CONFIG`` keeps CONFIG).
    """
    commands = _commands() if commands is None else commands
    ours, petsc = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and not token.startswith("--") and len(token) > 2 and token[1].isalpha():
            petsc.append(token)
            if i + 1 < len(argv) and _takes_value(argv[i + 1], commands):
                petsc.append(argv[i + 1])
                i += 1
        else:
            ours.append(token)
        i += 1
    return ours, petsc


def _petsc_option_message(exc: BaseException, options: Sequence[str]) -> str | None:
    """The one line naming a rejected PETSc option, for a PETSc error or for an error a
    solver raised while handling one (its ``__context__``), else None.
    """
    from hpcqml.parallel import petsc_error_message

    seen: BaseException | None = exc
    for _ in range(4):  # a solver's own error around PETSc's: a short chain
        if seen is None:
            return None
        message = petsc_error_message(seen, options)
        if message is not None:
            return message
        seen = seen.__context__
    return None


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _data_tool(name: str, rest: list[str]) -> int:
    """Run ``hpcqml data synth|fetch`` with its own parser."""
    module_name, add_arguments, handler = DATA_TOOLS[name]
    module = importlib.import_module(module_name)
    p = argparse.ArgumentParser(prog=f"hpcqml data {name}")
    getattr(module, add_arguments)(p)
    return int(getattr(module, handler)(p.parse_args(rest)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hpcqml``: parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code."""
    full = list(sys.argv[1:] if argv is None else argv)
    argv, petsc_options = split_petsc_options(full)
    debug = "--debug" in argv
    comm = None
    try:
        # 'hpcqml data synth|fetch ...' are tools; 'hpcqml data CONFIG' is the stage.
        rest = [a for a in argv if a not in ("--debug", "--quiet")]
        if rest[:1] == ["data"] and rest[1:2] and rest[1] in DATA_TOOLS:
            return _data_tool(rest[1], rest[2:])
        command = _command_of(argv)
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command not in SERIAL_COMMANDS and args.command not in TOOL_COMMANDS:
            from hpcqml.parallel import world

            comm = world()
        return _dispatch(args, full, petsc_options)
    except SystemExit:
        raise
    except BrokenPipeError:
        # output piped into a reader that stopped early ('hpcqml info X | head'): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BaseException as exc:  # noqa: BLE001 - one line, non-zero exit, all ranks down
        from hpcqml.parallel import report_error_and_abort

        message = _petsc_option_message(exc, petsc_options)
        if message is not None:
            exc = UserError(message)
        from hpcqml.errors import StoppedBySignal

        if isinstance(exc, StoppedBySignal):  # worded as of now: a cancel after the warning
            exc = StoppedBySignal(exc.final())
        if comm is None and "mpi4py.MPI" in sys.modules:
            comm = sys.modules["mpi4py.MPI"].COMM_WORLD
        report_error_and_abort(comm, exc, debug=debug, code=2 if isinstance(exc, UserError) else 1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
