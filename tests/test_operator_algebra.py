"""Operator algebra: sums, scalings, compositions, transposes, scipy export and
parameter-shaped lists, against the same algebra on explicit float64 matrices."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from curvature_cases import cnn, data, dense_ggn, dense_hessian, keep_index, rand_vec, random_mask, sub

from hpcqml.errors import UserError
from hpcqml.hessian.algebra import AdjointOperator, ProductOperator, SumOperator
from hpcqml.hessian.curvature import GGNLinearOperator
from hpcqml.hessian.hvp import HessianLinearOperator

torch.set_num_threads(1)
RTOL, ATOL = 1e-10, 1e-12  # float64 products against explicit matrices (see test_curvature)


@pytest.fixture(scope="module")
def pair():
    """H and G on the support of a pruning mask (micro-batched), and their explicit matrices."""
    net = cnn(act=torch.nn.Softplus)
    x, y = data(13)
    mask = random_mask(net, keep=0.6)
    keep = keep_index(net, mask)
    ce = torch.nn.functional.cross_entropy
    H = HessianLinearOperator(net, (x, y), wrt="support", mask=mask, micro_batch=5, route="double-backward")
    G = GGNLinearOperator(net, (x, y), wrt="support", mask=mask, micro_batch=5)
    return H, G, sub(dense_hessian(net, ce, x, y), keep), sub(dense_ggn(net, ce, x, y), keep)


def close(a, b):
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def test_linear_combinations_match_explicit_matrices(pair):
    H, G, Hd, Gd = pair
    V = rand_vec(H.n, 0, cols=2)
    assert close((H - G) @ V, (Hd - Gd) @ V)
    assert close((H + G) @ V, (Hd + Gd) @ V)
    assert close((2.5 * H) @ V, 2.5 * Hd @ V) and close((H * -0.5) @ V, -0.5 * Hd @ V)
    assert close((-G) @ V, -Gd @ V)
    combo = 0.5 * (H - 3 * G) + G
    assert isinstance(combo, SumOperator) and len(combo.terms) == 3  # nested sums stay one level deep
    assert close(combo @ V, (0.5 * Hd - 0.5 * Gd) @ V)
    assert combo.symmetric and combo.T is combo and combo.shape == (H.n, H.n)
    before = H.products + G.products
    (H - G) @ V
    assert (H - G).products == before + 4  # two columns through each of H and G


def test_composition_and_its_transpose(pair):
    H, G, Hd, Gd = pair
    P = H @ G
    assert isinstance(P, ProductOperator) and not P.symmetric
    v = rand_vec(H.n, 1)
    assert close(P @ v, Hd @ (Gd @ v))
    assert isinstance(P.T, AdjointOperator) and close(P.T @ v, Gd @ (Hd @ v))  # (HG)^T = G H
    assert P.T.T is P
    S = (H @ G - G @ H)  # a commutator: antisymmetric
    assert close(S.T @ v, -(S @ v))
    assert close((H @ G @ H) @ v, Hd @ Gd @ Hd @ v)


def test_to_scipy_of_a_chain(pair):
    H, G, Hd, Gd = pair
    A = (H - G).to_scipy()
    assert isinstance(A, scipy.sparse.linalg.LinearOperator) and A.dtype == np.float64
    top = np.sort(scipy.sparse.linalg.eigsh(A, k=2, which="LA", tol=1e-12, v0=np.ones(H.n),
                                            return_eigenvectors=False))
    assert np.allclose(top, np.linalg.eigvalsh((Hd - Gd).numpy())[-2:], rtol=1e-8, atol=1e-10)
    B = (H @ G).to_scipy()
    w = rand_vec(H.n, 2).numpy()
    assert np.allclose(B.rmatvec(w), (Gd @ Hd).numpy() @ w, rtol=RTOL, atol=ATOL)
    assert np.allclose(B.H @ np.stack([w, w], 1), ((Gd @ Hd).numpy() @ np.stack([w, w], 1)), rtol=RTOL, atol=ATOL)


def test_parameter_shaped_lists_in_and_out(pair):
    H, G, Hd, _ = pair
    space = H.space
    v = rand_vec(H.n, 3)
    as_list = space.to_params(v)
    out = H @ as_list
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in space.params]
    assert close(space.from_params(out), Hd @ v)
    for o, m in zip(out, space.masks, strict=True):  # pruned coordinates stay zero
        if m is not None:
            assert torch.all(o[~m] == 0)
    V = rand_vec(H.n, 4, cols=3)
    cols = [space.to_params(c) for c in V.unbind(1)]
    M = [torch.stack([c[i] for c in cols], dim=-1) for i in range(len(space.params))]
    outM = (H - G).matmat(M)
    assert [o.shape for o in outM] == [(*p.shape, 3) for p in space.params]
    flat = torch.stack([space.from_params([o[..., j] for o in outM]) for j in range(3)], dim=1)
    assert close(flat, (H - G) @ V)


def test_numpy_in_numpy_out_and_bad_inputs(pair):
    H, G, Hd, _ = pair
    v = rand_vec(H.n, 5).numpy()
    out = (2 * H).matvec(v)
    assert isinstance(out, np.ndarray) and np.allclose(out, 2 * Hd.numpy() @ v, rtol=RTOL, atol=ATOL)
    with pytest.raises(UserError, match="shape"):
        H @ torch.ones(H.n + 1, dtype=torch.float64)
    with pytest.raises(UserError, match="real number"):
        H * torch.ones(1)
    with pytest.raises(UserError, match="combine"):
        H + 1.0
    with pytest.raises(UserError, match="tensors shaped like the parameters"):
        H @ [torch.ones(2)]
    with pytest.raises(UserError, match="match neither"):
        H @ [torch.ones(*p.shape, 2, 1) for p in H.space.params]
