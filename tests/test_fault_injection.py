"""Fault injection: a rerun never loses committed results, nothing missing is skipped in
silence, damage is caught, and bad input is refused naming the cause.

Each case injects one fault (a refused or failing rerun, a kill inside a commit, a purged
artifact, damaged bytes, a concurrent writer) into a real run of the runner and the HDF5
store, then asserts that every committed result is still there and that the final
numbers equal those of an uninterrupted run. The test stages below are real stages
(registered, fingerprinted, committed through the store); only their arithmetic is tiny.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import child_env, run_cli
from hpcqml import config as config_module
from hpcqml.config import Field, load_config
from hpcqml.errors import ConfigError, InputFileError, StoppedBySignal, UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import REGISTRY, Stage, StageContext, register, schemas
from hpcqml.store import ResultsStore, write_dataset

CALLS: list[tuple[str, int]] = []
#: stage -> unit before which the stage raises (the fault of a "failed rerun")
FAIL_AT: dict[str, int] = {}


def _unit_stage(ctx: StageContext) -> None:
    """``units`` groups of value ``scale * (unit + 1)``, resuming through completed ones."""
    for unit in range(ctx.cfg["units"]):
        key = f"{ctx.name}/unit_{unit:03d}"
        if ctx.store.is_complete(key):
            continue
        if FAIL_AT.get(ctx.name) == unit:
            raise RuntimeError(f"injected failure of {ctx.name} before unit {unit}")
        CALLS.append((ctx.name, unit))
        value = np.full(3, ctx.cfg["scale"] * (unit + 1), dtype=np.float64)
        ctx.store.commit(key, lambda g, v=value: write_dataset(g, "value", v, "1", "scale times (unit + 1)"))


def _needs_file(ctx: StageContext) -> None:
    """Pre-run check: the input file ``[stage] needs`` names must exist."""
    need = ctx.cfg["needs"]
    if need and not Path(need).is_file():
        raise UserError(f"[{ctx.name}] input {need}: missing")


def _schema() -> dict[str, Field]:
    return {"units": Field(int, 2, min=1, doc="units of work"),
            "scale": Field(float, 1.0, doc="multiplies every value"),
            "needs": Field(str, "", doc="an input file that must exist"),
            "ratio": Field(float, 0.5, min=0.0, max=1.0, doc="a bounded number")}


@pytest.fixture
def two_stages(monkeypatch):
    """Stages ``up`` and ``down``; ``down`` reads ``up``; both declare a pre-run check."""
    for name in ("up", "down"):
        register(Stage(name, _schema(), _unit_stage, doc=f"test stage {name}", checks=(_needs_file,)))
    monkeypatch.setitem(config_module.UPSTREAM, "down", ("up",))
    CALLS.clear()
    FAIL_AT.clear()
    yield
    for name in ("up", "down"):
        REGISTRY.pop(name, None)
    FAIL_AT.clear()


def _cfg(out: Path, run: str = "", **sections: str):
    text = f'[run]\noutput = "{out}"\nstages = ["up", "down"]\n{run}\n'
    for name, body in sections.items():
        text += f"[{name}]\n{body}\n"
    return load_config("t.toml", schemas(), text=text)


def _results(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of the stages' own groups (not bookkeeping), by path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as fh:
        for top in ("up", "down"):
            if top in fh:
                fh[top].visititems(lambda n, o, t=top: out.__setitem__(f"{t}/{n}", o[()])
                                   if isinstance(o, h5py.Dataset) else None)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bit for bit: same arithmetic


def _fingerprint(path: Path, stage: str) -> str:
    with h5py.File(path, "r") as fh:
        return str(fh[f"fingerprints/{stage}"].attrs["sha256"])


def _uninterrupted(tmp_path: Path, **sections: str) -> dict[str, np.ndarray]:
    """The results of one clean run of ``up`` and ``down`` with ``sections``."""
    ref = tmp_path / "reference.h5"
    run_pipeline(_cfg(ref, **sections), world(), quiet=True)
    return _results(ref)


# ---- refused and failed reruns ---------------------------------------------------------------

def test_refused_rerun_keeps_every_committed_result(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    before, sha = _results(out), _fingerprint(out, "up")
    CALLS.clear()
    missing = tmp_path / "absent.dat"
    with pytest.raises(UserError) as info:
        run_pipeline(_cfg(out, up=f'scale = 3.0\nneeds = "{missing}"'), world(), ["up"], quiet=True)
    assert str(info.value) == f"[up] input {missing}: missing"
    assert CALLS == []
    _assert_same(_results(out), before)
    assert _fingerprint(out, "up") == sha
    with h5py.File(out, "r") as fh:
        assert bool(fh["perf/up"].attrs["complete"]) and not bool(fh["fingerprints/down"].attrs["stale"])
        assert "previous" not in fh


def test_refusal_of_a_later_stage_comes_before_an_earlier_stage_is_replaced(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    before = _results(out)
    with pytest.raises(UserError, match="absent"):
        run_pipeline(_cfg(out, up="scale = 2.0", down=f'needs = "{tmp_path / "absent"}"'), world(), quiet=True)
    assert CALLS == [("up", 0), ("up", 1), ("down", 0), ("down", 1)]   # the first run only
    _assert_same(_results(out), before)


def test_failed_rerun_keeps_old_results_until_the_new_ones_complete(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    old = _results(out)
    old_sha = _fingerprint(out, "up")
    # the rerun with other settings fails after one new unit committed
    FAIL_AT["up"] = 1
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(_cfg(out, up="scale = 3.0"), world(), ["up"], quiet=True)
    with h5py.File(out, "r") as fh:
        kept = fh["previous/up/groups/up"]
        np.testing.assert_array_equal(kept["unit_001/value"][()], old["up/unit_001/value"])
        assert str(fh["previous/up/fingerprint"].attrs["sha256"]) == old_sha
        assert bool(fh["fingerprints/down"].attrs["stale"])            # down was computed from the old up
        np.testing.assert_array_equal(fh["up/unit_000/value"][()], [3.0, 3.0, 3.0])
    # back to the old settings: the old results come back, nothing is recomputed
    FAIL_AT.clear()
    CALLS.clear()
    run_pipeline(_cfg(out), world(), ["up"], quiet=True)
    assert CALLS == []
    _assert_same({k: v for k, v in _results(out).items() if k.startswith("up/")},
                 {k: v for k, v in old.items() if k.startswith("up/")})
    # the new settings again: the partial new results come back and only the rest is computed
    run_pipeline(_cfg(out, up="scale = 3.0"), world(), quiet=True)
    assert CALLS == [("up", 1), ("down", 0), ("down", 1)]
    _assert_same(_results(out), _uninterrupted(tmp_path, up="scale = 3.0"))
    with h5py.File(out, "r") as fh:
        assert "up" not in fh.get("previous", {})                  # complete: the replaced results are gone
        assert not bool(fh["fingerprints/down"].attrs["stale"])


def test_failure_before_the_first_new_commit_touches_nothing(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    before = _results(out)
    FAIL_AT["up"] = 0
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(_cfg(out, up="scale = 5.0"), world(), quiet=True)
    _assert_same(_results(out), before)
    with h5py.File(out, "r") as fh:
        assert "previous" not in fh and not bool(fh["fingerprints/down"].attrs["stale"])
        assert str(fh["provenance/run_001"].attrs["status"]) == "failed"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_replaced(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    before = _results(out)
    with pytest.raises(UserError, match="cuda"):
        run_pipeline(_cfg(out, run='device = "cuda"', up="scale = 2.0"), world(), quiet=True)
    assert len(CALLS) == 4
    _assert_same(_results(out), before)


# ---- a kill inside a commit ------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import test_fault_injection as t
    from hpcqml import config as config_module
    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import Stage, register
    from hpcqml.store import ResultsStore

    for name in ("up", "down"):
        register(Stage(name, t._schema(), t._unit_stage, doc=name, checks=(t._needs_file,)))
    config_module.UPSTREAM["down"] = ("up",)
    real = ResultsStore._rewrite
    def dying(self, edit):
        def body(fh):
            edit(fh)
            if "up/unit_001" in fh and fh["up/unit_001/value"][0] == 6.0:  # the second new unit, not renamed yet
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, body)
    ResultsStore._rewrite = dying
    run_pipeline(t._cfg(sys.argv[1], up="scale = 3.0"), world(), quiet=True)
""")


def test_kill_inside_a_commit_loses_nothing_and_the_rerun_matches(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    old = _results(out)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    res = subprocess.run([sys.executable, str(script), str(out), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == -signal.SIGKILL, res.stderr
    with h5py.File(out, "r") as fh:                  # the file the kill left is readable
        np.testing.assert_array_equal(fh["up/unit_000/value"][()], [3.0, 3.0, 3.0])
        assert "unit_001" not in fh["up"]            # the killed commit never happened
        for key, value in old.items():               # every old result is kept
            src = f"previous/up/groups/{key}" if key.startswith("up/") else key
            np.testing.assert_array_equal(fh[src][()], value)
    run_pipeline(_cfg(out, up="scale = 3.0"), world(), quiet=True)
    _assert_same(_results(out), _uninterrupted(tmp_path, up="scale = 3.0"))
    with h5py.File(out, "r") as fh:
        assert [str(fh[f"provenance/{k}"].attrs["status"]) for k in sorted(fh["provenance"])] == \
            ["completed", "killed", "completed"]


# ---- concurrent writers ----------------------------------------------------------------------

def test_a_second_writer_is_refused_and_loses_nothing(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    before = _results(out)
    live = ResultsStore(out, world())
    live.open_run("x = 1", "sha", {"command_line": "the live run"})
    try:
        with pytest.raises(UserError, match="being written by another run"):
            run_pipeline(_cfg(out, up="scale = 4.0"), world(), quiet=True)
    finally:
        live.close_run("completed")
    _assert_same(_results(out), before)


# ---- damaged files ---------------------------------------------------------------------------

def _chunk_offset(path: Path, key: str) -> int:
    with h5py.File(path, "r") as fh:
        return int(fh[key].id.get_chunk_info(0).byte_offset)


def _flip(path: Path, offset: int, count: int, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= int(rng.integers(1, 256))     # never zero: every byte really changes
    path.write_bytes(bytes(data))


def test_four_damaged_bytes_in_a_checksummed_dataset_are_caught(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    _flip(out, _chunk_offset(out, "down/unit_001/value") + 4, 4)
    res = run_cli("verify", str(out))
    assert res.returncode == 2
    assert "dataset /down/unit_001/value: unreadable" in res.stdout
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    # a resume reads what it depends on before skipping it
    CALLS.clear()
    with pytest.raises(InputFileError, match="down/unit_001/value"):
        run_pipeline(_cfg(out), world(), quiet=True)
    assert CALLS == []
    # the report refuses naming the damaged dataset; info shows the tree without failing
    res = run_cli("report", str(out), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2 and "down/unit_001/value" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_scrambled_bytes_give_one_line_never_a_traceback(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    size = out.stat().st_size
    for start in range(0, size, max(size // 4, 1)):
        damaged = tmp_path / f"d{start}.h5"
        damaged.write_bytes(out.read_bytes())
        _flip(damaged, start, 2000, seed=start)
        for args in (("info", str(damaged)), ("verify", str(damaged))):
            res = run_cli(*args)
            assert "Traceback" not in res.stderr, (args, start, res.stderr)
            if res.returncode != 0:
                assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (args, start, res.stderr)
        if "HDF5 library crashed" in res.stderr:
            continue  # libhdf5 itself crashes on this file: only a separate process survives that
        # a resume never says "complete" over damage it depends on: it refuses or runs cleanly
        try:
            run_pipeline(_cfg(damaged), world(), quiet=True)
        except UserError as exc:
            assert "\n" not in str(exc)
        else:
            assert run_cli("verify", str(damaged)).returncode == 0, start


def test_verify_passes_an_intact_file_and_counts_its_datasets(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    res = run_cli("verify", str(out))
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        count = []
        fh.visititems(lambda n, o: count.append(n) if isinstance(o, h5py.Dataset) else None)
    assert res.stdout.startswith(f"{out}: {len(count)} dataset(s) read through their checksums")


# ---- purged artifacts ------------------------------------------------------------------------

# A purged snapshot: the spectrum stage measures the states present, then fails naming the missing
# one (tests/test_engine_stage.py and tests/test_hessian_stage.py, with real snapshots and data).


# ---- symlinked results file ------------------------------------------------------------------

def test_a_symlinked_results_file_stays_a_link(tmp_path, two_stages):
    real = tmp_path / "store" / "r.h5"
    link = tmp_path / "r.h5"
    run_pipeline(_cfg(real), world(), quiet=True)
    link.symlink_to(real)
    run_pipeline(_cfg(link, up="scale = 2.0"), world(), quiet=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    _assert_same(_results(real), _uninterrupted(tmp_path, up="scale = 2.0"))


# ---- errors that name the cause --------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("qcm.eta=nan", "[qcm] eta"), ("hhl.eps=inf", "[hhl] eps"), ("qcm.eps=-inf", "[qcm] eps"),
    ("run.seed=18446744073709551616", "[run] seed"), ("run.seed=9223372036854775808", "[run] seed"),
])
def test_non_finite_numbers_and_huge_integers_are_refused_naming_the_key(override, key):
    section, name = override.split("=")[0].split(".")
    if name not in ({"run": {"seed": 0}} | schemas()).get(section, {}):
        pytest.skip(f"no key {section}.{name} in this version")
    with pytest.raises(ConfigError) as info:
        load_config("c.toml", schemas(), [override], text="[run]\n")
    assert key in str(info.value) and "\n" not in str(info.value)


def test_nan_is_refused_before_a_rerun_replaces_anything(tmp_path, two_stages):
    with pytest.raises(ConfigError, match=r"\[up\] ratio = nan: must be a finite number"):
        _cfg(tmp_path / "r.h5", up="ratio = nan")


def test_a_binary_config_file_is_named(tmp_path):
    cfg = tmp_path / "binary.toml"
    cfg.write_bytes(bytes(range(256)) * 4)
    res = run_cli("validate", str(cfg))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert str(cfg) in line and "not a text file" in line


def test_a_directory_in_place_of_a_cifar_file_is_named(tmp_path):
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.data.synth import write_synthetic

    root = write_synthetic(tmp_path / "data", n_train=20, n_test=10, classes=2, seed=0)
    part = next(Path(root).rglob("train"))
    part.unlink()
    part.mkdir()
    with pytest.raises(InputFileError) as info:
        load_cifar100(root)
    assert str(part) in str(info.value) and "a directory" in str(info.value)


def test_negative_petsc_option_values_are_values():
    from hpcqml.cli import split_petsc_options
    from hpcqml.parallel import petsc_error_message  # noqa: F401 - the pairs it names use the same rule

    ours, petsc = split_petsc_options(["run", "c.toml", "-qcm_ksp_rtol", "-5", "-qcm_eps_target", "-0.5",
                                       "-log_view", "--quiet"])
    assert ours == ["run", "c.toml", "--quiet"]
    assert petsc == ["-qcm_ksp_rtol", "-5", "-qcm_eps_target", "-0.5", "-log_view"]


def test_a_cancel_after_the_warning_is_recorded_as_a_cancel(tmp_path):
    from hpcqml.training.signals import interrupted_error

    note = tmp_path / "note"
    note.write_text("USR1\n")
    env = {"HPCQML_BATCH": "slurm", "HPCQML_STOP_NOTE": str(note)}
    exc = interrupted_error(signal.SIGUSR1, 7, "w/state.pt", total=10, stage="train", env=env)
    assert isinstance(exc, StoppedBySignal) and "requeues" in str(exc)
    note.write_text("TERM\n")                       # scancel after the wall-time warning
    assert "SIGTERM (cancel)" in exc.final() and "no requeue" in exc.final()


def test_info_on_a_file_damaged_in_its_metadata_is_one_line(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(out), world(), quiet=True)
    with h5py.File(out, "r") as fh:
        offset = fh["perf"].id.get_info().addr if hasattr(fh["perf"].id, "get_info") else 0
    _flip(out, max(offset, 512), 2000)
    res = run_cli("info", str(out))
    assert "Traceback" not in res.stderr and "AttributeError" not in res.stderr
    if res.returncode:
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_verify_names_a_file_that_is_not_hdf5(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"\0" * 4096)
    res = run_cli("verify", str(bad))
    assert res.returncode == 2 and str(bad) in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---- same config and machine, same numbers -----------------------------------------------------

#: which route the artificial timing finds faster (the "load" on the machine)
FASTEST = {"route": "pairwise"}


def _summed(route: str, values: np.ndarray) -> float:
    """The same sum by two routes whose roundings differ (like the two product routes)."""
    if route == "pairwise":
        return float(np.sum(values))
    total = np.float64(0.0)
    for v in values:
        total += v
    return float(total)


def _timed_stage(ctx: StageContext) -> None:
    """Decides its route by "timing" once, then sums 10,000 values per unit by that route."""
    choice = ctx.store.decide_once(f"{ctx.name}/decisions", lambda: {"route": FASTEST["route"]})
    for unit in range(ctx.cfg["units"]):
        key = f"{ctx.name}/unit_{unit:03d}"
        if ctx.store.is_complete(key):
            continue
        if FAIL_AT.get(ctx.name) == unit:
            raise RuntimeError("injected failure")
        values = np.random.default_rng(unit).standard_normal(10_000)
        total = _summed(choice["route"], values)
        ctx.store.commit(key, lambda g, t=total: write_dataset(g, "value", np.array([t]), "1", "a sum"))


def test_a_timed_choice_is_made_once_and_a_resume_under_load_gives_the_same_bits(tmp_path, monkeypatch):
    register(Stage("timed", _schema(), _timed_stage, doc="timed"))
    try:
        def cfg(out):
            return load_config("t.toml", schemas(), text=f'[run]\noutput = "{out}"\nstages = ["timed"]\n'
                                                        "[timed]\nunits = 3\n")

        def values(out):
            with h5py.File(out, "r") as fh:
                return [fh[f"timed/unit_{u:03d}/value"][()] for u in range(3)]
        ref = tmp_path / "ref.h5"
        run_pipeline(cfg(ref), world(), quiet=True)
        # interrupted before its first unit, then resumed while the other route looks faster
        out = tmp_path / "r.h5"
        FAIL_AT["timed"] = 0
        with pytest.raises(RuntimeError):
            run_pipeline(cfg(out), world(), quiet=True)
        FAIL_AT.clear()
        monkeypatch.setitem(FASTEST, "route", "sequential")
        run_pipeline(cfg(out), world(), quiet=True)
        for a, b in zip(values(out), values(ref), strict=True):
            np.testing.assert_array_equal(a, b)                  # bit for bit
        with h5py.File(out, "r") as fh:
            assert fh["timed/decisions"].attrs["route"] == "pairwise"
        # the check is sensitive: deciding again would have given other bits
        other = tmp_path / "other.h5"
        run_pipeline(cfg(other), world(), quiet=True)
        assert any(not np.array_equal(a, b) for a, b in zip(values(other), values(ref), strict=True))
    finally:
        REGISTRY.pop("timed", None)
        FAIL_AT.clear()


def test_a_purged_data_set_is_named_before_anything_is_replaced(tmp_path):
    """The spectrum stage's pre-run check: the work directory's data set was purged."""
    out = tmp_path / "p.h5"
    work = tmp_path / "p.work"
    work.mkdir()
    (work / "pruned.pt").write_bytes(b"")       # the model is there, <workdir>/data is not
    cfg = load_config("t.toml", schemas(), text=f'[run]\noutput = "{out}"\nworkdir = "{work}"\n'
                                                'stages = ["spectrum"]\n[data]\nsource = "synthetic"\n'
                                                '[spectrum]\nsource = "pruned"\n')
    with pytest.raises(UserError) as info:
        run_pipeline(cfg, world(), quiet=True)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"[spectrum] data set missing: CIFAR-100 directory {work / 'data'}")
    with h5py.File(out, "r") as fh:
        assert "spectrum" not in fh and "spectrum" not in fh.get("perf", {})
