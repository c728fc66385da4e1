"""The func route's vmap block product and the compiled route against their column-by-column
and eager counterparts."""
from __future__ import annotations

import pytest
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.hvp import HessianLinearOperator, compile_available


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)).double()
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("width", [1, 2, 3, 8])
def test_vmap_block_product_equals_columns(width):
    net = _bn_net()
    stats = net[1].running_mean.clone()
    x, y = _data()
    mask = {"0.weight": torch.rand(net[0].weight.shape, generator=torch.Generator().manual_seed(2)) > 0.4}
    kw = dict(route="func", wrt="support", mask=mask, micro_batch=5)
    block = HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(), vmap_width=width, **kw)
    single = HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(), vmap_width=1, **kw)
    V = torch.randn(block.n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = block.matmat(V)
    want = torch.stack([single.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)
    # Same float64 arithmetic per column up to summation order inside batched kernels:
    # a few hundred flops per entry at eps = 1.1e-16 stays far below 1e-12 of the scale.
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # Eval mode: the running statistics were read, never updated.
    assert torch.equal(net[1].running_mean, stats)


def test_vmap_width_must_be_positive():
    x, y = _data()
    with pytest.raises(UserError, match="vmap_width"):
        HessianLinearOperator(_bn_net(), (x, y), torch.nn.CrossEntropyLoss(), route="func", vmap_width=0)


def test_auto_skips_compiled_unless_it_pays_back():
    x, y = _data()
    op = HessianLinearOperator(_bn_net(), (x, y), torch.nn.CrossEntropyLoss(), route="auto", expected_products=10)
    op.matvec(torch.ones(op.n, dtype=torch.float64))
    assert "compiled" not in op.route_timings and op.route in ("double-backward", "func")
    assert op.compile_seconds == 0.0


@pytest.mark.skipif(not compile_available(), reason="torch.compile or a C++ compiler is not available")
def test_compiled_route_equals_eager():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
    eager = HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(), route="func")
    compiled = HessianLinearOperator(net, (x, y), torch.nn.CrossEntropyLoss(), route="compiled")
    V = torch.randn(eager.n, 2, generator=g)
    want = eager.matmat(V)
    got = compiled.matmat(V)
    assert compiled.compile_seconds > 0.0  # the first column compiled, and that time is kept apart
    # float32: fused kernels reorder sums of ~30 terms; 1e-5 of the scale is ~100 eps.
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    spent = compiled.compile_seconds
    compiled.matvec(V[:, 0])
    assert compiled.compile_seconds == spent  # paid once per operator
