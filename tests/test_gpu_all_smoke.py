"""The one-command GPU benchmark runs end to end in its CPU smoke mode and writes its record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]


def test_gpu_all_smoke_writes_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HPCQML_BENCH_FILE": str(tmp_path / "bench.h5"),
           "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "benchmarks/gpu_all.py", "--smoke", "--budget", "3000"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "gpu_all.json").read_text())["rows"]
    names = [r["what"] for r in rows]
    for part in ("gradient", "H.v double-backward", "H.v func", "H.V func vmap", "lockstep", "sequential",
                 "SLQ one probe", "H.v func, mb", "TF32", "strict fp32"):
        assert any(part in name for name in names), (part, names)
    assert all(r["seconds"] > 0 for r in rows)  # every row ran (nothing skipped, nothing out of memory)
    lock = next(r for r in rows if r["what"].endswith("lockstep"))
    assert "max rel. Ritz difference" in lock["note"]
    with h5py.File(tmp_path / "bench.h5", "r") as fh:
        (stamp,) = fh["gpu all"].keys()
        assert len(json.loads(fh["gpu all"][stamp].attrs["rows_json"])) == len(rows)
    assert "| what | seconds |" in run.stdout


def test_gpu_all_refuses_without_a_device_unless_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "HPCQML_BENCH_FILE": str(tmp_path / "bench.h5")}
    run = subprocess.run([sys.executable, "benchmarks/gpu_all.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr
    assert not (tmp_path / "bench.h5").exists()
