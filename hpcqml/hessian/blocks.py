"""Diagonal blocks of a curvature operator over groups of parameters.

A partition of the coordinate subspace S into parameter groups b = 1..B gives the diagonal
blocks ``C_bb = P_b C P_b^T`` (``P_b`` selects the coordinates of group b).  The spectrum of
each block tells where along the network the curvature behind eq. II.65 lives; the spectrum of
the block-diagonal matrix ``diag(C_11, ..., C_BB)`` is the union of the block spectra.

* :func:`partition` names the groups: ``module`` (one group per module that owns
  parameters: a layer's weight and bias together), ``layer`` (one group per top-level child
  of the model, e.g. ``layer1`` of a ResNet or each entry of a ``Sequential``), or a list of
  name patterns (one group per pattern, :func:`hpcqml.hessian.hvp.matches`).  Pruning masks
  stay applied; a group with no kept coordinate is left out.
* A block operator is the same operator class built on the group's subspace
  (``space.restrict``), so its products differentiate only with respect to the group.
* :class:`BlockDiagonalOperator` applies all blocks in one pass over the data: the vector
  cut into its B block parts becomes B columns of one ``matmat`` of the whole operator, and
  column b's block-b rows are kept.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hpcqml.errors import UserError
from hpcqml.hessian.algebra import OperatorAlgebra
from hpcqml.hessian.hvp import ParamSpace, select_names

BLOCK_RULES = ("layer", "module")


def _group_key(name: str, rule: str) -> str:
    """The group a parameter name belongs to under ``layer`` or ``module``."""
    if rule == "module":
        owner = name.rpartition(".")[0]
        return owner or name
    return name.split(".", 1)[0]


def partition(space: ParamSpace, blocks: str | Sequence[str]) -> dict[str, list[str]]:
    """Group the parameters of ``space`` into named blocks (model order).

    Args:
        space: the coordinate subspace.
        blocks: ``layer``, ``module`` or a list of name patterns (each parameter goes to the
            first pattern that selects it; a pattern that selects nothing is an error).

    Returns:
        ``{block name: parameter names}``; blocks whose coordinates are all pruned are left out.
    """
    sizes = dict(zip(space.names, space.sizes, strict=True))
    groups: dict[str, list[str]] = {}
    if isinstance(blocks, str):
        if blocks not in BLOCK_RULES:
            raise UserError(f"blocks = {blocks!r}: not one of {', '.join(BLOCK_RULES)}, nor a list of name patterns")
        for name in space.names:
            groups.setdefault(_group_key(name, blocks), []).append(name)
    else:
        taken: set[str] = set()
        for pat in blocks:
            chosen = [n for n in select_names(space.names, [pat], "blocks") if n not in taken]
            taken.update(chosen)
            groups[pat] = chosen
    return {k: names for k, names in groups.items() if sum(sizes[n] for n in names) > 0}


class BlockDiagonalOperator(OperatorAlgebra):
    """``diag(C_11, ..., C_BB)`` of an operator: all blocks in one pass over the data.

    Args:
        op: the operator on the whole subspace (a :class:`hpcqml.hessian.hvp.CurvatureOperator`
            or a combination of such operators on one subspace).
        groups: ``{block name: parameter names}`` (:func:`partition`).
    """

    def __init__(self, op: OperatorAlgebra, groups: dict[str, list[str]]) -> None:
        space = op.space
        if space is None:
            raise UserError("a block-diagonal operator needs an operator with a parameter layout")
        self.op = op
        self.space = space
        self.groups = dict(groups)
        self.index = {k: space.index_of(names).to(op.device) for k, names in self.groups.items()}
        covered = torch.cat(list(self.index.values())) if self.index else torch.zeros(0, dtype=torch.int64)
        if covered.numel() != int(torch.unique(covered).numel()):
            raise UserError("blocks overlap: a parameter is in two blocks")
        self.symmetric = op.symmetric

    @property
    def n(self) -> int:
        """Dimension of the whole subspace (coordinates in no block map to zero)."""
        return self.op.n

    @property
    def products(self) -> int:
        """Products the underlying operator has applied (B columns per block-diagonal product)."""
        return int(getattr(self.op, "products", 0))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the operator."""
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        """Device of the operator."""
        return self.op.device

    def _blockwise(self, cols: list[torch.Tensor], adjoint: bool) -> list[torch.Tensor]:
        spread = []
        for c in cols:
            for idx in self.index.values():
                part = torch.zeros_like(c)
                part[idx] = c[idx]
                spread.append(part)
        prods = self.op._apply_adjoint(spread) if adjoint else self.op._apply(spread)
        out, j = [], 0
        for c in cols:
            acc = torch.zeros_like(c)
            for idx in self.index.values():
                acc[idx] = prods[j][idx]
                j += 1
            out.append(acc)
        return out

    def _apply(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._blockwise(cols, adjoint=False)

    def _apply_adjoint(self, cols: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._blockwise(cols, adjoint=True)

    def block_products(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{b: C_bb v_b}`` for block vectors ``v_b`` (length n_b each), in one pass."""
        unknown = sorted(set(parts) - set(self.index))
        if unknown:
            raise UserError(f"no block named {unknown[0]!r}; blocks are {', '.join(self.index)}")
        full = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for k, v in parts.items():
            if v.shape != (self.index[k].numel(),):
                raise UserError(f"block {k!r} vector has shape {tuple(v.shape)}, expected ({self.index[k].numel()},)")
            full[self.index[k]] = v.to(device=self.device, dtype=self.dtype)
        spread = []
        for k in parts:
            part = torch.zeros_like(full)
            part[self.index[k]] = full[self.index[k]]
            spread.append(part)
        prods = self.op._apply(spread)
        return {k: p[self.index[k]] for k, p in zip(parts, prods, strict=True)}
