"""The one builder of the qcm and hhl stages' random instances: members of the random quadratic
family (Sec. III C), scaled to a step size.  Network instances (eq. II.65) are built in the stage
layer (:mod:`hpcqml.stages._network`).
"""
from __future__ import annotations

from hpcqml.carleman.instance import PolynomialODE


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
