"""Memory estimates are compared with the node the run is meant for, not with the machine
``validate`` runs on (a login node on a cluster), and the output says which source it used:
``--memory-per-rank``, the job's allocation (SLURM_MEM_PER_CPU x cpus, SLURM_MEM_PER_NODE,
the PBS script's HPCQML_NODE_MEMORY), ``[run] node_memory_gib``, then this machine.
"""
from __future__ import annotations

import math
import os
import subprocess

import pytest
from conftest import REPO

from hpcqml.config import load_config
from hpcqml.preflight import MEMORY_WARN_FRACTION, machine_memory_bytes, memory_target, parse_size, preflight
from hpcqml.stages import estimates, schemas

SCHEDULER_VARS = ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE",
                  "SLURM_TASKS_PER_NODE", "HPCQML_NODE_MEMORY", "HPCQML_RANKS_PER_NODE")


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    """Tests run outside any job, whatever the machine running them is."""
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)


def _config(extra: str = "", steps: int = 100):
    text = (f'[run]\nstages = ["spectrum"]\n{extra}\n[data]\nsynth_classes = 10\n'
            f'[pretrain]\nmodel = "resnet8-w1"\n[spectrum]\nlanczos_steps = {steps}\n')
    return load_config("m.toml", schemas(), text=text)


@pytest.mark.parametrize(("text", "expected"), [
    ("64G", 64 * 2**30), ("64GB", 64 * 2**30), ("64GiB", 64 * 2**30), ("4000M", 4000 * 2**20),
    ("4000", 4000 * 2**20), ("1T", 2**40), ("512k", 512 * 2**10), ("1.5G", int(1.5 * 2**30)),
    ("", 0), ("lots", 0), ("-4G", 0), ("0", 0)])
def test_scheduler_sizes(text, expected):
    assert parse_size(text) == expected


def test_sources_in_order():
    cfg = _config("node_memory_gib = 64")
    gb = 2**30
    # explicit wins over everything
    t = memory_target(cfg, 4, 3 * gb, {"SLURM_MEM_PER_NODE": "8000"})
    assert t.per_rank == 3 * gb and t.source == "--memory-per-rank"
    # inside a job: the allocation, per CPU x cpus per task, before per node
    t = memory_target(cfg, 4, 0, {"SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_PER_TASK": "4",
                                  "SLURM_MEM_PER_NODE": "8000"})
    assert t.per_rank == 2000 * 2**20 * 4 and "SLURM_MEM_PER_CPU" in t.source and "4 CPU(s)" in t.source
    # per node, shared by the ranks on a node (SLURM_TASKS_PER_NODE "2(x2)": 2 on each of 2 nodes)
    t = memory_target(cfg, 4, 0, {"SLURM_MEM_PER_NODE": "8000", "SLURM_TASKS_PER_NODE": "2(x2)"})
    assert t.per_rank == 8000 * 2**20 / 2 and "SLURM_MEM_PER_NODE" in t.source and "2 rank(s)" in t.source
    t = memory_target(cfg, 4, 0, {"HPCQML_NODE_MEMORY": "32G", "HPCQML_RANKS_PER_NODE": "4"})
    assert t.per_rank == 8 * gb and "HPCQML_NODE_MEMORY" in t.source
    # SLURM's --mem=0 (the whole node) is no number: the config's target node serves
    t = memory_target(cfg, 4, 0, {"SLURM_MEM_PER_NODE": "0"})
    assert t.per_rank == 16 * gb and "[run] node_memory_gib = 64" in t.source and "4 rank(s)" in t.source
    # nothing given: this machine, and the line says it is not the target node
    t = memory_target(_config(), 2, 0, {})
    assert t.per_rank == machine_memory_bytes() / 2 and "this machine" in t.source
    assert "node_memory_gib" in t.source


def test_node_memory_is_checked_and_stays_out_of_the_fingerprint():
    from hpcqml.errors import ConfigError

    with pytest.raises(ConfigError, match="node_memory_gib"):
        _config("node_memory_gib = -1")
    with pytest.raises(ConfigError, match="node_memory_gib"):
        _config("node_memory_gib = nan")
    assert _config("node_memory_gib = 64").sha256() == _config().sha256()
    assert _config("node_memory_gib = 64").stage_fingerprint("spectrum", schemas()) == \
        _config().stage_fingerprint("spectrum", schemas())


def _basis_bytes(steps: int) -> int:
    """The Lanczos basis of resnet8-w1 (10 classes) on one rank, from the built model itself:
    ``steps`` float32 vectors of every parameter."""
    from hpcqml.models import build

    n = sum(p.numel() for p in build("resnet8-w1", num_classes=10).parameters())
    return steps * n * 4


@pytest.mark.parametrize("where", ["config", "slurm"])
def test_the_50_percent_warning_follows_the_target_node(monkeypatch, where):
    """The basis needs B bytes per rank: a target node giving a rank 1.5 B draws the warning
    (B > 50 % of 1.5 B), one giving 2.5 B does not, whatever this machine has."""
    steps = 100
    basis = _basis_bytes(steps)
    for factor, warned in ((1.5, True), (2.5, False)):
        node = factor * basis          # one rank on the node
        if where == "config":
            cfg = _config(f"node_memory_gib = {node / 2**30!r}", steps)
        else:
            cfg = _config("node_memory_gib = 1000", steps)   # the job's allocation wins
            monkeypatch.setenv("SLURM_MEM_PER_NODE", str(math.ceil(node / 2**20)))
        found = preflight(cfg, ranks=1, estimates=estimates())
        source = "[run] node_memory_gib" if where == "config" else "SLURM_MEM_PER_NODE"
        assert found.memory_source.startswith(source), found.memory_source
        assert any(line.startswith("memory per rank: ") and source in line for line in found.estimates)
        spectrum = [w for w in found.warnings if w.startswith("spectrum:")]
        assert bool(spectrum) == warned, (factor, found.warnings)
        assert (basis > MEMORY_WARN_FRACTION * found_per_rank(found)) == warned


def found_per_rank(found) -> float:
    """The bytes per rank the estimates were compared with, read back from the line."""
    line = next(e for e in found.estimates if e.startswith("memory per rank: "))
    return float(line.split()[3]) * 2**30


def test_validate_says_which_source_it_used(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[run]\nstages = ["data"]\nnode_memory_gib = 2\n')
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}
    res = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "hpcqml", "validate", str(cfg), "--ranks", "4"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "# estimate: memory per rank: 0.50 GiB from [run] node_memory_gib = 2 / 4 rank(s) on a node" \
        in res.stdout, res.stdout


def test_the_pbs_script_hands_its_memory_request_to_the_ranks():
    from hpcqml.jobs.render import JobSpec, render

    spec = JobSpec(config="c.toml", scheduler="pbs", nodes=2, ranks_per_node=4, time="01:00:00",
                   output="results/c.h5", name="c", mem="64G")
    text = render(spec)
    line = next(x for x in text.splitlines() if "HPCQML_NODE_MEMORY=" in x)
    out = subprocess.run(["bash", "-c", line + '\necho "$HPCQML_NODE_MEMORY $HPCQML_RANKS_PER_NODE"'],
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, check=True)
    mem, rpn = out.stdout.split()
    t = memory_target(_config(), 8, 0, {"HPCQML_NODE_MEMORY": mem, "HPCQML_RANKS_PER_NODE": rpn})
    assert t.per_rank == 64 * 2**30 / 4
    assert "HPCQML_NODE_MEMORY=" not in render(JobSpec(config="c.toml", scheduler="slurm", nodes=1,
                                                       ranks_per_node=4, time="01:00:00",
                                                       output="results/c.h5", name="c", mem="64G"))
