"""Synthetic stand-in for CIFAR-100, written in exactly the python-pickle layout.

Class ``c`` has a smooth random prototype image P_c (a 4x4x3 random field upsampled to
32x32).  Sample i of class c is  x_i = clip(128 + s * (a_i P_c + sigma * z_i)),  with
a_i ~ U[0.6, 1.4] a random contrast and z_i white Gaussian noise, rounded to uint8.  The
class is visible in the low-frequency structure, so a small CNN learns it well above
chance, while the noise keeps it from being trivial.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from hpcqml.data.cifar import SUBDIR
from hpcqml.errors import UserError
from hpcqml.io import atomic_write_bytes


def _prototypes(classes: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.standard_normal((classes, 3, 4, 4))
    up = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)          # C x 3 x 32 x 32, blocky
    # smooth the blocks with a separable 5-tap box filter (wrap-around) for a natural look
    for ax in (2, 3):
        up = np.asarray(sum(np.roll(up, k, axis=ax) for k in range(-2, 3))) / 5.0
    up /= up.reshape(classes, -1).std(axis=1)[:, None, None, None]
    return up.astype(np.float32)


def _samples(protos: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
             noise: float) -> np.ndarray:
    n = labels.shape[0]
    contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32)
    z = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    x = 128.0 + 40.0 * (contrast * protos[labels] + noise * z)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def make_synthetic(n_train: int, n_test: int, classes: int, seed: int,
                   noise: float = 1.0) -> dict[str, dict]:
    """Return the three pickle dicts ``{"train", "test", "meta"}`` of a synthetic set."""
    if n_train < classes or n_test < 1 or classes < 2:
        raise UserError(f"synthetic data: need classes >= 2, train >= classes and test >= 1 "
                        f"(got train={n_train}, test={n_test}, classes={classes})")
    rng = np.random.default_rng([0x5A17, int(seed)])
    protos = _prototypes(classes, rng)
    out: dict[str, dict] = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        out[part] = {
            b"filenames": [f"synth_{part}_{i:06d}.png".encode() for i in range(n)],
            b"batch_label": f"synthetic {part} (seed {seed})".encode(),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels * 20 // classes).tolist(),
            b"data": _samples(protos, labels, rng, noise),
        }
    out["meta"] = {
        b"fine_label_names": [f"class_{c:03d}".encode() for c in range(classes)],
        b"coarse_label_names": [f"super_{c:02d}".encode() for c in range(20)],
    }
    return out


def write_synthetic(out_dir: str | Path, n_train: int = 5000, n_test: int = 1000, classes: int = 100,
                    seed: int = 0, noise: float = 1.0) -> Path:
    """Write ``out_dir/cifar-100-python/{train,test,meta}``; return that directory."""
    d = Path(out_dir) / SUBDIR
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in make_synthetic(n_train, n_test, classes, seed, noise).items():
        atomic_write_bytes(d / name, pickle.dumps(obj, protocol=4))
    return d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hpcqml data synth``."""
    parser.add_argument("--out", required=True, help="directory to create cifar-100-python/ in")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--noise", type=float, default=1.0, help="noise level relative to the class signal")


def cli_synth(args: argparse.Namespace) -> int:
    """``hpcqml data synth``: write a synthetic CIFAR-100-layout data set."""
    d = write_synthetic(args.out, args.train, args.test, args.classes, args.seed,
                        getattr(args, "noise", 1.0))
    print(f"wrote synthetic CIFAR-100 layout to {d} ({args.train} train, {args.test} test, "
          f"{args.classes} classes)")
    return 0
