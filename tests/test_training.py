"""Training kernels on one process: global BatchNorm, the data-parallel step against a
plain full-batch SGD step, the sparse-training schedule, learning on synthetic data,
checkpoints and the stages end to end."""
from __future__ import annotations

import copy
import math

import h5py
import numpy as np
import pytest
import torch

import torch.nn.functional as F
from mpi4py import MPI

from hpcqml.data.batches import to_tensor
from hpcqml.data.cifar import load_cifar100
from hpcqml.data.synth import write_synthetic
from hpcqml.errors import UserError
from hpcqml.models import build
from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint
from hpcqml.training.loop import (Dataset, PretrainSettings, SparseSettings, evaluate, is_classical,
                                  is_download, lr_at, make_pretrain_optimizer, pretrain, sparse_train,
                                  train_step)
from hpcqml.training.syncbn import global_batchnorm

torch.set_num_threads(1)   # the test box has 2 shared cores

SELF = MPI.COMM_SELF
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n_train=600, n_test=200, classes=10, seed=0)
    s = load_cifar100(root)
    return Dataset(s.train_x, s.train_y, s.test_x, s.test_y, s.num_classes)


def test_global_batchnorm_single_rank_equals_torch_batchnorm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn2 = copy.deepcopy(bn)
    x = torch.randn(7, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, 4, 3, dtype=torch.float64)
    g1 = torch.autograd.grad((bn(x) * w).sum(), [x, bn.weight, bn.bias])
    with global_batchnorm(bn2, SELF):
        assert type(bn2).__name__ == "GlobalBatchNorm2d"
        g2 = torch.autograd.grad((bn2(x) * w).sum(), [x, bn2.weight, bn2.bias])
    assert type(bn2) is torch.nn.BatchNorm2d                      # swapped back
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_mean, bn2.running_mean, atol=1e-14)
    assert torch.allclose(bn.running_var, bn2.running_var, atol=1e-14)


def test_train_step_equals_plain_full_batch_sgd(data):
    torch.manual_seed(0)
    m1 = build("resnet8-w1", 10)
    m2 = copy.deepcopy(m1)
    x = to_tensor(data.train_x[:24])
    y = torch.from_numpy(data.train_y[:24])
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.05)
    loss, acc = train_step(m1, SELF, x, y, 24, opt1)
    # independent reference: ordinary nn.BatchNorm2d in train mode, mean loss, SGD
    m2.train()
    out = m2(x)
    ref_loss = F.cross_entropy(out, y)
    ref_loss.backward()
    with torch.no_grad():
        for p in m2.parameters():
            p -= 0.05 * p.grad
    assert abs(loss - ref_loss.item()) < 1e-5
    assert abs(acc - float((out.argmax(1) == y).float().mean())) <= 1 / 24 + 1e-12   # argmax near-ties
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), n


def test_paper_schedule_flags():
    classical = [t for t in range(1, 301) if is_classical(t, 100, 10)]
    assert classical == list(range(1, 11)) + list(range(101, 111)) + list(range(201, 211))
    assert [t for t in range(0, 301) if is_download(t, 100)] == [100, 200, 300]


def test_lr_schedules():
    s = PretrainSettings(lr=0.1, schedule="step")
    assert lr_at(0, 100, s) == 0.1 and math.isclose(lr_at(60, 100, s), 0.01) and math.isclose(lr_at(80, 100, s), 0.001)
    s.schedule = "cosine"
    assert lr_at(0, 100, s) == 0.1 and abs(lr_at(100, 100, s)) < 1e-12
    s.schedule = "bogus"
    with pytest.raises(UserError):
        lr_at(0, 10, s)


def test_small_model_learns_synthetic_data_above_chance(data):
    torch.manual_seed(0)
    m = build("resnet8-w1", data.num_classes)
    s = PretrainSettings(epochs=3, batch_size=50, lr=0.1, augment=False)
    _, acc0 = evaluate(m, SELF, data.test_x, data.test_y, CPU)
    n, hist = pretrain(m, SELF, data, s, CPU, make_pretrain_optimizer(m, s))
    assert n == 36 and len(hist["loss"]) == 36
    _, acc = evaluate(m, SELF, data.test_x, data.test_y, CPU)
    assert acc > 0.3 > acc0 + 0.05                  # chance is 0.1
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])


def test_sparse_protocol_history(data):
    torch.manual_seed(0)
    m = build("resnet8-w1", data.num_classes)
    from hpcqml.training.pruning import prune_
    prune_(m, 0.2)
    s = SparseSettings(steps=6, batch_size=40, lr=0.05, keep_fraction=0.2, download_every=3,
                       classical_steps=1, test_interval=2)
    seen = []
    n, h = sparse_train(m, SELF, data, s, CPU, after_step=lambda t, hist, masks: seen.append((t, masks is not None)))
    assert n == 6 and h["step"] == [1, 2, 3, 4, 5, 6]
    assert h["download"] == [False, False, True, False, False, True]
    assert seen == list(zip(h["step"], h["download"], strict=True))
    assert h["quantum_eligible"] == [False, True, True, False, True, True]
    assert math.isnan(h["test_accuracy"][0]) and not math.isnan(h["test_accuracy"][1])
    # pruned weights regrow during training and the download re-prunes to 1 - keep
    assert all(sp < 0.5 for sp in h["sparsity_before_download"])
    assert abs(h["sparsity"][2] - 0.8) < 1e-4 and abs(h["sparsity"][5] - 0.8) < 1e-4
    assert h["sparsity"][3] < 0.5


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    torch.manual_seed(0)
    m = build("resnet8-w1", 10)
    mask = {"conv1.weight": torch.ones_like(m.conv1.weight, dtype=torch.bool)}
    p = save_checkpoint(tmp_path / "c.pt", "resnet8-w1", 10, m, mask=mask, step=7, meta={"a": [1.0, 2.0]})
    ck = load_checkpoint(p)
    assert ck.step == 7 and ck.model_name == "resnet8-w1" and ck.meta == {"a": [1.0, 2.0]}
    assert not ck.model.training and torch.equal(ck.mask["conv1.weight"], mask["conv1.weight"])
    for a, b in zip(ck.model.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    raw = p.read_bytes()
    p.write_bytes(raw[:100])
    with pytest.raises(UserError) as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "missing.pt")


def test_stop_flag_records_the_signal_and_a_cancel_wins():
    import os
    import signal

    from hpcqml.training.signals import StopFlag

    for first, second in ((signal.SIGUSR1, signal.SIGTERM), (signal.SIGTERM, signal.SIGUSR1)):
        with StopFlag() as flag:
            assert not flag.requested(SELF) and flag.signum is None
            os.kill(os.getpid(), first)
            assert flag.requested(SELF) and flag.signum == first
            os.kill(os.getpid(), second)
            assert flag.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL       # handlers restored


@pytest.mark.parametrize("signum, env, requeue", [
    ("SIGUSR1", {"HPCQML_BATCH": "slurm", "HPCQML_REQUEUE": "1"}, True),
    ("SIGUSR1", {"HPCQML_BATCH": "pbs"}, True),
    ("SIGUSR1", {"HPCQML_BATCH": "slurm", "HPCQML_REQUEUE": "0"}, False),
    ("SIGUSR1", {}, False),
    ("SIGTERM", {"HPCQML_BATCH": "slurm", "HPCQML_REQUEUE": "1"}, False),
    ("SIGTERM", {"HPCQML_BATCH": "pbs"}, False),
    # the job script forwards a cancel as SIGUSR1 and notes that it was SIGTERM
    ("SIGUSR1", {"HPCQML_BATCH": "pbs", "HPCQML_STOP_NOTE": "TERM"}, False),
    ("SIGUSR1", {"HPCQML_BATCH": "slurm", "HPCQML_STOP_NOTE": "USR1"}, True),
])
def test_stop_message_says_what_was_saved_and_whether_the_job_requeues(tmp_path, signum, env, requeue):
    import signal

    from hpcqml.training.signals import interrupted_error, will_requeue

    env = dict(env)
    noted = env.get("HPCQML_STOP_NOTE")
    if noted:
        (tmp_path / "note").write_text(noted + "\n")
        env["HPCQML_STOP_NOTE"] = str(tmp_path / "note")
    sig = getattr(signal, signum)
    assert will_requeue(sig, env) is requeue
    msg = str(interrupted_error(sig, 12, "w/pretrain_state.pt", total=40, stage="pretrain", env=env))
    shown = "SIGTERM" if noted == "TERM" else signum
    meaning = "wall-time warning" if shown == "SIGUSR1" else "cancel"
    assert msg.startswith(f"stopped by {shown} ({meaning}): pretrain after step 12 of 40; "
                          f"saved checkpoint w/pretrain_state.pt (step 12); ")
    assert ("the job script requeues the job" in msg) is requeue
    assert ("no requeue" in msg) is (not requeue)
    assert "\n" not in msg


def test_step_meter_rate_eta_and_cadence():
    from hpcqml.training.progress import StepMeter, format_duration

    now = [100.0]
    meter = StepMeter(total=250, start=50, every=50, interval=60.0, clock=lambda: now[0])
    now[0] += 20.0                                  # 10 steps in 20 s after resuming at 50
    assert not meter.due(60)
    assert meter.line(60) == "step 60 of 250 (24.0%), 0.5 steps/s, ETA 0:06:20"
    assert meter.due(100)                           # every 50 steps
    now[0] += 61.0
    assert meter.due(101)                           # at least once a minute
    assert not meter.due(102)
    assert meter.due(250)                           # the last step
    assert format_duration(3 * 3600 + 7) == "3:00:07" and format_duration(float("inf")) == "?"


def test_pretrain_refuses_a_batch_larger_than_the_data(data):
    m = build("resnet8-w1", data.num_classes)
    s = PretrainSettings(epochs=1, batch_size=601)
    with pytest.raises(UserError, match="batch size 601 is larger than the 600 training samples"):
        pretrain(m, SELF, data, s, CPU, make_pretrain_optimizer(m, s))


SIGNAL_CONFIG = """
[run]
name = "sig"
output = "{out}"
stages = ["data", "pretrain", "prune", "train"]
seed = 2

[data]
synth_train = 100
synth_test = 20
synth_classes = 4

[pretrain]
model = "resnet8-w1"
epochs = 1
batch_size = 20

[prune]
keep_fraction = 0.2

[train]
steps = {steps}
batch_size = 8
download_every = 7
classical_steps = 2
test_interval = 5
snapshot_every = 3
checkpoint_every = 1000
"""


@pytest.mark.timeout(240)
def test_stages_end_to_end_with_sigusr1_restart(tmp_path):
    """All four stages via the CLI on 2 ranks.  Run a: SIGUSR1 to mpirun during training ->
    resume state + one-line error; rerunning continues.  Run b: never stopped.  Both end
    with the same weights; run b's HDF5 layout is checked."""
    import os
    import signal
    import subprocess
    import time

    from conftest import PYTHON, REPO, mpiexec, run_cli
    steps = 30
    cfg_a = tmp_path / "a.toml"
    cfg_a.write_text(SIGNAL_CONFIG.format(out=tmp_path / "a.h5", steps=steps))
    cmd = [*mpiexec(), "-n", "2", PYTHON, "-m", "hpcqml", "run", str(cfg_a)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "a.work" / "snapshots" / "step_000003.pt"
    deadline = time.time() + 150
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be signalled"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGUSR1 (wall-time warning): train after step" in err, err[-1500:]
    state = load_checkpoint(tmp_path / "a.work" / "train_state.pt")
    # one line: what stopped, what was saved, what next (not in a batch job: no requeue)
    line = next(x for x in err.splitlines() if "stopped by SIGUSR1" in x)
    assert f"train after step {state.step} of {steps}" in line
    assert f"saved checkpoint {tmp_path / 'a.work' / 'train_state.pt'} (step {state.step})" in line
    assert line.endswith("no requeue; run the same command again to continue")
    assert 3 <= state.step < steps
    with h5py.File(tmp_path / "a.h5", "r") as fh:   # the per-step log up to the stop is in the file
        assert fh["train_log"].attrs["steps_done"] == state.step
        assert fh["train_log/loss"].shape == (state.step,) and "train" not in fh
    r = run_cli("run", str(cfg_a), ranks=2, timeout=150)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "resuming from" in r.stderr
    cfg_b = tmp_path / "b.toml"
    cfg_b.write_text(SIGNAL_CONFIG.format(out=tmp_path / "b.h5", steps=steps))
    r = run_cli("run", str(cfg_b), ranks=2, timeout=150)
    assert r.returncode == 0, r.stderr[-1500:]
    a = load_checkpoint(tmp_path / "a.work" / "trained.pt")
    b = load_checkpoint(tmp_path / "b.work" / "trained.pt")
    assert a.step == b.step == steps
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), n
    with h5py.File(tmp_path / "a.h5", "r") as fa, h5py.File(tmp_path / "b.h5", "r") as fb:
        assert np.array_equal(fa["train/loss"][()], fb["train/loss"][()])
        assert list(fa["train/step"][()]) == list(range(1, steps + 1))
        assert fb["data"].attrs["num_classes"] == 4 and fb["data/train_counts"][()].sum() == 100
        assert fb["pretrain/loss"].shape == (5,)
        g = fb["prune"]
        assert g.attrs["kept_total"] == round(0.2 * g.attrs["prunable_total"])
        kept = sum(int(g["mask"][n][()].sum()) for n in g["mask"])
        assert kept == g.attrs["kept_total"] and int(g["kept"][()].sum()) == kept
        t = fb["train"]
        assert list(np.nonzero(t["download"][()])[0] + 1) == [7, 14, 21, 28]
        eligible = [int(s) for s in t["step"][()] if t["quantum_eligible"][s - 1]]
        assert 1 not in eligible and 2 not in eligible and 3 in eligible and 8 not in eligible
        ta = t["test_accuracy"][()]
        assert np.isnan(ta[0]) and not np.isnan(ta[4])
        assert abs(t["sparsity"][6] - 0.8) < 1e-3 and t["sparsity_before_download"][6] < 0.5
        assert list(t["snapshot_steps"][()]) == list(range(0, steps + 1, 3))
    snaps = sorted(p.name for p in (tmp_path / "b.work" / "snapshots").iterdir())
    assert snaps == [f"step_{k:06d}.pt" for k in range(0, steps + 1, 3)]
    snap = load_checkpoint(tmp_path / "b.work" / "snapshots" / "step_000021.pt")
    assert snap.step == 21 and snap.mask is not None
    assert (tmp_path / "b.work" / "pretrained.pt").is_file() and (tmp_path / "b.work" / "pruned.pt").is_file()
