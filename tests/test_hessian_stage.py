"""The ``spectrum`` stage end to end on a tiny ResNet and synthetic data: layout and resume."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpcqml.config import load_config
from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import load_all

torch.set_num_threads(1)


def make_workdir(tmp_path, steps=(0, 10)):
    from hpcqml.data.synth import write_synthetic
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    work = tmp_path / "run.work"
    write_synthetic(work / "data", n_train=120, n_test=10, classes=10, seed=0)
    torch.manual_seed(0)
    model = build("resnet8-w1", 10)
    mask = {k: torch.rand(p.shape) < 0.1 for k, p in model.named_parameters() if p.dim() > 1}
    for s in steps:
        save_checkpoint(work / "snapshots" / f"step_{s:06d}.pt", "resnet8-w1", 10, model, mask=mask, step=s)
    return work


def config(tmp_path, name="run", **over):
    body = {"batch_size": 8, "micro_batch": 5, "lanczos_steps": 4, "probes": 2, "route": "double-backward",
            "t_max": 5, **over}
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, list) else f"{k} = {v}"
                      for k, v in body.items())
    text = f'[run]\noutput = "{tmp_path}/{name}.h5"\nworkdir = "{tmp_path}/run.work"\ndevice = "cpu"\n' \
           f'stages = ["spectrum"]\nseed = 3\nthreads = 1\n[spectrum]\n{lines}\n'
    schemas = {k: s.schema for k, s in load_all().items()}
    return load_config("<test>", schemas, text=text)


def read_result(path, label):
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{label}/result"]
        return {"attrs": dict(g.attrs), "nodes": g["nodes"][()], "weights": g["weights"][()],
                "rho": g["density/rho"][()], "grid": g["density/grid"][()],
                "proxy": g["proxy/nodes"][()], "density_attrs": dict(g["density"].attrs),
                "proxy_attrs": dict(g["proxy"].attrs),
                "probes": sorted(k for k in fh[f"spectrum/{label}"] if k.startswith("probe_"))}


def test_stage_writes_layout(tmp_path):
    make_workdir(tmp_path)
    path = run_pipeline(config(tmp_path), world(), quiet=True)
    r = read_result(path, "step_000010")
    assert r["probes"] == ["probe_000", "probe_001"]
    assert r["nodes"].shape == (2, 4) and np.allclose(np.nansum(r["weights"], axis=1), 1.0)
    assert r["rho"].shape == (256,) and r["density_attrs"]["kernel"] == "gaussian"
    assert "width_factor" in r["density_attrs"]["width_rule"]
    a = r["attrs"]
    assert a["wrt"] == "all" and a["route"] == "double-backward" and a["reorth"] == "full"
    assert a["lambda_min"] <= a["lambda_max"] and np.isfinite(a["trace"])
    assert r["proxy_attrs"]["a_definition"] == "a = -lambda" and r["proxy_attrs"]["cutoff"] == 0.4
    assert r["proxy"].shape == (6,)
    # both snapshots measured; batch is drawn with the step's seed, so the spectra differ
    r0 = read_result(path, "step_000000")
    assert not np.allclose(r0["nodes"], r["nodes"])


def test_stage_resumes_at_next_unfinished_probe(tmp_path, monkeypatch):
    import hpcqml.hessian.slq as slq

    make_workdir(tmp_path, steps=(10,))
    real = slq.lanczos
    started = []

    def failing(*args, **kw):
        started.append(kw["probe"])
        if kw["probe"] == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kw)

    monkeypatch.setattr(slq, "lanczos", failing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(tmp_path, probes=3, wrt="support"), world(), quiet=True)
    assert started == [0, 1]
    started.clear()

    def counting(*args, **kw):
        started.append(kw["probe"])
        return real(*args, **kw)

    monkeypatch.setattr(slq, "lanczos", counting)
    path = run_pipeline(config(tmp_path, probes=3, wrt="support"), world(), quiet=True)
    assert started == [1, 2]  # probe 0 was not recomputed
    resumed = read_result(path, "step_000010")
    fresh = run_pipeline(config(tmp_path, name="fresh", probes=3, wrt="support"), world(), quiet=True)
    ref = read_result(fresh, "step_000010")
    np.testing.assert_allclose(resumed["nodes"], ref["nodes"], rtol=1e-6)
    assert resumed["attrs"]["wrt"] == "support"
    assert resumed["attrs"]["n"] < 0.5 * sum(p.numel() for p in __import__("hpcqml.models", fromlist=["build"]).build("resnet8-w1", 10).parameters())


def test_missing_snapshot_is_user_error(tmp_path):
    make_workdir(tmp_path, steps=(0,))
    with pytest.raises(UserError, match="no snapshot for step 20"):
        run_pipeline(config(tmp_path, steps=[20]), world(), quiet=True)
