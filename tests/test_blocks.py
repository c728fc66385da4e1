"""Parameter blocks: name patterns with pruning masks, diagonal blocks against the explicit
Hessian's blocks, the one-pass block-diagonal operator and block spectra against dense
block eigenvalues (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from curvature_cases import cnn, data, dense_hessian, keep_index, rand_vec, random_mask, sub

import hpcqml
from hpcqml.errors import UserError
from hpcqml.hessian.blocks import BlockDiagonalOperator, partition
from hpcqml.hessian.curvature import build_curvature
from hpcqml.hessian.hvp import HessianLinearOperator, param_space

torch.set_num_threads(1)
RTOL, ATOL = 1e-10, 1e-12  # float64 products against explicit matrices (see test_curvature)


class CountingBatches(list):
    """A list of (x, y) batches that counts the complete passes over it."""

    passes = 0

    def __iter__(self):
        yield from list.__iter__(self)
        self.passes += 1


@pytest.fixture(scope="module")
def case():
    net = cnn()
    x, y = data(15)
    mask = random_mask(net, keep=0.5)
    keep = keep_index(net, mask)
    H = sub(dense_hessian(net, torch.nn.functional.cross_entropy, x, y), keep)
    return net, x, y, mask, H


def positions(net, mask, names):
    """Positions in the support vector of the listed parameters' kept coordinates."""
    out, o = [], 0
    for k, p in net.named_parameters():
        size = int(mask[k].sum()) if k in mask else p.numel()
        if k in names:
            out.extend(range(o, o + size))
        o += size
    return torch.tensor(out)


def test_partition_rules_and_patterns():
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)),
                              torch.nn.Linear(4, 2))
    space = param_space(net)
    assert partition(space, "layer") == {"0": ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"],
                                         "1": ["1.weight", "1.bias"]}
    assert partition(space, "module") == {"0.0": ["0.0.weight", "0.0.bias"], "0.1": ["0.1.weight", "0.1.bias"],
                                          "1": ["1.weight", "1.bias"]}
    assert partition(space, ["*.bias", "0"]) == {"*.bias": ["0.0.bias", "0.1.bias", "1.bias"],
                                                 "0": ["0.0.weight", "0.1.weight"]}  # first pattern wins
    with pytest.raises(UserError, match="blocks pattern 'fc'"):
        partition(space, ["fc"])
    pruned = param_space(net, "support", {"1.weight": torch.zeros(2, 4, dtype=torch.bool)})
    assert list(partition(pruned, ["1.weight", "1.bias"])) == ["1.bias"]  # a fully pruned block is left out


def test_wrt_patterns_with_a_mask(case):
    net, x, y, mask, H = case
    names = ["0.weight", "0.bias"]
    op = HessianLinearOperator(net, (x, y), wrt=["0"], mask=mask, micro_batch=4, route="double-backward")
    idx = positions(net, mask, names)
    assert op.space.names == names and op.n == int(mask["0.weight"].sum()) + 3
    v = rand_vec(op.n, 0)
    assert torch.allclose(op @ v, H[idx][:, idx] @ v, rtol=RTOL, atol=ATOL)
    with pytest.raises(UserError, match="wrt pattern 'conv9'"):
        param_space(net, ["conv9"])
    with pytest.raises(UserError, match="nor a list of name patterns"):
        param_space(net, "everything")


def test_blocks_match_the_explicit_diagonal_blocks_and_their_spectra(case):
    net, x, y, mask, H = case
    ops = build_curvature("hessian", net, (x, y), wrt="support", mask=mask, blocks="module", micro_batch=6,
                          route="func")
    groups = {"0": ["0.weight", "0.bias"], "1": ["1.weight", "1.bias"], "4": ["4.weight", "4.bias"]}
    assert list(ops) == [f"hessian/{k}" for k in groups]
    for k, names in groups.items():
        op = ops[f"hessian/{k}"]
        idx = positions(net, mask, names)
        Hbb = H[idx][:, idx]
        V = rand_vec(op.n, 1, cols=2)
        assert torch.allclose(op @ V, Hbb @ V, rtol=RTOL, atol=ATOL)
        # full Lanczos on the block: each Gauss node with weight is an eigenvalue of H_bb,
        # and the extreme ones are found (1e-7 relative: Lanczos on n_b <= 100 in float64)
        eig = np.linalg.eigvalsh(Hbb.numpy())
        nodes, weights = hpcqml.slq(op, probes=2, steps=op.n, seed=2).pooled()
        hit = nodes[weights > 1e-8]
        scale = float(np.abs(eig).max())
        assert np.all(np.min(np.abs(hit[:, None] - eig[None, :]), axis=1) < 1e-7 * scale)
        assert abs(hit.max() - eig[-1]) < 1e-7 * scale and abs(hit.min() - eig[0]) < 1e-7 * scale


def test_block_diagonal_operator_takes_one_pass_for_all_blocks(case):
    net, x, y, mask, H = case
    batches = CountingBatches([(x[:8], y[:8]), (x[8:], y[8:])])
    op = HessianLinearOperator(net, batches, wrt="support", mask=mask, micro_batch=5, num_data=len(y),
                               route="double-backward")
    groups = partition(op.space, "module")
    D = BlockDiagonalOperator(op, groups)
    dense_blocks = torch.zeros_like(H)
    for names in groups.values():
        idx = positions(net, mask, names)
        dense_blocks[idx[:, None], idx[None, :]] = H[idx][:, idx]
    v = rand_vec(op.n, 3)
    before = batches.passes
    assert torch.allclose(D @ v, dense_blocks @ v, rtol=RTOL, atol=ATOL)
    assert batches.passes - before == 1  # three blocks, one pass over the data
    parts = {k: v[positions(net, mask, names)] for k, names in groups.items()}
    before = batches.passes
    got = D.block_products(parts)
    assert batches.passes - before == 1
    for k, names in groups.items():
        idx = positions(net, mask, names)
        assert torch.allclose(got[k], H[idx][:, idx] @ parts[k], rtol=RTOL, atol=ATOL)
    with pytest.raises(UserError, match="no block named"):
        D.block_products({"fc": v[:3]})
