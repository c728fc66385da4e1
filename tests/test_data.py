"""CIFAR-100 pickle loader (errors on files the test corrupts), synthetic set, batches."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from hpcqml.data.batches import (
    augment,
    augment_params,
    batch_indices,
    epoch_batches,
    shard,
    to_tensor,
)
from hpcqml.data.cifar import CIFAR100_MEAN, CIFAR100_STD, load_cifar100
from hpcqml.data.synth import add_arguments, cli_synth, write_synthetic
from hpcqml.errors import UserError
from hpcqml.parallel import block_bounds

torch.set_num_threads(1)   # the test box has 2 shared cores


@pytest.fixture
def synth(tmp_path):
    d = write_synthetic(tmp_path, n_train=60, n_test=20, classes=6, seed=3)
    return tmp_path, d


def test_synthetic_layout_is_cifar100_pickle(synth):
    root, d = synth
    assert sorted(p.name for p in d.iterdir()) == ["meta", "test", "train"]
    with open(d / "train", "rb") as fh:
        obj = pickle.load(fh, encoding="bytes")
    assert obj[b"data"].dtype == np.uint8 and obj[b"data"].shape == (60, 3072)
    assert len(obj[b"fine_labels"]) == 60 and len(obj[b"coarse_labels"]) == 60
    with open(d / "meta", "rb") as fh:
        meta = pickle.load(fh, encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 6
    split = load_cifar100(root)
    assert split.train_x.shape == (60, 32, 32, 3) and split.train_x.dtype == np.uint8
    assert split.test_y.dtype == np.int64 and split.num_classes == 6
    # the row layout is R(1024) G(1024) B(1024): pixel (0, 0) channels
    assert np.array_equal(split.train_x[0, 0, 0], obj[b"data"][0, [0, 1024, 2048]])
    assert set(split.train_y.tolist()) == set(range(6))


def test_synthetic_is_reproducible_and_seeded(tmp_path):
    a = load_cifar100(write_synthetic(tmp_path / "a", 30, 10, 5, seed=1))
    b = load_cifar100(write_synthetic(tmp_path / "b", 30, 10, 5, seed=1))
    c = load_cifar100(write_synthetic(tmp_path / "c", 30, 10, 5, seed=2))
    assert np.array_equal(a.train_x, b.train_x) and not np.array_equal(a.train_x, c.train_x)


def test_cli_synth(tmp_path, capsys):
    import argparse as ap
    p = ap.ArgumentParser()
    add_arguments(p)
    cli_synth(p.parse_args(["--out", str(tmp_path), "--train", "12", "--test", "4", "--classes", "3"]))
    assert load_cifar100(tmp_path).train_x.shape[0] == 12
    assert "12 train" in capsys.readouterr().out


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_missing_directory(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path / "nope")
    _one_line(e, "nope", "not found")


def test_directory_without_files(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path)
    _one_line(e, "cifar-100-python")


def test_missing_file(synth):
    root, d = synth
    (d / "test").unlink()
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "test"), "missing")


def test_truncated_pickle(synth):
    root, d = synth
    raw = (d / "train").read_bytes()
    (d / "train").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "train"), "truncated")


def test_not_a_pickle(synth):
    root, d = synth
    (d / "meta").write_text("this is not a pickle\n")
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "meta"))


def test_wrong_format_pickle(synth):
    root, d = synth
    (d / "train").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "train"), "dict")


def _rewrite(path, changes):
    with open(path, "rb") as fh:
        obj = pickle.load(fh, encoding="bytes")
    obj.update(changes)
    path.write_bytes(pickle.dumps(obj))
    return obj


def test_wrong_image_shape(synth):
    root, d = synth
    with open(d / "train", "rb") as fh:
        data = pickle.load(fh, encoding="bytes")[b"data"]
    _rewrite(d / "train", {b"data": data[:, :3000]})
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "train"), "3072")


def test_label_count_mismatch_and_range(synth):
    root, d = synth
    _rewrite(d / "test", {b"fine_labels": [0] * 5})
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "test"), "fine_labels")
    _rewrite(d / "test", {b"fine_labels": [99] * 20})
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, str(d / "test"), "labels span")


def test_missing_key(synth):
    root, d = synth
    with open(d / "train", "rb") as fh:
        obj = pickle.load(fh, encoding="bytes")
    del obj[b"fine_labels"]
    (d / "train").write_bytes(pickle.dumps(obj))
    with pytest.raises(UserError) as e:
        load_cifar100(root)
    _one_line(e, "fine_labels")


def test_batch_indices_are_seeded_and_distinct():
    a = batch_indices(1000, 64, seed=5, step=7)
    assert a.dtype == np.int64 and len(np.unique(a)) == 64 and a.min() >= 0 and a.max() < 1000
    assert np.array_equal(a, batch_indices(1000, 64, seed=5, step=7))
    assert not np.array_equal(a, batch_indices(1000, 64, seed=5, step=8))
    assert not np.array_equal(a, batch_indices(1000, 64, seed=6, step=7))
    with pytest.raises(UserError):
        batch_indices(10, 11, 0, 0)


def test_epoch_batches_cover_without_repeats():
    bs = epoch_batches(103, 10, seed=0, epoch=2)
    flat = np.concatenate(bs)
    assert len(bs) == 10 and len(np.unique(flat)) == 100


@pytest.mark.parametrize("n,size", [(2048, 1), (2048, 3), (10, 3), (7, 4)])
def test_shard_is_a_contiguous_partition(n, size):
    idx = np.arange(n) * 3
    parts = [shard(idx, r, size) for r in range(size)]
    assert np.array_equal(np.concatenate(parts), idx)
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= 1
    assert block_bounds(n, size - 1, size)[1] == n


def test_to_tensor_normalises_per_channel():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.dtype == torch.float32 and t.shape == (3, 3, 32, 32)
    expect = (img[1, 4, 5, 2] / 255.0 - CIFAR100_MEAN[2]) / CIFAR100_STD[2]
    assert abs(float(t[1, 2, 4, 5]) - expect) < 1e-5


def test_augment_crop_and_flip():
    img = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8)
    out = augment(img, np.array([4, 0]), np.array([4, 8]), np.array([False, True]))
    assert np.array_equal(out[0], img[0])                     # centre crop, no flip
    unflipped = out[1][:, ::-1]                               # dy=0, dx=8: shifted up-left by 4
    assert np.array_equal(unflipped[4:, :28], img[1, :28, 4:])
    assert not unflipped[:4].any() and not unflipped[:, 28:].any()
    dy, dx, flip = augment_params(16, 0, 3)
    assert dy.max() <= 8 and dx.min() >= 0 and flip.dtype == bool


# ---- the layout of the real CIFAR-100 files -------------------------------------------------
# The published files were written by Python 2's cPickle, protocol 2: strings are byte
# strings (SHORT_BINSTRING/BINSTRING, read back as bytes), memo indices start at 1, and the
# image array goes through numpy's _reconstruct named with the GLOBAL opcode.

class _Global:
    def __init__(self, module: str, name: str):
        self.ref = f"{module}\n{name}\n".encode()


class _Py2Writer:
    """Emit protocol-2 opcodes the way Python 2's cPickle did for the CIFAR-100 files."""

    def __init__(self, reconstruct_module: str):
        self.out = bytearray(b"\x80\x02")
        self.memo = 0
        self.reconstruct = _Global(reconstruct_module, "_reconstruct")

    def put(self):
        self.memo += 1
        self.out += (b"q" + bytes([self.memo]) if self.memo < 256
                     else b"r" + struct.pack("<I", self.memo))

    def emit(self, x):
        out = self.out
        if isinstance(x, _Global):
            out += b"c" + x.ref
            self.put()
        elif x is None:
            out += b"N"
        elif isinstance(x, bool):
            out += b"\x88" if x else b"\x89"
        elif isinstance(x, int):
            out += (b"K" + bytes([x]) if 0 <= x < 256 else b"M" + struct.pack("<H", x) if 0 <= x < 65536
                    else b"J" + struct.pack("<i", x))
        elif isinstance(x, bytes):
            out += (b"U" + bytes([len(x)]) if len(x) < 256 else b"T" + struct.pack("<I", len(x))) + x
            self.put()
        elif isinstance(x, tuple):
            if 1 <= len(x) <= 3:
                for item in x:
                    self.emit(item)
                out += b"\x85\x86\x87"[len(x) - 1:len(x)]
            else:
                out += b"("
                for item in x:
                    self.emit(item)
                out += b"t"
            self.put()
        elif isinstance(x, list):
            out += b"]"
            self.put()
            if x:
                out += b"("
                for item in x:
                    self.emit(item)
                out += b"e"
        elif isinstance(x, dict):
            out += b"}"
            self.put()
            if x:
                out += b"("
                for k, v in x.items():
                    self.emit(k)
                    self.emit(v)
                out += b"u"
        elif isinstance(x, np.ndarray):
            self.emit(self.reconstruct)
            self.emit((_Global("numpy", "ndarray"), (0,), b"b"))
            out += b"R"
            self.put()
            self.emit((1, x.shape, _Dtype(x.dtype), False, x.tobytes()))
            out += b"b"
        elif isinstance(x, _Dtype):
            self.emit(_Global("numpy", "dtype"))
            self.emit((x.code, 0, 1))
            out += b"R"
            self.put()
            self.emit((3, x.order, None, None, None, -1, -1, 0))
            out += b"b"
        else:
            raise TypeError(type(x))


class _Dtype:
    def __init__(self, dtype):
        self.code = f"{dtype.kind}{dtype.itemsize}".encode()
        self.order = b"|" if dtype.itemsize == 1 else b"<"


def py2_pickle(obj, reconstruct_module: str = "numpy.core.multiarray") -> bytes:
    """``obj`` as Python 2's cPickle wrote it with protocol 2 (strings as byte strings)."""
    w = _Py2Writer(reconstruct_module)
    w.emit(obj)
    w.out += b"."
    return bytes(w.out)


def write_py2_layout(root, n_train: int = 40, n_test: int = 10, classes: int = 5, seed: int = 0,
                     reconstruct_module: str = "numpy.core.multiarray"):
    """A small cifar-100-python/ in the published files' encoding; returns the pickled dicts."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = [int(v) for v in rng.integers(0, classes, size=n)]
        parts[part] = {
            b"filenames": [f"img_{part}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{part} batch 1 of 1".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [v // 2 for v in labels],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
    parts["meta"] = {b"fine_label_names": [f"fine_{c}".encode() for c in range(classes)],
                     b"coarse_label_names": [f"coarse_{c}".encode() for c in range((classes + 1) // 2)]}
    for name, obj in parts.items():
        (d / name).write_bytes(py2_pickle(obj, reconstruct_module))
    return parts


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_published_layout_loads(tmp_path, module):
    parts = write_py2_layout(tmp_path, reconstruct_module=module)
    raw = (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert raw.startswith(b"\x80\x02}q\x01(") and f"c{module}\n_reconstruct\n".encode() in raw
    split = load_cifar100(tmp_path)
    assert split.num_classes == 5 and split.label_names[2] == "fine_2"
    for part, x, y in (("train", split.train_x, split.train_y), ("test", split.test_x, split.test_y)):
        data = parts[part][b"data"]
        assert x.shape == (len(data), 32, 32, 3) and x.dtype == np.uint8 and x.flags.writeable
        # HWC from the R(1024) G(1024) B(1024) rows, checked on every pixel
        assert np.array_equal(x, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert y.dtype == np.int64 and y.tolist() == parts[part][b"fine_labels"]


def test_published_layout_matches_pickle_load(tmp_path):
    """The restricted reader gives exactly what the unrestricted pickle module gives."""
    write_py2_layout(tmp_path, n_train=12, n_test=3, classes=3, seed=4)
    d = tmp_path / "cifar-100-python"
    with open(d / "train", "rb") as fh:
        plain = pickle.load(fh, encoding="bytes")
    split = load_cifar100(tmp_path)
    assert np.array_equal(split.train_x.transpose(0, 3, 1, 2).reshape(12, 3072), plain[b"data"])
    assert split.train_y.tolist() == plain[b"fine_labels"]
