#!/usr/bin/env bash
# Set up hpcqml's environment on Debian 12: the MPI/PETSc/SLEPc/HDF5 stack from Debian,
# a venv that sees it, and the package itself (editable) with PyTorch's CPU build.
# Idempotent: packages already present are not fetched again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HPCQML_VENV:-$here/.venv}"
PETSC_DIR_DEFAULT=/usr/lib/petscdir/petsc3.18/x86_64-linux-gnu-real
SLEPC_DIR_DEFAULT=/usr/lib/slepcdir/slepc3.18/x86_64-linux-gnu-real

apt_pkgs=(python3-venv python3-dev openmpi-bin libopenmpi-dev python3-mpi4py python3-petsc4py
          python3-slepc4py python3-h5py-mpi python3-scipy python3-matplotlib git make)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[install] apt packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# petsc4py/slepc4py from Debian import only when PETSC_DIR/SLEPC_DIR point at the real build.
# This .pth runs before Debian's own (venv site-packages are processed first), so users export nothing.
cat > "$site/00-hpcqml-petsc.pth" <<PTH
import os; os.environ.setdefault('PETSC_DIR', '$PETSC_DIR_DEFAULT'); os.environ.setdefault('SLEPC_DIR', '$SLEPC_DIR_DEFAULT')
PTH

# Keep Debian's numpy 1.x: petsc4py is compiled against it.
numpy_version="$("$venv/bin/python" -c 'import numpy; print(numpy.__version__)')"
echo "numpy==$numpy_version" > "$venv/constraints.txt"
echo "[install] pip install -e .[test,analysis] (torch CPU build, numpy pinned to $numpy_version)"
"$venv/bin/pip" install -q -c "$venv/constraints.txt" "torch==2.13.0" -e "$here[test,analysis]"
# curvlinops-for-pytorch is the reference Hessian operator of the library tests. Its dependency
# backpack declares torchvision, whose only wheel for this torch is a CUDA build that does not load
# beside the CPU torch; neither curvlinops' Hessian nor hpcqml imports it, so install without deps.
echo "[install] curvlinops-for-pytorch (test reference, without torchvision)"
"$venv/bin/pip" install -q --no-deps -c "$venv/constraints.txt" curvlinops-for-pytorch==3.0.1 \
  backpack-for-pytorch==1.7.1 einconv==0.1.0 einops==0.8.2 linear_operator==0.6.1 opt_einsum==3.4.0 \
  unfoldNd==0.2.3 packaging
"$venv/bin/python" - <<'PY'
import numpy, torch, h5py, mpi4py, petsc4py, slepc4py
from petsc4py import PETSc
from slepc4py import SLEPc
print(f"[install] ok: numpy {numpy.__version__}, torch {torch.__version__}, h5py {h5py.__version__}, "
      f"mpi4py {mpi4py.__version__}, petsc4py {petsc4py.__version__}, slepc4py {slepc4py.__version__}")
PY
