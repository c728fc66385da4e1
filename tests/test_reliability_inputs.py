"""Hostile Carleman instance files (``[qcm] generator = "file"``): every one is refused with
one line naming the file, never a traceback, a hang or a huge allocation; and the hhl
stage's system file is read by its pre-run check, before a rerun replaces anything.
"""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from hpcqml.carleman.instance import load_instance
from hpcqml.errors import InputFileError


def _good(path, **changes):
    """A valid n = 2, q = 2 instance, with ``changes`` (key -> array, or None to delete)."""
    n = 2
    arrays = {"n": np.array(n, dtype=np.int64), "q": np.array(2, dtype=np.int64),
              "u_in": np.array([0.1, -0.2])}
    for ell in range(3):
        cols = n**ell
        arrays[f"F{ell}/indptr"] = np.array([0, 1, 2], dtype=np.int64)
        arrays[f"F{ell}/indices"] = np.array([0, cols - 1], dtype=np.int64)
        arrays[f"F{ell}/data"] = np.array([-0.5, 0.25])
    arrays.update(changes)
    with h5py.File(path, "w") as fh:
        for key, value in arrays.items():
            if value is not None:
                fh.create_dataset(key, data=value)
    return path


def test_the_good_instance_loads(tmp_path):
    ode = load_instance(_good(tmp_path / "i.h5"))
    assert ode.n == 2 and ode.q == 2


HOSTILE = {
    "degree too high": {"q": np.array(99, dtype=np.int64)},
    "degree not an integer": {"q": np.array(1.5)},
    "u_in empty": {"u_in": np.zeros(0)},
    "u_in a matrix": {"u_in": np.zeros((2, 2))},
    "u_in strings": {"u_in": np.array([b"a", b"b"])},
    "indptr too short": {"F1/indptr": np.array([0, 1], dtype=np.int64)},
    "indptr decreasing": {"F1/indptr": np.array([0, 2, 1], dtype=np.int64)},
    "index out of range": {"F1/indices": np.array([0, 7], dtype=np.int64)},
    "negative index": {"F2/indices": np.array([-1, 0], dtype=np.int64)},
    "indices float": {"F1/indices": np.array([0.0, 1.0])},
    "data length lies": {"F1/data": np.array([1.0])},
    "missing F2": {"F2/indptr": None, "F2/indices": None, "F2/data": None},
    "NaN coefficient": {"F1/data": np.array([np.nan, 1.0])},
    "Inf coefficient": {"F0/data": np.array([np.inf, 1.0])},
    "NaN initial state": {"u_in": np.array([np.nan, 0.0])},
    "3-d array": {"F1/data": np.zeros((1, 1, 2))},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_instance_contents_are_one_line_naming_the_file(tmp_path, case):
    path = _good(tmp_path / "i.h5", **HOSTILE[case])
    with pytest.raises(InputFileError) as info:
        load_instance(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message


def test_a_declared_huge_dataset_is_refused_unread(tmp_path):
    path = tmp_path / "huge.h5"
    _good(path)
    with h5py.File(path, "a") as fh:
        del fh["F1/data"]
        fh.create_dataset("F1/data", shape=(10**10,), dtype=np.float64)  # declared, never allocated
    with pytest.raises(InputFileError, match="larger than allowed"):
        load_instance(path)


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "directory", "fifo", "text", "group"])
def test_files_that_are_not_instances(tmp_path, kind):
    path = tmp_path / "i.h5"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        raw = _good(tmp_path / "g.h5").read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "text":
        path.write_text("n = 2\nq = 2\n")
    else:
        _good(path)
    with pytest.raises(InputFileError) as info:
        load_instance(path, group="/nope" if kind == "group" else "/")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_hostile_hhl_system_file_is_refused_before_the_rerun_replaces_anything(tmp_path):
    """The hhl stage's pre-run check reads the system file: the earlier /hhl/random stays."""
    from hpcqml.config import load_config
    from hpcqml.errors import UserError
    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import schemas

    out = tmp_path / "h.h5"
    text = f'[run]\noutput = "{out}"\nstages = ["hhl"]\n[hhl]\nclock_qubits = [4]\nreadout_trials = 4\n'
    run_pipeline(load_config("h.toml", schemas(), text=text), world(), quiet=True)

    def snapshot() -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with h5py.File(out, "r") as fh:
            fh["hhl"].visititems(lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return found
    before = snapshot()
    # the validate estimate's embedded dimension is the one the stage built
    from hpcqml.preflight import preflight
    from hpcqml.stages import estimates

    found = preflight(load_config("h.toml", schemas(), text=text), estimates=estimates())
    with h5py.File(out, "r") as fh:
        inst = fh["hhl/random/instance"].attrs
        line = f"{int(inst['system_size']):,} rows, embedded D = {int(inst['embedded_dim']):,}"
    assert any(line in e for e in found.estimates), (line, found.estimates)
    hostile = tmp_path / "system.mtx"
    hostile.write_text("%%MatrixMarket matrix coordinate real general\n3 3 99999999999\n1 1 nan\n")
    bad = text.replace('[hhl]\n', f'[hhl]\ncases = ["random", "file"]\nsystem_file = "{hostile}"\n')
    with pytest.raises(UserError) as info:
        run_pipeline(load_config("h.toml", schemas(), text=bad), world(), quiet=True)
    assert str(hostile) in str(info.value) and "\n" not in str(info.value)
    after = snapshot()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    with h5py.File(out, "r") as fh:
        assert "previous" not in fh and bool(fh["perf/hhl"].attrs["complete"])


def test_rejected_hhl_option_is_named_and_negative_values_are_values(tmp_path):
    from conftest import run_cli

    cfg = tmp_path / "h.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/h.h5"\nstages = ["hhl"]\n[hhl]\nclock_qubits = [4]\n'
                   "readout_trials = 4\n")
    res = run_cli("--quiet", "run", str(cfg), "-hhl_pc_type", "bogus")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "PETSc rejected an option value" in line and "-hhl_pc_type bogus" in line
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/q.h5"\nstages = ["qcm"]\n[qcm]\nn = 2\nN = [1, 2]\n')
    res = run_cli("--quiet", "run", str(cfg), "-qcm_eps_target", "-0.5", "-qcm_ksp_rtol", "1e-9")
    assert res.returncode == 0, res.stderr
    assert "unrecognized" not in res.stderr and "-0.5" not in res.stderr   # a value, not an argument
