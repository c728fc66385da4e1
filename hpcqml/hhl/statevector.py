"""State-vector simulation of the HHL algorithm (paper Sec. II C, Theorem II.3, eq. II.84-II.86).

Given a real linear system ``M x = B`` the simulation works on a Hermitian matrix ``H`` of
dimension ``D = 2**m``:

* ``H = M`` when ``M`` is symmetric, otherwise the Hermitian dilation

      H = [[0, M], [M^T, 0]],   H [0; x] = [B; 0]   <=>   M x = B,

  whose eigenvalues are ``+-sigma_i`` (the singular values of ``M``);
* padded to the next power of two with a diagonal block equal to ``||H||`` (the padded
  coordinates carry no amplitude of ``|B>`` and never mix with the others);
* rescaled by ``1/||H||_2`` so that its spectrum lies in ``[-1, 1]``, as the paper assumes
  when it writes ``||M|| = 1``.

The circuit that is simulated, with ``c`` clock qubits, ``N_c = 2**c`` and ``|b> = B/||B||``:

1. ``|0>_clock |b>`` ; Hadamards on the clock: ``N_c^{-1/2} sum_k |k> |b>``;
2. controlled ``U^{2^p}`` from clock qubit ``p`` with ``U = exp(i H t0)``, i.e. in total
   ``sum_k |k> U^k |b>``;
3. inverse quantum Fourier transform on the clock. Writing ``|b> = sum_j beta_j |u_j>``
   (eq. II.84) the state is ``sum_j beta_j |u_j> sum_y alpha_{y|j} |y>`` with
   ``alpha_{y|j} = N_c^{-1} sum_k exp(2 pi i k (phi_j - y/N_c))``, ``phi_j = lambda_j t0 / (2 pi)``:
   the finite-clock (phase-estimation) error and leakage are kept exactly;
4. a rotation of an ancilla controlled by the clock value ``y``, which stands for the
   eigenvalue estimate ``lambda~_y = 2 pi y' / (t0 N_c)`` (``y'`` the signed value of ``y``):
   ``|0> -> sqrt(1 - a_y^2) |0> + a_y |1>`` with ``a_y = C / lambda~_y`` (``a_0 = 0``; values
   with ``|C / lambda~_y| > 1``, possible only when ``C`` is chosen above the default, saturate at +-1);
   in the truncated variant (eq. II.86) a flag qubit is set to ``|ill>`` when
   ``|lambda~_y| < 1/kappa_a`` and those branches get ``a_y = C`` (passed uninverted);
5. uncomputation: QFT, controlled ``U^{-2^p}``, Hadamards;
6. post-selection of ancilla ``|1>`` and clock ``|0>``. The output state approximates
   ``|x> ~ sum_j lambda_j^{-1} beta_j |u_j>`` (eq. II.85).

The controlled evolutions are applied exactly (no Trotter error) by representing the
system register in the eigenbasis of ``H`` during the simulation; this is a choice of
basis for the classical simulation, not a shortcut: the amplitudes that reach the output
depend on the eigenvalues only through the clock register, so every finite-``c`` effect
of the circuit is present. The last Hadamard layer is applied implicitly: the clock-0
amplitude after it is ``N_c^{-1/2} sum_k psi_k`` and, the layer being unitary, the norm of
the rest is the clock leakage.

Memory: the clock-system state holds ``2**c * D`` complex128 amplitudes per ancilla/flag
branch that is kept, and the eigen-decomposition two dense ``D x D`` float64 matrices
(see :func:`memory_estimate_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import UserError

#: Relative tolerance under which M is treated as symmetric (no dilation needed).
SYMMETRY_RTOL = 1e-12

#: How eigenvalues are mapped to clock values: the fixed default ``t0`` or an exact mapping.
CLOCK_MAPPINGS = ("default", "exact")


@dataclass
class HermitianSystem:
    """A linear system embedded as a Hermitian, power-of-two, unit-norm problem ``H z = b``.

    Attributes:
    ----------
    H : float64 array ``(D, D)``, symmetric, spectral norm 1, ``D = 2**system_qubits``.
    b : float64 array ``(D,)``, the (unnormalised) embedded right-hand side.
    n : size of the original system ``M`` (``n x n``).
    dilated : whether ``H`` is the dilation ``[[0, M], [M^T, 0]]``.
    scale : ``||H_unscaled||_2`` (the spectral norm of ``M``); ``H = H_unscaled / scale``.
    eigenvalues, eigenvectors : eigen-decomposition of ``H`` (ascending, orthonormal columns).
    spectrum : eigenvalues of the scaled matrix before padding (length ``n`` or ``2n`` if dilated).
    """

    H: np.ndarray
    b: np.ndarray
    n: int
    dilated: bool
    scale: float
    eigenvalues: np.ndarray = field(repr=False)
    eigenvectors: np.ndarray = field(repr=False)
    spectrum: np.ndarray | None = field(repr=False, default=None)

    @property
    def dim(self) -> int:
        """Padded dimension ``D``."""
        return int(self.H.shape[0])

    @property
    def system_qubits(self) -> int:
        """Number of qubits of the system register, ``log2 D``."""
        return int(self.dim).bit_length() - 1

    def embed_solution(self, x: np.ndarray) -> np.ndarray:
        """Place a solution ``x`` of ``M x = B`` where ``H^{-1} b`` carries it (float64, length D)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.n:
            raise UserError(f"solution has length {x.shape[0]}, expected {self.n}")
        z = np.zeros(self.dim, dtype=np.float64)
        off = self.n if self.dilated else 0
        z[off:off + self.n] = x
        return z

    def solution_part(self, z: np.ndarray) -> np.ndarray:
        """The ``x`` block of a vector in the embedded space (length ``n``, same dtype as ``z``)."""
        off = self.n if self.dilated else 0
        return np.asarray(z)[off:off + self.n]

    def exact_state(self) -> np.ndarray:
        """Normalised ``H^{-1} b`` from the eigen-decomposition (eq. II.85), float64, length D."""
        beta = self.eigenvectors.T @ self.b
        z = self.eigenvectors @ (beta / self.eigenvalues)
        return z / np.linalg.norm(z)


def is_symmetric(M: Any) -> bool:
    """Whether ``M`` (dense or scipy.sparse) equals its transpose to ``SYMMETRY_RTOL`` times its largest entry."""
    A = sp.csr_matrix(M, dtype=np.float64)
    biggest = float(abs(A).max()) if A.nnz else 0.0
    diff = A - A.T
    return (float(abs(diff).max()) if diff.nnz else 0.0) <= SYMMETRY_RTOL * max(biggest, 1e-300)


def padded_dim(size: int) -> int:
    """The power of two (at least 2) that holds ``size`` coordinates."""
    return 1 << max(int(np.ceil(np.log2(size))), 1)


def embedded_dim(M: Any) -> int:
    """Dimension ``D`` of the embedding :func:`embed` builds for ``M``, without building it."""
    n = M.shape[0]
    return padded_dim(n if is_symmetric(M) else 2 * n)


def embed(M: Any, B: np.ndarray) -> HermitianSystem:
    """Hermitian, padded, normalised embedding of ``M x = B`` (dense or scipy.sparse ``M``).

    Raises :class:`UserError` for non-square or mismatched shapes, non-finite entries,
    a zero right-hand side or a zero matrix.
    """
    Md = M.toarray() if sp.issparse(M) else np.asarray(M)
    Md = np.asarray(Md, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64).reshape(-1)
    if Md.ndim != 2 or Md.shape[0] != Md.shape[1]:
        raise UserError(f"HHL: M must be square, got shape {Md.shape}")
    n = Md.shape[0]
    if B.shape[0] != n:
        raise UserError(f"HHL: right-hand side has length {B.shape[0]}, M is {n} x {n}")
    if not (np.all(np.isfinite(Md)) and np.all(np.isfinite(B))):
        raise UserError("HHL: M or B contains NaN or Inf")
    if not np.any(B):
        raise UserError("HHL: right-hand side B is zero, |B> is undefined")
    sym = is_symmetric(Md)
    if sym:
        Hu, b = 0.5 * (Md + Md.T), B.copy()
    else:
        Hu = np.zeros((2 * n, 2 * n), dtype=np.float64)
        Hu[:n, n:] = Md
        Hu[n:, :n] = Md.T
        b = np.concatenate([B, np.zeros(n)])
    size = Hu.shape[0]
    w = np.linalg.eigvalsh(Hu)
    scale = float(np.max(np.abs(w)))
    if scale == 0.0:
        raise UserError("HHL: M is the zero matrix")
    D = padded_dim(size)
    H = np.zeros((D, D), dtype=np.float64)
    H[:size, :size] = Hu / scale
    H[np.arange(size, D), np.arange(size, D)] = 1.0  # padding: eigenvalue ||H||, no amplitude there
    bp = np.zeros(D, dtype=np.float64)
    bp[:size] = b
    evals, evecs = np.linalg.eigh(H)
    return HermitianSystem(H=H, b=bp, n=n, dilated=not sym, scale=scale,
                           eigenvalues=evals, eigenvectors=evecs, spectrum=w / scale)


def default_t0(clock_qubits: int) -> float:
    """Evolution time ``t0 = pi (1 - 2/N_c)``: eigenvalues ``+-1`` land on the clock values ``+-(N_c/2 - 1)``.

    With ``||H|| = 1`` every phase ``lambda t0 / (2 pi)`` then lies in ``(-1/2, 1/2)``, so no
    eigenvalue aliases to the opposite sign.
    """
    if clock_qubits < 2:
        raise UserError(f"HHL: need at least 2 clock qubits, got {clock_qubits}")
    return float(np.pi * (1.0 - 2.0 / 2**clock_qubits))


def clock_eigenvalues(clock_qubits: int, t0: float) -> np.ndarray:
    """Eigenvalue estimate ``lambda~_y = 2 pi y' / (t0 N_c)`` for each clock value ``y`` (float64, N_c).

    ``y'`` is ``y`` read as a signed (two's complement) integer: ``y' = y - N_c`` for ``y >= N_c/2``.
    """
    Nc = 2**clock_qubits
    y = np.arange(Nc, dtype=np.float64)
    signed = np.where(y >= Nc // 2, y - Nc, y)
    return 2.0 * np.pi * signed / (t0 * Nc)


def default_C(clock_qubits: int, t0: float, kappa_a: float | None = None) -> float:  # noqa: N802 - the paper's C
    """Largest rotation constant with ``|C / lambda~| <= 1`` on every inverted clock value.

    Plain HHL inverts every non-zero clock value, the smallest being ``2 pi / (t0 N_c)``;
    truncated HHL only inverts ``|lambda~| >= 1/kappa_a`` and passes the rest with amplitude
    ``C`` (which must be ``<= 1``), so there ``C = max(2 pi / (t0 N_c), 1/kappa_a)``, capped at 1.
    """
    cmin = min(2.0 * np.pi / (t0 * 2**clock_qubits), 1.0)
    if kappa_a is None:
        return float(cmin)
    return float(min(max(cmin, 1.0 / kappa_a), 1.0))


def exact_t0(eigenvalues: np.ndarray, clock_qubits: int, tol: float = 1e-9) -> float | None:
    """Evolution time that puts every eigenvalue exactly on a clock value, or ``None``.

    With ``t0 = 2 pi m / N_c`` the clock values are ``lambda~_y = y'/m`` (see
    :func:`clock_eigenvalues`), so an eigenvalue is read without phase-estimation error
    when ``m lambda`` is an integer. This returns ``2 pi m / N_c`` for the smallest
    ``m = 1 .. N_c/2 - 1`` with ``|m lambda_j - round(m lambda_j)| <= tol m`` for every
    ``lambda_j`` (``|lambda_j| <= 1``: the largest, ``m``, stays below the aliasing point
    ``N_c/2``). The smallest ``m`` is chosen because the default rotation constant is
    ``C = 1/m``, so it maximises the success probability. The default mapping
    (:func:`default_t0`) is ``m = N_c/2 - 1``.

    Args:
        eigenvalues: eigenvalues of the scaled Hermitian matrix (``|lambda| <= 1``).
        clock_qubits: ``c``, at least 2.
        tol: tolerance on ``m lambda`` per unit ``m`` (rounding of the eigen-decomposition).

    Returns:
        ``t0`` (float) or ``None`` when no ``m`` up to ``N_c/2 - 1`` works.
    """
    default_t0(clock_qubits)  # validates clock_qubits
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    Nc = 2**clock_qubits
    for m in range(1, Nc // 2):
        scaled = m * lam
        if np.all(np.abs(scaled - np.round(scaled)) <= tol * m):
            return float(2.0 * np.pi * m / Nc)
    return None


def clock_t0(system: HermitianSystem, clock_qubits: int, mapping: str = "default") -> tuple[float, bool]:
    """``t0`` for a clock mapping and whether every eigenvalue of ``H`` sits on a clock value.

    ``mapping = "default"``: :func:`default_t0`; ``"exact"``: :func:`exact_t0` over the
    eigenvalues of ``H`` (padding included), falling back to the default when no exact
    mapping exists for this clock size.

    Returns:
        ``(t0, exact)``; ``exact`` is True when every ``t0 N_c lambda_j / (2 pi)`` is an integer.
    """
    if mapping not in CLOCK_MAPPINGS:
        raise UserError(f"HHL: clock mapping must be one of {', '.join(CLOCK_MAPPINGS)}, got {mapping!r}")
    t_exact = exact_t0(system.eigenvalues, clock_qubits) if mapping == "exact" else None
    if t_exact is not None:
        return t_exact, True
    t0 = default_t0(clock_qubits)
    return t0, on_clock_grid(system.eigenvalues, clock_qubits, t0)


def on_clock_grid(eigenvalues: np.ndarray, clock_qubits: int, t0: float, tol: float = 1e-9) -> bool:
    """Whether every ``phi_j N_c = lambda_j t0 N_c / (2 pi)`` is an integer (within ``tol`` per unit)."""
    y = np.asarray(eigenvalues, dtype=np.float64) * t0 * 2**clock_qubits / (2.0 * np.pi)
    return bool(np.all(np.abs(y - np.round(y)) <= tol * max(1.0, float(np.abs(y).max(initial=0.0)))))


@dataclass
class HHLResult:
    """Outcome of one simulated HHL run.

    ``state`` is the normalised post-selected state (ancilla ``|1>``, clock ``|0>``),
    complex128: the system register (length D) for plain HHL; for truncated HHL the system
    and flag registers (length 2D, flag as the most significant qubit: ``[well; ill]``),
    whose two halves are also given as ``state_well`` and ``state_ill``.
    Probabilities are of the whole run (prepare, QPE, rotate, uncompute, measure):

    * ``p_success``: ancilla ``|1>`` and clock back in ``|0>`` (the post-selection);
    * ``p_ancilla``: ancilla ``|1>`` whatever the clock;
    * ``leakage``: ``1 - p_success / p_ancilla``, the part of the ancilla-``|1>`` branch
      whose clock was not uncomputed to ``|0>`` (a finite-clock effect).

    ``density_fidelity_with(ref)`` uses the state conditioned on ancilla ``|1>`` only (clock
    traced out), kept as the per-branch, per-clock-value blocks ``clock_blocks``
    (shape ``(branches, N_c, D)``, branch 0 = well/plain, 1 = ill) with the system register
    in the eigenbasis ``basis`` of ``H`` (columns).
    """

    state: np.ndarray
    state_well: np.ndarray | None
    state_ill: np.ndarray | None
    p_success: float
    p_ancilla: float
    leakage: float
    clock_qubits: int
    t0: float
    C: float
    kappa_a: float | None
    qubits: dict
    clock_blocks: np.ndarray | None = field(repr=False, default=None)
    basis: np.ndarray | None = field(repr=False, default=None)

    def fidelity_with(self, ref: np.ndarray) -> float:
        """``|<ref|x>|^2`` with both normalised; truncated runs compare ``|ref>|well>`` (eq. II.87 squared)."""
        ref = np.asarray(ref, dtype=np.complex128)
        state = self.state if self.state_well is None else self.state_well
        return float(abs(np.vdot(ref, state)) ** 2 / np.vdot(ref, ref).real)

    def density_fidelity_with(self, ref: np.ndarray) -> float:
        """``<ref| rho |ref>`` for the state conditioned on ancilla ``|1>`` (clock traced out; flag ``|well>``)."""
        if self.basis is None or self.clock_blocks is None:
            raise ValueError("density_fidelity_with: this result keeps no clock_blocks/basis")
        ref = np.asarray(ref, dtype=np.complex128)
        ref = self.basis.T @ (ref / np.linalg.norm(ref))  # into the eigenbasis the blocks use
        blocks = self.clock_blocks
        num = float(np.sum(np.abs(blocks[0] @ ref.conj()) ** 2))
        return num / float(np.sum(np.abs(blocks) ** 2))


def _controlled_phases(psi: np.ndarray, lam: np.ndarray, t0: float, sign: float) -> None:
    """Apply ``sum_k |k><k| (x) U^{sign k}`` bit by bit: clock qubit ``p`` controls ``U^{sign 2^p}``.

    ``psi`` has shape ``(N_c, D)`` with the system in the eigenbasis of ``H`` (``U`` diagonal).
    """
    Nc = psi.shape[0]
    c = Nc.bit_length() - 1
    k = np.arange(Nc)
    for p in range(c):
        rows = (k >> p) & 1 == 1
        psi[rows, :] *= np.exp(1j * sign * (2**p) * t0 * lam)[None, :]


def _circuit_parameters(clock_qubits: int, C: float | None, t0: float | None,
                        kappa_a: float | None) -> tuple[float, float]:
    """Checked ``(t0, C)``, defaults filled in; :class:`UserError` on bad parameters."""
    if not isinstance(clock_qubits, (int, np.integer)) or clock_qubits < 2:
        raise UserError(f"HHL: clock_qubits must be an integer >= 2, got {clock_qubits!r}")
    if kappa_a is not None and not kappa_a > 0:
        raise UserError(f"HHL: kappa_a must be > 0, got {kappa_a!r}")
    t0 = default_t0(clock_qubits) if t0 is None else float(t0)
    if not 0.0 < t0 < np.pi:
        raise UserError(f"HHL: t0 must lie in (0, pi) (eigenvalues +-1 alias beyond), got {t0!r}")
    C = default_C(clock_qubits, t0, kappa_a) if C is None else float(C)
    if not 0.0 < C <= 1.0:
        raise UserError(f"HHL: rotation constant C must lie in (0, 1], got {C!r}")
    return t0, C


def rotation_branches(clock_qubits: int, t0: float, C: float, kappa_a: float | None) -> list[np.ndarray]:
    """Step 4, the ancilla-|1> amplitude per clock value: ``[well]`` (plain HHL) or
    ``[well, ill]`` (truncated: clock values with ``|lambda~| < 1/kappa_a`` flag ill, not inverted).
    """
    lam_est = clock_eigenvalues(clock_qubits, t0)
    with np.errstate(divide="ignore"):
        inv = np.where(lam_est != 0.0, C / lam_est, 0.0)
    inv = np.clip(inv, -1.0, 1.0)  # |C/lambda~| > 1 (only when C exceeds the default) saturates
    if kappa_a is None:
        return [inv]
    ill = np.abs(lam_est) < 1.0 / kappa_a
    return [np.where(ill, 0.0, inv), np.where(ill, C, 0.0)]


def simulate_hhl(system: HermitianSystem, clock_qubits: int, C: float | None = None,
                 t0: float | None = None, kappa_a: float | None = None) -> HHLResult:
    """Run the HHL circuit described in the module docstring on ``system`` and post-select.

    ``kappa_a`` switches on the truncated variant (eq. II.86): clock values with
    ``|lambda~| < 1/kappa_a`` set the flag to ``|ill>`` and are not inverted.
    Raises :class:`UserError` when nothing survives post-selection or on bad parameters.
    """
    t0, C = _circuit_parameters(clock_qubits, C, t0, kappa_a)
    Nc = 2**clock_qubits
    lam, V = system.eigenvalues, system.eigenvectors
    b = system.b / np.linalg.norm(system.b)
    beta = (V.T @ b).astype(np.complex128)

    # 1-2: Hadamards on the clock, controlled powers of U = exp(i H t0).
    psi = np.empty((Nc, system.dim), dtype=np.complex128)
    psi[:] = beta[None, :] / np.sqrt(Nc)
    _controlled_phases(psi, lam, t0, +1.0)
    # 3: inverse QFT  |k> -> N_c^{-1/2} sum_y exp(-2 pi i k y / N_c) |y>.
    psi = np.fft.fft(psi, axis=0) / np.sqrt(Nc)
    outs, blocks = [], []
    for amp in rotation_branches(clock_qubits, t0, C, kappa_a):
        phi = psi * amp[:, None]  # ancilla-|1> branch only: it is all that post-selection keeps
        # 5: uncompute: QFT, controlled U^{-2^p}; the final Hadamards are applied implicitly.
        phi = np.fft.ifft(phi, axis=0) * np.sqrt(Nc)
        _controlled_phases(phi, lam, t0, -1.0)
        blocks.append(phi)
        outs.append(phi.sum(axis=0) / np.sqrt(Nc))  # <0|_clock H^{(x)c}
    p_anc = float(sum(np.sum(np.abs(blk) ** 2) for blk in blocks))
    p_succ = float(sum(np.sum(np.abs(o) ** 2) for o in outs))
    if p_succ <= 1e-300:
        raise UserError("HHL: post-selection probability is zero (no eigenvalue was inverted)")
    norm = np.sqrt(p_succ)
    back = [V @ o / norm for o in outs]  # leave the eigenbasis
    state = back[0] if len(back) == 1 else np.concatenate(back)
    clock_blocks = np.stack(blocks)
    qubits = {"system": system.system_qubits, "clock": int(clock_qubits), "ancilla": 1,
              "flag": 0 if kappa_a is None else 1}
    qubits["total"] = sum(qubits.values())
    return HHLResult(state=state, state_well=back[0] if kappa_a is not None else None,
                     state_ill=back[1] if kappa_a is not None else None,
                     p_success=p_succ, p_ancilla=p_anc, leakage=1.0 - p_succ / p_anc if p_anc > 0 else 0.0,
                     clock_qubits=int(clock_qubits), t0=t0, C=C, kappa_a=kappa_a, qubits=qubits,
                     clock_blocks=clock_blocks, basis=V)


def estimate_solution_norm(system: HermitianSystem, result: HHLResult) -> float:
    """``||x||`` of ``M x = B`` estimated from the success probability of plain HHL.

    Post-selection keeps ``C sum_j beta_j lambda~_j^{-1} |u_j>`` (eq. II.85 with the
    rotation ``a_y = C / lambda~_y``), so with exact eigenvalue estimates
    ``p_success = C^2 ||H^{-1} b||^2 / ||b||^2``. Since ``H = H_unscaled / scale`` and the
    solution block of ``H_unscaled^{-1} b`` is ``x`` (zero elsewhere, also for the dilation),

        ||x|| = sqrt(p_success) ||B|| / (C scale).

    With a finite clock the estimate carries the phase-estimation error (it converges as
    the clock grows, see the tests). It is undefined (``nan``) for truncated runs and when
    the rotation saturates (``C`` above the smallest clock value ``2 pi / (t0 N_c)``).

    Returns:
        The estimate (float, units of ``x``) or ``nan``.
    """
    smallest = 2.0 * np.pi / (result.t0 * 2**result.clock_qubits)
    if result.kappa_a is not None or result.C > smallest * (1.0 + 1e-12):
        return float("nan")
    return float(np.sqrt(result.p_success) * np.linalg.norm(system.b) / (result.C * system.scale))


def memory_estimate_bytes(dim: int, clock_qubits: int, truncated: bool = False) -> int:
    """Peak memory of :func:`embed` + :func:`simulate_hhl` for padded dimension ``dim`` (bytes, model).

    Dense float64 matrices: the unpadded and padded ``H`` and the eigenvectors plus LAPACK
    ``syevd`` workspace (about ``2 D^2`` doubles), i.e. ``5 D^2`` doubles; complex128
    ``2**c x D`` arrays: the QPE state and its FFT, and per kept branch the rotated copy and
    its FFT.
    """
    dense = 8 * dim * dim * 5
    branches = 2 if truncated else 1
    state = 16 * (2**clock_qubits) * dim * (2 + 2 * branches)
    return int(dense + state)
