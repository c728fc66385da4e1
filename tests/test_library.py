"""The Hessian operator as a library: any loss, tensors or a DataLoader, matmat, scipy,
against dense Hessians formed independently (small float64 cases), curvlinops and the docs."""
from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch.utils.data import DataLoader, TensorDataset

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian.hvp import (
    ROUTE_CLASSES,
    CurvatureOperator,
    DoubleBackwardHessian,
    FuncHessian,
    HessianLinearOperator,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
RTOL, ATOL = 1e-10, 1e-12  # float64 products against the dense Hessian


def mlp(outputs: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, outputs)).double()


def cnn(seed: int = 0) -> torch.nn.Module:
    """A tiny conv net with BatchNorm whose running statistics are not the defaults."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def data(n: int, shape: tuple[int, ...], classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=torch.float64, generator=g), torch.randint(0, classes, (n,), generator=g)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def dense_hessian(net: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian of ``loss_fn(net(x), y)`` on the whole data set in eval mode, by
    ``torch.autograd.functional.hessian`` of the loss as a function of the flat parameters."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        ps, o = {}, 0
        for k, p in params.items():
            ps[k] = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
        return loss_fn(torch.func.functional_call(net, ps, (x,)), y)

    was = net.training
    net.eval()
    try:
        return torch.autograd.functional.hessian(loss_of, flat0)
    finally:
        net.train(was)


def rand_vec(n: int, seed: int, cols: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n if cols is None else (n, cols), dtype=torch.float64, generator=g)


@pytest.fixture(scope="module")
def conv_case():
    net = cnn()
    x, y = data(23, (2, 5, 5), 4)
    return net, x, y, dense_hessian(net, torch.nn.functional.cross_entropy, x, y)


@pytest.mark.parametrize("route", ["double-backward", "func", "auto"])
def test_tensors_default_cross_entropy(conv_case, route):
    net, x, y, H = conv_case
    op = HessianLinearOperator(net, (x, y), route=route)
    v = rand_vec(op.n, 0)
    assert op.shape == (op.n, op.n) == tuple(H.shape) and op.dtype == torch.float64
    assert torch.allclose(op @ v, H @ v, rtol=RTOL, atol=ATOL)
    assert op.route_used in ("double-backward", "func") and op.num_data == len(y)


@pytest.mark.parametrize("route", ["double-backward", "func"])
def test_dataloader_with_ragged_micro_batches(conv_case, route):
    """23 samples in batches of 10 (last one 3), micro-batches of 4: nothing divides evenly."""
    net, x, y, H = conv_case
    op = HessianLinearOperator(net, loader(x, y, 10), torch.nn.CrossEntropyLoss(), micro_batch=4, route=route)
    assert op.num_data == 23
    v = rand_vec(op.n, 1)
    assert torch.allclose(op.matvec(v), H @ v, rtol=RTOL, atol=ATOL)
    assert op.route_used == route  # a fixed route is used as given (a resumed run passes its stored choice)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_loss_over_batches_matches_one_call(reduction):
    """MSELoss 'mean' averages over every output element: the operator must match one call
    of the loss on the whole data set, not a per-sample mean."""
    net = mlp(outputs=3)
    x = data(17, (4,), 2, seed=2)[0]
    t = torch.randn(17, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    loss_fn = torch.nn.MSELoss(reduction=reduction)
    H = dense_hessian(net, loss_fn, x, t)
    op = HessianLinearOperator(net, [(x[:6], t[:6]), (x[6:], t[6:])], loss_fn, micro_batch=5)
    v = rand_vec(op.n, 2)
    assert torch.allclose(op @ v, H @ v, rtol=RTOL, atol=ATOL)
    assert loss_fn.reduction == reduction  # the caller's module is not changed


def soft_hinge(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """A custom loss function with a ``reduction`` argument (its 'none' is per sample)."""
    margin = out.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(out, dim=1)
    per = torch.nn.functional.softplus(1.0 - margin) ** 2
    return {"mean": per.mean, "sum": per.sum, "none": lambda: per}[reduction]()


class AttrOnlyLoss:
    """A loss object that declares ``reduction = 'mean'`` but cannot switch it."""

    reduction = "mean"

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return soft_hinge(out, y, "mean")


@pytest.mark.parametrize("loss_fn", [soft_hinge, AttrOnlyLoss()], ids=["argument", "attribute"])
def test_custom_loss_function(conv_case, loss_fn):
    net, x, y, _ = conv_case
    H = dense_hessian(net, loss_fn, x, y)
    op = HessianLinearOperator(net, loader(x, y, 8), loss_fn, micro_batch=3, route="func")
    v = rand_vec(op.n, 3)
    assert torch.allclose(op @ v, H @ v, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        assert op.loss() == pytest.approx(float(loss_fn(net.eval()(x), y)), rel=1e-12)


@pytest.mark.parametrize("route", ["double-backward", "func"])
def test_matmat_equals_columnwise_matvec_and_numpy_round_trip(conv_case, route):
    net, x, y, H = conv_case
    op = HessianLinearOperator(net, loader(x, y, 9), micro_batch=5, route=route)
    V = rand_vec(op.n, 4, cols=3)
    HV = op.matmat(V)
    cols = torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1)
    assert torch.allclose(HV, cols, rtol=1e-12, atol=1e-14)
    assert torch.allclose(op @ V, H @ V, rtol=RTOL, atol=ATOL)
    out = op @ V.numpy()
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (op.n, 3)
    assert np.allclose(out, (H @ V).numpy(), rtol=RTOL, atol=ATOL)
    out32 = op.matvec(V[:, 0].numpy().astype(np.float32))  # cast in, the input's dtype out
    assert out32.dtype == np.float32 and np.allclose(out32, (H @ V[:, 0].float().double()).numpy(), rtol=1e-5)


def test_to_scipy_eigsh_matches_dense_eigenvalues(conv_case):
    net, x, y, H = conv_case
    A = HessianLinearOperator(net, loader(x, y, 12), micro_batch=7).to_scipy()
    assert isinstance(A, scipy.sparse.linalg.LinearOperator) and A.dtype == np.float64 and A.shape == H.shape
    top = np.sort(scipy.sparse.linalg.eigsh(A, k=3, which="LA", tol=1e-12, v0=np.ones(A.shape[0]),
                                            return_eigenvectors=False))
    exact = np.linalg.eigvalsh(H.numpy())[-3:]
    assert np.allclose(top, exact, rtol=1e-8, atol=1e-10)


def test_routes_agree_on_a_dataloader(conv_case):
    net, x, y, _ = conv_case
    V = rand_vec(sum(p.numel() for p in net.parameters()), 6, cols=2)
    a = DoubleBackwardHessian(net, loader(x, y, 6), micro_batch=4) @ V
    b = FuncHessian(net, loader(x, y, 6), micro_batch=4) @ V
    assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_given_sample_count_is_the_counted_one(conv_case):
    """Passing ``num_data`` (as the pipeline does) gives the operator that counts the samples itself."""
    net, x, y, _ = conv_case
    v = rand_vec(sum(p.numel() for p in net.parameters()), 7)
    given = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=6, route="double-backward")
    counted = HessianLinearOperator(net, (x, y), micro_batch=6, route="double-backward")
    assert given.num_data == counted.num_data == len(y)
    assert torch.equal(given.matvec(v), counted.matvec(v))


def test_support_subspace_on_a_dataloader(conv_case):
    net, x, y, H = conv_case
    g = torch.Generator().manual_seed(8)
    mask = {"0.weight": torch.rand(net[0].weight.shape, generator=g) < 0.4}
    keep = torch.cat([mask[k].reshape(-1) if k in mask else torch.ones(p.numel(), dtype=torch.bool)
                      for k, p in net.named_parameters()])
    op = HessianLinearOperator(net, loader(x, y, 10), wrt="support", mask=mask, micro_batch=3)
    v = rand_vec(op.n, 9)
    assert op.n == int(keep.sum())
    assert torch.allclose(op @ v, H[keep][:, keep] @ v, rtol=RTOL, atol=ATOL)


def test_a_new_route_is_one_subclass(conv_case):
    """A route registers by subclassing; ``auto`` then times it beside the built-in ones."""
    net, x, y, H = conv_case

    class AutogradHvp(CurvatureOperator):
        route_name = "autograd-hvp"

        def _chunk_products(self, xb, yb, vps):
            params = tuple(p.detach() for p in self.space.params)
            return [list(torch.autograd.functional.hvp(lambda *ps: self._chunk_loss(xb, yb, ps), params,
                                                       tuple(vp))[1]) for vp in vps]

    try:
        op = HessianLinearOperator(net, (x, y), micro_batch=7, route="autograd-hvp")
        v = rand_vec(op.n, 10)
        assert torch.allclose(op @ v, H @ v, rtol=RTOL, atol=ATOL)
        auto = HessianLinearOperator(net, (x, y), micro_batch=7, route="auto")
        auto @ v
        assert set(auto.route_timings) == {"double-backward", "func", "autograd-hvp"}
    finally:
        ROUTE_CLASSES.pop("autograd-hvp")


def gen(x: torch.Tensor, y: torch.Tensor):
    yield x, y


@pytest.mark.parametrize("bad, match", [
    (lambda x, y: gen(x, y), "one-shot iterator"),
    (lambda x, y: iter([(x, y)]), "one-shot iterator"),
    (lambda x, y: 3.0, "pass \\(x, y\\) tensors"),
    (lambda x, y: (x, y[:-1]), "differ in length"),
    (lambda x, y: [x], "expected \\(x, y\\) tensor pairs"),
])
def test_bad_data_is_refused_in_one_line(conv_case, bad, match):
    net, x, y, _ = conv_case
    with pytest.raises(UserError, match=match) as err:
        HessianLinearOperator(net, bad(x, y))
    assert "\n" not in str(err.value)


def test_bad_loss_and_vectors_are_refused(conv_case):
    net, x, y, _ = conv_case
    with pytest.raises(UserError, match="reduction"):
        HessianLinearOperator(net, (x, y), lambda out, t: out.sum())
    with pytest.raises(UserError, match="class weights"):
        HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(weight=torch.ones(4, dtype=torch.float64)))
    with pytest.raises(UserError, match="route"):
        HessianLinearOperator(net, (x, y), route="magic")
    op = HessianLinearOperator(net, (x, y))
    with pytest.raises(UserError, match="shape"):
        op.matvec(torch.ones(op.n + 1, dtype=torch.float64))


def test_non_finite_product_is_a_numerical_error():
    net = mlp()
    x, y = data(5, (4,), 3)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    op = HessianLinearOperator(net, (x, y), route="double-backward")
    with pytest.raises(NumericalError, match="not finite"):
        op @ torch.ones(op.n, dtype=torch.float64)


def test_curvlinops_hessian_linear_operator_agrees(conv_case):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch (test extra) is not installed")
    net, x, y, H = conv_case
    net.eval()  # curvlinops evaluates the model as it is; ours switches to eval mode itself
    data_ = loader(x, y, 10)
    theirs = curvlinops.HessianLinearOperator(net, torch.nn.CrossEntropyLoss(), list(net.parameters()), data_,
                                              check_deterministic=False)
    ours = HessianLinearOperator(net, data_, torch.nn.CrossEntropyLoss(), micro_batch=4)
    V = rand_vec(ours.n, 11, cols=2)
    assert torch.allclose(ours @ V, theirs @ V, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours @ V, H @ V, rtol=RTOL, atol=ATOL)


def test_import_hpcqml_does_not_import_torch():
    code = ("import hpcqml, hpcqml.hessian, sys; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'mpi4py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_library_doc_example_runs(tmp_path, monkeypatch):
    """The python block of docs/library.md runs as written (so the doc cannot rot)."""
    text = (REPO / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "docs/library.md has no python code block"
    example = tmp_path / "library_example.py"
    example.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(example), run_name="__doc_example__")
    assert np.isfinite(scope["top"]).all() and scope["spectrum"].n == scope["H"].n
