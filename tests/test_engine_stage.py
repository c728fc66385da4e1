"""The spectrum stage with probes in lockstep gives the numbers of probes one at a time.

Tiny ResNet and synthetic data (float32 products): the block product sums in another order
than the single product, so Ritz values agree to the float32 rounding carried through a few
Lanczos steps (1e-4 of max |theta| here, the tolerance of the serial-vs-sharded stage test);
the float64 equality to 1e-9 is tested on exact operators in tests/test_engine_continuation.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcqml.parallel import world
from hpcqml.runner import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hessian_stage import config, make_workdir

torch.set_num_threads(1)


def test_lockstep_stage_equals_sequential_stage(tmp_path):
    """One probe at a time (lockstep = 1), all 3 together (lockstep = 3) and the width chosen
    from memory (lockstep = 0) give the same numbers; the chosen width is recorded once in
    spectrum/decisions, and the negative mass names its delta."""
    out = {}
    for k in (1, 3, 0):
        make_workdir(tmp_path, steps=(0,), name=f"k{k}")
        path = run_pipeline(config(tmp_path, name=f"k{k}", probes=3, lockstep=k, negative_delta=0.5), world(),
                            quiet=True)
        with h5py.File(path, "r") as fh:
            g = fh["spectrum/step_000000"]
            out[k] = (g["result/nodes"][()], g["result/estimates/trace"][0],
                      fh["perf/spectrum/counters/hvp_products"][()].tolist(),
                      [g[f"probe_00{p}"].attrs["steps"] for p in range(3)])
            neg = g["result/estimates/negative_mass"]
            assert neg.attrs["delta"] == 0.5 and "below -delta (delta = 0.5)" in neg.attrs["description"]
            decided = fh["spectrum/decisions"].get("lockstep/step_000000")
            # the memory's width before the cap at a group's probes: a few KiB per basis fit 8
            assert (decided is None) if k else (decided.attrs["lockstep"] == 8)
    n1, t1, p1, s1 = out[1]
    assert p1 == [12.0] and s1 == [4, 4, 4]
    scale = float(np.max(np.abs(n1)))
    for k in (3, 0):
        nk, tk, pk, sk = out[k]
        assert pk == p1 and sk == s1
        np.testing.assert_allclose(nk, n1, rtol=0, atol=1e-4 * scale)
        assert abs(tk - t1) <= 1e-4 * abs(t1)


def test_snapshot_listed_by_train_but_purged_is_named_after_the_rest(tmp_path):
    """``/train/snapshot_steps`` lists 0, 10 and 20; the scratch cleaner removed step 20's file.
    The stage measures 0 and 10, then fails with one line naming step_000020.pt, and the stage
    is not complete (no hole reported as complete)."""
    import pytest

    from hpcqml.errors import UserError
    from hpcqml.store import ResultsStore, write_dataset

    out = tmp_path / "run.h5"
    work = make_workdir(tmp_path, steps=(0, 10))
    store = ResultsStore(out, world())
    store.open_run("x = 1", "sha", {"command_line": "train"})
    store.commit("train", lambda g: write_dataset(g, "snapshot_steps", np.array([0, 10, 20], dtype=np.int64),
                                                  "count", "snapshot steps"))
    store.close_run("completed")
    with pytest.raises(UserError) as info:
        run_pipeline(config(tmp_path), world(), quiet=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"[spectrum] snapshot {work / 'snapshots' / 'step_000020.pt'} is missing")
    with h5py.File(out, "r") as fh:
        assert fh["spectrum/step_000000/result"].attrs["complete"]
        assert fh["spectrum/step_000010/result"].attrs["complete"]
        assert "step_000020" not in fh["spectrum"]
        assert not ("perf/spectrum" in fh and fh["perf/spectrum"].attrs.get("complete", False))


def test_route_decision_is_told_the_expected_products(tmp_path, monkeypatch):
    """``auto`` is decided knowing how many products the run takes at least (states x
    curvatures x probes x steps = 2 x 1 x 2 x 4), so a compiled route is timed only when
    its compile time pays back."""
    import hpcqml.stages.spectrum as stage

    seen = []
    real = stage.decide_route

    def spy(ctx, st):
        seen.append(st.hessian.expected_products)
        return real(ctx, st)

    monkeypatch.setattr(stage, "decide_route", spy)
    make_workdir(tmp_path, steps=(0, 10))
    run_pipeline(config(tmp_path, route="auto", probes=2), world(), quiet=True)
    assert seen == [16]
