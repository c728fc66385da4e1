"""Rank-invariant batch drawing and sharding.

Every random draw is a pure function of ``(seed, step)`` so all ranks, whatever their
number, agree on the global batch; each rank then takes a contiguous shard of it.
"""
from __future__ import annotations

import numpy as np
import torch

from hpcqml.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from hpcqml.errors import UserError
from hpcqml.parallel import block_bounds

_BATCH_STREAM = 0x42A7C4
_EPOCH_STREAM = 0x5EED0E
_AUG_STREAM = 0xA06A06


def batch_indices(n_train: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """B distinct training indices drawn uniformly for ``step`` (int64, identical on every rank)."""
    if batch_size < 1 or batch_size > n_train:
        raise UserError(f"batch size {batch_size}: must be between 1 and the {n_train} training samples")
    rng = np.random.default_rng([_BATCH_STREAM, int(seed), int(step)])
    return rng.choice(n_train, size=batch_size, replace=False).astype(np.int64)


def epoch_batches(n_train: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch as consecutive slices of a seeded permutation (last short batch dropped)."""
    if batch_size < 1 or batch_size > n_train:
        raise UserError(f"batch size {batch_size}: must be between 1 and the {n_train} training samples")
    perm = np.random.default_rng([_EPOCH_STREAM, int(seed), int(epoch)]).permutation(n_train)
    nb = n_train // batch_size
    return [perm[i * batch_size:(i + 1) * batch_size].astype(np.int64) for i in range(nb)]


def shard(indices: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's contiguous slice of ``indices`` (:func:`hpcqml.parallel.block_bounds`)."""
    a, b = block_bounds(len(indices), rank, size)
    return indices[a:b]


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 N x 32 x 32 x 3 -> float32 N x 3 x 32 x 32, (x/255 - mean) / std per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(torch.float32).div_(255.0)
    mean = torch.tensor(CIFAR100_MEAN, dtype=torch.float32)
    std = torch.tensor(CIFAR100_STD, dtype=torch.float32)
    x = (x - mean) / std
    return x.permute(0, 3, 1, 2).contiguous()


def augment_params(batch_size: int, seed: int, step: int, pad: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample crop offsets (dy, dx in [0, 2*pad]) and flip flags for the global batch of ``step``."""
    rng = np.random.default_rng([_AUG_STREAM, int(seed), int(step)])
    dy = rng.integers(0, 2 * pad + 1, size=batch_size)
    dx = rng.integers(0, 2 * pad + 1, size=batch_size)
    flip = rng.random(batch_size) < 0.5
    return dy, dx, flip


def augment(images_uint8: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray,
            pad: int = 4) -> np.ndarray:
    """Random crop (zero padding ``pad``) and horizontal flip of uint8 NHWC images."""
    n, h, w, _ = images_uint8.shape
    padded = np.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images_uint8)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out
