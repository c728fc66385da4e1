"""Model zoo: exact parameter counts (paper Sec. III B), block types, invalid names."""
from __future__ import annotations

import argparse

import pytest
import torch

from hpcqml.errors import UserError
from hpcqml.models import build, cli_list, count_parameters, parse_name, analytic_parameter_count
from hpcqml.models.resnet import BasicBlock, Bottleneck

torch.set_num_threads(1)   # the test box has 2 shared cores


def test_resnet32_w4_has_exactly_7451044_parameters():
    assert analytic_parameter_count("resnet32-w4", 100) == 7_451_044
    assert count_parameters(build("resnet32-w4", 100, device="meta")) == 7_451_044


def test_resnet56_w11_has_exactly_103703700_parameters():
    model = build("resnet56-w11", 100, device="meta")
    assert count_parameters(model) == 103_703_700 == analytic_parameter_count("resnet56-w11", 100)
    assert all(isinstance(b, Bottleneck) for b in model.layer1)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 9


def _analytic_basic(depth: int, k: int, classes: int) -> int:
    """Independent closed-form count for the basic-block family."""
    n, w = (depth - 2) // 6, (16 * k, 32 * k, 64 * k)
    total = 3 * w[0] * 9 + 2 * w[0]
    cin = w[0]
    for c in w:
        for _ in range(n):
            total += cin * c * 9 + 2 * c + c * c * 9 + 2 * c
            if cin != c:
                total += cin * c + 2 * c
            cin = c
    return total + cin * classes + classes


@pytest.mark.parametrize("name,depth,k", [("resnet8-w1", 8, 1), ("resnet20-w2", 20, 2), ("resnet32-w4", 32, 4)])
def test_basic_family_matches_closed_form(name, depth, k):
    assert count_parameters(build(name, 10, device="meta")) == _analytic_basic(depth, k, 10)
    assert analytic_parameter_count(name, 10) == _analytic_basic(depth, k, 10)
    assert isinstance(build(name, 10, device="meta").layer1[0], BasicBlock)


@pytest.mark.parametrize("name", ["resnet56-w1", "resnet62-w2", "resnet14-w3"])
def test_analytic_count_equals_the_built_model(name):
    """The torch-free count validate uses equals the model torch builds (both block types)."""
    for classes in (7, 100):
        assert analytic_parameter_count(name, classes) == count_parameters(build(name, classes, device="meta"))


def test_batchnorm_running_stats_are_not_parameters():
    m = build("resnet8-w1", 10)
    n_buffers = sum(b.numel() for b in m.buffers())
    assert n_buffers > 0
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    assert count_parameters(m) == 0


def test_forward_shapes_basic_and_bottleneck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    assert build("resnet8-w1", 7)(x).shape == (2, 7)
    bott = build("resnet56-w1", 5)
    assert isinstance(bott.layer2[0], Bottleneck)
    assert bott(x).shape == (2, 5)


@pytest.mark.parametrize("bad", ["resnet33-w4", "resnet2-w1", "resnet32", "vgg16", "resnet32-w0", ""])
def test_invalid_names_are_refused(bad):
    with pytest.raises(UserError) as e:
        parse_name(bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_cli_list_prints_exact_counts(capsys):
    cli_list(argparse.Namespace(names=["resnet32-w4", "resnet56-w11"], classes=100))
    out = capsys.readouterr().out
    assert "7,451,044" in out and "103,703,700" in out and "bottleneck" in out
