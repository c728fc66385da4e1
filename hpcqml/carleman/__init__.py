"""Quantum Carleman linearisation of discrete polynomial ODEs (paper Sec. II A-C, III C, V B).

Modules
- ``instance``: the :class:`PolynomialODE` data class (eq. II.1-II.2), validation, dict (de)serialisation.
- ``generators``: the random quadratic family of Sec. III C and reduced instances of a network.
- ``cases``: the one builder of the qcm and hhl stages' instances (random family scaled to a step
  size; network instances of the work directory's pruned checkpoint, checked against this run).
- ``reference``: serial scipy.sparse Carleman matrix (eq. II.3-II.6) and block system (eq. II.78-II.80).
- ``petsc_assembly``: distributed PETSc AIJ assembly of the same matrices.
- ``timestepping``: KSP solve, forward iteration, exact recurrence, errors, bounds (eq. II.57, II.60,
  and a discrete-map bound), late-time error rates (Fig. 4).
- ``spectra``: the one KSP set-up (also used by :mod:`hpcqml.hhl.reference`), SLEPc eigenvalues /
  singular values, the one count of dissipative modes (eq. II.28), kappa bounds (eq. II.81-II.83), :class:`PetscOwner`.
- ``system``: :class:`CarlemanCase`, the owner of every PETSc object of one case.
- ``discrete``: the exact Carleman lift of the discrete map u -> u + F(u) (Kronecker powers of u + F(u),
  truncated at N), assembled per rank like A, with its serial reference and residuals.
- ``mode_link``: dissipative fractions from the Hessian (N = 1) to the sums of eq. II.64 (N >= 2).
"""
