"""Linear-operator algebra shared by every curvature operator: products and combinations.

An operator here is a linear map ``A: R^n -> R^n`` on the coordinate subspace S of the
parameters (the Hessian H_S behind F_1 = -eta H of eq. II.65, a generalised Gauss-Newton
matrix, a Fisher, one of their diagonal blocks).  :class:`OperatorAlgebra` gives every such
operator

* products ``A @ v`` and ``A @ V`` with a flat vector, an (n, k) matrix (torch or numpy), or
  a list of tensors shaped like the parameters (a trailing axis of k columns for a matrix);
  the result has the input's form;
* combinations ``A + B``, ``A - B``, ``c * A``, ``-A`` and composition ``A @ B``, themselves
  operators (so they chain and still offer :meth:`OperatorAlgebra.to_scipy`);
* the transpose ``A.T``: a symmetric operator is its own transpose, a combination's
  transpose is built from the transposes of its terms ((AB)^T = B^T A^T).

A subclass implements one hook, ``_apply(cols) -> cols`` on flat columns of length n, and
states whether it is symmetric.  Every hook is collective over the operator's communicator
when it has one: every rank passes the same vectors and gets the same result.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcqml.errors import UserError


class OperatorAlgebra:
    """Products, combinations, transpose and scipy export for an operator on R^n.

    Subclasses provide ``n``, ``dtype``, ``device``, ``space`` (a
    :class:`hpcqml.hessian.hvp.ParamSpace`, or None when lists of parameter-shaped tensors are
    not accepted), ``symmetric`` and ``_apply``; a non-symmetric one also ``_apply_adjoint``.
    """

    symmetric: bool = True
    space: Any = None

    # -- the hooks ----------------------------------------------------------------------------
    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``[A c for c in cols]`` for flat columns of length n (one pass for all)."""
        raise NotImplementedError(f"{type(self).__name__} implements no product")

    def _apply_adjoint(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``[A^T c for c in cols]``; a symmetric operator applies itself."""
        if self.symmetric:
            return self._apply(cols)
        raise NotImplementedError(f"{type(self).__name__} implements no adjoint product")

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Dimension of the space the operator acts on."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        raise NotImplementedError

    # -- conversions ------------------------------------------------------------------------------
    def _flat_in(self, v: Any, ndim: int | None) -> tuple[torch.Tensor, Any]:
        """``v`` as an (n,) or (n, k) tensor on the operator's dtype/device, and how to return it.

        The second value is None (a torch tensor), a numpy dtype (numpy in, numpy out) or
        ``"list"`` (parameter-shaped tensors in and out).
        """
        if isinstance(v, (list, tuple)):
            return self._from_list(v), "list"
        kind = None
        if isinstance(v, np.ndarray):
            kind = v.dtype
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise UserError(f"cannot multiply the operator with a {type(v).__name__}; "
                            "pass a torch tensor, a numpy array or a list of parameter-shaped tensors")
        if (ndim is not None and v.ndim != ndim) or v.ndim not in (1, 2) or v.shape[0] != self.n:
            want = f"({self.n},)" if ndim == 1 else f"({self.n}, k)" if ndim == 2 else f"({self.n},) or ({self.n}, k)"
            raise UserError(f"vector has shape {tuple(v.shape)}, expected {want}")
        return v.to(device=self.device, dtype=self.dtype), kind

    def _from_list(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat (n,) or (n, k) form of parameter-shaped tensors (a trailing column axis for k)."""
        space = self.space
        if space is None:
            raise UserError(f"{type(self).__name__} takes flat vectors only (it has no parameter layout)")
        if len(tensors) != len(space.params) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise UserError(f"expected a list of {len(space.params)} tensors shaped like the parameters "
                            f"{', '.join(space.names)}; got {len(tensors)} items")
        shapes = [tuple(p.shape) for p in space.params]
        if all(tuple(t.shape) == s for t, s in zip(tensors, shapes, strict=True)):
            return space.from_params([t.to(device=self.device, dtype=self.dtype) for t in tensors])
        k = tensors[0].shape[-1] if tensors[0].ndim else -1
        if not all(tuple(t.shape) == (*s, k) for t, s in zip(tensors, shapes, strict=True)):
            got = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise UserError(f"tensor shapes {got} match neither the parameters {shapes} nor them with one "
                            "trailing column axis")
        cols = [space.from_params([t[..., j].to(device=self.device, dtype=self.dtype) for t in tensors])
                for j in range(k)]
        return torch.stack(cols, dim=1) if cols else torch.zeros(self.n, 0, dtype=self.dtype, device=self.device)

    def _out(self, flat: torch.Tensor, kind: Any) -> Any:
        """Return ``flat`` in the form the input had."""
        if kind is None:
            return flat
        if isinstance(kind, str):
            if flat.ndim == 1:
                return self.space.to_params(flat)
            per_col = [self.space.to_params(c) for c in flat.unbind(1)]
            return [torch.stack([col[i] for col in per_col], dim=-1) for i in range(len(self.space.params))]
        return flat.detach().cpu().numpy().astype(kind, copy=False)

    def _run(self, v: Any, ndim: int | None, adjoint: bool = False) -> Any:
        t, kind = self._flat_in(v, ndim)
        apply = self._apply_adjoint if adjoint else self._apply
        if t.ndim == 1:
            return self._out(apply([t])[0], kind)
        if t.shape[1] == 0:
            return self._out(t.clone(), kind)
        return self._out(torch.stack(apply(list(t.unbind(1))), dim=1), kind)

    # -- products -------------------------------------------------------------------------------
    def matvec(self, v: Any) -> Any:
        """Return ``A v`` for a flat length-n ``v`` (torch or numpy) or parameter-shaped tensors.

        A torch ``v`` gives a tensor of the operator's dtype and device; a numpy ``v`` is
        cast in and gives numpy of its own dtype; a list gives a list.
        """
        return self._run(v, 1 if not isinstance(v, (list, tuple)) else None)

    def matmat(self, V: Any) -> Any:
        """Return ``A V`` for an (n, k) matrix, or parameter-shaped tensors with k trailing
        columns: one pass over the data for all k columns.
        """
        return self._run(V, 2 if not isinstance(V, (list, tuple)) else None)

    def rmatvec(self, v: Any) -> Any:
        """Return ``A^T v`` (flat vectors)."""
        return self._run(v, 1, adjoint=True)

    def __matmul__(self, other: Any) -> Any:
        """``A @ B`` for an operator (composition), else ``A @ v`` / ``A @ V`` (a product)."""
        if isinstance(other, OperatorAlgebra):
            return ProductOperator([self, other])
        if isinstance(other, (list, tuple)):
            return self._run(other, None)
        return self.matmat(other) if getattr(other, "ndim", 1) == 2 else self.matvec(other)

    # -- combinations -----------------------------------------------------------------------------
    def __add__(self, other: Any) -> OperatorAlgebra:
        """``A + B``."""
        return SumOperator([(1.0, self), (1.0, _operand(other))])

    def __sub__(self, other: Any) -> OperatorAlgebra:
        """``A - B``."""
        return SumOperator([(1.0, self), (-1.0, _operand(other))])

    def __mul__(self, scalar: Any) -> OperatorAlgebra:
        """``A * c``."""
        return SumOperator([(_scalar(scalar), self)])

    def __rmul__(self, scalar: Any) -> OperatorAlgebra:
        """``c * A``."""
        return SumOperator([(_scalar(scalar), self)])

    def __neg__(self) -> OperatorAlgebra:
        """``-A``."""
        return SumOperator([(-1.0, self)])

    @property
    def T(self) -> OperatorAlgebra:  # noqa: N802  (the usual name of a transpose)
        """The transpose: the operator itself when symmetric, else its adjoint."""
        return self if self.symmetric else AdjointOperator(self)

    def adjoint(self) -> OperatorAlgebra:
        """The transpose (real operators), as :attr:`T`."""
        return self.T

    def to_scipy(self) -> Any:
        """Return the operator as a ``scipy.sparse.linalg.LinearOperator`` (float64 in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            return self.matvec(np.asarray(v, dtype=np.float64).reshape(-1))

        def mm(V: np.ndarray) -> np.ndarray:
            return self.matmat(np.asarray(V, dtype=np.float64))

        def rmv(v: np.ndarray) -> np.ndarray:
            return self.rmatvec(np.asarray(v, dtype=np.float64).reshape(-1))

        def rmm(V: np.ndarray) -> np.ndarray:
            return self._run(np.asarray(V, dtype=np.float64), 2, adjoint=True)

        return LinearOperator(self.shape, matvec=mv, rmatvec=rmv, matmat=mm, rmatmat=rmm, dtype=np.float64)


def _scalar(c: Any) -> float:
    if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer, np.floating)):
        raise UserError(f"an operator can be scaled by a real number, not a {type(c).__name__}")
    return float(c)


def _operand(other: Any) -> OperatorAlgebra:
    if not isinstance(other, OperatorAlgebra):
        raise UserError(f"cannot combine an operator with a {type(other).__name__}")
    return other


class _Combined(OperatorAlgebra):
    """Common part of combined operators: same size, dtype and device as the first term."""

    def __init__(self, terms: Sequence[OperatorAlgebra]) -> None:
        first = terms[0]
        for t in terms[1:]:
            if t.n != first.n:
                raise UserError(f"cannot combine operators of sizes {first.n} and {t.n}")
        self._first = first
        self.space = first.space

    @property
    def n(self) -> int:
        """Dimension (that of the terms)."""
        return self._first.n

    @property
    def products(self) -> int:
        """Products the underlying operators have applied so far (each column counts once per operator)."""
        return sum(int(getattr(op, "products", 0)) for op in self._operands())

    def _operands(self) -> list[OperatorAlgebra]:
        return [self._first]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first term."""
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        """Device of the first term."""
        return self._first.device


class SumOperator(_Combined):
    """``sum_i c_i A_i``: each term applied to all columns in one call, then combined."""

    terms: list[tuple[float, OperatorAlgebra]]

    def __init__(self, terms: Sequence[tuple[float, OperatorAlgebra]]) -> None:
        flat: list[tuple[float, OperatorAlgebra]] = []
        for c, op in terms:  # (c A) + ... with A itself a sum: one level, so chains stay shallow
            if isinstance(op, SumOperator):
                flat.extend((c * ci, oi) for ci, oi in op.terms)
            else:
                flat.append((c, op))
        super().__init__([op for _, op in flat])
        self.terms = flat
        self.symmetric = all(op.symmetric for _, op in flat)

    def _operands(self) -> list[OperatorAlgebra]:
        return [op for _, op in self.terms]

    def _combine(self, cols: list[torch.Tensor], adjoint: bool) -> list[torch.Tensor]:
        acc: list[torch.Tensor] | None = None
        for c, op in self.terms:
            out = op._apply_adjoint(cols) if adjoint else op._apply(cols)
            out = [o.to(device=self.device, dtype=self.dtype) for o in out]
            acc = [c * o for o in out] if acc is None else [a + c * o for a, o in zip(acc, out, strict=True)]
        assert acc is not None
        return acc

    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._combine(cols, adjoint=False)

    def _apply_adjoint(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._combine(cols, adjoint=True)

    def __repr__(self) -> str:
        """E.g. ``1*HessianLinearOperator - 1*GGNLinearOperator``."""
        return " + ".join(f"{c:g}*{type(op).__name__}" for c, op in self.terms).replace("+ -", "- ")


class ProductOperator(_Combined):
    """``A_1 A_2 ... A_m``: the rightmost factor is applied first."""

    factors: list[OperatorAlgebra]

    def __init__(self, factors: Sequence[OperatorAlgebra]) -> None:
        flat: list[OperatorAlgebra] = []
        for op in factors:
            flat.extend(op.factors if isinstance(op, ProductOperator) else [op])
        super().__init__(flat)
        self.factors = flat
        self.symmetric = len(flat) == 1 and flat[0].symmetric

    def _operands(self) -> list[OperatorAlgebra]:
        return list(self.factors)

    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        for op in reversed(self.factors):
            cols = [c.to(device=op.device, dtype=op.dtype) for c in cols]
            cols = op._apply(cols)
        return cols

    def _apply_adjoint(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        for op in self.factors:  # (A_1 ... A_m)^T = A_m^T ... A_1^T
            cols = [c.to(device=op.device, dtype=op.dtype) for c in cols]
            cols = op._apply_adjoint(cols)
        return cols


class AdjointOperator(_Combined):
    """``A^T`` of a non-symmetric operator: its products are ``A``'s adjoint products."""

    def __init__(self, op: OperatorAlgebra) -> None:
        super().__init__([op])
        self.op = op
        self.symmetric = op.symmetric

    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.op._apply_adjoint(cols)

    def _apply_adjoint(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.op._apply(cols)

    @property
    def T(self) -> OperatorAlgebra:  # noqa: N802
        """``(A^T)^T = A``."""
        return self.op
