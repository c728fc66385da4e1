"""The ``spectrum`` stage measuring several curvature matrices and diagonal blocks of one
pruned model state, checked against dense matrices built independently with autograd."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from test_hessian_stage import config, make_workdir

from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline

torch.set_num_threads(1)

#: the diagonal block checked densely: the two batch-norm layers of one residual block
#: (2 x (16 scales + 16 shifts), unpruned).  Two layers, because within one layer of a ReLU
#: network the logits are piecewise linear in the parameters and the Hessian block equals
#: the GGN block; across two layers they differ (the Hessian block is indefinite here).
BLOCK = "layer1.0.bn*"
BLOCK_NAMES = [f"layer1.0.bn{i}.{k}" for i in (1, 2) for k in ("weight", "bias")]
BLOCK_N = 64


def dense_block_matrices(tmp_path, names):
    """Dense Hessian and Gauss-Newton blocks (float64) of the mean cross-entropy of the
    stage's fixed batch, with respect to the parameters ``names`` of the stored snapshot.

    The GGN block is ``(1/B) sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` with ``J_i`` the
    Jacobian of sample i's logits; the Hessian block is the full second derivative.
    """
    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.training.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run.work" / "snapshots" / "step_000000.pt", device=torch.device("cpu"))
    model = ck.model.double().eval()
    data = load_cifar100(tmp_path / "run.work" / "data")
    idx = batch_indices(len(data.train_y), 8, 3, ck.step)
    x = to_tensor(data.train_x[idx]).double()
    y = torch.from_numpy(data.train_y[idx])
    params = dict(model.named_parameters())
    base = {k: v.detach() for k, v in params.items()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    theta0 = torch.cat([base[n].reshape(-1) for n in names])

    def logits(theta):
        parts = dict(base)
        for n, piece, shape in zip(names, torch.split(theta, sizes), shapes, strict=True):
            parts[n] = piece.reshape(shape)
        return torch.func.functional_call(model, parts, (x,))

    def loss(theta):
        return torch.nn.functional.cross_entropy(logits(theta), y)

    hess = torch.autograd.functional.hessian(loss, theta0).numpy()
    jac = torch.autograd.functional.jacobian(logits, theta0)          # B x C x n
    p = torch.softmax(logits(theta0), dim=1)
    out_h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]        # B x C x C
    ggn = torch.einsum("bcn,bcd,bdm->nm", jac, out_h, jac).numpy() / len(y)
    return hess, ggn


def test_hessian_ggn_and_block_spectra(tmp_path):
    """Hessian and GGN of the whole support plus their diagonal blocks of one layer: each
    block probe, a full Krylov space (m = block size), has Ritz values at the dense block
    eigenvalues; the whole-space Hessian keeps its group, the GGN is positive semidefinite."""
    make_workdir(tmp_path, steps=(0,))
    cfg = config(tmp_path, curvature=["hessian", "ggn"], blocks=[BLOCK], lanczos_steps=BLOCK_N,
                 probes=1, batch_size=8, micro_batch=8)
    path = run_pipeline(cfg, world(), quiet=True)
    hess, ggn = dense_block_matrices(tmp_path, BLOCK_NAMES)
    with h5py.File(path, "r") as fh:
        top = fh["spectrum/step_000000"]
        assert top["result"].attrs["curvature"] == "hessian" and top["result"].attrs["block"] == ""
        assert fh["spectrum/step_000000/ggn/result"].attrs["curvature"] == "ggn"
        assert fh["spectrum/step_000000/ggn/result"].attrs["route"] == "none"
        ggn_whole = fh["spectrum/step_000000/ggn/probe_000/nodes"][()]
        got = {}
        for kind in ("hessian", "ggn"):
            g = fh[f"spectrum/step_000000/{kind}/{BLOCK}"]
            assert g["result"].attrs["n"] == BLOCK_N and g["result"].attrs["block"] == BLOCK
            got[kind] = (g["probe_000/nodes"][()], g["result"].attrs["lambda_min"], g["result"].attrs["lambda_max"])
    for kind, dense in (("hessian", hess), ("ggn", ggn)):
        evals = np.linalg.eigvalsh(0.5 * (dense + dense.T))
        nodes, lmin, lmax = got[kind]
        # float32 products: each Ritz value of the full Krylov space carries a rounding error
        # of a few 1e-7 * ||H|| per product, accumulated over <= 64 reorthogonalised steps;
        # 1e-4 * ||H|| leaves a margin of more than 10 over that estimate
        tol = 1e-4 * np.abs(evals).max()
        assert np.abs(nodes[:, None] - evals[None, :]).min(axis=1).max() < tol
        assert abs(lmin - evals[0]) < tol and abs(lmax - evals[-1]) < tol
    # a Gauss-Newton matrix is positive semidefinite: its Ritz values are >= 0 up to rounding
    assert ggn_whole.min() > -1e-4 * np.abs(ggn_whole).max()


def test_unknown_curvature_refused(tmp_path):
    make_workdir(tmp_path, steps=(0,))
    cfg = config(tmp_path, curvature=["hessian", "kfac"])
    with pytest.raises(UserError, match=r"curvature = 'kfac': not one of hessian, ggn"):
        run_pipeline(cfg, world(), quiet=True)
