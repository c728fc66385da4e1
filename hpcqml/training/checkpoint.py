"""Model checkpoints: model name + state dict + optional pruning mask, written atomically.

Every checkpoint a stage writes into a work directory carries its *origin*: the
fingerprint of the stage inputs that made it and the results file of the run that wrote
it (see :mod:`hpcqml.training.origin`), so that a work directory shared by two runs is
refused instead of resumed.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcqml.errors import UserError
from hpcqml.io import atomic_torch_save

FORMAT = "hpcqml-checkpoint-v1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its name and classes, mask, step, metadata and origin."""
    model: nn.Module
    model_name: str
    num_classes: int
    mask: dict[str, torch.Tensor] | None
    step: int
    meta: dict[str, Any] = field(default_factory=dict)
    #: fingerprint of the stage inputs that made the file ("" = not recorded)
    fingerprint: str = ""
    #: results file of the run that wrote it ("" = not recorded)
    results: str = ""


def save_checkpoint(path: str | Path, model_name: str, num_classes: int, model: nn.Module,
                    mask: dict[str, torch.Tensor] | None = None, step: int = 0,
                    meta: dict[str, Any] | None = None, fingerprint: str = "",
                    results: str = "") -> Path:
    """Write the checkpoint atomically (tmp file + rename).  Call on one rank only.

    ``meta`` must hold only tensors, numbers, strings, lists and dicts (it is loaded with
    ``weights_only=True``).  ``fingerprint`` and ``results`` record the file's origin: the
    fingerprint of the stage inputs that made it and the results file of its run.
    """
    obj = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": int(num_classes),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "mask": None if mask is None else {k: v.detach().to("cpu", torch.bool) for k, v in mask.items()},
        "step": int(step),
        "meta": meta or {},
        "fingerprint": str(fingerprint),
        "results": str(results),
    }
    return atomic_torch_save(obj, path)


#: type of each required field, checked before anything is built from the file
_FIELD_TYPES = {"model_name": str, "num_classes": int, "state_dict": dict, "step": int}


def _check_container(path: Path) -> None:
    """Refuse a file that is not a zip of uncompressed members, as ``torch.save`` writes.

    A compressed member could expand to any size when torch reads it; a stored member that
    lies inside the file is no larger than the file.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise UserError(f"checkpoint {path}: not a zip-format torch checkpoint ({reason}); truncated or "
                        f"another format") from None
    for info in members:
        if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                or info.header_offset + info.compress_size > size):
            raise UserError(f"checkpoint {path}: member {info.filename[:80]!r} is compressed or larger than "
                            f"the file (torch.save writes neither); refused unread")


def _check_fields(obj: dict, path: Path) -> None:
    """Refuse missing or mistyped fields and a state dict that does not fit its model.

    The model is built on the meta device first (shapes only, no storage), so a file that
    announces an absurd depth, width or class count is refused before anything is allocated.
    """
    from hpcqml.models import build, parse_name

    for key, kind in _FIELD_TYPES.items():
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"checkpoint {path}: '{key}' is {type(value).__name__}, expected {kind.__name__}")
    state, name = obj["state_dict"], obj["model_name"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"checkpoint {path}: 'state_dict' must map parameter names to tensors")
    try:
        depth, _ = parse_name(name)
        if depth > len(state):  # every layer holds at least one tensor
            raise UserError(f"state dict does not fit {name}: {len(state)} tensors for depth {depth}")
        expected = {k: tuple(v.shape) for k, v in build(name, obj["num_classes"], device="meta")
                    .state_dict().items()}
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        key = min(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise UserError(f"checkpoint {path}: state dict does not fit {name}/{obj['num_classes']} classes "
                        f"({key[:80]}: {found.get(key)} in the file, {expected.get(key)} expected)")
    mask = obj.get("mask")
    if mask is not None and not (isinstance(mask, dict) and all(
            isinstance(v, torch.Tensor) and found.get(k) == tuple(v.shape) for k, v in mask.items())):
        raise UserError(f"checkpoint {path}: 'mask' must map parameter names to tensors of their shapes")
    if not isinstance(obj.get("meta") or {}, dict):
        raise UserError(f"checkpoint {path}: 'meta' is {type(obj['meta']).__name__}, expected dict")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint (eval mode) on ``device``."""
    from hpcqml.models import build

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: not found")
    _check_container(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise UserError(f"checkpoint {path}: unreadable ({type(exc).__name__}); truncated or not a "
                        f"torch checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not an {FORMAT} file")
    _check_fields(obj, path)
    model = build(obj["model_name"], obj["num_classes"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: state dict does not fit {obj['model_name']} "
                        f"({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return Checkpoint(model, obj["model_name"], obj["num_classes"], obj["mask"], obj["step"],
                      obj.get("meta") or {}, str(obj.get("fingerprint") or ""), str(obj.get("results") or ""))


def read_origin(path: str | Path) -> tuple[str, str] | None:
    """``(fingerprint, results)`` recorded in a checkpoint, without reading its tensors.

    Returns None when the file is missing or not a readable checkpoint (the caller then
    treats it as absent); files written before origins were recorded give ``("", "")``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        _check_container(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable or refused file has no origin to compare
        return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    return str(obj.get("fingerprint") or ""), str(obj.get("results") or "")
