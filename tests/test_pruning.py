"""Global magnitude pruning checked against an independent numpy top-k."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch import nn

from hpcqml.errors import UserError
from hpcqml.models import build
from hpcqml.training.pruning import (global_magnitude_mask, layer_sparsity, prunable_parameters, prune_,
                                     sparsity)

torch.set_num_threads(1)   # the test box has 2 shared cores


def _numpy_topk_mask(arrays, keep):
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    k = int(round(keep * flat.size))
    order = np.argsort(-flat, kind="stable")          # largest first, ties by position
    m = np.zeros(flat.size, bool)
    m[order[:k]] = True
    return m, k


@pytest.mark.parametrize("keep", [0.1, 0.37, 1.0])
def test_mask_equals_numpy_global_topk(keep):
    torch.manual_seed(1)
    ts = [("a", torch.randn(40, 3)), ("b", torch.randn(7, 5, 2) * 3), ("c", torch.randn(11))]
    masks = global_magnitude_mask(ts, keep)
    got = np.concatenate([masks[n].numpy().ravel() for n, _ in ts])
    want, k = _numpy_topk_mask([t.numpy() for _, t in ts], keep)
    assert got.sum() == k
    assert np.array_equal(got, want)


def test_ties_keep_exactly_k():
    ts = [("a", torch.ones(10)), ("b", torch.ones(10))]
    m = global_magnitude_mask(ts, 0.25)
    assert int(m["a"].sum() + m["b"].sum()) == 5
    assert m["a"][:5].all()                           # ties broken by position


def test_bad_fraction_is_refused():
    with pytest.raises(UserError):
        global_magnitude_mask([("a", torch.ones(3))], 0.0)


def test_default_scope_excludes_classifier_and_bn():
    m = build("resnet8-w1", 10)
    names = [n for n, _ in prunable_parameters(m)]
    assert "fc.weight" not in names and "fc.bias" not in names
    assert "conv1.weight" in names and not any("bn" in n for n in names)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(names) == len(convs)
    assert "fc.weight" in [n for n, _ in prunable_parameters(m, "conv-linear")]
    assert len(prunable_parameters(m, "all")) == len(list(m.parameters()))
    with pytest.raises(UserError):
        prunable_parameters(m, "everything")


def test_prune_model_keeps_top_fraction_of_prunable_weights():
    torch.manual_seed(0)
    m = build("resnet8-w1", 10)
    ref = {n: p.detach().clone() for n, p in prunable_parameters(m)}
    fc = m.fc.weight.detach().clone()
    masks = prune_(m, 0.1)
    want, k = _numpy_topk_mask([t.numpy() for t in ref.values()], 0.1)
    got = np.concatenate([masks[n].numpy().ravel() for n in ref])
    assert np.array_equal(got, want)
    total = sum(t.numel() for t in ref.values())
    assert abs(sparsity(m) - (1 - k / total)) < 1e-12
    for n, p in prunable_parameters(m):
        assert torch.equal(p.detach(), ref[n] * masks[n])
    assert torch.equal(m.fc.weight.detach(), fc)       # classifier untouched
    rows = layer_sparsity(m)
    assert sum(r[2] for r in rows) == k
