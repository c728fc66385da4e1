"""Hostile ``[hhl] system_file`` inputs through the runner, not only through the loader.

tests/test_hhl_files.py feeds each hostile system file to ``hpcqml.hhl.systems.load_system``.
Here every one of them is given to ``run_pipeline`` as a rerun of a finished hhl run whose
settings changed (``cases = ["random", "file"]``): the run must be refused with one line
naming the file (a :class:`UserError`, which the CLI maps to exit status 2) before the
rerun replaces anything, so the earlier ``/hhl/random`` stays bit for bit and no shadow
group is left.  One of the cases also goes through ``hpcqml run`` itself, for the exit
status and the single stderr line.  One results file serves every case: a refused rerun
must leave it as it was, which is what each case checks.
"""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
from conftest import run_cli
from test_hhl_files import _system, write_hdf5, write_mtx, write_petsc

from hpcqml.errors import UserError
from hpcqml.hhl.systems import PETSC_MAT_CLASSID, PETSC_VEC_CLASSID

GOOD_HHL = "[hhl]\nclock_qubits = [4]\nreadout_trials = 4\n"


def _hdf5(path, arrays):
    with h5py.File(path, "w") as fh:
        for key, value in arrays.items():
            if key == "huge":
                fh.create_dataset("M", shape=(10**12, 10**12), dtype=np.float64, chunks=(1, 1))
            else:
                fh[key] = value
    return path


def hostile_cases(d) -> dict[str, tuple[str, str]]:
    """name -> (system_file, system_rhs_file): the hostile files of tests/test_hhl_files.py,
    written under ``d``."""
    M, b = _system()
    write_hdf5(d / "dense.h5", M, b)
    write_petsc(d / "sys.petsc", M, b)
    write_mtx(d / "sys.mtx", d / "b.mtx", M, b)
    rhs = str(d / "b.mtx")
    cases: dict[str, tuple[str, str]] = {}
    for ext in (".h5", ".petsc", ".mtx"):
        r = rhs if ext == ".mtx" else ""
        cases[f"missing{ext}"] = (str(d / f"nope{ext}"), r)
        junk = d / f"junk{ext}"
        junk.write_bytes(np.random.default_rng(1).bytes(4096))
        cases[f"random{ext}"] = (str(junk), r)
    (d / "adir.h5").mkdir()
    cases["directory"] = (str(d / "adir.h5"), "")
    cases["mtx without rhs"] = (str(d / "sys.mtx"), "")
    cases["rhs with hdf5"] = (str(d / "dense.h5"), rhs)
    for name in ("dense.h5", "sys.petsc", "sys.mtx"):
        raw = (d / name).read_bytes()
        cut = d / f"cut_{name}"
        cut.write_bytes(raw[: len(raw) * 2 // 3])
        cases[f"truncated {name}"] = (str(cut), rhs if name.endswith(".mtx") else "")
    for name, arrays in {
        "nonsquare": {"M": np.ones((3, 4)), "b": np.ones(3)},
        "short b": {"M": M, "b": b[:-1]},
        "complex": {"M": M.astype(np.complex128), "b": b},
        "strings": {"M": np.array([b"ab", b"cd"]), "b": b},
        "nan": {"M": np.where(np.eye(5) > 0, np.nan, M), "b": b},
        "no b": {"M": M},
        "declared 10^12 rows": {"huge": None, "b": np.ones(1)},
    }.items():
        cases[f"hdf5 {name}"] = (str(_hdf5(d / f"{name.replace(' ', '_')}.h5", arrays)), "")
    with h5py.File(d / "csr.h5", "w") as fh:
        g = fh.create_group("M")
        g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 9]), np.array([0, 1, 2])
        g["shape"] = np.array([2, 2])
        fh["b"] = np.ones(2)
    cases["hdf5 csr column outside"] = (str(d / "csr.h5"), "")
    raw = (d / "sys.petsc").read_bytes()
    ints = np.frombuffer(raw[:16], dtype=">i4").copy()
    for label, (where, value) in {"classid": (0, 42), "nonsquare": (2, 4), "dense": (3, -1),
                                  "nnz": (3, 10**6)}.items():
        bad = ints.copy()
        bad[where] = value
        (d / f"{label}.petsc").write_bytes(bad.tobytes() + raw[16:])
        cases[f"petsc {label}"] = (str(d / f"{label}.petsc"), "")
    (d / "extra.petsc").write_bytes(raw + b"\0" * 8)
    cases["petsc trailing bytes"] = (str(d / "extra.petsc"), "")
    wrong = bytearray(raw)
    off = len(raw) - 8 * 5 - 8
    wrong[off:off + 4] = np.array([PETSC_VEC_CLASSID + 1], dtype=">i4").tobytes()
    (d / "vec.petsc").write_bytes(bytes(wrong))
    cases["petsc wrong vec"] = (str(d / "vec.petsc"), "")
    nan = bytearray(raw)
    nan[-8:] = np.array([np.nan], dtype=">f8").tobytes()
    (d / "nan.petsc").write_bytes(bytes(nan))
    cases["petsc nan"] = (str(d / "nan.petsc"), "")
    (d / "huge.petsc").write_bytes(np.array([PETSC_MAT_CLASSID, 2**31 - 1, 2**31 - 1, 2**31 - 1],
                                            dtype=">i4").tobytes() + b"\0" * 64)
    cases["petsc declared 2^31 rows"] = (str(d / "huge.petsc"), "")
    sio.mmwrite(str(d / "cplx.mtx"), sp.coo_matrix(M.astype(np.complex128)))
    cases["mtx complex"] = (str(d / "cplx.mtx"), rhs)
    sio.mmwrite(str(d / "rect.mtx"), sp.coo_matrix(np.ones((3, 4))))
    cases["mtx nonsquare"] = (str(d / "rect.mtx"), rhs)
    sio.mmwrite(str(d / "short_b.mtx"), b[:-1].reshape(-1, 1))
    cases["mtx short rhs"] = (str(d / "sys.mtx"), str(d / "short_b.mtx"))
    sio.mmwrite(str(d / "two.mtx"), np.ones((2, 1)))
    (d / "nan.mtx").write_text("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 nan\n2 2 1.0\n")
    cases["mtx nan"] = (str(d / "nan.mtx"), str(d / "two.mtx"))
    (d / "lying.mtx").write_text("%%MatrixMarket matrix coordinate real general\n2 2 9\n1 1 1.0\n")
    cases["mtx declares more entries"] = (str(d / "lying.mtx"), str(d / "two.mtx"))
    (d / "huge.mtx").write_text(f"%%MatrixMarket matrix coordinate real general\n{10**12} {10**12} "
                                f"{10**12}\n1 1 1.0\n")
    cases["mtx declared 10^12 rows"] = (str(d / "huge.mtx"), str(d / "huge.mtx"))
    (d / "sys.txt").write_text("1 0\n0 1\n")
    cases["unknown extension"] = (str(d / "sys.txt"), "")
    (d / "empty.h5").write_bytes(b"")
    cases["empty file"] = (str(d / "empty.h5"), "")
    (d / "zero.petsc").symlink_to("/dev/zero")
    cases["link to /dev/zero"] = (str(d / "zero.petsc"), "")
    cases["rhs missing"] = (str(d / "sys.mtx"), str(d / "nope_b.mtx"))
    (d / "empty_b.mtx").write_text("")
    cases["rhs empty"] = (str(d / "sys.mtx"), str(d / "empty_b.mtx"))
    fifo = d / "fifo.h5"
    os.mkfifo(fifo)
    cases["fifo"] = (str(fifo), "")
    return cases


def _config_text(out, system: str = "", rhs: str = "") -> str:
    text = f'[run]\noutput = "{out}"\nstages = ["hhl"]\n' + GOOD_HHL
    if system:
        text += f'cases = ["random", "file"]\nsystem_file = "{system}"\n'
    if rhs:
        text += f'system_rhs_file = "{rhs}"\n'
    return text


def _hhl_datasets(path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as fh:
        fh["hhl"].visititems(lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return found


def _assert_unchanged(out, before: dict[str, np.ndarray], case: str) -> None:
    """/hhl holds the same datasets, bit for bit; no swap is pending under /previous."""
    after = _hhl_datasets(out)
    assert sorted(after) == sorted(before), case
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=f"{case}: {key}")
    with h5py.File(out, "r") as fh:
        assert "previous" not in fh and bool(fh["perf/hhl"].attrs["complete"]), case
        assert "hhl/file" not in fh, case


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished hhl run (the random case) and its /hhl datasets."""
    from hpcqml.config import load_config
    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import schemas

    d = tmp_path_factory.mktemp("hostile")
    out = d / "h.h5"
    run_pipeline(load_config("h.toml", schemas(), text=_config_text(out)), world(), quiet=True)
    return d, out, _hhl_datasets(out)


def test_every_hostile_system_file_is_refused_by_the_runner_keeping_the_previous_result(finished):
    from hpcqml.config import load_config
    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import schemas

    d, out, before = finished
    (d / "files").mkdir()
    cases = hostile_cases(d / "files")
    assert len(cases) >= 40
    escaped = []
    for case, (system, rhs) in sorted(cases.items()):
        try:
            run_pipeline(load_config("h.toml", schemas(), text=_config_text(out, system, rhs)), world(), quiet=True)
        except UserError as exc:        # the CLI prints it as one line and exits with status 2
            message = str(exc)
            assert "\n" not in message and (system in message or (rhs and rhs in message)), (case, message)
        except Exception as exc:  # noqa: BLE001 - collected: every case is reported at once
            escaped.append(f"{case}: {type(exc).__name__}: {exc}")
        else:
            escaped.append(f"{case}: accepted")
        _assert_unchanged(out, before, case)
    assert not escaped, "\n".join(escaped)


@pytest.mark.timeout(120)
def test_hostile_system_files_through_hpcqml_run_exit_2_with_one_line(finished):
    """A truncated HDF5 system file through the command line (the CLI maps every UserError
    alike, so one case stands for the rest)."""
    d, out, before = finished
    files = d / "cli"
    files.mkdir()
    cases = hostile_cases(files)
    for case in ("truncated dense.h5",):
        system, rhs = cases[case]
        cfg = files / "h.toml"
        cfg.write_text(_config_text(out, system, rhs))
        res = run_cli("--quiet", "run", str(cfg), timeout=100)
        assert res.returncode == 2, (case, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hpcqml: error: "), (case, res.stderr)
        assert system in lines[0] or (rhs and rhs in lines[0]), (case, lines[0])
        _assert_unchanged(out, before, case)
    info = run_cli("info", str(out))
    assert info.returncode == 0, info.stderr
