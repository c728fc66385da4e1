"""Curvature matrices beside the Hessian: the generalised Gauss-Newton matrix and Fishers.

Write the training loss of eq. I.3 over the data set as ``L(theta) = (1/R) sum_n l(f_n, y_n)``
with ``f_n = f_theta(x_n)`` the network output of sample n, ``l`` the sample's summed loss
elements and ``R`` the normaliser (``1`` for reduction ``sum``; ``N`` times the loss
elements per sample for ``mean``: ``N`` for cross-entropy, ``N*C`` for ``MSELoss``).  With
``J_n = d f_n / d theta`` (rows restricted to the coordinate subspace S):

* the generalised Gauss-Newton matrix  ``G = (1/R) sum_n J_n^T (d^2 l / d f_n^2) J_n``;
  the Hessian splits as ``H = G + (1/R) sum_n sum_k (d l / d f_nk) d^2 f_nk / d theta^2``,
  so ``H - G`` is the part of the curvature that comes from the network's own second
  derivatives (G is positive semi-definite for a convex ``l``);
* the empirical Fisher  ``E = (1/R) sum_n g_n g_n^T`` with ``g_n = J_n^T d l / d f_n``, the
  gradient of the sample's loss at its own label;
* the Monte-Carlo Fisher  ``F = (1/(M R)) sum_n sum_m J_n^T s_nm s_nm^T J_n`` with
  ``s_nm = d l(f_n, y~_nm) / d f_n`` for M labels ``y~_nm`` drawn from the model's own
  predictive distribution (categorical for cross-entropy, Gaussian of variance 1/2 for the
  squared error, Bernoulli for BCE-with-logits); its expectation over the draws is G for
  these losses.

These are the conventions of curvlinops (``GGNLinearOperator``, ``EFLinearOperator``,
``FisherMCLinearOperator``), and the operators agree with it to rounding.

Each operator is a :class:`hpcqml.hessian.hvp.CurvatureOperator` subclass that implements
one chunk's products: data, micro-batching, scaling, the BatchNorm mode, the MPI reduction
and the product algebra are the base's.  A chunk's products use one forward pass for the
vector-Jacobian product and one Jacobian-vector product per vector (``torch.func``).

Monte-Carlo draws do not depend on ranks, chunks or batches: the draws of a sample come from
a generator seeded by ``(seed, a hash of the sample's input and label bytes)`` and are kept
for the operator's lifetime, so every product applies the same matrix and 1, 2 or 3 ranks
apply the same matrix.  (Two identical samples receive identical draws.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpcqml.errors import UserError
from hpcqml.hessian.algebra import OperatorAlgebra
from hpcqml.parallel import allreduce_sum
from hpcqml.hessian.hvp import (
    ChunkLoss,
    CurvatureOperator,
    DataSource,
    HessianLinearOperator,
    ParamSpace,
    param_space,
)

KINDS = ("hessian", "ggn", "fisher", "empirical-fisher", "hessian-minus-ggn")
"""Curvature kinds :func:`build_curvature` builds (names as the spectrum stage takes them)."""


class _OutputCurvature(CurvatureOperator):
    """Common part of the operators of the form ``sum_n J_n^T M_n J_n`` (M_n on outputs)."""

    def _linearised(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable, Callable]:
        """The chunk's output ``f``, its VJP function and ``v -> J v`` (parameter lists)."""
        names = self.space.names
        params = tuple(p.detach() for p in self.space.params)

        def f(*ps: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.model, dict(zip(names, ps, strict=True)), (x,))

        out, vjp_fn = torch.func.vjp(f, *params)[:2]

        def jvp(vp: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.func.jvp(f, params, tuple(vp))[1]

        return out.detach(), vjp_fn, jvp

    def _output_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``d L_c / d f`` at the chunk's labels (the chunk's share of the loss)."""
        return torch.func.grad(lambda o: self.loss_fn(o, y, self.num_data))(out)


class GGNLinearOperator(_OutputCurvature):
    """The generalised Gauss-Newton matrix ``G = (1/R) sum_n J_n^T (d^2 l/d f_n^2) J_n``.

    Per chunk: ``J v`` (forward mode), the loss Hessian on outputs applied to it
    (forward over reverse on the loss alone), then ``J^T`` (one VJP of the shared forward).
    Takes the arguments of :class:`hpcqml.hessian.hvp.CurvatureOperator`.
    """

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        out, vjp_fn, jvp = self._linearised(x)

        def grad_out(o: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda o_: self.loss_fn(o_, y, self.num_data))(o)

        res = []
        for vp in vps:
            hjv = torch.func.jvp(grad_out, (out,), (jvp(vp),))[1]
            res.append(list(vjp_fn(hjv)))
        return res


class EmpiricalFisherLinearOperator(_OutputCurvature):
    """The empirical Fisher ``E = (1/R) sum_n g_n g_n^T``, ``g_n`` the sample's loss gradient.

    Per chunk: the output gradients ``d l/d f_n = R dL_c/d f_n``, the scalars
    ``(d l/d f_n) . (J v)_n`` and one VJP.  With ``batchnorm='train'`` the samples of a
    chunk are coupled and ``J_n`` is the Jacobian of sample n's output through the chunk.
    """

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        out, vjp_fn, jvp = self._linearised(x)
        r = self.loss_fn.normaliser(out, y, self.num_data)
        g = (self._output_grad(out, y) * r).reshape(out.shape[0], -1)
        res = []
        for vp in vps:
            coeff = (g * jvp(vp).reshape(g.shape)).sum(dim=1, keepdim=True)
            res.append(list(vjp_fn((g * coeff).reshape(out.shape) / r)))
        return res


def likelihood_of(fn: Callable) -> str:
    """The predictive distribution behind a loss: ``categorical``, ``gaussian`` or ``bernoulli``."""
    if fn is F.cross_entropy or (isinstance(fn, torch.nn.CrossEntropyLoss) and fn.label_smoothing == 0.0):
        return "categorical"
    if fn is F.mse_loss or isinstance(fn, torch.nn.MSELoss):
        return "gaussian"
    if fn is F.binary_cross_entropy_with_logits or (isinstance(fn, torch.nn.BCEWithLogitsLoss)
                                                     and fn.pos_weight is None):
        return "bernoulli"
    raise UserError(f"the Monte-Carlo Fisher needs a negative log-likelihood loss (cross-entropy, MSE or "
                    f"BCE-with-logits without weights); got {getattr(fn, '__name__', type(fn).__name__)}")


class MCFisherLinearOperator(_OutputCurvature):
    """The Monte-Carlo Fisher ``F = (1/(M R)) sum_n sum_m J_n^T s_nm s_nm^T J_n``.

    ``s_nm`` is the output gradient of the sample's loss at a label drawn from the model:
    ``softmax(f_n) - e_y~`` (cross-entropy), ``sqrt(2) z`` with z standard normal (squared
    error: labels ``f_n + z/sqrt(2)``), ``sigmoid(f_n) - y~`` (BCE-with-logits).  Outputs
    must be (batch, C).

    Args:
        seed: seed of the draws (with each sample's content hash).
        mc_samples: M, the labels drawn per sample.
        Others as :class:`hpcqml.hessian.hvp.CurvatureOperator`.
    """

    def __init__(self, model: torch.nn.Module, data: Any, loss_fn: Callable | ChunkLoss | None = None, *,
                 seed: int = 0, mc_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(model, data, loss_fn, **kwargs)
        if int(mc_samples) < 1:
            raise UserError(f"mc_samples = {mc_samples}: must be >= 1")
        if not 0 <= int(seed) < 2 ** 63:
            raise UserError(f"Fisher seed = {seed}: must be in [0, 2**63)")
        self.likelihood = likelihood_of(self.loss_fn.fn)
        self.seed = int(seed)
        self.mc_samples = int(mc_samples)
        self._draws: dict[bytes, np.ndarray] = {}

    def sample_keys(self, x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
        """One 16-byte key per sample: a hash of its input and label bytes (as given here)."""
        xs = x.detach().cpu().contiguous().reshape(x.shape[0], -1).numpy()
        ys = y.detach().cpu().contiguous().reshape(y.shape[0], -1).numpy()
        return [hashlib.blake2b(a.tobytes() + b.tobytes(), digest_size=16).digest()
                for a, b in zip(xs, ys, strict=True)]

    def _draws_of(self, keys: list[bytes], width: int) -> np.ndarray:
        """Per sample the (M, width) standard draws: uniforms, or normals for ``gaussian``."""
        rows = []
        for key in keys:
            d = self._draws.get(key)
            if d is None:
                rng = np.random.default_rng([self.seed, int.from_bytes(key[:8], "little"),
                                             int.from_bytes(key[8:], "little")])
                d = (rng.standard_normal((self.mc_samples, width)) if self.likelihood == "gaussian"
                     else rng.random((self.mc_samples, width)))
                self._draws[key] = d
            rows.append(d)
        return np.stack(rows, axis=1)  # (M, b, width)

    def sampled_output_grads(self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The (M, b, C) gradients ``s_nm`` of the samples' losses at their drawn labels."""
        if out.ndim != 2:
            raise UserError(f"the Monte-Carlo Fisher needs (batch, C) outputs; the model gives {tuple(out.shape)}")
        b, c = out.shape
        width = 1 if self.likelihood == "categorical" else c
        u = torch.from_numpy(self._draws_of(self.sample_keys(x, y), width)).to(device=out.device, dtype=out.dtype)
        if self.likelihood == "gaussian":
            return u * np.sqrt(2.0)
        if self.likelihood == "bernoulli":
            p = torch.sigmoid(out)
            return p - (u < p).to(out.dtype)
        p = torch.softmax(out, dim=1)
        cdf = torch.cumsum(p, dim=1)
        labels = torch.searchsorted(cdf.expand(self.mc_samples, b, c).contiguous(), u.contiguous())
        labels = labels.clamp_(max=c - 1).squeeze(-1)  # u above a rounded total of 1: the last class
        return p - F.one_hot(labels, c).to(out.dtype)

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        out, vjp_fn, jvp = self._linearised(x)
        r = self.loss_fn.normaliser(out, y, self.num_data)
        s = self.sampled_output_grads(x, y, out)
        res = []
        for vp in vps:
            coeff = torch.einsum("mbc,bc->mb", s, jvp(vp))
            res.append(list(vjp_fn(torch.einsum("mb,mbc->bc", coeff, s) / (self.mc_samples * r))))
        return res


CLASSES: dict[str, type[CurvatureOperator]] = {
    "hessian": HessianLinearOperator, "ggn": GGNLinearOperator, "fisher": MCFisherLinearOperator,
    "empirical-fisher": EmpiricalFisherLinearOperator,
}


def hessian_minus_ggn(model: torch.nn.Module, data: Any, loss_fn: Callable | ChunkLoss | None = None,
                      *, route: str | None = None, **kwargs: Any) -> OperatorAlgebra:
    """``H - G``: the network's own second-derivative part of the Hessian (module docstring).

    The two operators share the data source, the loss and the subspace.
    """
    h = HessianLinearOperator(model, data, loss_fn, route=route, **kwargs)
    shared = {k: v for k, v in kwargs.items() if k not in ("wrt", "mask", "micro_batch", "space", "num_data")}
    g = GGNLinearOperator(model, h.source, h.loss_fn, space=h.space, num_data=h.num_data, **shared)
    return h - g


def build_curvature(kind: str | Sequence[str], model: torch.nn.Module, data: Any,
                    loss_fn: Callable | None = None, *, wrt: str | Sequence[str] = "all",
                    mask: Mapping[str, torch.Tensor] | None = None, blocks: str | Sequence[str] | None = None,
                    route: str | None = None, batchnorm: str = "eval", micro_batch: int | None = None,
                    num_data: int | None = None, comm: Any = None, seed: int = 0, mc_samples: int = 1,
                    check_finite: bool = True, perf: Any = None) -> dict[str, OperatorAlgebra]:
    """Named curvature operators of one model state, sharing data, loss and subspace.

    Args:
        kind: one of :data:`KINDS` or a list of them.
        model: the network.
        data: this rank's samples (as :class:`hpcqml.hessian.hvp.CurvatureOperator`).
        loss_fn: the loss (default: mean cross-entropy).
        wrt: ``all``, ``support`` or name patterns (:func:`hpcqml.hessian.hvp.param_space`).
        mask: pruning masks by parameter name.
        batchnorm: ``eval`` or ``train`` (:func:`hpcqml.hessian.hvp.product_mode`).
        micro_batch: samples per chunk.
        num_data: samples over all ranks (None: counted once for all operators).
        comm: the communicator the data is sharded over.
        check_finite: raise on a NaN/Inf product.
        perf: optional counters and timers.
        blocks: None (the whole subspace), ``layer``, ``module`` or a list of name patterns
            (:func:`hpcqml.hessian.blocks.partition`): one operator per diagonal block.
        route: the Hessian's product route (:func:`hpcqml.hessian.hvp.resolve_route`).
        seed: seed of the Monte-Carlo Fisher's draws.
        mc_samples: labels drawn per sample for the Monte-Carlo Fisher.

    Returns:
        ``{kind: operator}``, or with blocks ``{"kind/block": operator}`` (kinds in the order
        given, blocks in model order).
    """
    from hpcqml.hessian.blocks import partition

    kinds = [kind] if isinstance(kind, str) else list(kind)
    if not kinds:
        raise UserError("curvature: name at least one of " + ", ".join(KINDS))
    for k in kinds:
        if k not in KINDS:
            raise UserError(f"curvature = {k!r}: not one of {', '.join(KINDS)}")
    space = param_space(model, wrt, mask)
    source = DataSource(data, micro_batch)
    chunk_loss = ChunkLoss(loss_fn)
    if num_data is None:
        total = np.array([source.count()], dtype=np.int64)
        allreduce_sum(comm, total)
        num_data = int(total[0])
    common = dict(num_data=num_data, comm=comm, batchnorm=batchnorm, check_finite=check_finite, perf=perf)
    parts: dict[str, ParamSpace] = {"": space} if blocks is None else {
        name: space.restrict(names) for name, names in partition(space, blocks).items()}
    out: dict[str, OperatorAlgebra] = {}
    for k in kinds:
        for bname, sub in parts.items():
            extra: dict[str, Any] = {"route": route} if k in ("hessian", "hessian-minus-ggn") else {}
            if k == "fisher":
                extra = {"seed": seed, "mc_samples": mc_samples}
            if k == "hessian-minus-ggn":
                op: OperatorAlgebra = hessian_minus_ggn(model, source, chunk_loss, space=sub, **extra, **common)
            else:
                op = CLASSES[k](model, source, chunk_loss, space=sub, **extra, **common)
            out[k if blocks is None else f"{k}/{bname}"] = op
    return out
