"""Rendered job scripts place ranks well: one GPU per task under SLURM, cores mapped and bound
for the mpirun fallback, and a PBS resubmission path that survives moving the checkout.

The scripts run in dry-run mode (``HPCQML_DRY_RUN=1``), which prints the launch line instead
of starting ranks; the real Open MPI ``mpirun`` of this machine answers ``--version``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from hpcqml.jobs import add_arguments, cli_main

TINY = """[run]
name = "tiny"
output = "results/tiny.h5"
stages = ["data"]
threads = 1
[data]
synth_train = 64
synth_test = 16
synth_classes = 4
"""


def _render(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hpcqml jobs")
    add_arguments(parser)
    return cli_main(parser.parse_args(list(argv)))


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize(("ranks_per_node", "gpus", "tasks_per_gpu"), [(4, 4, 1), (4, 2, 2), (3, 2, 2)])
def test_slurm_binds_gpus_to_tasks(tmp_path, tiny, ranks_per_node, gpus, tasks_per_gpu):
    out = tmp_path / "job.sbatch"
    assert _render("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node",
                   str(ranks_per_node), "--gpus-per-node", str(gpus), "--time", "00:10:00", "--out", str(out)) == 0
    directives = [line.split(None, 1)[1] for line in out.read_text().splitlines() if line.startswith("#SBATCH")]
    assert f"--gpus-per-node={gpus}" in directives
    assert f"--gpu-bind=single:{tasks_per_gpu}" in directives


def test_cpu_only_slurm_script_asks_for_no_gpu_binding(tmp_path, tiny):
    out = tmp_path / "job.sbatch"
    _render("render", str(tiny), "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", "2",
            "--time", "00:10:00", "--out", str(out))
    assert "gpu" not in "".join(line for line in out.read_text().splitlines() if line.startswith("#SBATCH"))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun on PATH")
def test_mpirun_fallback_maps_and_binds_threads(tmp_path, tiny):
    """PBS always launches through mpirun; with Open MPI the line maps PE cores per rank."""
    out = tmp_path / "job.pbs"
    _render("render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
            "--cpus-per-rank", "1", "--time", "00:10:00", "--out", str(out))
    env = {k: v for k, v in os.environ.items() if k not in ("LAUNCH", "OMP_NUM_THREADS")}
    env.update(HPCQML_DRY_RUN="1", PBS_JOBID="7.server", PBS_O_WORKDIR=str(tmp_path),
               HPCQML_VENV=str(REPO / ".venv"))
    res = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=60).stdout
    if "Open MPI" in version and (os.cpu_count() or 1) >= 2:
        assert re.search(r"mpirun .*--map-by slot:PE=1 --bind-to core -n 2 hpcqml run", line), line
    else:
        assert "--map-by" not in line, line


def test_pbs_resubmits_by_a_path_inside_the_checkout(tmp_path, tiny, monkeypatch):
    """Rendered from the repository root with an absolute --out inside it, the script names
    itself relative to the root, so a copied checkout resubmits its own copy.
    """
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "jobs" / "pbs" / "tiny.pbs"
    out.parent.mkdir(parents=True)
    _render("render", str(tiny), "--scheduler", "pbs", "--nodes", "1", "--ranks-per-node", "2",
            "--time", "00:10:00", "--out", str(out))
    text = out.read_text()
    assert 'HPCQML_JOB_SCRIPT="${HPCQML_JOB_SCRIPT:-jobs/pbs/tiny.pbs}"' in text
    assert str(tmp_path) not in re.findall(r"HPCQML_JOB_SCRIPT=.*", text)[0]
