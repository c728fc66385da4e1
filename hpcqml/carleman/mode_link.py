"""From the Hessian's modes (N = 1) to the modes of the full Carleman matrix (N >= 2).

For a reduced network instance (eq. II.65) F_1 = -eta H, so the N = 1 Carleman matrix is F_1 and
its dissipative fraction (|1 + a| < 1, eq. II.28) is the Hessian statement: the fraction of
Hessian eigenvalues lambda with |1 - eta lambda| < 1.  At order N the matrix A has blocks A^j_j with
eigenvalues a_{i_1} + ... + a_{i_j} (eq. II.64), coupled by F_2 above and by F_0 = -eta grad L
below the diagonal.  With F_0 = 0, A is block upper triangular and its spectrum is exactly those
sums (:func:`sum_spectrum_fraction`); with F_0 != 0 it is not, and only the eigenvalues of the
assembled A tell.  These functions give the numbers the ``qcm`` stage stores side by side.
"""
from __future__ import annotations

import numpy as np

from hpcqml.modes import is_dissipative


def hessian_fraction(F1_eigenvalues: np.ndarray) -> float:
    """Dissipative fraction of the N = 1 modes: mean of |1 + a| < 1 over the eigenvalues a of F_1 (eq. II.28)."""
    a = np.asarray(F1_eigenvalues)
    return float(np.mean(is_dissipative(a))) if a.size else float("nan")


def sum_spectrum_fraction(F1_eigenvalues: np.ndarray, N: int) -> float:
    """Dissipative fraction of the order-N Carleman spectrum when F_0 = 0 (eq. II.64).

    Block j contributes the n^j sums a_{i_1} + ... + a_{i_j} over ordered index tuples; the fraction
    is the count of sums with |1 + s| < 1 over Delta = n + ... + n^N.

    Args:
        F1_eigenvalues: the n eigenvalues a of F_1.
        N: Carleman order (n^N sums are formed, so keep n^N moderate).

    Returns:
        The fraction in [0, 1].
    """
    a = np.asarray(F1_eigenvalues, dtype=np.complex128)
    sums = np.zeros(1, dtype=np.complex128)
    dissipative = 0
    total = 0
    for _ in range(N):
        sums = (sums[:, None] + a[None, :]).reshape(-1)
        dissipative += int(np.count_nonzero(is_dissipative(sums)))
        total += sums.size
    return dissipative / total
