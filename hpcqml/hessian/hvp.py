"""Exact Hessian-vector products of a loss over a data set, as a linear operator.

The loss is a loss function ``loss_fn(output, target)`` over a data set of ``N`` samples,
possibly sharded over the ranks of an MPI communicator.  With the default cross-entropy
and reduction ``mean`` this is the paper's batch loss (Sec. III B: B = 2048 randomly
selected training samples),

    L(theta) = (1/N) sum_{i=1}^{N} l_i(theta),      H = d^2 L / d theta^2,

and with reduction ``sum`` the factor 1/N is dropped.  In general ``L`` is what the loss
function returns on the whole data set in one call, ``loss_fn(model(X), Y)``.

``H`` is restricted to a coordinate subspace ``S`` (``all`` trainable parameters, or
``support``: the coordinates kept by a pruning mask plus every parameter the mask does not
cover).  With the selection matrix ``P`` (rows = chosen coordinates) the operator is
``H_S = P H P^T``; a vector of ``H_S`` is a flat tensor of length ``n = |S|``.

Because ``L`` is a sum over samples, ``H v = sum_c Hess(L_c) v`` for any partition of the
data into chunks ``c``, where ``L_c`` is the chunk's share of ``L`` (its summed loss divided
by the global mean's denominator, so a ragged last chunk is weighted correctly).  Each rank
iterates its shard of the data, splits every batch into micro-batches, accumulates the
chunk products, and the partial products are summed over ranks by MPI allreduce.

BatchNorm layers: ``batchnorm = "eval"`` (the default) normalises with the running
statistics, so ``L`` is a sum over samples as above.  ``batchnorm = "train"`` normalises
each chunk with its own batch statistics (the running statistics are neither used nor
updated); the samples of a chunk are then coupled, and the operator is the sum over chunks
of ``Hess(L_c)`` with ``L_c`` evaluated on chunk c alone.  It therefore depends on how the
data is cut into chunks: the chunks are the micro-batches of each batch as this rank's data
yields it, so two layouts give the same operator exactly when they give the same chunks
(for instance whole batches as chunks, ``micro_batch=None``, with each batch held by one
rank).  Dropout and every other layer stay in eval mode.

Structure: :class:`CurvatureOperator` owns the parameters, the data iteration, the
micro-batching, the scaling, the BatchNorm mode and the reductions; the product API (``@``,
``matvec``, ``matmat``, ``to_scipy``, ``A + B``, ``c * A``, ``A.T``, lists of
parameter-shaped tensors) comes from :class:`hpcqml.hessian.algebra.OperatorAlgebra`.  A
product route or another curvature matrix (:mod:`hpcqml.hessian.curvature`) is a subclass
that implements the one per-chunk hook ``_chunk_products``.  Three Hessian routes are
implemented:

* ``double-backward`` (:class:`DoubleBackwardHessian`): g = dL_c/dtheta with
  ``create_graph=True``, then d(g . v)/dtheta;
* ``func`` (:class:`FuncHessian`): forward-over-reverse,
  ``torch.func.jvp(torch.func.grad(L_c), (theta,), (v,))``, a block of vectors under
  ``torch.func.vmap`` over the tangents;
* ``compiled`` (:class:`CompiledHessian`): the ``func`` product under ``torch.compile``,
  its compile time reported apart (``compile_seconds``).

The products are summed over ranks by a :class:`hpcqml.hessian.reduce.Reducer` (device
buffers through NCCL or CUDA-aware MPI where available, the host otherwise).

:class:`HessianLinearOperator` runs one of them by name, or with ``auto`` times every route
on the first product and keeps the fastest (decided on rank 0 and broadcast); without a
route it takes the fixed default of the device type (:func:`default_route`), so the same
configuration on the same kind of machine always runs the same arithmetic.
The pipeline builds it from one tensor batch per rank with the global batch size given
(``HessianLinearOperator(model, (x, y), num_data=B, ...)``).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian.algebra import OperatorAlgebra
from hpcqml.hessian.reduce import Reducer
from hpcqml.parallel import allreduce_sum
from hpcqml.protocols import Comm, PerfTimer

SPACES = ("all", "support")
REDUCTIONS = ("mean", "sum")
BATCHNORM_MODES = ("eval", "train")
DEFAULT_ROUTES = {"cpu": "double-backward", "cuda": "double-backward"}
"""The route taken when none is named, per device type: double backward needs no forward-mode
derivative of any layer, so it runs every model; ``auto`` or a name chooses otherwise."""


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, restoring each flag afterwards."""
    with product_mode(model, "eval"):
        yield


@contextlib.contextmanager
def product_mode(model: torch.nn.Module, batchnorm: str = "eval") -> Iterator[None]:
    """Eval mode for the duration, BatchNorm layers in ``batchnorm`` mode; flags restored after.

    ``train``: every BatchNorm layer normalises with the statistics of the batch it is given
    and neither reads nor updates its running statistics (``track_running_stats`` is off for
    the duration).
    """
    if batchnorm not in BATCHNORM_MODES:
        raise UserError(f"batchnorm = {batchnorm!r}: not one of {', '.join(BATCHNORM_MODES)}")
    flags = [(m, m.training) for m in model.modules()]
    tracked = []
    model.eval()
    try:
        if batchnorm == "train":
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    tracked.append((m, m.track_running_stats))
                    m.track_running_stats = False
                    m.train(True)
        yield
    finally:
        for m, keep in tracked:
            m.track_running_stats = keep
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
        """Set ``n`` and the flat offsets of the parameters."""
        self.n = int(sum(self.sizes))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters (of the first one)."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters (of the first one)."""
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

    def restrict(self, names: Sequence[str]) -> ParamSpace:
        """The subspace of the listed parameters (model order kept, their masks kept)."""
        keep = set(names)
        unknown = sorted(keep - set(self.names))
        if unknown:
            raise UserError(f"parameter {unknown[0]!r} is not in the operator's coordinate space")
        idx = [k for k, name in enumerate(self.names) if name in keep]
        return ParamSpace([self.names[k] for k in idx], [self.params[k] for k in idx],
                          [self.masks[k] for k in idx], [self.sizes[k] for k in idx])

    def index_of(self, names: Sequence[str]) -> torch.Tensor:
        """Flat positions in S (int64) of the coordinates of the listed parameters."""
        keep = set(names)
        parts = [torch.arange(self.offsets[k], self.offsets[k + 1], dtype=torch.int64)
                 for k, name in enumerate(self.names) if name in keep]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def matches(name: str, pattern: str) -> bool:
    """Whether a parameter name is selected by a pattern.

    A pattern is a parameter name or a module name (``layer1.0.conv1`` selects
    ``layer1.0.conv1.weight``), with shell wildcards (``layer*``, ``*.bias``, ``fc.*``).
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select_names(names: Sequence[str], patterns: Sequence[str], what: str = "wrt") -> list[str]:
    """The names selected by any of the patterns, in the given order; a pattern that
    selects nothing is an error naming it.
    """
    if isinstance(patterns, str) or not patterns:
        raise UserError(f"{what} patterns must be a non-empty list of names or wildcards")
    for pat in patterns:
        if not isinstance(pat, str) or not any(matches(n, pat) for n in names):
            raise UserError(f"{what} pattern {pat!r} matches no trainable parameter "
                            f"(names look like {names[0]!r})")
    return [n for n in names if any(matches(n, pat) for pat in patterns)]


def param_space(model: torch.nn.Module, wrt: str | Sequence[str] = "all",
                mask: Mapping[str, torch.Tensor] | None = None) -> ParamSpace:
    """Build the coordinate subspace S of the Hessian (F_1 = -eta H, eq. II.65).

    Args:
        model: the network.
        wrt: ``all`` trainable parameters, the mask's ``support``, or a list of parameter or
            module name patterns (:func:`matches`).
        mask: pruning masks by parameter name (needed for ``support``; with a pattern list
            the selected parameters are restricted to the mask's support when one is given).

    Returns:
        The subspace: every chosen parameter named in ``mask`` contributes its True
        coordinates, every other chosen one (never pruned: BatchNorm, biases, ...) all of them.
    """
    patterns = None if isinstance(wrt, str) else list(wrt)
    if patterns is None and wrt not in SPACES:
        raise UserError(f"hessian wrt = {wrt!r}: not one of {', '.join(SPACES)}, nor a list of name patterns")
    if wrt == "support" and mask is None:
        raise UserError("hessian wrt = 'support' needs a pruning mask, but the model has none")
    use_mask = (wrt == "support" or patterns is not None) and mask is not None
    chosen: Mapping[str, torch.Tensor] = mask if use_mask and mask is not None else {}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UserError("model has no trainable parameters")
    wanted = set(trainable if patterns is None else select_names(trainable, patterns))
    names, params, masks, sizes = [], [], [], []
    known = set(trainable)
    for name, p in model.named_parameters():
        if name not in wanted or not p.requires_grad:
            continue
        m = None
        if name in chosen:
            m = chosen[name].to(device=p.device, dtype=torch.bool)
            if m.shape != p.shape:
                raise UserError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        names.append(name)
        params.append(p)
        masks.append(m)
        sizes.append(int(p.numel()) if m is None else int(m.sum()))
    if not params:
        raise UserError("model has no trainable parameters")
    if use_mask:
        missing = sorted(set(chosen) - known)
        if missing:
            raise UserError(f"mask names {missing[0]!r}, which is not a trainable parameter of the model")
    return ParamSpace(names, params, masks, sizes)


# -- the loss ------------------------------------------------------------------------------

def _reduction_of(loss_fn: Callable) -> str:
    """Return the reduction a loss function applies: its ``reduction`` attribute or argument default."""
    red = getattr(loss_fn, "reduction", None)
    if red is None:
        param = _signature_params(loss_fn).get("reduction")
        red = None if param is None or param.default is inspect.Parameter.empty else param.default
    if red is None:
        raise UserError("loss_fn has neither a 'reduction' attribute nor a 'reduction' argument with a default; "
                        "give it one ('mean' or 'sum')")
    if red not in REDUCTIONS:
        raise UserError(f"loss_fn reduction = {red!r}: not one of {', '.join(REDUCTIONS)}")
    return str(red)


def _signature_params(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return {}


def _with_reduction(loss_fn: Callable, reduction: str) -> Callable | None:
    """``loss_fn`` with another reduction (a module copy or a bound argument), or None."""
    if isinstance(loss_fn, torch.nn.Module) and hasattr(loss_fn, "reduction"):
        other: Any = copy.copy(loss_fn)
        other.reduction = reduction
        return other
    if "reduction" in _signature_params(loss_fn):
        return lambda out, target: loss_fn(out, target, reduction=reduction)
    return None


class ChunkLoss:
    """A loss function evaluated on chunks whose values add up to the loss of the whole data set.

    Reduction ``sum``: a chunk's value is the loss itself.  Reduction ``mean``: when the
    reduction can be switched (a module with a ``reduction`` attribute, or a function with
    a ``reduction`` argument), the chunk's summed loss divided by ``num_data`` times the
    loss elements per sample (``reduction='none'`` tells how many: 1 for cross-entropy, the
    output width for ``MSELoss``); otherwise the chunk's mean times ``b / num_data``.
    """

    def __init__(self, loss_fn: Callable | None = None) -> None:
        self.fn = F.cross_entropy if loss_fn is None else loss_fn
        self.reduction = _reduction_of(self.fn)
        if self.reduction == "mean" and getattr(self.fn, "weight", None) is not None:
            raise UserError("loss_fn has class weights and reduction 'mean', whose denominator is not a sample "
                            "count; use reduction 'sum'")
        self._sum = _with_reduction(self.fn, "sum") if self.reduction == "mean" else None
        self._none = _with_reduction(self.fn, "none") if self.reduction == "mean" else None
        self._per_sample: int | None = None

    def __call__(self, out: torch.Tensor, target: torch.Tensor, num_data: int) -> torch.Tensor:
        """Return the chunk's share of the loss of a data set of ``num_data`` samples."""
        if self.reduction == "sum":
            return self.fn(out, target)
        b = int(out.shape[0])
        per_sample = self._elements_per_sample(out, target)
        if per_sample is None or self._sum is None:
            return self.fn(out, target) * (b / num_data)
        return self._sum(out, target) / (num_data * per_sample)

    def normaliser(self, out: torch.Tensor, target: torch.Tensor, num_data: int) -> float:
        """``R`` with ``L = (1/R) sum_n l_n``, ``l_n`` a sample's summed loss elements.

        ``1`` for reduction ``sum``; ``num_data`` times the loss elements per sample for
        ``mean`` (``num_data`` when that count cannot be found).
        """
        if self.reduction == "sum":
            return 1.0
        return float(num_data * (self._elements_per_sample(out, target) or 1))

    def _elements_per_sample(self, out: torch.Tensor, target: torch.Tensor) -> int | None:
        if self._per_sample is None and self._sum is not None and self._none is not None:
            with torch.no_grad():
                try:
                    count = int(self._none(out.detach(), target).numel())
                except (TypeError, ValueError, RuntimeError):  # a custom loss without 'none'
                    count = 0
            b = int(out.shape[0])
            self._per_sample = count // b if count >= b and count % b == 0 else 0
        return self._per_sample or None


# -- the data -------------------------------------------------------------------------------

def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, int(size))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class DataSource:
    """Samples of one rank, split into micro-batches.

    The data is one ``(x, y)`` pair of tensors, or a re-iterable collection of ``(x, y)``
    batches (a list, a ``DataLoader``).
    """

    def __init__(self, data: Any, micro_batch: int | None) -> None:
        if micro_batch is not None and int(micro_batch) < 1:
            raise UserError(f"micro_batch = {micro_batch}: must be >= 1")
        if _is_tensor_pair(data):
            if int(data[0].shape[0]) != int(data[1].shape[0]):
                raise UserError(f"batch inputs ({data[0].shape[0]}) and labels ({data[1].shape[0]}) differ in length")
        elif not isinstance(data, Iterable):
            raise UserError(f"data is a {type(data).__name__}: pass (x, y) tensors or an iterable of (x, y) batches")
        elif isinstance(data, Iterator):
            raise UserError("data is a one-shot iterator (a generator?): every product reads the data again; "
                            "pass a list of (x, y) batches, (x, y) tensors or a DataLoader")
        self.data = data
        self.micro_batch = None if micro_batch is None else int(micro_batch)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the ``(x, y)`` batches as stored."""
        if _is_tensor_pair(self.data):
            yield self.data[0], self.data[1]
            return
        for item in self.data:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2
                    and isinstance(item[0], torch.Tensor) and isinstance(item[1], torch.Tensor)):
                raise UserError(f"data yields a {type(item).__name__}; expected (x, y) tensor pairs")
            if int(item[0].shape[0]) != int(item[1].shape[0]):
                raise UserError(f"a batch has {item[0].shape[0]} inputs but {item[1].shape[0]} targets")
            yield item[0], item[1]

    def count(self) -> int:
        """Count the samples held here (one pass over the data)."""
        return sum(int(y.shape[0]) for _, y in self.batches())

    def chunks(self, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield micro-batches on ``device``, floating-point inputs cast to ``dtype``."""
        for x, y in self.batches():
            x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
            y = y.to(device)
            n = int(y.shape[0])
            for lo, hi in _chunks(n, self.micro_batch or max(n, 1)):
                yield x[lo:hi], y[lo:hi]


# -- the operator ---------------------------------------------------------------------------

ROUTE_CLASSES: dict[str, type[CurvatureOperator]] = {}  # route name -> subclass, filled on definition


class CurvatureOperator(OperatorAlgebra):
    """Base of the curvature operators: ``v -> C_S v`` of a loss over a data set.

    The base owns the parameter subspace, the data iteration and micro-batching, the
    scaling (:class:`ChunkLoss`), the BatchNorm mode, the reduction over ``comm`` and the
    finite check; the product API comes from :class:`OperatorAlgebra`.  A subclass
    implements :meth:`_chunk_products` (one chunk's products); a Hessian route also sets
    ``route_name`` and is then registered in :data:`ROUTE_CLASSES`.

    Args:
        model: the network (put in eval mode during every product; its flags are restored).
        data: this rank's samples: ``(x, y)`` tensors, or a re-iterable collection of
            ``(x, y)`` batches such as a list or a ``torch.utils.data.DataLoader`` (it must
            give the same samples on every pass: no shuffling or augmentation).
        loss_fn: ``loss_fn(output, target)`` with a ``reduction`` attribute or argument
            (``mean`` or ``sum``); default: cross-entropy, reduction ``mean``.
        wrt: ``all`` trainable parameters, the ``support`` of ``mask``, or a list of
            parameter/module name patterns (:func:`param_space`).
        mask: pruning masks by parameter name (for ``wrt='support'`` or patterns).
        space: a ready coordinate subspace (overrides ``wrt``/``mask``).
        micro_batch: samples per chunk (the last chunk of a batch may be smaller); None
            takes each batch whole.
        batchnorm: ``eval`` (running statistics) or ``train`` (each chunk's own batch
            statistics; the running statistics are neither used nor updated).
        num_data: samples over all ranks; None counts them (one pass over the data and an
            allreduce).
        comm: the mpi4py communicator whose ranks hold the shards (None = one process).
        check_finite: raise :class:`NumericalError` on a NaN/Inf product.
        perf: optional object with ``count(name, n)`` and ``comm_timer()``.
    """

    route_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names a route in :data:`ROUTE_CLASSES`."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("route_name"):
            ROUTE_CLASSES[cls.route_name] = cls

    def __init__(self, model: torch.nn.Module, data: Any, loss_fn: Callable | ChunkLoss | None = None, *,
                 wrt: str = "all", mask: Mapping[str, torch.Tensor] | None = None,
                 space: ParamSpace | None = None, micro_batch: int | None = None, num_data: int | None = None,
                 comm: Comm | None = None, check_finite: bool = True, perf: PerfTimer | None = None,
                 batchnorm: str = "eval") -> None:
        if batchnorm not in BATCHNORM_MODES:
            raise UserError(f"batchnorm = {batchnorm!r}: not one of {', '.join(BATCHNORM_MODES)}")
        self.batchnorm = batchnorm
        self.model = model
        self.space = space if space is not None else param_space(model, wrt, mask)
        self.source = data if isinstance(data, DataSource) else DataSource(data, micro_batch)
        self.loss_fn = loss_fn if isinstance(loss_fn, ChunkLoss) else ChunkLoss(loss_fn)
        self.comm = comm
        self.num_data = int(num_data) if num_data is not None else self._count(comm)
        if self.num_data < 1:
            raise UserError("Hessian data set is empty")
        self.check_finite = bool(check_finite)
        self.perf = perf
        self.products = 0

    def _count(self, comm: Comm | None) -> int:
        total = np.array([self.source.count()], dtype=np.int64)
        allreduce_sum(comm, total)
        return int(total[0])

    # -- the per-chunk hook ----------------------------------------------------------------
    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """``[Hess(L_c) v for v in vps]`` on one chunk, each in parameter-shaped list form."""
        raise NotImplementedError(f"{type(self).__name__} implements no product route")

    def _chunk_loss(self, x: torch.Tensor, y: torch.Tensor,
                    params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Return the chunk's share ``L_c`` of the loss (with ``params``: a functional call on them)."""
        if params is None:
            out = self.model(x)
        else:
            out = torch.func.functional_call(self.model, dict(zip(self.space.names, params, strict=True)), (x,))
        return self.loss_fn(out, y, self.num_data)

    # -- local (unreduced) products ---------------------------------------------------------
    def _local(self, vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Return the sum of the chunk products over this rank's data, in product mode."""
        acc = [[torch.zeros_like(p) for p in self.space.params] for _ in vps]
        with product_mode(self.model, self.batchnorm):
            for x, y in self.source.chunks(self.space.device, self.space.dtype):
                for a_col, h_col in zip(acc, self._chunk_products(x, y, vps), strict=True):
                    for a, h in zip(a_col, h_col, strict=True):
                        a.add_(h.detach())
        return acc

    def _product(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the flat products ``H_S c`` for the flat columns ``cols``, reduced over ``comm``."""
        local = self._local([self.space.to_params(c) for c in cols])
        if len(cols) == 1:
            out = self.space.from_params(local[0]).contiguous()
        else:
            out = torch.stack([self.space.from_params(c) for c in local], dim=1).contiguous()
        self.reducer.allreduce_(out)
        self.products += len(cols)
        if self.perf is not None:
            self.perf.count("hvp_products", len(cols))
        if self.check_finite:
            check_finite(out, f"product {self.products} of {type(self).__name__}")
        return [out] if len(cols) == 1 else list(out.unbind(1))

    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._product(cols)

    @property
    def reducer(self) -> Reducer:
        """The sum over ``comm`` of this operator's products (device buffers where possible)."""
        if getattr(self, "_reducer", None) is None:
            self._reducer = Reducer(self.comm, self.space.device, perf=self.perf)
        return self._reducer

    # -- public -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Dimension of the coordinate subspace S."""
        return self.space.n

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products (that of the parameters)."""
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        """Device of the products (that of the parameters)."""
        return self.space.device

    def gradient(self) -> torch.Tensor:
        """Flat gradient ``P dL/dtheta`` of the data-set loss (allreduced)."""
        params = self.space.params
        acc = [torch.zeros_like(p) for p in params]
        with product_mode(self.model, self.batchnorm):
            for x, y in self.source.chunks(self.space.device, self.space.dtype):
                for a, h in zip(acc, torch.autograd.grad(self._chunk_loss(x, y), params), strict=True):
                    a.add_(h)
        out = self.space.from_params(acc).contiguous()
        self.reducer.allreduce_(out)
        return out

    def loss(self) -> float:
        """Return the data-set loss L(theta) (allreduced), evaluated without gradients."""
        total = torch.zeros(1, dtype=torch.float64)
        with product_mode(self.model, self.batchnorm), torch.no_grad():
            for x, y in self.source.chunks(self.space.device, self.space.dtype):
                total += float(self._chunk_loss(x, y))
        allreduce_sum(self.comm, total)
        return float(total[0])


class DoubleBackwardHessian(CurvatureOperator):
    """Route ``double-backward``: the chunk gradient with a graph, then a VJP of it per vector.

    The graph is built once per chunk for all the vectors of a ``matmat``.
    """

    route_name = "double-backward"

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        params = self.space.params
        grads = torch.autograd.grad(self._chunk_loss(x, y), params, create_graph=True)
        last = len(vps) - 1
        return [list(torch.autograd.grad(grads, params, grad_outputs=vp, retain_graph=j < last))
                for j, vp in enumerate(vps)]


DEFAULT_VMAP_WIDTH = 4
"""Tangents per ``vmap`` call of the ``func`` route's ``matmat``.  Measured on resnet8-w1
(B = 64, one CPU thread, one run): per column, 4 tangents under one ``vmap`` cost 0.68 of a
single product, 8 cost 0.72, 16 cost 0.84 (the batched activations outgrow the cache); 4
and 8 are alike within the run's noise, and 4 holds half the batched activations."""


class FuncHessian(CurvatureOperator):
    """Route ``func``: forward-over-reverse, ``jvp(grad(L_c), (theta,), (v,))``.

    A block of k vectors is cut into chunks of ``vmap_width`` columns; each chunk runs as
    one ``torch.func.vmap`` of the product over its stacked tangents, so the chunk's forward
    and backward passes are shared by its columns.  ``vmap_width = 1`` runs the columns one
    by one.  Every column is the same product ``Hess(L_c) v`` as when run alone.
    """

    route_name = "func"
    vmap_width: int = DEFAULT_VMAP_WIDTH

    def _product_fn(self, x: torch.Tensor, y: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]]:
        """``(theta, v) -> Hess(L_c)(theta) v`` on the chunk ``(x, y)``, tuples of parameter-shaped tensors."""
        def loss_of(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return self._chunk_loss(x, y, ps)

        grad_fn = torch.func.grad(loss_of)

        def hvp(ps: tuple[torch.Tensor, ...], tangent: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(torch.func.jvp(grad_fn, (ps,), (tangent,))[1])

        return hvp

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        params = tuple(p.detach() for p in self.space.params)
        hvp = self._product_fn(x, y)
        width = max(1, int(self.vmap_width))
        if width == 1 or len(vps) == 1:
            return [list(hvp(params, tuple(vp))) for vp in vps]
        batched = torch.func.vmap(hvp, in_dims=(None, 0))
        out: list[list[torch.Tensor]] = []
        for lo in range(0, len(vps), width):
            block = vps[lo:lo + width]
            stacked = tuple(torch.stack(parts) for parts in zip(*block, strict=True))
            products = batched(params, stacked)
            out += [[t[j] for t in products] for j in range(len(block))]
        return out


COMPILE_PAYBACK_PRODUCTS = {"cpu": 3800, "cuda": 210}
"""Products after which ``torch.compile`` of the product has paid for its compilation, per
device type: compiling costs about c products and saves a fraction s of each later one, so
it pays back after c / s products.  Measured on resnet8-w1 (CPU inductor C++, one thread):
compile 764 s against 1.34 s per eager product (c = 570), 1.18x faster after (s = 0.15),
c / s = 3800; on resnet32-w4 on an H200: 40 s against 0.44 s (c = 91), 1.78x (s = 0.44),
c / s = 210."""


def compile_available() -> bool:
    """Whether ``torch.compile`` can run here (on a CPU, inductor needs a C++ compiler)."""
    import shutil

    has_cxx = shutil.which("g++") is not None or shutil.which("c++") is not None
    return hasattr(torch, "compile") and has_cxx


class CompiledHessian(FuncHessian):
    """Route ``compiled``: the ``func`` route's product under ``torch.compile``.

    The product ``(theta, v, x, y) -> Hess(L_c)(theta) v`` is compiled once per operator
    (on a CPU by the inductor C++ backend); a chunk of a new shape (a ragged last chunk)
    compiles once more.  ``compile_seconds`` accumulates the wall time of each call that
    compiled (it includes that call's one product), so the price of compiling is reported
    apart from the products.  A block of vectors runs column by column.
    """

    route_name = "compiled"
    compile_cost: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compile_seconds = 0.0
        self._compiled: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self._shapes: set[tuple[Any, ...]] = set()

    def _compiled_product(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        if self._compiled is None:
            if not hasattr(torch, "compile"):
                raise UserError("hessian route = 'compiled' needs torch.compile (PyTorch >= 2.0)")

            def product(ps: tuple[torch.Tensor, ...], tangent: tuple[torch.Tensor, ...],
                        x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return self._product_fn(x, y)(ps, tangent)

            self._compiled = torch.compile(product)
        return self._compiled

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        params = tuple(p.detach() for p in self.space.params)
        fn = self._compiled_product()
        out = []
        for vp in vps:
            key = (tuple(x.shape), x.dtype, str(x.device), tuple(y.shape))
            if key in self._shapes:
                out.append(list(fn(params, tuple(vp), x, y)))
                continue
            _sync(x.device)
            t0 = time.perf_counter()
            out.append(list(fn(params, tuple(vp), x, y)))
            _sync(x.device)
            self.compile_seconds += time.perf_counter() - t0
            self._shapes.add(key)
        return out


class HessianLinearOperator(CurvatureOperator):
    """The Hessian operator with its product route chosen by name, or ``auto``.

    With ``auto`` every registered route is timed on the first product and the fastest is
    kept (rank 0's choice is broadcast, so every rank uses the same route).

    Takes the arguments of :class:`CurvatureOperator` and ``route``: a route name, ``auto``,
    or None for the device type's fixed default (:func:`default_route`).  ``route`` holds
    the requested name until ``auto`` has chosen; then it and ``route_used`` hold the choice
    (store it and pass it back, e.g. through :func:`resolve_route`, so that a resumed run
    uses the same arithmetic).  ``route_timings`` holds the seconds each route took on the
    first product.

    ``vmap_width``: columns per ``vmap`` call of the ``func`` route's ``matmat``
    (:data:`DEFAULT_VMAP_WIDTH`).  ``expected_products``: how many products the caller
    will ask for.  ``auto`` times the ``compiled`` route only when this number is given and
    reaches the device type's payback count (:data:`COMPILE_PAYBACK_PRODUCTS`); it then
    times the compiled route on a second product after the compiling one and keeps it when
    it is the fastest.  ``compile_seconds`` is the time spent compiling (0 when nothing
    was compiled).
    """

    def __init__(self, model: torch.nn.Module, data: Any, loss_fn: Callable | ChunkLoss | None = None, *,
                 route: str | None = None, vmap_width: int = DEFAULT_VMAP_WIDTH,
                 expected_products: int | None = None, **kwargs: Any) -> None:
        if route is not None and route != "auto" and route not in ROUTE_CLASSES:
            raise UserError(f"hessian route = {route!r}: not one of {', '.join(routes())}")
        if int(vmap_width) < 1:
            raise UserError(f"vmap_width = {vmap_width}: must be >= 1")
        if expected_products is not None and int(expected_products) < 0:
            raise UserError(f"expected_products = {expected_products}: must be >= 0")
        super().__init__(model, data, loss_fn, **kwargs)
        self.route = default_route(self.device) if route is None else route
        self.route_timings: dict[str, float] = {}
        self.expected_products = None if expected_products is None else int(expected_products)
        self._routes = {name: cls(model, self.source, self.loss_fn, space=self.space, num_data=self.num_data,
                                  batchnorm=self.batchnorm)
                        for name, cls in ROUTE_CLASSES.items()}
        for op in self._routes.values():
            if isinstance(op, FuncHessian):
                op.vmap_width = int(vmap_width)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the product (the ``compiled`` route; 0 when it never ran)."""
        return float(sum(getattr(op, "compile_seconds", 0.0) for op in self._routes.values()))

    def _times_route(self, name: str) -> bool:
        """Whether ``auto`` times route ``name``: a compiled route only when it pays back."""
        if not getattr(self._routes[name], "compile_cost", False):
            return True
        need = COMPILE_PAYBACK_PRODUCTS.get(self.device.type, COMPILE_PAYBACK_PRODUCTS["cpu"])
        return self.expected_products is not None and self.expected_products >= need and compile_available()

    @property
    def route_used(self) -> str | None:
        """The route the products run on (None until ``auto`` has timed the first product)."""
        return None if self.route == "auto" else self.route

    def _chunk_products(self, x: torch.Tensor, y: torch.Tensor,
                        vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        return self._routes[self._active]._chunk_products(x, y, vps)

    def _local(self, vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        if self.route == "auto":
            return self._choose_route(vps)
        self._active = self.route
        return super()._local(vps)

    def _choose_route(self, vps: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Time every route on this product and keep the fastest.

        Every rank times every route (a route that fails here counts as infinitely slow) and
        the slowest rank's time decides, so all ranks choose the same route, and a route that
        failed on any rank is never chosen.
        """
        results = {}
        for name in self._routes:
            if not self._times_route(name):
                continue
            self._active = name
            try:
                if getattr(self._routes[name], "compile_cost", False):
                    super()._local(vps)  # compiles; timed apart in compile_seconds
                _sync(self.device)
                t0 = time.perf_counter()
                results[name] = super()._local(vps)
            except (RuntimeError, NotImplementedError):  # an op without forward-mode AD
                self.route_timings[name] = float("inf")
                continue
            _sync(self.device)
            self.route_timings[name] = time.perf_counter() - t0
        names = sorted(self.route_timings)
        times = np.array([self.route_timings[name] for name in names], dtype=np.float64)
        if self.comm is not None and self.comm.Get_size() > 1:
            from mpi4py import MPI

            slowest = np.empty_like(times)
            self.comm.Allreduce(times, slowest, op=MPI.MAX)
            times = slowest
            self.route_timings = dict(zip(names, map(float, times), strict=True))
        if not np.any(np.isfinite(times)):
            raise NumericalError("hessian route = 'auto': every product route failed on the first product")
        best = names[int(np.argmin(times))]
        self.route = self._active = best
        if best not in results:
            results[best] = super()._local(vps)
        return results[best]


def routes() -> tuple[str, ...]:
    """Return the accepted ``route`` names: ``auto`` and every registered route."""
    return ("auto", *ROUTE_CLASSES)


def default_route(device: torch.device | str) -> str:
    """The fixed route of a device type (:data:`DEFAULT_ROUTES`; double backward for others)."""
    kind = torch.device(device).type
    return DEFAULT_ROUTES.get(kind, "double-backward")


def resolve_route(requested: str | None, device: torch.device | str, decided: str | None = None) -> str:
    """The route to build an operator with, the same on every call for the same inputs.

    Args:
        requested: a route name, ``auto``, or None / ``default`` (the device type's fixed
            route, :func:`default_route`).
        device: where the products run.
        decided: the route an earlier ``auto`` run chose and stored (its
            ``op.route_used``); it is reused, so ``auto`` is timed at most once per run.

    Returns:
        A route name, or ``auto`` when ``auto`` is requested and nothing was decided yet
        (the operator then times the routes on its first product; store ``route_used``
        before the first result is committed).
    """
    if requested is None or requested == "default":
        return default_route(device)
    if requested not in routes():
        raise UserError(f"hessian route = {requested!r}: not one of default, {', '.join(routes())}")
    if requested != "auto":
        return requested
    if decided is None:
        return "auto"
    if decided not in ROUTE_CLASSES:
        raise UserError(f"stored route {decided!r} is not a product route ({', '.join(ROUTE_CLASSES)})")
    return decided


def check_finite(w: torch.Tensor, what: str) -> None:
    """Raise NumericalError naming ``what`` if ``w`` holds NaN or Inf."""
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(f"Hessian-vector product is not finite (NaN/Inf) at {what}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
