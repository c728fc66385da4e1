"""``hpcqml info``: short by default (what ran and its key results), the whole tree with ``--all``.

The file is the one the real qcm and hhl stages write for a tiny config, with a training log and
three step spectra added by hand as docs/schema/train.md and docs/schema/spectrum.md lay them out
(running training and SLQ here would take minutes): every kind of key result is then present.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_cli, small_qcm_hhl_config
from hpcqml.info import summarize


STATES = ("step_000000", "step_000010", "step_000020")
TEST_ACCURACY = np.array([0.1, np.nan, 0.25, np.nan, 0.3125, np.nan])


def _add_train_and_spectra(fh: h5py.File) -> None:
    t = fh.create_group("train")
    t.attrs.update({"complete": True, "model": "resnet8-w1"})
    t["step"] = np.arange(6)
    t["test_accuracy"] = TEST_ACCURACY
    t["sparsity"] = np.full(6, 0.9)
    for i, label in enumerate(STATES):
        r = fh.create_group(f"spectrum/{label}/result")
        r.attrs.update({"complete": True, "n": 78042, "lambda_max": 40.0 + i})
        trace = r.create_dataset("estimates/trace", data=[10.0 + i, 0.5, 9.0, 12.0])
        trace.attrs["resolved"] = True
        p = r.require_group("proxy")
        p.attrs["primary"] = "eta"
        e = p.create_dataset("eta/estimates/error_proxy_t10", data=[0.75, np.nan, np.nan, np.nan])
        e.attrs["resolved"] = i != 1
        nc = p.create_dataset("eta/estimates/error_proxy_no_cutoff_t10", data=[1.5 + i, 0.01, 1.4, 1.6])
        nc.attrs["resolved"] = True
        neg = r.create_dataset("estimates/negative_mass", data=[0.002 * (i + 1), 0.0005, 0.001, 0.003])
        neg.attrs.update({"resolved": i != 2, "delta": 1.0})


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("info_short")
    cfg = tmp / "small.toml"
    out = tmp / "small.h5"
    cfg.write_text(small_qcm_hhl_config(out))
    res = run_cli("--quiet", "run", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "a") as fh:
        _add_train_and_spectra(fh)
    return out


def test_info_is_short_and_names_the_key_results(results_file):
    text = summarize(str(results_file))
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert "groups:" not in text and "perf/" not in text and "versions:" not in text
    assert "  qcm       complete, " in text and "  spectrum  partial" in text and "  pretrain  not run" in text
    assert "final test accuracy 0.3125" in text                    # the last measured one
    for i, label in enumerate(STATES):
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{label}:")]
        assert f"trace {10.0 + i:.4g} ± 0.5" in line and f"λ_max {40.0 + i:.4g}" in line
        assert ("E(10) 0.75 ± unknown (unresolved)" if i == 1 else "E(10) 0.75 ± unknown") in line
        assert f"E(10) no cutoff {1.5 + i:.4g} ± 0.01" in line and "no cutoff 1.5 ± 0.01 (unresolved)" not in line
        mass = f"mass below -1 {0.002 * (i + 1):.4g} ± 0.0005"
        assert (mass + " (unresolved)" if i == 2 else mass + ",") in line
    with h5py.File(results_file, "r") as fh:
        kappas = [fh[f"qcm/{c}/{k}"].attrs["kappa_M"] for c in fh["qcm"] for k in fh[f"qcm/{c}"]
                  if k.startswith("N_")]
        h = fh["hhl/random/hhl"]
        best = int(np.argmax(h["clock_qubits"][()]))
        fidelity, clocks = float(h["fidelity"][best]), int(h["clock_qubits"][best])
    assert f"κ(M) {min(kappas):.4g}–{max(kappas):.4g}" in text
    assert f"hhl random case: fidelity {fidelity:.6f} at {clocks} clock qubits" in text


def test_info_all_gives_the_whole_tree(results_file):
    short = run_cli("info", str(results_file))
    full = run_cli("info", "--all", str(results_file))
    assert short.returncode == 0 and full.returncode == 0, (short.stderr, full.stderr)
    assert "--all" in short.stdout and "groups:" not in short.stdout
    assert "groups:" in full.stdout and "perf/" in full.stdout and "config sha256" in full.stdout
    assert "final test accuracy 0.3125" in full.stdout
    assert len(full.stdout.splitlines()) > 2 * len(short.stdout.splitlines())
