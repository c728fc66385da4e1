"""Model zoo: CIFAR ResNets named ``resnet{depth}-w{widen}`` (paper Sec. III B).

``build("resnet32-w4")`` is the paper's 7,451,044-parameter model (Fig. 2);
``build("resnet56-w11")`` the 103,703,700-parameter one (Fig. 3).  Any depth 6n+2 with
n >= 1 and widen factor >= 1 is accepted; depth >= 54 uses bottleneck blocks.

Names and parameter counts (:func:`parse_name`, :func:`analytic_parameter_count`) need no
torch, so ``hpcqml validate`` starts fast; :func:`build` imports it.
"""
from __future__ import annotations

import argparse
import re

from typing import TYPE_CHECKING

from hpcqml.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: depth from which the ResNets use bottleneck blocks (the same constant as models.resnet)
BOTTLENECK_MIN_DEPTH = 54
#: output channels of a bottleneck block per planes
_EXPANSION = 4

__all__ = ["build", "parse_name", "count_parameters", "analytic_parameter_count", "LISTED_MODELS",
           "cli_list", "add_arguments"]

_NAME = re.compile(r"^resnet(\d+)-w(\d+)$")

#: Models printed by ``hpcqml models`` (any other valid name is accepted too).
LISTED_MODELS = ("resnet8-w1", "resnet20-w1", "resnet32-w1", "resnet32-w4", "resnet56-w1",
                 "resnet56-w11")


def parse_name(name: str) -> tuple[int, int]:
    """``"resnet32-w4"`` -> ``(32, 4)``; UserError for anything else."""
    m = _NAME.match(name.strip()) if isinstance(name, str) else None
    if m is None:
        raise UserError(f"model name {name!r}: expected 'resnet<depth>-w<widen>', e.g. 'resnet32-w4'")
    depth, widen = int(m.group(1)), int(m.group(2))
    if depth < 8 or (depth - 2) % 6 != 0:
        raise UserError(f"model name {name!r}: depth {depth} is invalid, it must be 6n+2 with n >= 1 "
                        f"(8, 14, 20, 26, 32, ..., 56, ...)")
    if widen < 1:
        raise UserError(f"model name {name!r}: widen factor must be >= 1")
    return depth, widen


def build(name: str, num_classes: int = 100, device: torch.device | str | None = None) -> nn.Module:
    """Return a freshly initialised CIFAR ResNet ``name`` with ``num_classes`` outputs.

    ``device="meta"`` builds it without allocating storage (for parameter counting).
    """
    import torch

    from hpcqml.models.resnet import CifarResNet

    depth, widen = parse_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes = {num_classes!r}: must be a positive integer")
    if device is None:
        return CifarResNet(depth, widen, num_classes)
    with torch.device(device):
        return CifarResNet(depth, widen, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _block_parameters(cin: int, planes: int, stride: int, bottleneck: bool) -> tuple[int, int]:
    """Trainable parameters of one residual block and its output channels."""
    if bottleneck:
        out = planes * _EXPANSION
        count = cin * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * out + 2 * out
    else:
        out = planes
        count = 9 * cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
    if stride != 1 or cin != out:
        count += cin * out + 2 * out                    # 1x1 projection and its BatchNorm
    return count, out


def analytic_parameter_count(name: str, num_classes: int = 100) -> int:
    """Trainable parameter count of model ``name`` from its layer shapes (no torch).

    Equals ``count_parameters(build(name, num_classes))``: bias-free convolutions, two
    affine BatchNorm parameters per channel, a linear classifier with bias.
    """
    depth, widen = parse_name(name)
    n = (depth - 2) // 6
    bottleneck = depth >= BOTTLENECK_MIN_DEPTH
    widths = (16 * widen, 32 * widen, 64 * widen)
    total = 9 * 3 * widths[0] + 2 * widths[0]          # stem conv3x3 and its BatchNorm
    cin = widths[0]
    for s, planes in enumerate(widths):
        for b in range(n):
            count, cin = _block_parameters(cin, planes, 2 if (s > 0 and b == 0) else 1, bottleneck)
            total += count
    return total + cin * num_classes + num_classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hpcqml models``."""
    parser.add_argument("names", nargs="*", help="model names to describe (default: the listed zoo)")
    parser.add_argument("--classes", type=int, default=100, help="number of output classes (default 100)")


def cli_list(args: argparse.Namespace) -> int:
    """``hpcqml models``: print each model name, block type and exact trainable-parameter count."""
    names = list(getattr(args, "names", None) or LISTED_MODELS)
    classes = int(getattr(args, "classes", 100))
    depths = [parse_name(name)[0] for name in names]        # refuse bad names before printing
    print(f"{'model':<16}{'block':<12}{f'parameters ({classes} classes)':>26}")
    for name, depth in zip(names, depths, strict=True):
        block = "bottleneck" if depth >= BOTTLENECK_MIN_DEPTH else "basic"
        print(f"{name:<16}{block:<12}{analytic_parameter_count(name, classes):>26,}")
    print(f"# the classifier has {classes} outputs; a config's count depends on its data set's classes "
          f"(--classes N; the synthetic demo set has fewer classes than CIFAR-100)")
    return 0
