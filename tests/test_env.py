"""The set-up files: conda environment, install idempotence, CI entry point."""
import subprocess

import yaml


def test_environment_yml_names_the_stack(repo):
    env = yaml.safe_load((repo / "env/environment.yml").read_text())
    names = {str(d).split("=")[0].split(">")[0].split("<")[0] for d in env["dependencies"] if isinstance(d, str)}
    for pkg in ("python", "numpy", "scipy", "mpi4py", "petsc4py", "slepc4py", "h5py", "pytorch", "matplotlib"):
        assert pkg in names, pkg
    install = (repo / "env/install.sh").read_text()
    for pkg in ("python3-mpi4py", "python3-petsc4py", "python3-slepc4py", "python3-h5py-mpi", "torch==2.13.0"):
        assert pkg in install, pkg


def test_second_make_does_not_reinstall(repo):
    res = subprocess.run(["make", "-n", "install"], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0
    assert "install.sh" not in res.stdout


def test_ci_runs_make_test(repo):
    lines = [line.strip() for line in (repo / ".ci/run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == "make test"


def test_petsc_imports_without_exported_dirs(repo):
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run([str(repo / ".venv/bin/python"), "-c",
                          "from petsc4py import PETSc; from slepc4py import SLEPc; print(PETSc.COMM_WORLD.getSize())"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
