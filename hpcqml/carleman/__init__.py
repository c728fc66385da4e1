"""Quantum Carleman linearisation of discrete polynomial ODEs (paper Sec. II A-C, III C, V B).

Modules
- ``instance``: the :class:`PolynomialODE` data class (eq. II.1-II.2), validation, dict (de)serialisation.
- ``generators``: the random quadratic family of Sec. III C, a sparse variant and a logistic map
  (network instances, which need torch, are built in :mod:`hpcqml.stages._network`).
- ``cases``: the one builder of the qcm and hhl stages' random instances (scaled to a step size).
- ``reference``: serial scipy.sparse Carleman matrix (eq. II.3-II.6) and block system (eq. II.78-II.80).
- ``petsc_assembly``: distributed PETSc AIJ assembly of the same matrices.
- ``timestepping``: KSP solve, forward iteration, exact recurrence, errors, bounds (eq. II.57, II.60,
  and a discrete-map bound), late-time error rates (Fig. 4).
- ``spectra``: SLEPc eigenvalues / singular values, the one count of dissipative modes (eq. II.28),
  kappa bounds (eq. II.81-II.83); the owner, KSP set-up and checked solve are :mod:`hpcqml.petsc`.
- ``system``: :class:`CarlemanCase`, the owner of every PETSc object of one case.
- ``discrete``: the exact Carleman lift of the discrete map u -> u + F(u) (Kronecker powers of u + F(u),
  truncated at N), assembled per rank like A, with its serial reference and residuals.
- ``mode_link``: dissipative fractions from the Hessian (N = 1) to the sums of eq. II.64 (N >= 2).
"""
