"""Simulated quantum linear-system solvers and their classical interfaces (paper Sec. II C-D).

Modules
- ``statevector``: state-vector simulation of HHL (quantum phase estimation with a finite
  clock register, eigenvalue-inversion rotation, uncomputation, post-selection) on the
  Hermitian embedding of a block system M x = B (Theorem II.3, eq. II.77, II.84-II.85).
- ``krylov``: the same noise-free circuit (plain and truncated) as Chebyshev matrix functions
  g(H) b of the sparse, distributed PETSc operator, with an a priori error bound; no clock
  register and no eigen-decomposition, so it reaches systems of millions of unknowns.
- ``truncated``: truncated HHL with a well/ill flag qubit (eq. II.86, Theorem II.4), the
  closed-form fidelity eq. II.87, the Haar average eq. II.89-II.92 and its limit eq. II.93.
- ``resources``: qubit counts, sparsity, condition numbers and the gate-complexity
  expressions eq. I.1, I.2, II.77, II.94-II.96, tomography and sparse state preparation.
- ``readout``: sampling read-out of a sparse state and the weighted coupon collector
  expectation eq. II.99.
- ``systems``: linear systems M x = b read from HDF5, PETSc binary and MatrixMarket files,
  with size checks before allocation (untrusted input).
- ``reference``: the PETSc KSP (options prefix ``hhl_``) that gives the reference solution,
  owning and destroying its PETSc objects.
- ``case``: the HDF5 layout of one ``hhl`` case (``HHLCase.to_group``/``from_group``), written by
  the stage and read by the report, and the table of eq. II.92 against eq. II.87.

The state-vector kernels are serial numpy/scipy code on explicit arrays; they know nothing of
configs or MPI (the ``hhl`` stage distributes sweep points over ranks). ``reference`` and
``krylov`` are collective over the communicator they are given.
"""
