"""Small float64 models and explicit curvature matrices, formed independently of the operators.

Every matrix here is built from whole-data-set Jacobians and Hessians by
``torch.autograd.functional`` on the flat parameter vector, with the formulas written out
(no operator code is used), so the operators are checked against an independent computation.
"""
from __future__ import annotations

import copy

import torch


def cnn(seed: int = 0, act: type[torch.nn.Module] = torch.nn.Tanh) -> torch.nn.Module:
    """A tiny conv net with BatchNorm whose running statistics are not the defaults."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), act(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.3, 0.3)
    return net


def data(n: int = 19, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, classes, (n,), generator=g)


def regression_targets(n: int, outputs: int = 4, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def random_mask(net: torch.nn.Module, seed: int = 8, keep: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.rand(net[0].weight.shape, generator=g) < keep,
            "4.weight": torch.rand(net[4].weight.shape, generator=g) < keep}


def keep_index(net: torch.nn.Module, mask: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Positions in the flat all-parameter vector kept by ``mask`` (all where None)."""
    parts = [mask[k].reshape(-1) if mask and k in mask else torch.ones(p.numel(), dtype=torch.bool)
             for k, p in net.named_parameters()]
    return torch.cat(parts).nonzero().squeeze(1)


def _flat_fn(net: torch.nn.Module, x: torch.Tensor):
    params = {k: p.detach() for k, p in net.named_parameters()}
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        ps, o = {}, 0
        for k, p in params.items():
            ps[k] = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
        return torch.func.functional_call(net, ps, (x,))

    return f, flat0


def in_eval(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of the network in eval mode (the original is not touched)."""
    return copy.deepcopy(net).eval()


def dense_hessian(net, loss_fn, x, y) -> torch.Tensor:
    """d^2 loss_fn(net(x), y) / d theta^2 on the whole data set, eval mode."""
    f, flat0 = _flat_fn(in_eval(net), x)
    return torch.autograd.functional.hessian(lambda w: loss_fn(f(w), y), flat0)


def dense_ggn(net, loss_fn, x, y) -> torch.Tensor:
    """J^T (d^2 L / d out^2) J with J = d net(x) / d theta over the whole data set (eval mode)."""
    f, flat0 = _flat_fn(in_eval(net), x)
    out = f(flat0).detach()
    J = torch.autograd.functional.jacobian(f, flat0).reshape(out.numel(), -1)
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    return J.T @ H_out @ J


def dense_empirical_fisher(net, per_sample_loss, x, y, normaliser: float) -> torch.Tensor:
    """(1/R) sum_n g_n g_n^T with g_n = d l_n / d theta, ``per_sample_loss(out, y)`` -> (N,)."""
    f, flat0 = _flat_fn(in_eval(net), x)
    grads = torch.autograd.functional.jacobian(lambda w: per_sample_loss(f(w), y), flat0)
    return grads.T @ grads / normaliser


def dense_output_jacobian(net, x) -> torch.Tensor:
    """(N, C, P) Jacobian of the outputs (eval mode)."""
    f, flat0 = _flat_fn(in_eval(net), x)
    return torch.autograd.functional.jacobian(f, flat0)


def dense_chunked_train_hessian(net, x, y, chunk: int) -> torch.Tensor:
    """Hessian of sum_c (b_c/N) CE_mean(net_train(x_c), y_c): BatchNorm normalises each chunk
    with that chunk's statistics (a copy of the net in train mode; its buffers are thrown away)."""
    twin = copy.deepcopy(net).train()
    f_parts = []
    n = len(y)
    for lo in range(0, n, chunk):
        f_parts.append((x[lo:lo + chunk], y[lo:lo + chunk]))
    params = {k: p.detach() for k, p in twin.named_parameters()}
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps, o = {}, 0
        for k, p in params.items():
            ps[k] = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
        total = 0.0
        for xc, yc in f_parts:
            out = torch.func.functional_call(twin, ps, (xc,))
            total = total + torch.nn.functional.cross_entropy(out, yc) * (len(yc) / n)
        return total

    return torch.autograd.functional.hessian(loss, flat0)


def rand_vec(n: int, seed: int, cols: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n if cols is None else (n, cols), dtype=torch.float64, generator=g)


def sub(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return M[idx][:, idx]
