"""Reduced network instances (eq. II.65) for the qcm and hhl stages.

Everything here needs torch, the training checkpoints and the Hessian operator, which sit above
the Carleman kernels, so it lives in the stage layer; :mod:`hpcqml.carleman` only receives the
finished :class:`~hpcqml.carleman.instance.PolynomialODE`.  The module name starts with an
underscore: it is a helper of two stages, not a stage itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, overload

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman.instance import PolynomialODE
from hpcqml.errors import UserError
from hpcqml.stages import StageContext


@overload
def network_checkpoint(ctx: StageContext, stage: str, required: Literal[True] = ...) -> tuple[Any, Path]: ...


@overload
def network_checkpoint(ctx: StageContext, stage: str, required: bool) -> tuple[Any, Path] | None: ...


def network_checkpoint(ctx: StageContext, stage: str, required: bool = True) -> tuple[Any, Path] | None:
    """The pruned checkpoint a network instance is reduced from: ``[stage] model_file`` or
    ``<workdir>/pruned.pt``.

    The work-directory file must have been made by this run's prune stage
    (:func:`hpcqml.training.origin.check_input`); a file the user names is taken as it is.

    Args:
        ctx: the stage context.
        stage: the stage reading it (for messages).
        required: when False, a missing ``pruned.pt`` returns None instead of failing.

    Returns:
        ``(checkpoint, path)``, or None (see ``required``).

    Raises:
        UserError: the file is missing, unreadable, or made by another run.
    """
    from hpcqml.parallel import decide_on_root
    from hpcqml.training.checkpoint import load_checkpoint
    from hpcqml.training.origin import check_input

    named = bool(ctx.cfg["model_file"])
    path = Path(ctx.cfg["model_file"]) if named else ctx.workdir / "pruned.pt"
    # decided on rank 0: a rank whose node sees a stale directory must not skip the
    # collective origin check below while the others enter it
    if not decide_on_root(ctx.comm, path.is_file):
        if named or required:
            raise UserError(f"[{stage}] network instance: checkpoint {path} not found "
                            f"(run the prune stage or set [{stage}] model_file)")
        return None
    ck = load_checkpoint(path)
    if not named:
        check_input(ctx, path, "prune", ck.fingerprint, ck.results)
    return ck, path


def network_case(model: Any, mask: dict | None, x: Any, y: Any, k: int, eta: float,
                 batchnorm: str = "eval") -> PolynomialODE:
    """Reduced instance (eq. II.65) of ``model`` in float64 and eval mode on the batch ``(x, y)``
    with the mean cross-entropy: the k largest surviving weights, learning rate ``eta``, BatchNorm
    layers in ``batchnorm`` mode (``eval`` running statistics, ``train`` the batch's own).
    """
    import torch

    model = model.double().eval()
    return network_instance(model, torch.nn.functional.cross_entropy, x.double(), y, k, eta, mask=mask,
                            batchnorm=batchnorm)


def _top_k(model: Any, k: int, mask: dict | None, names: list[str] | None) -> list[tuple[str, int]]:
    """(parameter name, flat index) of the k largest-magnitude surviving trainable weights
    (of the parameters ``names``, all if None), largest first.
    """
    import torch

    flat, owners = [], []
    for nm, p in model.named_parameters():
        if not p.requires_grad or (names is not None and nm not in names):
            continue
        w = p.detach().abs().reshape(-1).clone()
        if mask is not None and nm in mask:
            w[~mask[nm].reshape(-1).bool()] = -1.0
        flat.append(w)
        owners += [(nm, i) for i in range(w.numel())]
    allw = torch.cat(flat)
    if k < 1 or k > int((allw >= 0).sum()):
        raise UserError(f"network_instance: k={k} must be between 1 and the number of surviving weights")
    return [owners[i] for i in torch.topk(allw, k).indices.tolist()]


def _gradient_and_hessian(model: Any, loss_fn: Callable, inputs: Any, targets: Any,
                          picks: list[tuple[str, int]], batchnorm: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """``(g, H)`` of the loss in the coordinates ``picks`` (that order), float64 numpy, from the
    Hessian operator restricted to them (:class:`hpcqml.hessian.hvp.HessianLinearOperator`, the whole
    batch as one chunk, BatchNorm in ``batchnorm`` mode).
    """
    import torch

    from hpcqml.hessian.hvp import HessianLinearOperator

    keep = {nm: torch.zeros_like(p, dtype=torch.bool) for nm, p in model.named_parameters() if p.requires_grad}
    for nm, i in picks:
        keep[nm].view(-1)[i] = True
    op = HessianLinearOperator(model, (inputs, targets), loss_fn, wrt="support", mask=keep, route="double-backward",
                               batchnorm=batchnorm)
    model_order = [(nm, i) for nm in op.space.names for i in torch.nonzero(keep[nm].view(-1)).view(-1).tolist()]
    order = [model_order.index(pick) for pick in picks]     # model order -> top-k order
    k = len(picks)
    H = op.matmat(torch.eye(k, dtype=op.dtype, device=op.device))
    g = op.gradient()
    return g[order].detach().double().cpu().numpy(), H[order][:, order].detach().double().cpu().numpy()


def network_instance(model: Any, loss_fn: Callable, inputs: Any, targets: Any, k: int, eta: float,
                     mask: dict | None = None, names: list[str] | None = None,
                     batchnorm: str = "eval") -> PolynomialODE:
    """Reduced instance of gradient descent theta <- theta - eta grad L(theta) in a k-parameter subspace.

    The k coordinates are the k largest-magnitude surviving (``mask``) weights.  With theta* the
    current weights and u = theta - theta* restricted to them, the Taylor expansion of the update is
    F0 = -eta grad L, F1 = -eta grad^2 L, F2 = -(eta/2) grad^3 L flattened to k x k^2 (eq. II.65,
    V.6) on the fixed batch: F0 and F1 from the Hessian operator of :mod:`hpcqml.hessian.hvp`,
    the third derivative exactly by torch.func (forward over forward over reverse).  All three are
    taken in one mode (:func:`hpcqml.hessian.hvp.product_mode`): the model in eval mode with its
    BatchNorm layers in ``batchnorm`` mode (``eval``: running statistics; ``train``: the statistics of
    the batch itself, running statistics neither read nor updated).  ``u_in`` = 0 (the expansion point).
    """
    import torch
    from torch.func import functional_call, grad, jacfwd

    from hpcqml.hessian.hvp import product_mode

    picks = _top_k(model, k, mask, names)
    g, H = _gradient_and_hessian(model, loss_fn, inputs, targets, picks, batchnorm)
    base = {nm: p.detach().clone() for nm, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of(z: Any) -> Any:
        ps = dict(base)
        for idx, (nm, i) in enumerate(picks):
            flatp = ps[nm].reshape(-1)
            flatp = flatp.index_put((torch.tensor([i]),), flatp[i] + z[idx])
            ps[nm] = flatp.reshape(base[nm].shape)
        return loss_fn(functional_call(model, (ps, buffers), (inputs,)), targets)

    z0 = torch.zeros(k, dtype=torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32)
    with product_mode(model, batchnorm):
        D3 = jacfwd(jacfwd(grad(loss_of)))(z0).detach().double().numpy().reshape(k, k * k)
    F = [sp.csr_matrix(-eta * g.reshape(k, 1)), sp.csr_matrix(-eta * H), sp.csr_matrix(-0.5 * eta * D3)]
    return PolynomialODE(F=F, u_in=np.zeros(k), meta={"generator": "network", "k": k, "eta": eta,
                                                      "batchnorm": batchnorm,
                                                      "params": [f"{nm}[{i}]" for nm, i in picks]})
