"""CIFAR ResNets of depth 6n+2 and widen factor k (paper Sec. III B, Figs. 2 and 3).

Depth < 54: basic blocks (conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU), stage widths
16k, 32k, 64k, stem 3 -> 16k.  resnet32-w4 has 7,451,044 trainable parameters.

Depth >= 54: bottleneck blocks (1x1 -> 3x3 -> 1x1 with expansion 4), still n = (depth-2)/6
blocks per stage, stage widths 16k, 32k, 64k (outputs 64k, 128k, 256k), stem 3 -> 16k.
resnet56-w11 has 103,703,700 trainable parameters.

All convolutions are bias-free; each is followed by BatchNorm (affine).  Shortcuts are
1x1 conv + BN projections wherever the shape changes, identities otherwise.  The head is
global (8x8) average pooling and a linear classifier with bias.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hpcqml.models import BOTTLENECK_MIN_DEPTH


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """y = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """y = ReLU(BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(x))))))) + shortcut(x)), width x4 out."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _projection(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with widen factor k for 32x32 RGB inputs."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth {depth} is not of the form 6n+2 with n >= 1")
        if widen < 1:
            raise ValueError(f"widen factor {widen} must be >= 1")
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes} must be >= 1")
        n = (depth - 2) // 6
        block = Bottleneck if depth >= BOTTLENECK_MIN_DEPTH else BasicBlock
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.depth, self.widen, self.block = depth, widen, block.__name__
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for s, planes in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(block(cin, planes, stride))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
