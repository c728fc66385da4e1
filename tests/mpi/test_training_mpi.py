"""Data-parallel training under mpirun -n 1/2/3: the weights after k steps equal the
single-process ones (float32 round-off), a signal-stopped, restarted run reaches the
same weights as an uninterrupted one, and every rank agrees on which signal stopped it.

Every rank also computes the single-process reference itself (on MPI.COMM_SELF), so the
comparison needs no files from another run.  Tolerance (stated): every weight, BN buffer
and logged loss agrees to |a - b| <= 1e-5 + 1e-4 |b| after 4 steps of SGD.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.data.cifar import load_cifar100
from hpcqml.data.synth import write_synthetic
from hpcqml.models import build
from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint
from hpcqml.training.loop import (Dataset, PretrainSettings, SparseSettings, make_pretrain_optimizer,
                                  pretrain, sparse_train)
from hpcqml.training.pruning import prune_
from hpcqml.training.signals import StopFlag

torch.set_num_threads(1)

pytestmark = pytest.mark.timeout(120)
WORLD = MPI.COMM_WORLD
CPU = torch.device("cpu")
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def shared_dir():
    path = tempfile.mkdtemp(prefix="hpcqml-mpi-train-") if WORLD.Get_rank() == 0 else None
    yield Path(WORLD.bcast(path, root=0))
    WORLD.Barrier()
    if WORLD.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data(shared_dir):
    if WORLD.Get_rank() == 0:
        write_synthetic(shared_dir / "data", n_train=120, n_test=40, classes=5, seed=0)
    WORLD.Barrier()
    s = load_cifar100(shared_dir / "data")
    return Dataset(s.train_x, s.train_y, s.test_x, s.test_y, s.num_classes)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build("resnet8-w1", 5)
    prune_(m, 0.3)
    return m


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, exact: bool = False) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if exact:
            assert torch.equal(x, y), name
        else:
            assert torch.allclose(x.double(), y.double(), rtol=RTOL, atol=ATOL), \
                f"{name}: max diff {(x.double() - y.double()).abs().max():.3g}"


SPARSE = SparseSettings(steps=4, batch_size=23, lr=0.05, keep_fraction=0.3, download_every=2,
                        classical_steps=1, test_interval=2, seed=3)


def test_sparse_training_is_rank_count_invariant(data):
    par, ref = _model(), _model()
    _, h_par = sparse_train(par, WORLD, data, SPARSE, CPU)
    _, h_ref = sparse_train(ref, MPI.COMM_SELF, data, SPARSE, CPU)
    _assert_same_state(par, ref)
    for k in ("loss", "test_loss", "sparsity"):
        np.testing.assert_allclose(h_par[k], h_ref[k], rtol=RTOL, atol=ATOL)
    assert h_par["download"] == h_ref["download"] and h_par["batch_accuracy"] == h_ref["batch_accuracy"]
    # every rank holds the same weights (rank 0's are broadcast and compared)
    flat = torch.cat([p.detach().reshape(-1) for p in par.parameters()]).numpy()
    root = flat.copy()
    WORLD.Bcast(root, root=0)
    np.testing.assert_allclose(flat, root, rtol=0, atol=ATOL)


def test_pretraining_with_momentum_and_augmentation_is_rank_count_invariant(data):
    s = PretrainSettings(epochs=1, batch_size=31, lr=0.05, augment=True, seed=2)   # 3 steps
    par, ref = _model(1), _model(1)
    n1, h1 = pretrain(par, WORLD, data, s, CPU, make_pretrain_optimizer(par, s))
    n2, h2 = pretrain(ref, MPI.COMM_SELF, data, s, CPU, make_pretrain_optimizer(ref, s))
    assert n1 == n2 == 3
    _assert_same_state(par, ref)
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=RTOL, atol=ATOL)


def test_signal_stop_and_restart_matches_uninterrupted_run(data, shared_dir):
    full = _model(2)
    _, h_full = sparse_train(full, WORLD, data, SPARSE, CPU)

    part = _model(2)
    last = WORLD.Get_size() - 1

    def after_step(t, hist, masks):
        if t == 1 and WORLD.Get_rank() == last:       # only one rank gets the signal
            os.kill(os.getpid(), signal.SIGUSR1)

    with StopFlag() as flag:
        done, h_part = sparse_train(part, WORLD, data, SPARSE, CPU, after_step=after_step,
                                    stop=lambda: flag.requested(WORLD))
    assert done == 1 and len(h_part["step"]) == 1
    ck_path = shared_dir / "state.pt"
    if WORLD.Get_rank() == 0:
        save_checkpoint(ck_path, "resnet8-w1", 5, part, step=done, meta={"history": h_part})
    WORLD.Barrier()
    ck = load_checkpoint(ck_path)
    resumed = ck.model
    done2, h_res = sparse_train(resumed, WORLD, data, SPARSE, CPU, start_step=ck.step,
                                history=ck.meta["history"])
    assert done2 == SPARSE.steps
    _assert_same_state(resumed, full, exact=True)
    assert h_res["loss"] == h_full["loss"] and h_res["download"] == h_full["download"]


def test_pretrain_restart_restores_momentum(data, shared_dir):
    s = PretrainSettings(epochs=2, batch_size=40, lr=0.05, augment=False, seed=4)      # 6 steps
    full = _model(3)
    pretrain(full, WORLD, data, s, CPU, make_pretrain_optimizer(full, s))
    part = _model(3)
    opt = make_pretrain_optimizer(part, s)
    calls = iter([False, False, True])
    done, hist = pretrain(part, WORLD, data, s, CPU, opt, stop=lambda: next(calls))
    assert done == 3
    path = shared_dir / "pre.pt"
    if WORLD.Get_rank() == 0:
        save_checkpoint(path, "resnet8-w1", 5, part, step=done,
                        meta={"optimizer": opt.state_dict(), "history": hist})
    WORLD.Barrier()
    ck = load_checkpoint(path)
    opt2 = make_pretrain_optimizer(ck.model, s)
    opt2.load_state_dict(ck.meta["optimizer"])
    done2, _ = pretrain(ck.model, WORLD, data, s, CPU, opt2, start_step=ck.step, history=ck.meta["history"])
    assert done2 == 6
    _assert_same_state(ck.model, full, exact=True)


def test_every_rank_agrees_on_the_signal_and_a_cancel_wins():
    """Rank 0 gets the wall-time warning, the last rank a cancel: every rank stops and
    reports SIGTERM (no requeue), whichever signal it received itself."""
    last = WORLD.Get_size() - 1
    with StopFlag() as flag:
        assert not flag.requested(WORLD)
        if WORLD.Get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        if WORLD.Get_rank() == last:
            os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested(WORLD)
        assert flag.signum == signal.SIGTERM
    WORLD.Barrier()
