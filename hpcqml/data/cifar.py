"""Load CIFAR-100 from local files in the authors' python-pickle layout (no download code).

Layout (``cifar-100-python/``): ``train`` and ``test`` are pickled dicts with
``b'data'`` (uint8, N x 3072, each row the 1024 red, then green, then blue pixels of a
32x32 image in row-major order), ``b'fine_labels'`` and ``b'coarse_labels'`` (lists of
ints); ``meta`` holds ``b'fine_label_names'`` and ``b'coarse_label_names'``.
Every defect (missing directory or file, truncated or foreign pickle, wrong keys, shapes or
label range) raises :class:`~hpcqml.errors.UserError` with a one-line message naming the
path and what was expected.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcqml.errors import UserError

SUBDIR = "cifar-100-python"
FILES = ("train", "test", "meta")
IMAGE_SHAPE = (32, 32, 3)
ROW_LEN = 32 * 32 * 3

#: Per-channel mean and standard deviation of the CIFAR-100 training images (RGB, in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class CifarSplit:
    """Images as uint8 N x 32 x 32 x 3 (HWC, RGB), labels as int64 fine labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    label_names: list[str]
    root: Path


def resolve_dir(root: str | Path) -> Path:
    """Return the ``cifar-100-python`` directory given it or its parent."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"CIFAR-100 directory {root}: not found (expected a directory holding "
                        f"{SUBDIR}/ with files {', '.join(FILES)})")
    if (root / SUBDIR).is_dir():
        return root / SUBDIR
    if all((root / f).exists() for f in FILES):
        return root
    raise UserError(f"CIFAR-100 directory {root}: no {SUBDIR}/ subdirectory (expected {SUBDIR}/"
                    f"{{{','.join(FILES)}}} in the python-pickle layout)")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR-100 file {path}: missing (expected the python-pickle file '{path.name}')")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"CIFAR-100 file {path}: not a readable python pickle ({reason}); "
                        f"truncated or wrong format") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR-100 file {path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(obj: dict, key: bytes, path: Path):
    if key in obj:
        return obj[key]
    skey = key.decode()
    if skey in obj:
        return obj[skey]
    raise UserError(f"CIFAR-100 file {path}: key {key!r} missing (found {sorted(map(repr, obj))[:6]})")


def _load_part(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path)
    data = np.asarray(_get(obj, b"data", path))
    labels = np.asarray(_get(obj, b"fine_labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_LEN or data.shape[0] == 0:
        raise UserError(f"CIFAR-100 file {path}: b'data' has dtype {data.dtype} shape {data.shape}, "
                        f"expected uint8 of shape (N, {ROW_LEN}) with N > 0")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"CIFAR-100 file {path}: b'fine_labels' has shape {labels.shape}, "
                        f"expected {data.shape[0]} integer labels (one per image)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"CIFAR-100 file {path}: labels span [{labels.min()}, {labels.max()}], "
                        f"expected [0, {num_classes - 1}] from meta")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar100(root: str | Path) -> CifarSplit:
    """Load ``train``, ``test`` and ``meta`` from ``root`` (or ``root/cifar-100-python``)."""
    d = resolve_dir(root)
    meta_path = d / "meta"
    meta = _unpickle(meta_path)
    names = _get(meta, b"fine_label_names", meta_path)
    if not isinstance(names, (list, tuple)) or len(names) == 0:
        raise UserError(f"CIFAR-100 file {meta_path}: b'fine_label_names' must be a non-empty list")
    label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_x, train_y = _load_part(d / "train", len(label_names))
    test_x, test_y = _load_part(d / "test", len(label_names))
    return CifarSplit(train_x, train_y, test_x, test_y, len(label_names), label_names, d)
