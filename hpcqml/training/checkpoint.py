"""Model checkpoints: model name + state dict + optional pruning mask, written atomically."""
from __future__ import annotations

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
    model: nn.Module
    model_name: str
    num_classes: int
    mask: dict[str, torch.Tensor] | None
    step: int
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, model_name: str, num_classes: int, model: nn.Module,
                    mask: dict[str, torch.Tensor] | None = None, step: int = 0,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint atomically (tmp file + rename).  Call on one rank only.

    ``meta`` must hold only tensors, numbers, strings, lists and dicts (it is loaded with
    ``weights_only=True``).
    """
    obj = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": int(num_classes),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "mask": None if mask is None else {k: v.detach().to("cpu", torch.bool) for k, v in mask.items()},
        "step": int(step),
        "meta": meta or {},
    }
    return atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint (eval mode) on ``device``."""
    from hpcqml.models import build

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise UserError(f"checkpoint {path}: unreadable ({type(exc).__name__}); truncated or not a "
                        f"torch checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not an {FORMAT} file")
    model = build(obj["model_name"], obj["num_classes"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: state dict does not fit {obj['model_name']} "
                        f"({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return Checkpoint(model, obj["model_name"], obj["num_classes"], obj["mask"], obj["step"],
                      obj.get("meta") or {})
