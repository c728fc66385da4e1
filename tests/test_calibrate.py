"""``hpcqml calibrate`` and the wall-time lines of ``hpcqml validate``.

The prediction is checked against sample counts worked out by hand for the demo config;
the measurement only for being a positive, finite cost of the right kind (no timing value
is asserted: machines differ).
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from conftest import REPO, run_cli
from hpcqml.calibrate import Calibration, load, measure, save, stage_seconds
from hpcqml.config import load_config
from hpcqml.errors import InputFileError
from hpcqml.stages import schemas

DEMO = REPO / "jobs" / "configs" / "demo.toml"


def _cal(**changes) -> Calibration:
    base = Calibration(model="resnet8-w1", classes=10, device="cpu", threads=1, micro_batch=8, route="func",
                       gradient_s_per_sample=1e-3, product_s_per_sample=2e-3, host="h", cpu="test cpu",
                       torch_version="x", measured_at="2026-12-05T00:00:00Z")
    return dataclasses.replace(base, **changes)


def test_measure_gives_positive_costs_per_sample():
    cal = measure("resnet8-w1", 10, micro_batch=8, repeats=1)
    assert cal.model == "resnet8-w1" and cal.classes == 10 and cal.device == "cpu"
    assert math.isfinite(cal.gradient_s_per_sample) and cal.gradient_s_per_sample > 0
    assert math.isfinite(cal.product_s_per_sample) and cal.product_s_per_sample > 0
    assert cal.route in ("double-backward", "func")


def test_demo_prediction_counts_samples():
    cfg = load_config(DEMO, schemas())
    got = stage_seconds(cfg, _cal(), ranks=2)
    # pretrain: 3 epochs x ceil(1000/100) steps x 100 samples; train: 20 steps x 128 samples
    assert got["pretrain"][0] == pytest.approx(3 * 10 * 100 * 1e-3 / 2)
    assert got["train"][0] == pytest.approx(20 * 128 * 1e-3 / 2)
    # spectrum: snapshots 0, 10, 20 and the extra 12 = 4 states; budgets (if any) as the upper end
    sp = cfg.sections["spectrum"]
    probes = max(sp["probes"], sp.get("max_probes", 0) or 0)
    steps = max(sp["lanczos_steps"], sp.get("max_lanczos_steps", 0) or 0)
    assert got["spectrum"][0] == pytest.approx(4 * probes * steps * 128 * 2e-3 / 2)
    assert "4 state(s)" in got["spectrum"][1]


def test_save_load_round_trip_and_bad_file(tmp_path):
    path = save(_cal(), tmp_path / "c.json")
    assert load(path) == _cal()
    (tmp_path / "bad.json").write_text("{\"model\": 1}")
    with pytest.raises(InputFileError, match="not a calibration file"):
        load(tmp_path / "bad.json")


def test_validate_prints_time_from_a_calibration(tmp_path):
    path = save(_cal(), tmp_path / "c.json")
    res = run_cli("validate", str(DEMO), "--calibration", str(path), "--ranks", "2")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("# estimate: time train")]
    assert lines and "about 1 s" in lines[0]  # 20 x 128 x 1 ms / 2 ranks = 1.28 s
    other = save(_cal(model="resnet20-w1"), tmp_path / "other.json")
    res = run_cli("validate", str(DEMO), "--calibration", str(other))
    assert "time: not estimated" in res.stdout and "resnet20-w1" in res.stdout


def test_validate_without_calibration_says_how_to_get_one(tmp_path):
    res = run_cli("validate", str(DEMO), "--set", f'run.output="{tmp_path}/x.h5"')
    assert res.returncode == 0, res.stderr
    assert "time: not estimated" in res.stdout and "hpcqml calibrate" in res.stdout


def test_calibrate_command_writes_the_file(tmp_path):
    out = tmp_path / "cal.json"
    res = run_cli("calibrate", str(DEMO), "--out", str(out), "--repeats", "1", "--micro-batch", "4", timeout=300)
    assert res.returncode == 0, res.stderr
    cal = load(out)
    assert (cal.model, cal.classes, cal.micro_batch) == ("resnet8-w1", 10, 4)
    assert "# estimate (1 rank): time spectrum" in res.stdout
