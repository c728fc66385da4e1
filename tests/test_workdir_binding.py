"""Work directories bound to their run: every artifact the data/pretrain/prune/train stages
write records the fingerprint of the stage inputs and the results file of its run; another
run's artifact is refused with one line naming the file and that run, never resumed or
overwritten.  Also: batch sizes the data cannot fill are refused naming the key and the
data size, and HDF5 datasets of these stages carry units and a description."""
from __future__ import annotations

import h5py
import pytest
import torch

from hpcqml.config import load_config
from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import load_all
from hpcqml.store import read_strings
from hpcqml.training.checkpoint import load_checkpoint, read_origin

torch.set_num_threads(1)


BASE = """
[run]
output = "{out}"
workdir = "{work}"
stages = {stages}
seed = 1
threads = 1
device = "cpu"
[data]
synth_train = {train}
synth_test = 10
synth_classes = 4
[pretrain]
model = "resnet8-w1"
epochs = 1
batch_size = {batch}
lr = {lr}
checkpoint_every = 1
augment = false
[prune]
keep_fraction = 0.3
evaluate = false
[train]
steps = 4
batch_size = 8
download_every = 2
classical_steps = 1
test_interval = 0
snapshot_every = 2
checkpoint_every = 1
"""

ALL = '["data", "pretrain", "prune", "train"]'


def config(tmp_path, name: str, stages: str = ALL, lr: float = 0.1, train: int = 40, batch: int = 10):
    text = BASE.format(out=tmp_path / f"{name}.h5", work=tmp_path / "shared.work", stages=stages,
                       lr=lr, train=train, batch=batch)
    return load_config(f"{name}.toml", {k: s.schema for k, s in load_all().items()}, text=text)


def run(cfg, stages=None):
    return run_pipeline(cfg, world(), stages, quiet=True)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_second_config_in_a_shared_workdir_is_refused_not_resumed(tmp_path):
    """Config b (another pretrain learning rate) meets config a's pretrain_state.pt."""
    a = tmp_path / "a.h5"
    run(config(tmp_path, "a", stages='["data", "pretrain"]'))
    work = tmp_path / "shared.work"
    state_before = (work / "pretrain_state.pt").read_bytes()
    origin = read_origin(work / "pretrain_state.pt")
    assert origin is not None and origin[1] == str(a.resolve()) and len(origin[0]) == 64
    with pytest.raises(UserError) as exc:
        run(config(tmp_path, "b", stages='["data", "pretrain"]', lr=0.05))
    message = one_line(exc)
    # the first artifact b would touch is a's finished pretrained.pt (never overwritten), or its state
    assert str(work) in message and f"the run writing {a.resolve()}" in message, message
    assert (work / "pretrain_state.pt").read_bytes() == state_before
    assert read_origin(work / "pretrained.pt") == origin
    with h5py.File(tmp_path / "b.h5", "r") as fh:
        assert "pretrain" not in fh


def test_interrupted_state_of_another_run_is_refused(tmp_path):
    """Only a's resume state is there (a stopped before pretrained.pt): b refuses to resume it."""
    run(config(tmp_path, "a", stages='["data", "pretrain"]'))
    work = tmp_path / "shared.work"
    (work / "pretrained.pt").unlink()
    with pytest.raises(UserError) as exc:
        run(config(tmp_path, "b", stages='["data", "pretrain"]', lr=0.05))
    message = one_line(exc)
    assert message.startswith(f"{work / 'pretrain_state.pt'}: made by the run writing {tmp_path / 'a.h5'}")
    assert "refusing to resume it" in message


def test_same_results_file_with_changed_settings_starts_over(tmp_path, capsys):
    """The runner recomputes pretrain after a learning-rate change: the old state is not resumed."""
    run(config(tmp_path, "a", stages='["data", "pretrain"]'))
    work = tmp_path / "shared.work"
    (work / "pretrained.pt").unlink()                    # as if the first run had stopped early
    old = read_origin(work / "pretrain_state.pt")
    cfg = config(tmp_path, "a", stages='["data", "pretrain"]', lr=0.05)
    run_pipeline(cfg, world(), quiet=False)
    err = capsys.readouterr().err
    assert "deleted pretrain_state.pt made with the old settings" in err and "resuming" not in err
    new = read_origin(work / "pretrain_state.pt")
    assert new[1] == old[1] and new[0] != old[0]
    assert read_origin(work / "pretrained.pt") == new
    with h5py.File(tmp_path / "a.h5", "r") as fh:
        assert fh["pretrain"].attrs["fingerprint"] == new[0]
        assert fh["pretrain/lr"][0] == pytest.approx(0.05)


def test_prune_refuses_a_pretrained_model_of_another_run(tmp_path):
    run(config(tmp_path, "a", stages='["data", "pretrain"]'))
    with pytest.raises(UserError) as exc:
        run(config(tmp_path, "b", stages='["prune"]'))
    message = one_line(exc)
    assert message.startswith(f"{tmp_path / 'shared.work' / 'pretrained.pt'}: made by the run writing "
                              f"{tmp_path / 'a.h5'}") and "not by this run" in message


def test_synthetic_data_of_another_run_is_refused(tmp_path):
    run(config(tmp_path, "a", stages='["data"]'))
    with pytest.raises(UserError) as exc:
        run(config(tmp_path, "b", stages='["data"]', train=48))
    message = one_line(exc)
    assert "hpcqml-data.json: synthetic data made by the run writing" in message
    assert "synth_train 40 -> 48" in message


def test_full_pipeline_stamps_every_artifact_and_describes_every_dataset(tmp_path):
    path = run(config(tmp_path, "a"))
    work = tmp_path / "shared.work"
    with h5py.File(path, "r") as fh:
        recorded = {s: fh[s].attrs["fingerprint"] for s in ("pretrain", "prune", "train")}
        for stage in ("data", "pretrain", "prune", "train", "train_log"):
            def check(name, obj, stage=stage):
                if isinstance(obj, h5py.Dataset):
                    assert obj.attrs.get("units") and obj.attrs.get("description"), f"{stage}/{name}"
            fh[stage].visititems(check)
    from conftest import undocumented_datasets

    assert undocumented_datasets(path) == []  # every dataset is named in docs/results-schema.md or docs/schema
    with h5py.File(path, "r") as fh:
        names = read_strings(fh["prune/layer_names"])
        assert names[0] == "conv1.weight" and all(isinstance(n, str) for n in names)
        assert sorted(fh["prune/mask"]) == sorted(names)
    for file, stage in (("pretrain_state.pt", "pretrain"), ("pretrained.pt", "pretrain"),
                        ("pruned.pt", "prune"), ("train_state.pt", "train"), ("trained.pt", "train"),
                        ("snapshots/step_000000.pt", "train"), ("snapshots/step_000004.pt", "train")):
        ck = load_checkpoint(work / file)
        assert (ck.fingerprint, ck.results) == (recorded[stage], str(path.resolve())), file


@pytest.mark.parametrize("stage, key, batch, message", [
    ("pretrain", "pretrain", 41, "[pretrain] batch_size = 41 is larger than the data set's 40 training images"),
    ("train", "train", 41, "[train] batch_size = 41 is larger than the data set's 40 training images"),
])
def test_batch_larger_than_the_data_is_refused(tmp_path, stage, key, batch, message):
    cfg = config(tmp_path, "a", stages='["data", "pretrain", "prune", "train"]')
    cfg.sections[key]["batch_size"] = batch
    with pytest.raises(UserError) as exc:
        run(cfg)
    assert message in one_line(exc)
    if stage == "pretrain":
        assert not (tmp_path / "shared.work" / "pretrained.pt").exists()   # no "done: 0 steps"


def test_snapshot_beyond_the_last_step_is_refused(tmp_path):
    cfg = config(tmp_path, "a")
    cfg.sections["train"]["snapshot_steps"] = [3, 9]
    with pytest.raises(UserError, match=r"\[train\] snapshot_steps has step 9, beyond steps = 4"):
        run(cfg)


def test_keep_fraction_that_keeps_nothing_is_refused(tmp_path):
    cfg = config(tmp_path, "a", stages='["data", "pretrain", "prune"]')
    cfg.sections["prune"]["keep_fraction"] = 1e-9
    with pytest.raises(UserError, match=r"\[prune\] keep_fraction = 1e-09 keeps none of the"):
        run(cfg)


def test_more_classes_than_training_images_is_refused(tmp_path):
    cfg = config(tmp_path, "a", stages='["data"]')
    cfg.sections["data"]["synth_classes"] = 50
    with pytest.raises(UserError, match=r"\[data\] synth_classes = 50 is larger than synth_train = 40"):
        run(cfg)


def test_cli_second_config_sharing_the_workdir_exits_2_with_one_line(tmp_path):
    """As a user meets it: 'hpcqml run b.toml' after a.toml in the same work directory."""
    from conftest import run_cli

    for name, lr in (("a", 0.1), ("b", 0.05)):
        (tmp_path / f"{name}.toml").write_text(BASE.format(
            out=tmp_path / f"{name}.h5", work=tmp_path / "shared.work", stages='["data", "pretrain"]',
            lr=lr, train=40, batch=10))
    first = run_cli("run", str(tmp_path / "a.toml"), timeout=240)
    assert first.returncode == 0, first.stderr[-1500:]
    second = run_cli("run", str(tmp_path / "b.toml"), timeout=240)
    assert second.returncode == 2, second.stderr[-1500:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert len(errors) == 1 and f"made by the run writing {tmp_path / 'a.h5'}" in errors[0], second.stderr
    assert "resuming" not in second.stderr


def test_retraining_with_changed_settings_deletes_the_stale_snapshots(tmp_path):
    """Same results file, [train] changed: the runner recomputes train, and no snapshot of
    the old settings is left for the spectrum stage to measure."""
    path = run(config(tmp_path, "a"))
    snaps = tmp_path / "shared.work" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step_000000.pt", "step_000002.pt", "step_000004.pt"]
    cfg = config(tmp_path, "a")
    cfg.sections["train"]["snapshot_every"] = 4
    cfg.sections["train"]["lr"] = 0.02
    run(cfg)
    assert sorted(p.name for p in snaps.iterdir()) == ["step_000000.pt", "step_000004.pt"]
    with h5py.File(path, "r") as fh:
        fingerprint = fh["train"].attrs["fingerprint"]
        assert list(fh["train/snapshot_steps"][()]) == [0, 4]
    assert {read_origin(p)[0] for p in snaps.iterdir()} == {fingerprint}


def test_rerun_with_changed_lr_recomputes_own_artifacts_and_other_results_file_is_refused(tmp_path, capsys):
    """A finished pretrain rerun on the same results file with another learning rate is
    recomputed (its own pretrained.pt and state replaced); a second results file sharing
    the work directory is still refused."""
    path = run(config(tmp_path, "a", stages='["data", "pretrain"]'))
    work = tmp_path / "shared.work"
    old = read_origin(work / "pretrained.pt")
    run_pipeline(config(tmp_path, "a", stages='["data", "pretrain"]', lr=0.05), world(), quiet=False)
    err = capsys.readouterr().err
    assert "recomputing" in err and "refusing" not in err
    assert "deleted pretrained.pt, pretrain_state.pt made with the old settings" in err
    new = read_origin(work / "pretrained.pt")
    assert new[1] == old[1] and new[0] != old[0]
    assert read_origin(work / "pretrain_state.pt") == new
    with h5py.File(path, "r") as fh:
        assert fh["pretrain"].attrs["fingerprint"] == new[0]
        assert fh["pretrain/lr"][0] == pytest.approx(0.05)
    with pytest.raises(UserError) as exc:
        run(config(tmp_path, "b", stages='["data", "pretrain"]', lr=0.02))
    assert f"the run writing {path.resolve()}" in one_line(exc)
    assert read_origin(work / "pretrained.pt") == new
