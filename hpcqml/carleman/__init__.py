"""Quantum Carleman linearisation of discrete polynomial ODEs (paper Sec. II A-C, III C, V B).

Modules
- ``instance``: the :class:`PolynomialODE` data class (eq. II.1-II.2), validation, dict (de)serialisation.
- ``generators``: the random quadratic family of Sec. III C and reduced instances of a network.
- ``reference``: serial scipy.sparse Carleman matrix (eq. II.3-II.6) and block system (eq. II.78-II.80).
- ``petsc_assembly``: distributed PETSc AIJ assembly of the same matrices.
- ``timestepping``: KSP solve, forward iteration, exact recurrence, errors and bounds (eq. II.57, II.60).
- ``spectra``: SLEPc eigenvalues / singular values, dissipative counts (eq. II.28), kappa bounds (eq. II.83).
"""
