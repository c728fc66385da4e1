"""BatchNorm with statistics of the *global* batch, shared across MPI ranks.

Why: a data-parallel step on P ranks sees B/P samples per rank.  Ordinary BatchNorm in
train mode would normalise each shard with its own mean and variance, so the function
being differentiated, and hence the weights after k steps, would depend on P.  Here every
BatchNorm layer normalises with the mean and (biased) variance over all B samples of the
step, whatever P is, so 1, 2 or 3 ranks compute the same full-batch gradient (to
round-off) and the paper's "gradient of the loss over 2048 samples" is exact.

Forward, with M = B*H*W values per channel c (sums over all ranks):
    mu_c = (1/M) sum x,   var_c = (1/M) sum (x - mu_c)^2,   xhat = (x - mu_c)/sqrt(var_c + eps)
    y = gamma_c xhat + beta_c
Backward (dy = dL/dy for the global loss L):
    dx = gamma_c/sqrt(var_c + eps) * (dy - (1/M) sum dy - xhat (1/M) sum dy*xhat)
    dgamma_c = sum dy*xhat,   dbeta_c = sum dy   (returned as *local* sums; the gradient
    allreduce of the training step adds them up over ranks)
Running statistics use the unbiased variance var*M/(M-1), as torch.nn.BatchNorm2d does.
Each layer costs two small allreduces forward and one backward; they happen in the same
order on every rank because every rank runs the same graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, cast

import torch
from torch import nn

from hpcqml.parallel import allreduce_sum
from hpcqml.protocols import Comm

_RED = (0, 2, 3)


def _global_sum(comm: Comm, t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks in float64 (returns a new float64 tensor)."""
    if comm.Get_size() == 1:
        return t.detach().to(torch.float64).clone()
    buf = t.detach().to(device="cpu", dtype=torch.float64).contiguous()
    allreduce_sum(comm, buf)
    return buf.to(t.device)


class _GlobalBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, comm: Comm,
                eps: float, stats_out: list[Any]) -> torch.Tensor:
        n_local = x.shape[0] * x.shape[2] * x.shape[3]
        s1 = x.sum(dim=_RED, dtype=torch.float64)
        head = _global_sum(comm, torch.cat([s1, s1.new_tensor([float(n_local)])]))
        count = head[-1]
        mean = head[:-1] / count
        xc = x - mean.to(x.dtype)[None, :, None, None]
        s2 = _global_sum(comm, (xc * xc).sum(dim=_RED, dtype=torch.float64))
        var = s2 / count
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = xc * invstd[None, :, None, None]
        y = xhat * weight[None, :, None, None] + bias[None, :, None, None]
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.comm, ctx.count = comm, float(count)
        stats_out.extend([mean, var, float(count)])
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, weight, invstd = ctx.saved_tensors
        sdy = dy.sum(dim=_RED, dtype=torch.float64)
        sdyx = (dy * xhat).sum(dim=_RED, dtype=torch.float64)
        g = _global_sum(ctx.comm, torch.cat([sdy, sdyx]))
        c = sdy.numel()
        mdy = (g[:c] / ctx.count).to(dy.dtype)
        mdyx = (g[c:] / ctx.count).to(dy.dtype)
        dx = (dy - mdy[None, :, None, None] - xhat * mdyx[None, :, None, None]) \
            * (weight * invstd)[None, :, None, None]
        return dx, sdyx.to(weight.dtype), sdy.to(weight.dtype), None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose train-mode statistics are over the batch of all ranks in ``comm``.

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d; eval mode is unchanged.
    Instances are made by :func:`global_batchnorm`, which swaps the class temporarily.
    """

    comm: Comm | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.comm is None:
            return super().forward(x)
        if not (self.affine and self.track_running_stats):
            raise NotImplementedError("GlobalBatchNorm2d needs affine=True and track_running_stats=True")
        stats: list = []
        y = _GlobalBN.apply(x, self.weight, self.bias, self.comm, self.eps, stats)
        mean, var, count = stats
        # track_running_stats (checked above) means the three buffers exist
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is None or running_mean is None or running_var is None:
            raise NotImplementedError("GlobalBatchNorm2d needs its running statistics")
        with torch.no_grad():
            tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
            unbiased = var * (count / max(count - 1.0, 1.0))
            running_mean.mul_(1 - m).add_(mean.to(running_mean.dtype), alpha=m)
            running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype), alpha=m)
        return y


@contextmanager
def global_batchnorm(model: nn.Module, comm: Comm) -> Iterator[nn.Module]:
    """Within the block, every nn.BatchNorm2d of ``model`` uses global-batch statistics over ``comm``."""
    swapped: list[nn.Module] = []
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            cast(GlobalBatchNorm2d, m).comm = comm
            swapped.append(m)
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d
            del m.comm
