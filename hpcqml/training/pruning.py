"""Global magnitude pruning (paper Sec. III B: keep the largest 10% of the weights).

Given the prunable tensors w_1..w_L with n = sum |w_l| entries in total and a keep
fraction f, let k = round(f n).  The mask keeps exactly the k entries of largest |w|
over all tensors together (ties at the threshold are broken by position: earlier tensor,
then lower flat index, so the mask is deterministic); all others are set to zero.

Prunable sets (``scope``):
  * ``conv-linear-except-classifier`` (default, as in the paper authors' code): the weight
    of every Conv2d and Linear module except the last Linear (the classifier);
  * ``conv-linear``: every Conv2d and Linear weight;
  * ``all``: every trainable parameter (including BatchNorm affine parameters and biases).

torch is imported inside the functions: the stage schemas read :data:`SCOPES` without it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpcqml.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

SCOPES = ("conv-linear-except-classifier", "conv-linear", "all")


def prunable_parameters(model: nn.Module, scope: str = SCOPES[0]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the prunable set, in ``model.named_parameters()`` order."""
    if scope not in SCOPES:
        raise UserError(f"pruning scope {scope!r}: not one of {', '.join(SCOPES)}")
    from torch import nn

    named = dict(model.named_parameters())
    if scope == "all":
        return [(n, p) for n, p in named.items() if p.requires_grad]
    weights: list[str] = []
    last_linear = None
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight is not None:
            weights.append(f"{mname}.weight" if mname else "weight")
            if isinstance(m, nn.Linear):
                last_linear = weights[-1]
    if scope == "conv-linear-except-classifier" and last_linear is not None:
        weights.remove(last_linear)
    keep = set(weights)
    return [(n, p) for n, p in named.items() if n in keep]


def global_magnitude_mask(tensors: Sequence[tuple[str, torch.Tensor]], keep_fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks (CPU) keeping exactly round(keep_fraction * n) largest-|w| entries overall."""
    if not 0.0 < keep_fraction <= 1.0:
        raise UserError(f"keep fraction {keep_fraction}: must be in (0, 1]")
    if not tensors:
        raise UserError("pruning: the prunable set is empty")
    import torch

    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32).abs() for _, t in tensors])
    n = flat.numel()
    k = max(1, min(n, int(round(keep_fraction * n))))
    if k == n:
        keep = torch.ones(n, dtype=torch.bool)
    else:
        thr = torch.kthvalue(flat, n - k + 1).values      # k-th largest magnitude
        keep = flat > thr
        need = k - int(keep.sum())
        if need > 0:
            ties = torch.nonzero(flat == thr).reshape(-1)[:need]
            keep[ties] = True
    masks, off = {}, 0
    for name, t in tensors:
        masks[name] = keep[off:off + t.numel()].reshape(t.shape).clone()
        off += t.numel()
    return masks


def apply_mask_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every entry of the masked parameters where the mask is False (in place)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            p = params[name]
            p.mul_(m.to(device=p.device, dtype=p.dtype))


def prune_(model: nn.Module, keep_fraction: float, scope: str = SCOPES[0]) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of ``model`` in place; returns the masks."""
    params = prunable_parameters(model, scope)
    masks = global_magnitude_mask(params, keep_fraction)
    apply_mask_(model, masks)
    return masks


def layer_sparsity(model: nn.Module, scope: str = SCOPES[0]) -> list[tuple[str, int, int]]:
    """(name, numel, nonzero count) of each prunable tensor."""
    import torch

    return [(n, p.numel(), int(torch.count_nonzero(p))) for n, p in prunable_parameters(model, scope)]


def sparsity(model: nn.Module, scope: str = SCOPES[0]) -> float:
    """Fraction of exactly-zero entries in the prunable set."""
    rows = layer_sparsity(model, scope)
    total = sum(r[1] for r in rows)
    return 1.0 - sum(r[2] for r in rows) / total
