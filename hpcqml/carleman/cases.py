"""The one builder of the qcm and hhl stages' instances: random quadratic family members
(Sec. III C), scaled to a step size, and reduced network instances (eq. II.65) of a
pruned checkpoint in the work directory or a named file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcqml.carleman.instance import PolynomialODE
from hpcqml.errors import UserError


def random_instance(kind: str, n: int, f: float, seed: int, *, eta: float, u_scale: float,
                    div_range: float = 0.01, f2_per_row: int = 4, draws: str = "shared") -> PolynomialODE:
    """A member of the random quadratic family with every F_l scaled by the step size ``eta``.

    Args:
        kind: ``random`` (dense, :func:`~hpcqml.carleman.generators.random_quadratic`) or
            ``sparse`` (:func:`~hpcqml.carleman.generators.sparse_quadratic`).
        n: state dimension.
        f: fraction of dissipative Hessian modes.
        seed: instance seed.
        eta: step size (F_l -> eta F_l).
        u_scale: u_in ~ U(-u_scale, u_scale).
        div_range: divergent Hessian eigenvalues ~ U(-div_range, 0).
        f2_per_row: nonzeros per row of F2 (sparse only).
        draws: ``shared`` (one random stream per seed, common to every f) or ``independent``
            (one stream per (f, seed), :func:`~hpcqml.carleman.generators.fraction_stream`).

    Returns:
        The scaled instance.
    """
    from hpcqml.carleman import generators as gen

    if draws not in ("shared", "independent"):
        raise ValueError(f"random_instance: draws = {draws!r} is not 'shared' or 'independent'")
    stream = gen.fraction_stream(f) if draws == "independent" else None
    if kind == "random":
        ode = gen.random_quadratic(n, f, seed, u_scale=u_scale, div_range=div_range, stream=stream)
    elif kind == "sparse":
        ode = gen.sparse_quadratic(n, f, seed, f2_per_row=f2_per_row, u_scale=u_scale, div_range=div_range,
                                   stream=stream)
    else:
        raise ValueError(f"random_instance: kind = {kind!r} is not 'random' or 'sparse'")
    return gen.scale_step(ode, eta)


def network_checkpoint(ctx: Any, stage: str, required: bool = True) -> tuple[Any, Path] | None:
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
    from hpcqml.training.checkpoint import load_checkpoint
    from hpcqml.training.origin import check_input

    from hpcqml.parallel import decide_on_root

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

    from hpcqml.carleman.generators import network_instance

    model = model.double().eval()
    return network_instance(model, torch.nn.functional.cross_entropy, x.double(), y, k, eta, mask=mask,
                            batchnorm=batchnorm)
