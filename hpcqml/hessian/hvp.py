"""Exact Hessian-vector products of the mean cross-entropy over a fixed batch.

The loss is the mean cross-entropy over a fixed batch of ``B`` samples (paper Sec. III B:
B = 2048 randomly selected training samples),

    L(theta) = (1/B) sum_{i=1}^{B} l_i(theta),      H = d^2 L / d theta^2,

restricted to a coordinate subspace ``S`` (``all`` trainable parameters, or ``support``:
the coordinates kept by a pruning mask plus every parameter the mask does not cover).
With the selection matrix ``P`` (rows = chosen coordinates) the operator is
``H_S = P H P^T``; a vector of ``H_S`` is a flat tensor of length ``n = |S|``.

Because ``L`` is a sum over samples, ``H v = sum_c (1/B) sum_{i in c} Hess(l_i) v`` for any
partition of the batch into chunks ``c``: each rank holds a contiguous shard of the batch,
splits it into micro-batches, accumulates the chunk products (each chunk's loss is the
*sum* of its cross-entropies divided by the global ``B``, so a ragged last chunk is
weighted correctly), and the partial products are summed over ranks by MPI allreduce.

BatchNorm layers are used in eval mode (running statistics fixed; they are neither used
from the batch nor updated by a product).

Two product routes are implemented:

* ``double-backward``: g = dL/dtheta with ``create_graph=True``, then d(g . v)/dtheta;
* ``func``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(L), (theta,), (v,))``.

``auto`` times both on the first product and keeps the faster one (decided on rank 0 of
the communicator and broadcast, so every rank uses the same route).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hpcqml.errors import NumericalError, UserError
from hpcqml.parallel import allreduce_sum

ROUTES = ("auto", "double-backward", "func")
SPACES = ("all", "support")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, restoring each flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


@dataclass
class ParamSpace:
    """The coordinate subspace S of the trainable parameters that the Hessian acts on.

    ``names``/``params`` are the trainable parameters in model order; ``masks[k]`` is a
    bool tensor (same shape as ``params[k]``) selecting the kept coordinates, or None for
    a parameter taken whole.  ``n`` is the dimension of S.
    """

    names: list[str]
    params: list[torch.nn.Parameter]
    masks: list[torch.Tensor | None]
    sizes: list[int]
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(sum(self.sizes))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def to_params(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``P^T flat``: scatter a length-n vector into parameter-shaped tensors (zeros off S)."""
        out = []
        for k, p in enumerate(self.params):
            seg = flat[self.offsets[k]:self.offsets[k + 1]].to(dtype=p.dtype, device=p.device)
            if self.masks[k] is None:
                out.append(seg.view_as(p))
            else:
                full = torch.zeros_like(p)
                full[self.masks[k]] = seg
                out.append(full)
        return out

    def from_params(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``P x``: gather the S-coordinates of parameter-shaped tensors into one flat vector."""
        parts = []
        for k, t in enumerate(tensors):
            parts.append(t.reshape(-1) if self.masks[k] is None else t[self.masks[k]])
        return torch.cat(parts)


def param_space(model: torch.nn.Module, wrt: str = "all",
                mask: Mapping[str, torch.Tensor] | None = None) -> ParamSpace:
    """Build the coordinate subspace: ``all`` trainable parameters or the mask ``support``.

    For ``support`` every parameter named in ``mask`` contributes its True coordinates and
    every trainable parameter absent from ``mask`` (never pruned: BatchNorm, biases, ...)
    contributes all of its coordinates.
    """
    if wrt not in SPACES:
        raise UserError(f"hessian wrt = {wrt!r}: not one of {', '.join(SPACES)}")
    if wrt == "support" and mask is None:
        raise UserError("hessian wrt = 'support' needs a pruning mask, but the model has none")
    names, params, masks, sizes = [], [], [], []
    known = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        known.add(name)
        m = None
        if wrt == "support" and name in mask:
            m = mask[name].to(device=p.device, dtype=torch.bool)
            if m.shape != p.shape:
                raise UserError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        names.append(name)
        params.append(p)
        masks.append(m)
        sizes.append(int(p.numel()) if m is None else int(m.sum()))
    if not params:
        raise UserError("model has no trainable parameters")
    if wrt == "support":
        missing = sorted(set(mask) - known)
        if missing:
            raise UserError(f"mask names {missing[0]!r}, which is not a trainable parameter of the model")
    return ParamSpace(names, params, masks, sizes)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, int(size))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class HessianOperator:
    """``v -> H_S v`` for the mean cross-entropy of a batch sharded over ``comm``.

    Parameters
    ----------
    model: the network (put in eval mode during every product; its flags are restored).
    x, y: this rank's shard of the batch (inputs on the model's device, int64 labels).
    total_batch: the global batch size B (sum of the shard sizes over ``comm``).
    comm: the communicator whose ranks hold the shards (None = single process).
    space: the coordinate subspace (``param_space``).
    micro_batch: samples per chunk (the last chunk may be smaller).
    route: ``auto``, ``double-backward`` or ``func``.
    perf: optional object with ``count(name, n)`` and ``comm_timer()``.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, total_batch: int,
                 comm: Any = None, space: ParamSpace | None = None, micro_batch: int = 512,
                 route: str = "auto", perf: Any = None) -> None:
        if route not in ROUTES:
            raise UserError(f"hessian route = {route!r}: not one of {', '.join(ROUTES)}")
        if micro_batch < 1:
            raise UserError(f"micro_batch = {micro_batch}: must be >= 1")
        if int(x.shape[0]) != int(y.shape[0]):
            raise UserError(f"batch inputs ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
        self.model = model
        self.x, self.y = x, y
        self.total_batch = int(total_batch)
        if self.total_batch < 1:
            raise UserError("Hessian batch is empty")
        self.comm = comm
        self.space = space if space is not None else param_space(model)
        self.micro_batch = int(micro_batch)
        self.route = route
        self.perf = perf
        self.route_timings: dict[str, float] = {}
        self.products = 0

    @property
    def n(self) -> int:
        return self.space.n

    # -- losses -------------------------------------------------------------------------
    def _chunk_loss(self, params: Sequence[torch.Tensor] | None, lo: int, hi: int) -> torch.Tensor:
        """Sum of the chunk's cross-entropies divided by the global batch size B."""
        xb, yb = self.x[lo:hi], self.y[lo:hi]
        if params is None:
            out = self.model(xb)
        else:
            named = dict(zip(self.space.names, params))
            out = torch.func.functional_call(self.model, named, (xb,))
        return F.cross_entropy(out, yb, reduction="sum") / self.total_batch

    # -- local (unreduced) products ------------------------------------------------------
    def _local_double_backward(self, vp: list[torch.Tensor]) -> list[torch.Tensor]:
        params = self.space.params
        acc = [torch.zeros_like(p) for p in params]
        for lo, hi in _chunks(int(self.x.shape[0]), self.micro_batch):
            loss = self._chunk_loss(None, lo, hi)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            # d(g . v)/dtheta as a vector-Jacobian product of the gradient with v
            hv = torch.autograd.grad(grads, params, grad_outputs=vp)
            for a, h in zip(acc, hv):
                a.add_(h)
        return acc

    def _local_func(self, vp: list[torch.Tensor]) -> list[torch.Tensor]:
        params = tuple(p.detach() for p in self.space.params)
        acc = [torch.zeros_like(p) for p in params]
        for lo, hi in _chunks(int(self.x.shape[0]), self.micro_batch):
            def loss_fn(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return self._chunk_loss(ps, lo, hi)
            _, hv = torch.func.jvp(torch.func.grad(loss_fn), (params,), (tuple(vp),))
            for a, h in zip(acc, hv):
                a.add_(h)
        return acc

    def _local(self, route: str, vp: list[torch.Tensor]) -> list[torch.Tensor]:
        with eval_mode(self.model):
            if route == "func":
                return self._local_func(vp)
            return self._local_double_backward(vp)

    def _choose_route(self, vp: list[torch.Tensor]) -> list[torch.Tensor]:
        """Time both routes on this product; rank 0's choice is broadcast."""
        results = {}
        for route in ("double-backward", "func"):
            _sync(self.space.device)
            t0 = time.perf_counter()
            try:
                results[route] = self._local(route, vp)
            except (RuntimeError, NotImplementedError):  # an op without forward-mode AD
                self.route_timings[route] = float("inf")
                continue
            _sync(self.space.device)
            self.route_timings[route] = time.perf_counter() - t0
        best = min(self.route_timings, key=self.route_timings.get)
        if self.comm is not None and self.comm.Get_size() > 1:
            best = self.comm.bcast(best, root=0)
        self.route = best
        if best not in results:
            results[best] = self._local(best, vp)
        return results[best]

    # -- public -------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H_S v`` (flat, length n, same dtype/device as the parameters).

        Collective over ``comm``: every rank passes the same ``v`` and gets the same result.
        """
        if v.shape != (self.n,):
            raise UserError(f"vector has shape {tuple(v.shape)}, expected ({self.n},)")
        vp = self.space.to_params(v)
        if self.route == "auto":
            local = self._choose_route(vp)
        else:
            local = self._local(self.route, vp)
        out = self.space.from_params(local).contiguous()
        timer = self.perf.comm_timer() if self.perf is not None else contextlib.nullcontext()
        with timer:
            allreduce_sum(self.comm, out)
        self.products += 1
        if self.perf is not None:
            self.perf.count("hvp_products", 1)
        return out

    def gradient(self) -> torch.Tensor:
        """Flat gradient ``P dL/dtheta`` of the batch loss (allreduced); for benchmarks."""
        params = self.space.params
        acc = [torch.zeros_like(p) for p in params]
        with eval_mode(self.model):
            for lo, hi in _chunks(int(self.x.shape[0]), self.micro_batch):
                g = torch.autograd.grad(self._chunk_loss(None, lo, hi), params)
                for a, h in zip(acc, g):
                    a.add_(h)
        out = self.space.from_params(acc).contiguous()
        allreduce_sum(self.comm, out)
        return out

    def loss(self) -> float:
        """The batch loss L(theta) (allreduced), evaluated without gradients."""
        total = torch.zeros(1, dtype=torch.float64)
        with eval_mode(self.model), torch.no_grad():
            for lo, hi in _chunks(int(self.x.shape[0]), self.micro_batch):
                total += float(self._chunk_loss(None, lo, hi))
        allreduce_sum(self.comm, total)
        return float(total[0])


def check_finite(w: torch.Tensor, what: str) -> None:
    """Raise NumericalError naming ``what`` if ``w`` holds NaN or Inf."""
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(f"Hessian-vector product is not finite (NaN/Inf) at {what}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
