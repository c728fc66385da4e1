"""GGN, empirical and Monte-Carlo Fisher, Hessian - GGN and the BatchNorm mode, against
explicit matrices formed independently (float64, a conv net with BatchNorm and pruning
masks) and against curvlinops 3.0.1.

Tolerances: float64 products of matrices with entries O(1) and a few hundred terms per entry
agree with the dense matrices to ~1e-14 relative; 1e-10 leaves four decades of margin and
still fails on any wrong factor, sign or missing term.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from curvature_cases import (
    cnn,
    data,
    dense_chunked_train_hessian,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_output_jacobian,
    keep_index,
    rand_vec,
    random_mask,
    regression_targets,
    sub,
)
from torch.utils.data import DataLoader, TensorDataset

import hpcqml
from hpcqml.errors import UserError
from hpcqml.hessian.curvature import (
    KINDS,
    EmpiricalFisherLinearOperator,
    GGNLinearOperator,
    MCFisherLinearOperator,
    build_curvature,
    hessian_minus_ggn,
)
from hpcqml.hessian.hvp import HessianLinearOperator, default_route, resolve_route
from hpcqml.hessian.lanczos import rademacher_slice

torch.set_num_threads(1)
RTOL, ATOL = 1e-10, 1e-12
CE = torch.nn.CrossEntropyLoss()


def loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def case():
    net = cnn()
    x, y = data()
    mask = random_mask(net)
    return net, x, y, mask, keep_index(net, mask)


@pytest.fixture(scope="module")
def dense(case):
    """The explicit Hessian, GGN and empirical Fisher of the cross-entropy over all parameters."""
    net, x, y, _, _ = case
    ce = torch.nn.functional.cross_entropy
    per = lambda o, yy: ce(o, yy, reduction="none")  # noqa: E731
    return {"hessian": dense_hessian(net, ce, x, y), "ggn": dense_ggn(net, ce, x, y),
            "empirical-fisher": dense_empirical_fisher(net, per, x, y, len(y))}


def close(a, b):
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def test_ggn_matches_explicit_jt_h_j_on_a_pruned_support(case, dense):
    net, x, y, mask, keep = case
    G = sub(dense["ggn"], keep)
    op = GGNLinearOperator(net, loader(x, y, 7), CE, wrt="support", mask=mask, micro_batch=3)
    V = rand_vec(op.n, 0, cols=3)
    assert op.n == len(keep) and close(op @ V, G @ V)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12  # PSD for the convex cross-entropy: a sanity check


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_and_empirical_fisher_of_mse_match_explicit(case, reduction):
    net, x, _, _, _ = case
    t = regression_targets(len(x))
    loss = torch.nn.MSELoss(reduction=reduction)
    G = dense_ggn(net, loss, x, t)
    R = len(x) * t.shape[1] if reduction == "mean" else 1.0  # MSE 'mean' averages over N*C elements
    E = dense_empirical_fisher(net, lambda o, tt: ((o - tt) ** 2).sum(1), x, t, R)
    v = rand_vec(G.shape[0], 1)
    g_op = GGNLinearOperator(net, [(x[:8], t[:8]), (x[8:], t[8:])], loss, micro_batch=5)
    e_op = EmpiricalFisherLinearOperator(net, [(x[:8], t[:8]), (x[8:], t[8:])], loss, micro_batch=5)
    assert close(g_op @ v, G @ v) and close(e_op @ v, E @ v)


def test_empirical_fisher_of_cross_entropy_matches_explicit(case, dense):
    net, x, y, mask, keep = case
    E = sub(dense["empirical-fisher"], keep)
    op = EmpiricalFisherLinearOperator(net, loader(x, y, 6), wrt="support", mask=mask, micro_batch=4)
    V = rand_vec(op.n, 2, cols=2)
    assert close(op @ V, E @ V)


def test_hessian_minus_ggn_matches_explicit_difference(case, dense):
    net, x, y, _, _ = case
    H, G = dense["hessian"], dense["ggn"]
    op = hessian_minus_ggn(net, (x, y), micro_batch=8, route="func")
    v = rand_vec(op.n, 3)
    assert close(op @ v, (H - G) @ v)
    assert float((H - G).abs().max()) > 1e-3  # tanh: the network's own curvature is not zero here


def test_mc_fisher_matches_explicit_with_its_draws(case):
    """F = (1/(M N)) sum_n J_n^T s_nm s_nm^T J_n with the operator's own draws s_nm,
    where s_nm must be softmax(f_n) - e_label (a one-hot difference: checked)."""
    net, x, y, _, _ = case
    op = MCFisherLinearOperator(net, (x, y), seed=3, mc_samples=5, micro_batch=4)
    out = net.eval()(x).detach()
    s = op.sampled_output_grads(x, y, out)
    onehot = torch.softmax(out, 1)[None] - s
    assert s.shape == (5, len(y), 4) and torch.all((onehot == 0) | (onehot == 1)) and torch.all(onehot.sum(-1) == 1)
    J = dense_output_jacobian(net, x)  # (N, C, P)
    Js = torch.einsum("mnc,ncp->mnp", s, J)
    F = torch.einsum("mnp,mnq->pq", Js, Js) / (5 * len(y))
    v = rand_vec(op.n, 4)
    assert close(op @ v, F @ v)


def test_mc_fisher_draws_do_not_depend_on_chunks_or_batches(case):
    net, x, y, _, _ = case
    v = rand_vec(sum(p.numel() for p in net.parameters()), 5)
    a = MCFisherLinearOperator(net, (x, y), seed=7, mc_samples=2) @ v
    b = MCFisherLinearOperator(net, loader(x, y, 5), seed=7, mc_samples=2, micro_batch=2) @ v
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    c = MCFisherLinearOperator(net, (x[perm], y[perm]), seed=7, mc_samples=2, micro_batch=6) @ v
    d = MCFisherLinearOperator(net, (x, y), seed=8, mc_samples=2) @ v
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14) and torch.allclose(a, c, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a, d, rtol=1e-3)  # another seed draws other labels


def test_mc_fisher_converges_to_the_ggn(case, dense):
    """For cross-entropy E[s s^T] = diag(p) - p p^T = d^2 l/d f^2, so F -> G as M grows.

    With M = 4000 draws per sample the relative Frobenius error of the MC average is
    O(1/sqrt(M)) ~ 1.6e-2 per sample, less after averaging over 19 samples; 0.08 is five
    times that, and a wrong scale (a factor 2, a missing 1/M) fails it by far.
    """
    net, x, y, _, _ = case
    G = dense["ggn"]
    op = MCFisherLinearOperator(net, (x, y), seed=11, mc_samples=4000)
    F = op @ torch.eye(op.n, dtype=torch.float64)
    assert float(torch.linalg.norm(F - G) / torch.linalg.norm(G)) < 0.08


def test_curvlinops_ggn_and_empirical_fisher_agree_to_1e10(case):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch (test extra) is not installed")
    net, x, y, _, _ = case
    net.eval()  # curvlinops evaluates the model as it is; ours switches to eval mode itself
    t = regression_targets(len(x))
    params = list(net.parameters())
    for loss, targets in ((CE, y), (torch.nn.MSELoss(), t), (torch.nn.MSELoss(reduction="sum"), t)):
        batches = loader(x, targets, 7)
        V = rand_vec(sum(p.numel() for p in params), 6, cols=2)
        theirs = curvlinops.GGNLinearOperator(net, loss, params, batches, check_deterministic=False)
        ours = GGNLinearOperator(net, batches, loss, micro_batch=3)
        assert torch.allclose(ours @ V, theirs @ V, rtol=1e-10, atol=1e-12)
        theirs = curvlinops.EFLinearOperator(net, loss, params, batches, check_deterministic=False)
        ours = EmpiricalFisherLinearOperator(net, batches, loss, micro_batch=3)
        assert torch.allclose(ours @ V, theirs @ V, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_uses_each_chunks_statistics(case):
    """Train mode: the operator is the Hessian of the chunk-wise loss with each chunk's batch
    statistics; the running statistics are untouched; eval mode differs."""
    net, x, y, _, _ = case
    before = {k: b.clone() for k, b in net.state_dict().items()}
    was_training = net.training
    for chunk in (19, 5):
        H = dense_chunked_train_hessian(net, x, y, chunk)
        op = HessianLinearOperator(net, (x, y), micro_batch=chunk, batchnorm="train", route="double-backward")
        v = rand_vec(op.n, 7)
        assert close(op @ v, H @ v)
        assert close(GGNLinearOperator(net, (x, y), micro_batch=chunk, batchnorm="train").matvec(v),
                     GGNLinearOperator(net, (x, y), micro_batch=chunk, batchnorm="train").matvec(v))
    assert all(torch.equal(before[k], b) for k, b in net.state_dict().items())  # running stats, counter
    assert net.training == was_training
    ev = HessianLinearOperator(net, (x, y), micro_batch=19, route="double-backward") @ v
    tr = HessianLinearOperator(net, (x, y), micro_batch=19, batchnorm="train", route="double-backward") @ v
    assert not torch.allclose(ev, tr, rtol=1e-3)
    # the rule: chunks define the statistics, so the same chunks give the same operator however
    # the batches are held (whole batches of 5 as chunks = micro-batches of 5 of one tensor)
    a = HessianLinearOperator(net, loader(x, y, 5), batchnorm="train", route="func") @ v
    b = HessianLinearOperator(net, (x, y), micro_batch=5, batchnorm="train", route="func") @ v
    assert close(a, b)
    with pytest.raises(UserError, match="batchnorm"):
        HessianLinearOperator(net, (x, y), batchnorm="running")


def test_every_operator_runs_through_slq_and_top_eigenpairs(case, dense):
    """On the BatchNorm and last layer (pruned): full Lanczos (steps = n) gives Gauss nodes
    that are eigenvalues of the explicit matrix, the Hutchinson samples are z^T C z exactly,
    and the extreme eigenpairs are the explicit matrix's extreme eigenvalues.

    Tolerances: Lanczos with full reorthogonalisation on n ~ 100 in float64 finds eigenvalues
    to ~1e-12 * ||C||; 1e-7 * ||C|| is far above that and far below the eigenvalue gaps.
    """
    eigenpairs = pytest.importorskip("hpcqml.hessian.eigenpairs")
    net, x, y, mask, _ = case
    chosen = ("1.", "4.")  # BatchNorm (tanh follows, so H - G is not zero here) and the last layer
    small = [n for n, _ in net.named_parameters() if n.startswith(chosen)]
    ops = build_curvature(list(KINDS), net, (x, y), wrt=small, mask=mask, micro_batch=7, route="double-backward")
    flat_names = [n for n, p in net.named_parameters() for _ in range(p.numel())]
    part = torch.tensor([i for i in keep_index(net, mask).tolist() if flat_names[i].startswith(chosen)])
    explicit = dict(dense, **{"hessian-minus-ggn": dense["hessian"] - dense["ggn"]})
    for name, op in ops.items():
        assert op.n == len(part)
        # the MC Fisher's explicit form is checked above; here its own columns stand in
        C = sub(explicit[name], part) if name in explicit else op @ torch.eye(op.n, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(C).numpy()
        scale = float(np.abs(eig).max())
        assert scale > 1e-3, name  # a non-trivial matrix on this block
        spec = hpcqml.slq(op, probes=2, steps=op.n, seed=1)
        nodes, weights = spec.pooled()
        hit = nodes[weights > 1e-8]
        assert np.all(np.min(np.abs(hit[:, None] - eig[None, :]), axis=1) < 1e-7 * scale), name
        for probe, q in zip(spec.probes, spec.quad_forms, strict=True):
            z = torch.from_numpy(np.asarray(rademacher_slice(op.n, 0, op.n, 1, int(probe)), dtype=np.float64))
            assert q == pytest.approx(float(z @ C @ z), rel=1e-9, abs=1e-12), name
        pairs = eigenpairs.top_eigenpairs(op, 2, "both_ends", seed=3)
        assert np.allclose(np.sort(pairs.values), [eig[0], eig[-1]], rtol=0, atol=1e-7 * scale), name


def test_factory_names_kinds_and_blocks(case):
    net, x, y, mask, _ = case
    ops = build_curvature(["hessian", "ggn"], net, (x, y), wrt="support", mask=mask, blocks="module")
    assert list(ops) == ["hessian/0", "hessian/1", "hessian/4", "ggn/0", "ggn/1", "ggn/4"]
    assert ops["hessian/1"].n == 6 and ops["hessian/1"].route_used == default_route("cpu")
    assert list(build_curvature("fisher", net, (x, y))) == ["fisher"]
    with pytest.raises(UserError, match="curvature = 'hessian2'"):
        build_curvature("hessian2", net, (x, y))
    with pytest.raises(UserError, match="blocks = 'row'"):
        build_curvature("ggn", net, (x, y), blocks="row")
    with pytest.raises(UserError, match="Monte-Carlo Fisher needs a negative log-likelihood"):
        build_curvature("fisher", net, (x, y), loss_fn=torch.nn.L1Loss())


def test_route_is_fixed_per_device_type_and_auto_is_reused():
    assert default_route("cpu") == "double-backward" and default_route(torch.device("cuda", 1)) == "double-backward"
    assert resolve_route(None, "cpu") == resolve_route("default", "cpu") == "double-backward"
    assert resolve_route("func", "cpu") == "func"
    assert resolve_route("auto", "cpu") == "auto"  # nothing decided yet: the operator times it once
    assert resolve_route("auto", "cpu", decided="func") == "func"  # a resumed run reuses the stored choice
    with pytest.raises(UserError, match="stored route 'magic'"):
        resolve_route("auto", "cpu", decided="magic")
    with pytest.raises(UserError, match="route = 'fast'"):
        resolve_route("fast", "cpu")


def test_library_doc_curvature_examples_run(tmp_path, monkeypatch):
    """Every python block of the "Curvature operators" section of docs/library.md runs as written."""
    import re
    import runpy
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text()
    section = text.split("## Curvature operators", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        path = tmp_path / f"curvature_example_{i}.py"
        path.write_text(block)
        runpy.run_path(str(path), run_name="__doc_example__")
