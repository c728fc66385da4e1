"""Hostile inputs: CIFAR-100 pickles and model checkpoints that try to run code, lie about
their sizes, are cut short or hold the wrong types.  Each must give a one-line error (exit 2
through the CLI), run nothing, allocate nothing large and leave the results file intact."""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, child_env, mpiexec
from test_data import py2_pickle, write_py2_layout

from hpcqml.data.cifar import MAX_DEPTH, MAX_FILE_BYTES, load_cifar100, scan_pickle
from hpcqml.data.synth import write_synthetic
from hpcqml.errors import InputFileError, UserError
from hpcqml.models import build
from hpcqml.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint

torch.set_num_threads(1)   # the test box has 2 shared cores

HPCQML = REPO / ".venv" / "bin" / "hpcqml"
#: Peak Python/numpy allocation allowed while refusing a small hostile file.
PEAK_BYTES = 32 * 2**20


class Payload:
    """Unpickling this runs ``touch MARKER``: the side effect the tests look for."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


SYSTEM = f"{os.system.__module__}.system"     # how pickle names os.system ("posix.system")


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def refuse_cifar(root: Path, *needles: str) -> str:
    """Load ``root`` expecting an InputFileError; check its line and the allocation peak."""
    tracemalloc.start()
    try:
        with pytest.raises(InputFileError) as err:
            load_cifar100(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"refusing took {peak} bytes"
    return one_line(err.value, *needles)


@pytest.fixture
def good(tmp_path):
    """A valid synthetic cifar-100-python/ (6 classes) to spoil one file of."""
    d = write_synthetic(tmp_path / "set", n_train=30, n_test=6, classes=6, seed=1)
    return tmp_path / "set", d


# ---- code-running pickles --------------------------------------------------------------------

@pytest.mark.parametrize("part", ["meta", "train", "test"])
def test_reduce_payload_is_refused_and_never_runs(good, tmp_path, part):
    root, d = good
    marker = tmp_path / "pwned"
    (d / part).write_bytes(pickle.dumps(Payload(marker), protocol=2))
    refuse_cifar(root, str(d / part), f"refused global '{SYSTEM}'", "nothing was executed")
    assert not marker.exists()


def test_payload_nested_inside_a_valid_dict(good, tmp_path):
    root, d = good
    marker = tmp_path / "pwned"
    with open(d / "train", "rb") as fh:
        obj = pickle.load(fh, encoding="bytes")        # the test's own file: trusted here
    obj[b"coarse_labels"] = [Payload(marker)]
    (d / "train").write_bytes(pickle.dumps(obj, protocol=4))
    refuse_cifar(root, str(d / "train"), SYSTEM)
    assert not marker.exists()


def _stack_global(module: str, name: str, arg: bytes = b"") -> bytes:
    """Protocol-4 pickle: ``module.name(arg)``."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"\x80\x04" + s(module) + s(name) + b"\x93" + b"C" + bytes([len(arg)]) + arg + b"\x85R."


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("os", "system"), ("subprocess", "Popen"),
    ("numpy", "load"), ("numpy", "frombuffer"), ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct_evil"), ("_codecs", "encode"), ("torch", "load"),
])
def test_every_other_global_is_refused(good, module, name):
    root, d = good
    (d / "meta").write_bytes(_stack_global(module, name, b"1"))
    refuse_cifar(root, str(d / "meta"), f"refused global '{module}.{name}'")


def test_refused_name_with_control_characters_stays_on_one_line(good):
    root, d = good
    (d / "meta").write_bytes(_stack_global("os\nx", "sys\rtem"))
    refuse_cifar(root, "refused global")


def test_protocol0_instance_opcode_is_refused_before_lookup(good, tmp_path):
    root, d = good
    marker = tmp_path / "pwned"
    # INST: pushes MARK, an argument, then "i module\nname\n" calls module.name(argument)
    (d / "meta").write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    refuse_cifar(root, str(d / "meta"), "INST")
    assert not marker.exists()


# ---- damaged files -----------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.5, 0.999])
def test_truncated_file(good, fraction):
    root, d = good
    raw = (d / "train").read_bytes()
    (d / "train").write_bytes(raw[: int(len(raw) * fraction)])
    refuse_cifar(root, str(d / "train"), "truncated")


def test_one_byte_short(good):
    root, d = good
    raw = (d / "test").read_bytes()
    (d / "test").write_bytes(raw[:-1])
    refuse_cifar(root, str(d / "test"))


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes(good, seed):
    root, d = good
    rng = np.random.default_rng(seed)
    head = b"\x80\x04" if seed % 2 else b""       # half of them claim to be protocol-4 pickles
    (d / "meta").write_bytes(head + rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    refuse_cifar(root, str(d / "meta"))


def test_oversized_file_is_refused_unread(good):
    root, d = good
    with open(d / "train", "r+b") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)               # sparse: no disk space used
    refuse_cifar(root, str(d / "train"), "refused unread")


def test_fifo_and_device_do_not_hang(good):
    root, d = good
    (d / "train").unlink()
    os.mkfifo(d / "train")
    refuse_cifar(root, str(d / "train"), "not a regular file")
    (d / "train").unlink()
    (d / "train").symlink_to("/dev/zero")
    refuse_cifar(root, str(d / "train"), "not a regular file")


# ---- absurd declared sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("name,raw,needle", [
    # LONG_BINPUT 2^27: CPython's unpickler would zero a 2 GiB memo table
    ("memo", b"\x80\x04N" + b"r" + struct.pack("<I", 2**27) + b".", "memo index"),
    # BINBYTES8 announcing 1 TiB in a 20-byte file
    ("bytes8", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.", "remain"),
    # FRAME announcing 1 TiB
    ("frame", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.", "frame"),
    # three million nested 1-tuples used as a dict key: hashing it overflows the C stack
    ("depth", b"\x80\x02}N" + b"\x85" * 3_000_000 + b"Ns.", f"deeper than {MAX_DEPTH}"),
], ids=["memo", "bytes8", "frame", "depth"])
def test_structural_bombs(good, name, raw, needle):
    root, d = good
    (d / "meta").write_bytes(raw)
    refuse_cifar(root, str(d / "meta"), needle)


def _frag(obj) -> bytes:
    """The opcodes that push ``obj`` (protocol 3: bytes as BINBYTES, no frames)."""
    return pickle.dumps(obj, protocol=3)[2:-1]


def _array_pickle(shape, dtype=b"u1", raw=b"\0" * 16, recon=((0,), b"b"), order=b"|",
                  dtype_state=None, built=True) -> bytes:
    """A dict {b'data': array} whose array header says what the test wants."""
    out = bytearray(b"\x80\x03}(C\x04data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _frag(recon[0]) + _frag(recon[1])
    out += b"\x87R"
    if built:
        dstate = dtype_state if dtype_state is not None else (3, order, None, None, None, -1, -1, 0)
        state_dtype = b"cnumpy\ndtype\n" + _frag((dtype, 0, 1)) + b"R" + _frag(dstate) + b"b"
        out += b"(K\x01" + _frag(shape) + state_dtype + b"\x89" + _frag(raw) + b"tb"
    out += b"u."
    return bytes(out)


@pytest.mark.parametrize("kwargs,needle", [
    ({"shape": (10**12,)}, "needs 1000000000000 bytes"),
    ({"shape": (10**6, 10**6, 10**6)}, "needs"),
    ({"shape": (2**62, 4), "dtype": b"f8"}, "needs"),
    ({"shape": (-16,)}, "shape"),
    ({"shape": (16,), "dtype": b"O8"}, "plain numeric"),
    ({"shape": (16,), "dtype": b"V16"}, "plain numeric"),
    ({"shape": (1,), "dtype": b"u1", "dtype_state": (3, b"|", None, ("a",), {"a": 1}, 16, 1, 0)}, "fields"),
    ({"shape": (16,), "recon": ((10**12,), b"b")}, "_reconstruct"),
    ({"shape": (16,), "built": False}, "never given data"),
])
def test_array_headers_that_lie(good, kwargs, needle):
    root, d = good
    (d / "train").write_bytes(_array_pickle(**kwargs))
    refuse_cifar(root, str(d / "train"), needle)


def test_ndarray_called_directly_does_not_allocate(good):
    root, d = good
    # numpy.ndarray((10**12,)) would reserve a terabyte
    raw = b"\x80\x03cnumpy\nndarray\n" + _frag(((10**12,),)) + b"R."
    (d / "meta").write_bytes(raw)
    refuse_cifar(root, str(d / "meta"), "_reconstruct")


def test_scan_counts_the_published_layout(tmp_path):
    write_py2_layout(tmp_path, n_train=10, n_test=2, classes=2)
    raw = (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert 30 < scan_pickle(raw) < 200


# ---- wrong types ----------------------------------------------------------------------------------

def _rewrite(path: Path, **changes) -> None:
    with open(path, "rb") as fh:
        obj = pickle.load(fh, encoding="bytes")        # the test's own file: trusted here
    obj.update({k.encode(): v for k, v in changes.items()})
    path.write_bytes(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("part,changes,needle", [
    ("train", {"data": [[0] * 3072] * 30}, "b'data' has type list"),
    ("train", {"data": np.zeros((30, 3072), np.float32)}, "dtype float32"),
    ("train", {"data": np.zeros((30, 32, 32, 3), np.uint8)}, "shape (30, 32, 32, 3)"),
    ("train", {"data": np.zeros((0, 3072), np.uint8)}, "N > 0"),
    ("train", {"fine_labels": ["a"] * 30}, "integer labels"),
    ("train", {"fine_labels": [0.5] * 30}, "integer labels"),
    ("train", {"fine_labels": [[0, 1], [2]] + [0] * 28}, "integer labels"),
    ("train", {"fine_labels": [10**40] * 30}, "labels span"),
    ("train", {"fine_labels": [-1] * 30}, "labels span"),
    ("train", {"fine_labels": np.zeros((30, 2), np.int64)}, "shape (30, 2)"),
    ("train", {"fine_labels": 7}, "int"),
    ("meta", {"fine_label_names": [1, 2, 3]}, "list of strings"),
    ("meta", {"fine_label_names": b"abc"}, "list of strings"),
])
def test_wrong_types(good, part, changes, needle):
    root, d = good
    _rewrite(d / part, **changes)
    refuse_cifar(root, str(d / part), needle)


@pytest.mark.parametrize("obj", [None, 3, "text", [1, 2], (b"data",), {b"x" * 10**5: 1}])
def test_not_the_dict_layout(good, obj):
    root, d = good
    (d / "meta").write_bytes(pickle.dumps(obj, protocol=4))
    msg = refuse_cifar(root, str(d / "meta"))
    assert len(msg) < 600


def test_published_encoding_with_bad_labels(tmp_path):
    parts = write_py2_layout(tmp_path, classes=3)
    parts["test"][b"fine_labels"] = [5] * 10
    (tmp_path / "cifar-100-python" / "test").write_bytes(py2_pickle(parts["test"]))
    refuse_cifar(tmp_path, "labels span [5, 5], expected [0, 2]")


# ---- through the command line ------------------------------------------------------------------

def _hostile_dir(base: Path, marker: Path) -> Path:
    d = base / "cifar-100-python"
    d.mkdir(parents=True)
    for part in ("meta", "train", "test"):
        (d / part).write_bytes(pickle.dumps(Payload(marker)))
    return base


def _config(tmp_path: Path, root: Path, stages: str = '["data"]') -> Path:
    cfg = tmp_path / "hostile.toml"
    cfg.write_text(f'[run]\nname = "hostile"\noutput = "{tmp_path / "r.h5"}"\nstages = {stages}\n'
                   f'[data]\nsource = "cifar100"\nroot = "{root}"\n'
                   '[pretrain]\nmodel = "resnet8-w1"\nepochs = 1\nbatch_size = 8\n')
    return cfg


def _hpcqml(*args: str, ranks: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(HPCQML), *args]
    if ranks:
        cmd = [*mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env=child_env())


def _assert_refused(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert len(errors) == 1, proc.stderr
    assert str(path) in errors[0] and f"refused global '{SYSTEM}'" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("ranks", [0, 2])
def test_cli_refuses_the_malicious_directory(tmp_path, ranks):
    marker = tmp_path / "pwned"
    root = _hostile_dir(tmp_path / "evil", marker)
    proc = _hpcqml("run", str(_config(tmp_path, root)), ranks=ranks)
    _assert_refused(proc, root / "cifar-100-python" / "meta")
    assert not marker.exists()


def _groups(path: Path) -> dict[str, dict]:
    """Every complete group's datasets, as arrays."""
    out = {}
    with h5py.File(path, "r") as fh:
        for name, group in fh.items():
            if isinstance(group, h5py.Group) and group.attrs.get("complete"):
                out[name] = {k: v[()] for k, v in group.items() if isinstance(v, h5py.Dataset)}
    return out


def test_failed_stage_leaves_the_results_file_intact(tmp_path):
    """Data swapped for a hostile copy after the data stage ran: the results survive."""
    root = tmp_path / "shared"
    write_py2_layout(root, n_train=24, n_test=6, classes=4)
    cfg = _config(tmp_path, root, stages='["data", "pretrain"]')
    first = _hpcqml("run", str(cfg), "--stages", "data")
    assert first.returncode == 0, first.stderr
    results = tmp_path / "r.h5"
    before = _groups(results)
    assert "data" in before and before["data"]["train_counts"].sum() == 24

    marker = tmp_path / "pwned"
    d = root / "cifar-100-python"
    for part in ("meta", "train", "test"):
        (d / part).write_bytes(pickle.dumps(Payload(marker)))
    second = _hpcqml("run", str(cfg), ranks=2)          # data is done; pretrain reads the data
    _assert_refused(second, d / "meta")
    assert not marker.exists()
    after = _groups(results)
    assert after.keys() == before.keys()
    for name, datasets in before.items():
        assert after[name].keys() == datasets.keys()
        for key, value in datasets.items():
            assert np.array_equal(after[name][key], value), (name, key)
    assert not list(tmp_path.glob(".r.h5.*.tmp"))


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = build("resnet8-w1", 10)
    return save_checkpoint(tmp_path / "c.pt", "resnet8-w1", 10, model, step=3), model


def refuse_ckpt(path: Path, *needles: str) -> str:
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    return one_line(err.value, str(path), *needles)


def test_checkpoint_round_trip_still_works(ckpt):
    path, model = ckpt
    back = load_checkpoint(path)
    assert back.step == 3 and back.num_classes == 10
    for a, b in zip(back.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_checkpoint_truncated(ckpt, fraction):
    path, _ = ckpt
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    refuse_ckpt(path)


@pytest.mark.parametrize("seed", range(3))
def test_checkpoint_random_bytes(tmp_path, seed):
    path = tmp_path / "r.pt"
    head = b"PK\x03\x04" if seed else b""
    path.write_bytes(head + np.random.default_rng(seed).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    refuse_ckpt(path)


@pytest.mark.parametrize("how", ["torch.save", "plain pickle", "inside the dict"])
def test_checkpoint_payload_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(Payload(marker), path)
    elif how == "plain pickle":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    else:
        torch.save({"format": FORMAT, "model_name": "resnet8-w1", "num_classes": 10,
                    "state_dict": {"x": Payload(marker)}, "mask": None, "step": 0, "meta": {}}, path)
    refuse_ckpt(path)
    assert not marker.exists()


def _tamper(path: Path, out: Path, edit) -> Path:
    """Copy the zip checkpoint ``path`` to ``out``, passing each member through ``edit``."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data, compress = edit(info.filename, src.read(info))
            dst.writestr(info.filename, data, compress_type=compress)
    return out


def test_checkpoint_compressed_bomb_is_refused(tmp_path):
    """A 64 kB file whose deflated storage record would expand to 256 MiB."""
    path = tmp_path / "small.pt"
    torch.save({"x": torch.zeros(1)}, path)
    n = 2**26

    def edit(name: str, data: bytes):
        if name.endswith("data.pkl"):
            data = data.replace(b"K\x01t", b"J" + struct.pack("<i", n) + b"t")
            data = data.replace(b"K\x00K\x01\x85", b"K\x00J" + struct.pack("<i", n) + b"\x85")
        if name.endswith("data/0"):
            return bytes(4 * n), zipfile.ZIP_DEFLATED
        return data, zipfile.ZIP_STORED
    bomb = _tamper(path, tmp_path / "bomb.pt", edit)
    assert bomb.stat().st_size < 2**20
    refuse_ckpt(bomb, "compressed")


def test_checkpoint_storage_size_that_lies(ckpt, tmp_path):
    path, _ = ckpt

    def edit(name: str, data: bytes):
        if name.endswith("data.pkl"):   # the first storage announces 10^12 elements
            at = data.index(b"cpu") + 5
            head, tail = data[:at], data[at:]
            assert tail[:1] in (b"K", b"M", b"J")
            size = {b"K": 2, b"M": 3, b"J": 5}[tail[:1]]
            data = head + b"\x8a\x05" + (10**12).to_bytes(5, "little") + tail[size:]
        return data, zipfile.ZIP_STORED
    refuse_ckpt(_tamper(path, tmp_path / "lies.pt", edit))


def _save_raw(path: Path, **fields) -> Path:
    torch.manual_seed(0)
    obj = {"format": FORMAT, "model_name": "resnet8-w1", "num_classes": 10,
           "state_dict": build("resnet8-w1", 10).state_dict(), "mask": None, "step": 0, "meta": {}}
    obj.update(fields)
    for key in [k for k, v in fields.items() if v is _DROP]:
        del obj[key]
    torch.save(obj, path)
    return path


_DROP = object()


@pytest.mark.parametrize("fields,needle", [
    ({"format": "something-else"}, FORMAT),
    ({"model_name": _DROP}, "model_name"),
    ({"state_dict": _DROP}, "state_dict"),
    ({"state_dict": [1, 2]}, "state_dict"),
    ({"state_dict": {"conv1.weight": "text"}}, "state_dict"),
    ({"model_name": 7}, "model_name"),
    ({"model_name": "resnet8-w1; rm -rf /"}, "model name"),
    ({"num_classes": "10"}, "num_classes"),
    ({"num_classes": 10**9}, "does not fit"),
    ({"model_name": "resnet600000002-w1"}, "does not fit"),
    ({"model_name": "resnet8-w1000000"}, "does not fit"),
    ({"step": "3"}, "step"),
    ({"mask": [1]}, "mask"),
    ({"mask": {"nope.weight": torch.ones(3, dtype=torch.bool)}}, "mask"),
])
def test_checkpoint_wrong_types(tmp_path, fields, needle):
    path = _save_raw(tmp_path / "w.pt", **fields)
    refuse_ckpt(path, needle)


def test_checkpoint_state_dict_of_another_shape(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "c.pt", "resnet8-w1", 10, build("resnet8-w1", 7))
    refuse_ckpt(path, "does not fit")


# ---- environment ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["4; touch pwned", "-2", "0", "1e3", "$(id)", "\x7f"])
def test_thread_variables_that_are_not_counts_are_skipped(value):
    from hpcqml.parallel import world
    from hpcqml.runner import choose_threads

    env = {"OMP_NUM_THREADS": value, "SLURM_CPUS_PER_TASK": value}
    threads, source = choose_threads(world(), 0, env)
    assert source == "affinity mask / ranks on the node" and threads >= 1


# --- writes in directories other users can write: no symlink redirects a write ----------------

def test_symlink_at_the_final_path_is_replaced_not_followed(tmp_path):
    """A link planted where a checkpoint goes: the link is replaced, its target untouched."""
    from hpcqml.io import atomic_write_bytes

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    target = tmp_path / "shared" / "pretrained.pt"
    target.parent.mkdir()
    target.symlink_to(victim)
    atomic_write_bytes(target, b"new content")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"new content"


def test_a_planted_temporary_name_does_not_redirect_the_write(tmp_path, monkeypatch):
    """Every temporary name the writer could pick is a link to the victim beforehand (the
    first choices of mkstemp, replayed): the write goes to a new file, the victim is untouched."""
    import tempfile

    from hpcqml.io import atomic_write_bytes

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    names = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    (tmp_path / ".out.bin.aaaaaaaa.tmp").symlink_to(victim)
    atomic_write_bytes(tmp_path / "out.bin", b"payload")
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "out.bin").read_bytes() == b"payload"
    assert (tmp_path / ".out.bin.aaaaaaaa.tmp").is_symlink()        # the plant is left, never written through


def test_temporary_swapped_for_a_link_mid_write_is_not_renamed(tmp_path):
    """Another user swaps the temporary file for a link while it is written: refused, the
    target keeps its old content and nothing is written through the link."""
    from hpcqml.io import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    target = tmp_path / "results.h5"
    target.write_bytes(b"old")

    def write(fh):
        fh.write(b"new")
        name = next(tmp_path.glob(".results.h5.*.tmp"))
        name.unlink()
        name.symlink_to(victim)

    with pytest.raises(OSError, match="was replaced by another process"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and victim.read_bytes() == b"precious"
    assert not list(tmp_path.glob(".results.h5.*.tmp"))


def test_results_file_and_checkpoint_keep_the_umask_mode(tmp_path):
    """Files are written through the descriptor with 0666 less the umask (not mkstemp's 0600)."""
    from hpcqml.io import atomic_write_bytes

    old = os.umask(0o027)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
        ck = tmp_path / "m.pt"
        save_checkpoint(ck, "resnet8-w1", 3, build("resnet8-w1", 3))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert ck.stat().st_mode & 0o777 == 0o640
    assert load_checkpoint(ck).num_classes == 3


def test_job_script_is_executable_as_the_umask_allows_and_never_follows_a_link(tmp_path):
    from hpcqml.jobs import _write

    victim = tmp_path / "victim.sh"
    victim.write_text("echo mine\n")
    script = tmp_path / "job.sbatch"
    script.symlink_to(victim)
    old = os.umask(0o077)
    try:
        _write(script, "#!/bin/bash\necho job\n")
    finally:
        os.umask(old)
    assert victim.read_text() == "echo mine\n"
    assert not script.is_symlink() and script.stat().st_mode & 0o777 == 0o700


def test_oversized_synthetic_origin_record_is_a_one_line_error(tmp_path):
    from conftest import run_cli

    root = tmp_path / "data"
    write_synthetic(root, 20, 10, 2, 0, 1.0)
    (root / "hpcqml-data.json").write_bytes(b"{" + b" " * (1 << 20) + b"}")
    (tmp_path / "c.toml").write_text(
        f'[run]\noutput = "{tmp_path / "r.h5"}"\nstages = ["data"]\n'
        f'[data]\nroot = "{root}"\nsynth_train = 20\nsynth_test = 10\nsynth_classes = 2\n')
    proc = run_cli("run", str(tmp_path / "c.toml"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-1500:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcqml: error")]
    assert len(errors) == 1 and "hpcqml-data.json" in errors[0] and "more than the 65,536" in errors[0], \
        proc.stderr


@pytest.mark.parametrize("content, expected", [(b"TERM\n", "SIGTERM"), (b"TERM" + b" " * 100, None)])
def test_stop_note_is_read_with_a_limit(tmp_path, content, expected):
    import signal

    from hpcqml.training.signals import effective_signal

    note = tmp_path / "note"
    note.write_bytes(content)
    got = effective_signal(signal.SIGUSR1, {"HPCQML_STOP_NOTE": str(note)})
    assert got == (signal.SIGTERM if expected else signal.SIGUSR1)


def test_stop_note_that_is_a_fifo_does_not_hang(tmp_path):
    import signal

    from hpcqml.training.signals import effective_signal

    fifo = tmp_path / "note"
    os.mkfifo(fifo)
    assert effective_signal(signal.SIGUSR1, {"HPCQML_STOP_NOTE": str(fifo)}) == signal.SIGUSR1
