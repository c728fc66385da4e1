"""Work-directory artifacts bound to the run that made them.

Every checkpoint the training stages write into a work directory records its origin:

* ``fingerprint``: the stage's ``ctx.fingerprint``, a digest of the stage inputs that
  change its results (its own result-relevant keys and those of the stages it reads);
* ``results``: the absolute path of the results file of the run that wrote it.

The stage's HDF5 group carries the same fingerprint as an attribute.  Three checks use
them (all skipped while the runner supplies no fingerprint, ``ctx.fingerprint == ""``):

* :func:`may_resume` -- a stage's own resume state (``pretrain_state.pt``,
  ``train_state.pt``): resumed only when the fingerprints agree.  A state of this same
  results file made with other settings (the runner recomputes a stage whose settings
  changed) is set aside and the stage starts over; a state of another run is refused.
* :func:`check_input` -- an upstream artifact read by a later stage (``pretrained.pt``
  read by ``prune``, ``pruned.pt`` by ``train``): its fingerprint must equal the one the
  producing stage recorded in this results file; with no such record, it must come from
  this results file.
* :func:`check_overwrite` -- before a stage replaces an artifact: another run's file is
  never overwritten; :func:`clear_stale` also deletes this run's files made with other
  settings (the train stage's snapshots, so that no stale one is measured later).

A refusal is one :class:`~hpcqml.errors.UserError` line naming the file and the run that
made it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from hpcqml.errors import UserError
from hpcqml.protocols import StageRun

if TYPE_CHECKING:
    import h5py


def this_results(ctx: StageRun) -> str:
    """The absolute path of this run's results file (the run's identity in a stamp)."""
    return str(Path(ctx.store.path).resolve())


class Stamp(TypedDict):
    """The origin keyword arguments of :func:`~hpcqml.training.checkpoint.save_checkpoint`."""

    fingerprint: str
    results: str


def stamp(ctx: StageRun) -> Stamp:
    """Keyword arguments for :func:`~hpcqml.training.checkpoint.save_checkpoint`."""
    return {"fingerprint": ctx.fingerprint, "results": this_results(ctx)}


def _short(fingerprint: str) -> str:
    return fingerprint[:12] if fingerprint else "none recorded"


def describe_run(fingerprint: str, results: str) -> str:
    """Which run made a file, in words."""
    if not fingerprint and not results:
        return "a run that recorded no origin (an older hpcqml, or written by hand)"
    return f"the run writing {results or 'an unrecorded results file'} (fingerprint {_short(fingerprint)})"


def recorded_fingerprint(ctx: StageRun, stage: str) -> str | None:
    """The fingerprint stage ``stage`` recorded in this results file (None: no record)."""
    def read(fh: h5py.File) -> str | None:
        group = fh.get(stage)
        if group is None or "fingerprint" not in group.attrs:
            return None
        value = group.attrs["fingerprint"]
        return value.decode() if isinstance(value, bytes) else str(value)

    return ctx.store.read(read, default=None)


def may_resume(ctx: StageRun, path: Path, fingerprint: str, results: str) -> bool:
    """Whether the stage's own resume state at ``path`` may be resumed (run on rank 0).

    Returns True when the fingerprints agree (or no fingerprint is checked), False for a
    state this results file made with other settings (the stage starts over).

    Raises:
        UserError: the state was made by another run.
    """
    if not ctx.fingerprint or fingerprint == ctx.fingerprint:
        return True
    if results == this_results(ctx):
        ctx.log(f"{path} was made with other settings (fingerprint {_short(fingerprint)}, now "
                f"{_short(ctx.fingerprint)}): not resumed, starting over")
        return False
    raise UserError(f"{path}: made by {describe_run(fingerprint, results)}, not by this run "
                    f"({this_results(ctx)}, fingerprint {_short(ctx.fingerprint)}); refusing to resume it: "
                    f"give this config its own [run] workdir")


def check_input(ctx: StageRun, path: Path, producer: str, fingerprint: str, results: str) -> None:
    """Refuse an upstream artifact that this run's ``producer`` stage did not make.

    Raises:
        UserError: naming the file and the run that made it.
    """
    if not ctx.fingerprint:
        return
    expected = recorded_fingerprint(ctx, producer)
    if expected is not None:
        if fingerprint != expected:
            raise UserError(f"{path}: made by {describe_run(fingerprint, results)}, but the {producer} "
                            f"results in {this_results(ctx)} have fingerprint {_short(expected)}; "
                            f"rerun the {producer} stage (or give this config its own [run] workdir)")
        return
    if results != this_results(ctx):
        raise UserError(f"{path}: made by {describe_run(fingerprint, results)}, not by this run "
                        f"({this_results(ctx)}); run the {producer} stage of this config first, "
                        f"or give this config its own [run] workdir")


def check_overwrite(ctx: StageRun, *paths: Path) -> None:
    """Refuse to replace any of ``paths`` that another run made (run on rank 0).

    Raises:
        UserError: naming the first such file and the run that made it.
    """
    if not ctx.fingerprint:
        return
    from hpcqml.training.checkpoint import read_origin

    for path in paths:
        origin = read_origin(path)
        if origin is None:
            continue
        fingerprint, results = origin
        if fingerprint == ctx.fingerprint or results == this_results(ctx):
            continue
        raise UserError(f"{path}: made by {describe_run(fingerprint, results)}; not overwriting another "
                        f"run's file: give this config its own [run] workdir")


def clear_stale(ctx: StageRun, paths: list[Path]) -> list[Path]:
    """Before a stage starts over: delete those of ``paths`` this run made with other
    settings; refuse if another run made one (run on rank 0).

    Returns:
        The deleted files.

    Raises:
        UserError: naming the first file another run made, and that run.
    """
    if not ctx.fingerprint:
        return []
    from hpcqml.training.checkpoint import read_origin

    check_overwrite(ctx, *paths)
    removed = []
    for path in paths:
        origin = read_origin(path)
        if origin is not None and origin[0] != ctx.fingerprint:
            path.unlink()
            removed.append(path)
    return removed


def prepare_outputs(ctx: StageRun, output: Path, state: Path | None = None) -> None:
    """Before a stage writes its ``output`` (and its resume ``state``); collective.

    When the runner recomputes the stage because its settings changed (``ctx.fresh``),
    the stage's own files of this results file made with the old settings are deleted
    up front, so that none of them outlives a recompute that fails part-way.  Otherwise
    ``output`` is only checked (:func:`check_overwrite`) and ``state`` is left to
    :func:`load_resume_state`.  Another run's file is refused either way.

    Raises:
        UserError: naming the first file another run made, and that run.
    """
    from hpcqml.parallel import decide_on_root

    def decide() -> list[Path]:
        if ctx.fresh:
            return clear_stale(ctx, [p for p in (output, state) if p is not None])
        check_overwrite(ctx, output)
        return []

    removed = decide_on_root(ctx.comm, decide)
    if removed:
        ctx.log(f"settings changed: deleted {', '.join(p.name for p in removed)} made with the old settings")


def model_source(ctx: StageRun, default: str) -> tuple[Path, bool]:
    """The model a stage starts from: ``[stage] model_file`` when set, else ``<workdir>/default``;
    and whether it is this run's own upstream output (checked with :func:`check_input`).
    """
    if ctx.cfg["model_file"]:
        return Path(ctx.cfg["model_file"]), False
    return ctx.workdir / default, True


def begin(ctx: StageRun, output: Path, state: Path | None = None, source: Path | None = None,
          missing: str = "") -> bool:
    """The common start of a training stage (collective): False when it is already complete;
    else the starting model ``source`` must exist and the outputs are prepared
    (:func:`prepare_outputs`).

    Raises:
        UserError: ``source`` is missing (``missing`` says how to make it), or another
            run's file is in the way.
    """
    from hpcqml.parallel import decide_on_root

    if stage_complete(ctx, output):
        ctx.log("already complete")
        return False
    if source is not None and not decide_on_root(ctx.comm, source.is_file):
        raise UserError(f"{ctx.name}: model file {source} not found ({missing})")
    prepare_outputs(ctx, output, state)
    return True


def stage_complete(ctx: StageRun, output: Path) -> bool:
    """Whether the stage's group is complete, made with this fingerprint, and ``output`` exists.

    A complete group with another fingerprint (the runner reruns a stage whose settings
    changed) is not complete: the stage recomputes it.
    """
    from hpcqml.parallel import decide_on_root

    if not ctx.store.is_complete(ctx.name):
        return False
    if ctx.fingerprint:
        recorded = recorded_fingerprint(ctx, ctx.name)
        if recorded != ctx.fingerprint:
            ctx.log(f"results in {this_results(ctx)} were made with other settings "
                    f"(fingerprint {_short(recorded or '')}): recomputing")
            return False
    return bool(decide_on_root(ctx.comm, output.is_file))


def load_resume_state(ctx: StageRun, path: Path, device: Any) -> Any:
    """The stage's own resume checkpoint at ``path`` when it may be resumed, else None.

    Collective: rank 0 decides from the file's origin (:func:`may_resume`), then every
    rank loads it.

    Raises:
        UserError: the state was made by another run, or is unreadable.
    """
    from hpcqml.parallel import decide_on_root
    from hpcqml.training.checkpoint import load_checkpoint, read_origin

    def decide() -> bool:
        if not path.is_file():
            return False
        origin = read_origin(path)
        return origin is None or may_resume(ctx, path, *origin)   # unreadable: load_checkpoint says so

    if not decide_on_root(ctx.comm, decide):
        return None
    return load_checkpoint(path, device)
