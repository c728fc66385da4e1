"""Stages declare themselves: reads, pipeline order, performance-only keys, validate checks.

The config, preflight and results modules know no stage by name; these tests check that the
declarations reach them, and that the stage fingerprints are those of the fixed format
(sha256 over canonical JSON of ``{"stage", "inputs"}``), so results files made before keep
resuming.
"""
from __future__ import annotations

import hashlib
import json

import h5py
import pytest

from hpcqml.config import Field, dependency_closure, load_config, upstream
from hpcqml.preflight import preflight
from hpcqml.results import Results
from hpcqml.stages import REGISTRY, Stage, estimates, fixed_reads, pipeline, reads, register, schemas

PAPER_ORDER = ("data", "pretrain", "prune", "train", "spectrum", "qcm", "hhl", "report")


def _cfg(text: str, declared: bool = True):
    return load_config("t.toml", schemas(), text='[run]\noutput = "o.h5"\n' + text,
                       reads=reads() if declared else None)


def _expected_fingerprint(stage: str, inputs: dict) -> str:
    """The fingerprint written out by hand: sha256 of the canonical JSON of stage and inputs."""
    text = json.dumps({"stage": stage, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_pipeline_order_comes_from_the_declared_order():
    assert pipeline() == PAPER_ORDER
    register(Stage("between", {}, lambda ctx: None, order=45))
    try:
        assert pipeline() == (*PAPER_ORDER[:4], "between", *PAPER_ORDER[4:])
    finally:
        REGISTRY.pop("between")


@pytest.mark.parametrize("text, stage, expected", [
    ("", "pretrain", {"data"}),
    ("", "prune", {"pretrain", "data"}),
    ("", "train", {"prune", "data"}),
    ("", "spectrum", {"train", "data"}),
    ('[spectrum]\nsource = "pruned"\n', "spectrum", {"prune", "data", "train"}),   # eta = 0: [train] lr
    ('[spectrum]\nsource = "pruned"\neta = 0.1\n', "spectrum", {"prune", "data"}),
    ('[spectrum]\nsource = "file"\neta = 0.1\n', "spectrum", {"data"}),
    ("", "qcm", set()),
    ('[qcm]\ngenerator = "network"\n', "qcm", {"prune", "data"}),
    ("", "hhl", set()),
    ('[hhl]\ncases = ["random", "network"]\n', "hhl", {"prune", "data"}),
    ("", "report", set(PAPER_ORDER) - {"report"}),
])
def test_each_stage_declares_what_it_reads(text, stage, expected):
    assert set(upstream(stage, _cfg(text))) == expected


def test_without_the_declarations_the_config_knows_no_dependency():
    """config.py holds no stage table: the reads come only from what the caller hands in."""
    cfg = _cfg('[qcm]\ngenerator = "network"\n', declared=False)
    assert all(upstream(name, cfg) == () for name in PAPER_ORDER)
    assert dependency_closure("spectrum", _cfg("")) == {"spectrum", "train", "prune", "pretrain", "data"}


def test_fingerprints_keep_their_format_and_leave_out_flagged_keys():
    """Hand-written inputs: result keys that differ from their defaults, of the stage, the
    stages it reads (by its declaration) and [run]; the fields flagged performance-only
    (micro_batch, groups, route, ref_max_dim, max_dim, [run] device/threads/name) are absent."""
    cfg = _cfg('seed = 3\ndevice = "cpu"\nthreads = 2\nname = "x"\n'
               '[train]\nlr = 0.5\n[spectrum]\nsource = "pruned"\nmicro_batch = 8\ngroups = 2\nroute = "func"\n'
               '[qcm]\ngenerator = "network"\nref_max_dim = 5\n[hhl]\nmax_dim = 64\n'
               '[prune]\nkeep_fraction = 0.3\n')
    sch = schemas()
    run = {"seed": 3}
    assert cfg.stage_fingerprint("spectrum", sch) == _expected_fingerprint("spectrum", {
        "run": run, "spectrum": {"source": "pruned"}, "prune": {"keep_fraction": 0.3}, "data": {},
        "pretrain": {}, "train": {"lr": 0.5}})
    assert cfg.stage_fingerprint("qcm", sch) == _expected_fingerprint("qcm", {
        "run": run, "qcm": {"generator": "network"}, "prune": {"keep_fraction": 0.3}, "data": {},
        "pretrain": {}})
    assert cfg.stage_fingerprint("hhl", sch) == _expected_fingerprint("hhl", {"run": run, "hhl": {}})


def test_a_test_stage_declares_its_reads_and_its_fingerprint_follows():
    schema = {"scale": Field(float, 1.0, doc="scale"), "chunk": Field(int, 1, affects_results=False, doc="perf")}
    register(Stage("up_r", schema, lambda ctx: None, order=2000))
    register(Stage("down_r", schema, lambda ctx: None, order=2001, reads=fixed_reads("up_r")))
    try:
        def fp(text: str) -> str:
            return _cfg(text).stage_fingerprint("down_r", schemas())
        base = fp("")
        assert fp("[up_r]\nscale = 2.0\n") != base
        assert fp("[up_r]\nchunk = 9\n[down_r]\nchunk = 3\n") == base
        assert pipeline()[-2:] == ("up_r", "down_r")
    finally:
        REGISTRY.pop("up_r")
        REGISTRY.pop("down_r")


def test_preflight_runs_only_the_checks_it_is_handed(tmp_path):
    cfg = _cfg('stages = ["data", "pretrain", "train"]\n[pretrain]\nmodel = "no-such-net"\n'
               f'[data]\nsource = "cifar100"\nroot = "{tmp_path / "missing"}"\n')
    assert preflight(cfg, estimates={}).errors == []
    found = preflight(cfg, estimates=estimates())
    assert any(line.startswith("pretrain.model: ") for line in found.errors), found.errors
    root_errors = [line for line in found.errors if line.startswith("data.root")]
    assert len(root_errors) == 1, found.errors   # three stages check the directory; reported once


def _results_file(path, pipeline_attr: list[str] | None) -> None:
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = "1.1"
        if pipeline_attr is not None:
            fh.attrs["pipeline"] = pipeline_attr
        for name in ("zeta", "alpha"):
            fh.create_group(f"perf/{name}").attrs["complete"] = True
            fh.create_group(f"fingerprints/{name}")


def test_results_lists_stages_in_the_recorded_order(tmp_path):
    path = tmp_path / "r.h5"
    _results_file(path, ["zeta", "middle", "alpha"])
    with Results(path) as res:
        assert list(res.stages) == ["zeta", "middle", "alpha"]
        assert [s.state for s in res.stages.values()] == ["complete", "not run", "complete"]
    _results_file(path, None)   # a file written before the order was recorded: the groups found
    with Results(path) as res:
        assert sorted(res.stages) == ["alpha", "zeta"]
        assert all(s.state == "complete" for s in res.stages.values())
