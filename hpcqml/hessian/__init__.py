"""Hessian spectra of neural networks by distributed stochastic Lanczos quadrature.

Modules
-------
``hvp``      exact Hessian-vector products of the mean cross-entropy over a fixed batch,
             micro-batched, data-sharded over an MPI communicator.
``lanczos``  Lanczos with float64 recurrence coefficients and full reorthogonalisation
             against a Krylov basis sharded by parameter slices across ranks.
``slq``      Rademacher probes, probe groups, Gauss nodes/weights, Hutchinson trace.
``density``  Gaussian-kernel spectral density on a grid (width rule stored).
``proxy``    error proxy of eq. III.10-III.13, dissipative fraction (eq. II.28),
             time limit (eq. II.34) and fidelity estimate (eq. II.92/II.93).

Every kernel takes its MPI communicator as an argument; none reads files or configs.
"""
