"""Data-parallel SGD over MPI: dense pre-training and the paper's sparse-training protocol.

Data parallelism.  The global batch of step t is the seeded index set I_t (|I_t| = B,
identical on every rank, see :mod:`hpcqml.data.batches`); rank r holds the contiguous
shard S_r of I_t.  Each rank back-propagates its share of the full-batch mean loss,
    L_r = (1/B) sum_{i in S_r} l_i,      L = sum_r L_r = (1/B) sum_{i in I_t} l_i,
and the gradients are summed by one allreduce, so every rank holds grad L exactly as a
single process would (up to float32 summation order).  BatchNorm uses the statistics of
the whole global batch (:mod:`hpcqml.training.syncbn`), which makes the loss itself
independent of the rank count.

Sparse-training protocol (paper Sec. III B, Fig. 2): start from the pruned pre-trained
model; update t = 1..T is  theta_t = theta_{t-1} - eta grad L_{I_t}(theta_{t-1})  (plain
SGD, eta = 0.01, B = 2048); pruned weights may regrow; after every update t with
t % download_every == 0 the weights are re-pruned to the top ``keep_fraction`` by
magnitude (the "download"); the first ``classical_steps`` updates after each download
(and after the initial pruning) are classical, the others quantum-eligible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from hpcqml.data.batches import augment, augment_params, batch_indices, epoch_batches, to_tensor
from hpcqml.errors import UserError
from hpcqml.parallel import allreduce_sum, block_bounds
from hpcqml.protocols import Comm, PerfTimer
from hpcqml.training.log import HISTORY_KEYS
from hpcqml.training.pruning import prune_, sparsity
from hpcqml.training.syncbn import global_batchnorm


@dataclass
class Dataset:
    """Arrays every rank holds: uint8 NHWC images and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def _check_batch(comm: Comm, batch_size: int) -> None:
    if batch_size < comm.Get_size():
        raise UserError(f"batch size {batch_size} is smaller than the {comm.Get_size()} ranks")


def train_step(model: nn.Module, comm: Comm, x: torch.Tensor, y: torch.Tensor, global_batch: int,
               optimizer: torch.optim.Optimizer, perf: PerfTimer | None = None) -> tuple[float, float]:
    """One data-parallel SGD step on this rank's shard (x, y) of a global batch of size B.

    Returns the global-batch mean loss and accuracy (before the update), same on all ranks.
    """
    model.train()
    optimizer.zero_grad(set_to_none=False)
    with global_batchnorm(model, comm):
        logits = model(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        (loss_sum / global_batch).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    allreduce_sum(comm, flat, perf)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n
    stats = torch.tensor([float(loss_sum.detach()), float((logits.argmax(1) == y).sum())],
                         dtype=torch.float64)
    allreduce_sum(comm, stats, perf)
    optimizer.step()
    return float(stats[0]) / global_batch, float(stats[1]) / global_batch


@torch.no_grad()
def evaluate(model: nn.Module, comm: Comm, images: np.ndarray, labels: np.ndarray, device: torch.device,
             chunk: int = 500, perf: PerfTimer | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over (images, labels), eval-mode BN; ranks split the set."""
    model.eval()
    a, b = block_bounds(len(labels), comm.Get_rank(), comm.Get_size())
    acc = torch.zeros(2, dtype=torch.float64)
    for s in range(a, b, chunk):
        e = min(b, s + chunk)
        x = to_tensor(images[s:e]).to(device)
        y = torch.from_numpy(labels[s:e]).to(device)
        out = model(x)
        acc[0] += float(F.cross_entropy(out, y, reduction="sum"))
        acc[1] += float((out.argmax(1) == y).sum())
    allreduce_sum(comm, acc, perf)
    return float(acc[0]) / len(labels), float(acc[1]) / len(labels)


def _shard_tensors(data: Dataset, idx: np.ndarray, comm: Comm, device: torch.device,
                   aug: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = block_bounds(len(idx), comm.Get_rank(), comm.Get_size())
    mine = idx[a:b]
    imgs = data.train_x[mine]
    if aug is not None:
        dy, dx, flip = aug
        imgs = augment(imgs, dy[a:b], dx[a:b], flip[a:b])
    return to_tensor(imgs).to(device), torch.from_numpy(data.train_y[mine]).to(device)


# ----------------------------------------------------------------------------- pre-training

@dataclass
class PretrainSettings:
    """Dense pre-training settings (``[pretrain]`` and the run seed)."""
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"            # "cosine" | "step" | "constant"
    milestones: tuple = (0.5, 0.75)     # fractions of the run where "step" divides lr by 10
    augment: bool = True
    seed: int = 0


def lr_at(step: int, total: int, s: PretrainSettings) -> float:
    """Learning rate of (0-based) update ``step`` out of ``total``."""
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "cosine":
        return 0.5 * s.lr * (1.0 + math.cos(math.pi * step / max(total, 1)))
    if s.schedule == "step":
        return s.lr * 0.1 ** sum(step >= m * total for m in s.milestones)
    raise UserError(f"learning-rate schedule {s.schedule!r}: not one of cosine, step, constant")


def make_pretrain_optimizer(model: nn.Module, s: PretrainSettings) -> torch.optim.SGD:
    """SGD with momentum and weight decay over ``model``'s parameters, as ``s`` says."""
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def pretrain(model: nn.Module, comm: Comm, data: Dataset, s: PretrainSettings, device: torch.device,
             optimizer: torch.optim.SGD, start_step: int = 0, history: dict | None = None,
             after_step: Callable[[int, dict], None] | None = None,
             stop: Callable[[], bool] | None = None, perf: PerfTimer | None = None) -> tuple[int, dict]:
    """Dense SGD with momentum for ``s.epochs`` epochs; returns (steps done, history).

    Epoch e visits a seeded permutation of the training set in batches of B (last partial
    batch dropped).  ``after_step(t, history)`` runs after update t (for checkpoints);
    ``stop()`` (collective) ends the run early after the current update.
    """
    _check_batch(comm, s.batch_size)
    n = len(data.train_y)
    if s.batch_size > n:
        raise UserError(f"batch size {s.batch_size} is larger than the {n} training samples: no full batch")
    spe = n // s.batch_size
    total = spe * s.epochs
    hist = history if history is not None else {"step": [], "loss": [], "accuracy": [], "lr": []}
    t = start_step
    while t < total:
        epoch, i = divmod(t, spe)
        idx = epoch_batches(n, s.batch_size, s.seed, epoch)[i]
        aug = augment_params(s.batch_size, s.seed, t) if s.augment else None
        x, y = _shard_tensors(data, idx, comm, device, aug)
        lr = lr_at(t, total, s)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, acc = train_step(model, comm, x, y, s.batch_size, optimizer, perf)
        if not math.isfinite(loss):
            from hpcqml.errors import NumericalError
            raise NumericalError(f"pre-training loss is {loss} at step {t + 1}; lower the learning rate")
        t += 1
        for k, v in (("step", t), ("loss", loss), ("accuracy", acc), ("lr", lr)):
            hist[k].append(v)
        if after_step is not None:
            after_step(t, hist)
        if stop is not None and t < total and stop():
            break
    return t, hist


# ----------------------------------------------------------------------- sparse training

@dataclass
class SparseSettings:
    """Sparse-training settings (``[train]``, falling back to ``[prune]``, and the run seed)."""
    steps: int = 200
    batch_size: int = 2048
    lr: float = 0.01
    keep_fraction: float = 0.1
    download_every: int = 100
    classical_steps: int = 10
    test_interval: int = 10
    scope: str = "conv-linear-except-classifier"
    seed: int = 0




def is_classical(t: int, download_every: int, classical_steps: int) -> bool:
    """Update t (1-based) is classical iff it is among the first ``classical_steps`` after a download.

    Downloads happen after updates download_every, 2*download_every, ... and the initial
    pruning counts as a download before update 1.
    """
    return (t - 1) % download_every < classical_steps


def is_download(t: int, download_every: int) -> bool:
    """Whether the weights are re-pruned after update t."""
    return t > 0 and t % download_every == 0


def empty_history() -> dict[str, list]:
    """An empty per-step log: one list per key of :data:`HISTORY_KEYS`."""
    return {k: [] for k in HISTORY_KEYS}


def sparse_train(model: nn.Module, comm: Comm, data: Dataset, s: SparseSettings, device: torch.device,
                 start_step: int = 0, history: dict | None = None,
                 after_step: Callable[[int, dict, dict | None], None] | None = None,
                 stop: Callable[[], bool] | None = None, perf: PerfTimer | None = None) -> tuple[int, dict]:
    """Run updates start_step+1 .. s.steps of the sparse-training protocol.

    ``history`` (one list per key of HISTORY_KEYS, one entry per update; test metrics are
    NaN except every ``test_interval`` updates) is extended in place.  ``after_step(t,
    history, masks)`` is called after update t (masks: the new masks if t was a download,
    else None); ``stop()`` (collective) ends early.  Returns (updates done, history).
    """
    _check_batch(comm, s.batch_size)
    hist = history if history is not None else empty_history()
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.0, weight_decay=0.0)
    n = len(data.train_y)
    t = start_step
    while t < s.steps:
        idx = batch_indices(n, s.batch_size, s.seed, t + 1)
        x, y = _shard_tensors(data, idx, comm, device)
        loss, acc = train_step(model, comm, x, y, s.batch_size, opt, perf)
        if not math.isfinite(loss):
            from hpcqml.errors import NumericalError
            raise NumericalError(f"sparse-training loss is {loss} at step {t + 1}; lower the learning rate")
        t += 1
        sp_before = sparsity(model, s.scope)
        masks = None
        if is_download(t, s.download_every):
            masks = prune_(model, s.keep_fraction, s.scope)
        sp = sparsity(model, s.scope) if masks is not None else sp_before
        tl, ta = (evaluate(model, comm, data.test_x, data.test_y, device, perf=perf)
                  if s.test_interval > 0 and t % s.test_interval == 0 else (math.nan, math.nan))
        row = (t, loss, acc, tl, ta, sp, sp_before, masks is not None,
               not is_classical(t, s.download_every, s.classical_steps))
        for k, v in zip(HISTORY_KEYS, row, strict=True):
            hist[k].append(v)
        if after_step is not None:
            after_step(t, hist, masks)
        if stop is not None and t < s.steps and stop():
            break
    return t, hist


@torch.no_grad()
def broadcast_model_(model: nn.Module, comm: Comm) -> None:
    """Copy rank 0's parameters and buffers to every rank (float/int tensors, in place)."""
    if comm.Get_size() == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        host = t.detach().to("cpu").contiguous().numpy()
        comm.Bcast(host, root=0)
        t.copy_(torch.from_numpy(host))
