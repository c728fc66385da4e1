"""CIFAR-100 pickle loader (errors on files the test corrupts), synthetic set, batches."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

torch.set_num_threads(1)   # the test box has 2 shared cores

from hpcqml.data.batches import (augment, augment_params, batch_indices, epoch_batches, shard,
                                 shard_bounds, to_tensor)
from hpcqml.data.cifar import CIFAR100_MEAN, CIFAR100_STD, load_cifar100
from hpcqml.data.synth import add_arguments, cli_synth, write_synthetic
from hpcqml.errors import UserError


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
    import argparse as ap  # noqa: PLC0415
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
    assert shard_bounds(n, size - 1, size)[1] == n


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
