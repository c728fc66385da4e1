"""Load CIFAR-100 from local files in the authors' python-pickle layout (no download code).

Layout (``cifar-100-python/``): ``train`` and ``test`` are pickled dicts with
``b'data'`` (uint8, N x 3072, each row the 1024 red, then green, then blue pixels of a
32x32 image in row-major order), ``b'fine_labels'`` and ``b'coarse_labels'`` (lists of
ints); ``meta`` holds ``b'fine_label_names'`` and ``b'coarse_label_names'``.

The files are untrusted input (they often sit in shared directories), so they are never
handed to :func:`pickle.load`.  Each file is read whole after a size check, scanned opcode
by opcode (declared lengths, memo indices, opcode count and nesting depth are bounded before
any object exists) and then unpickled by :class:`CifarUnpickler`, which resolves no global
except numpy's array and dtype reconstructors, and even those only to inert stand-ins that
rebuild an array from validated bytes.  Nothing in a file can call a function.

Every defect (missing directory or file, oversized, truncated, foreign or hostile pickle,
wrong keys, shapes or label range) raises :class:`~hpcqml.errors.InputFileError` with a
one-line message naming the path and what was expected.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcqml.errors import InputFileError

SUBDIR = "cifar-100-python"
FILES = ("train", "test", "meta")
IMAGE_SHAPE = (32, 32, 3)
ROW_LEN = 32 * 32 * 3

#: Per-channel mean and standard deviation of the CIFAR-100 training images (RGB, in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

#: Largest file accepted (bytes); the real ``train`` file is about 160 MB.
MAX_FILE_BYTES = 512 * 2**20
#: Most pickle opcodes scanned in one file (a 50,000-image ``train`` file has about 2e5).
MAX_OPCODES = 2**22
#: Deepest container nesting accepted (both encodings of the layout reach 6: dict > array >
#: array state > dtype > dtype state, counting the calls that build them).
MAX_DEPTH = 16
#: Most dimensions of a pickled array.
MAX_NDIM = 8

#: Opcodes that build instances, call extension registries or take out-of-band data: the
#: layout never contains them, so the scan refuses them outright.
_FORBIDDEN_OPS = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4",
                            "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"})
#: Opcodes that add items to (or set the state of) the object below them on the stack.
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})

#: Modules whose ``_reconstruct`` numpy names in array pickles (numpy 1.x and 2.x).
_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
#: Plain numeric dtype codes an array may have (optional byte-order prefix).
_DTYPE_CODE = re.compile(r"[<>|=]?(b1|u1|i1|u2|i2|u4|i4|u8|i8|f2|f4|f8)")

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


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


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the CIFAR-100 layout; ``name`` is ``module.name``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


class _Inert:
    """Base of every object the unpickler hands out: no ``__dict__``, state cannot be set."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"state applied to {type(self).__name__}")


class _NdarrayToken(_Inert):
    """Stands for ``numpy.ndarray``; only :class:`_Reconstruct` accepts it, calling it fails."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002 - any call is refused
        raise pickle.UnpicklingError("numpy.ndarray may only be passed to _reconstruct")


class _DtypeStub(_Inert):
    """A validated plain numeric dtype; ``__setstate__`` accepts only a byte order."""

    __slots__ = ("built", "dtype")

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.built = False

    def __setstate__(self, state: Any) -> None:
        if self.built or not isinstance(state, tuple) or len(state) not in (8, 9):
            raise pickle.UnpicklingError("dtype state is not a version 3/4 tuple")
        if any(part is not None for part in state[2:5]):
            raise pickle.UnpicklingError("dtype with sub-arrays or fields")
        order = _text(state[1])
        if order not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"dtype byte order {_short.repr(state[1])}")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder("<" if order == "<" else ">")
        self.built = True


class _DtypeFactory(_Inert):
    """Stands for ``numpy.dtype``: builds a :class:`_DtypeStub` for a plain numeric code."""

    __slots__ = ()

    def __call__(self, code: Any, align: Any = 0, copy: Any = 1) -> _DtypeStub:  # noqa: ARG002 - numpy.dtype's signature
        text = _text(code)
        if text is None or not _DTYPE_CODE.fullmatch(text):
            raise pickle.UnpicklingError(f"dtype {_short.repr(code)} is not a plain numeric type")
        return _DtypeStub(np.dtype(text))


class _ArrayStub(_Inert):
    """An array announced by ``_reconstruct``; ``__setstate__`` rebuilds it from raw bytes.

    The shape is checked against the byte count in Python integers before numpy sees it,
    so a header announcing 10^12 entries fails without allocating anything.
    """

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("array state is not a (version, shape, dtype, fortran, data) tuple")
        if len(state) == 5:
            if state[0] != 1:
                raise pickle.UnpicklingError(f"array state version {_short.repr(state[0])}")
            state = state[1:]
        shape, dt, fortran, raw = state
        if not isinstance(dt, _DtypeStub) or not dt.built:
            raise pickle.UnpicklingError("array dtype is not a numpy dtype")
        if not (isinstance(shape, tuple) and len(shape) <= MAX_NDIM
                and all(type(s) is int and s >= 0 for s in shape)):
            raise pickle.UnpicklingError(f"array shape {_short.repr(shape)}")
        if not isinstance(raw, bytes) or not isinstance(fortran, (bool, int)):
            raise pickle.UnpicklingError("array data is not raw bytes")
        count = 1
        for s in shape:
            count *= s
        if count * dt.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"array shape {shape} of {dt.dtype} needs "
                                         f"{count * dt.dtype.itemsize} bytes, the file holds {len(raw)}")
        flat = np.frombuffer(raw, dtype=dt.dtype, count=count)
        self.array = flat.reshape(shape, order="F" if fortran else "C")


class _Reconstruct(_Inert):
    """Stands for numpy's ``_reconstruct``: returns an empty :class:`_ArrayStub`."""

    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
        if not isinstance(subtype, _NdarrayToken) or shape != (0,) or _text(typecode) != "b":
            raise pickle.UnpicklingError("_reconstruct called with arguments numpy never writes")
        return _ArrayStub()


class CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-100 python layout: numpy arrays and plain data, nothing else.

    ``find_class`` admits ``numpy.ndarray``, ``numpy.dtype`` and numpy's ``_reconstruct``
    (under its numpy 1.x and 2.x module names) and returns inert stand-ins for them; every
    other global raises :class:`RefusedGlobal` before anything is imported or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name == "ndarray":
            return _NdarrayToken()
        if module == "numpy" and name == "dtype":
            return _DtypeFactory()
        if module in _RECONSTRUCT_MODULES and name == "_reconstruct":
            return _Reconstruct()
        raise RefusedGlobal(f"{_printable(module)}.{_printable(name)}")


def _text(value: Any) -> str | None:
    """``value`` as text if it is a short ASCII str or bytes (Python 2 strings load as bytes)."""
    if isinstance(value, bytes) and len(value) <= 64:
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None


def _printable(name: Any) -> str:
    """A global's name for a one-line message (control characters escaped, long names cut)."""
    text = str(name)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if text.isprintable() else repr(text)


def _show(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _read_bounded(path: Path) -> bytes:
    """The bytes of regular file ``path``, refusing anything larger than MAX_FILE_BYTES."""
    if not path.exists():
        raise InputFileError(f"CIFAR-100 file {_show(path)}: missing (expected the python-pickle "
                             f"file '{path.name}')")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputFileError(f"CIFAR-100 file {_show(path)}: cannot open ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked on the descriptor, before Python wraps it
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise InputFileError(f"CIFAR-100 file {_show(path)}: {kind}, expected the python-pickle "
                             f"file '{path.name}'")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > MAX_FILE_BYTES:
            raise InputFileError(f"CIFAR-100 file {_show(path)}: {info.st_size} bytes, more than the "
                                 f"{MAX_FILE_BYTES} a CIFAR-100 part can hold; refused unread")
        raw = fh.read(info.st_size + 1)        # a buffer of the size fstat gave, no larger
    if len(raw) != info.st_size:
        raise InputFileError(f"CIFAR-100 file {_show(path)}: changed size while being read; refused")
    return raw


def _pop(stack: list[int | None], count: int) -> list[int]:
    if count > len(stack) or any(d is None for d in stack[len(stack) - count:]):
        raise ValueError("stack underflow")
    popped = stack[len(stack) - count:]
    del stack[len(stack) - count:]
    return popped  # type: ignore[return-value]


def _pop_to_mark(stack: list[int | None]) -> list[int]:
    for k in range(len(stack) - 1, -1, -1):
        if stack[k] is None:
            sliced = stack[k + 1:]
            del stack[k:]
            return sliced  # type: ignore[return-value]
    raise ValueError("no mark on the stack")


def scan_pickle(raw: bytes) -> int:
    """Check a pickle's structure before any object is built; return its opcode count.

    Declared lengths must fit in the file, memo indices must be dense, the opcode count is
    at most MAX_OPCODES and containers nest at most MAX_DEPTH deep (tracked by simulating
    the unpickler's stack with nesting depths in place of objects).

    Raises:
        ValueError: the first violation, in one line.
    """
    stack: list[int | None] = []          # nesting depth of each entry; None marks a MARK
    memo: dict[int, int] = {}
    count = 0
    for op, arg, pos in pickletools.genops(io.BytesIO(raw)):
        count += 1
        if count > MAX_OPCODES:
            raise ValueError(f"more than {MAX_OPCODES} opcodes")
        name = op.name
        if name in _FORBIDDEN_OPS:
            raise ValueError(f"opcode {name} at byte {pos} is not allowed in this layout")
        if name == "FRAME" and int(arg or 0) > len(raw) - int(pos or 0) - 9:
            raise ValueError(f"frame at byte {pos} announces {arg} bytes past the end of the file")
        if name == "MARK":
            stack.append(None)
            continue
        if name in _MEMO_PUTS or name == "MEMOIZE":
            index = len(memo) if name == "MEMOIZE" else int(arg or 0)
            if index > len(memo) + 1 or not stack or stack[-1] is None:
                raise ValueError(f"memo index {index} at byte {pos} out of sequence")
            memo[index] = stack[-1]
            continue
        if name in _MEMO_GETS:
            if arg not in memo:
                raise ValueError(f"memo index {arg} at byte {pos} was never stored")
            stack.append(memo[arg])
            continue
        before = [s.name for s in op.stack_before]
        if "mark" in before:
            items = _pop_to_mark(stack)
            below = _pop(stack, before.index("mark"))
        else:
            items, below = _pop(stack, len(before)), []
        if name == "DUP":
            stack.extend(items * 2)
            continue
        if name in _MUTATORS:
            holder, *items = below + items
            depth = max(holder, 1 + max(items, default=0))
        else:
            depth = 1 + max(items, default=-1)
        if depth > MAX_DEPTH:
            raise ValueError(f"containers nest deeper than {MAX_DEPTH} at byte {pos}")
        stack.extend([depth] * len(op.stack_after))
    return count


def _resolve(value: Any) -> Any:
    """Replace a rebuilt array stand-in by its array; leave anything else as it is."""
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise pickle.UnpicklingError("array announced but never given data")
        return value.array
    return value


def _unpickle(path: Path) -> dict:
    """Read ``path`` with the size check, structural scan and restricted unpickler."""
    raw = _read_bounded(path)
    try:
        scan_pickle(raw)
        obj = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedGlobal as exc:
        raise InputFileError(f"CIFAR-100 file {_show(path)}: refused global '{exc.name}' (a CIFAR-100 "
                             f"pickle holds only numpy arrays, lists, bytes and ints); nothing was "
                             f"executed") from None
    except Exception as exc:  # noqa: BLE001 - every failure to parse an untrusted file is bad input
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputFileError(f"CIFAR-100 file {_show(path)}: not a readable python pickle ({reason}); "
                             f"truncated or wrong format") from None
    if not isinstance(obj, dict):
        raise InputFileError(f"CIFAR-100 file {_show(path)}: expected a pickled dict, got {type(obj).__name__}")
    try:
        return {key: _resolve(value) for key, value in obj.items()}
    except pickle.UnpicklingError as exc:
        raise InputFileError(f"CIFAR-100 file {_show(path)}: {exc}") from None


def _get(obj: dict, key: bytes, path: Path) -> Any:
    if key in obj:
        return obj[key]
    skey = key.decode()
    if skey in obj:
        return obj[skey]
    found = sorted(_short.repr(k) for k in list(obj)[:20])[:6]
    raise InputFileError(f"CIFAR-100 file {_show(path)}: key {key!r} missing (found {', '.join(found) or 'none'})")


def _images(value: Any, path: Path) -> np.ndarray:
    """``b'data'`` as a uint8 (N, 3072) array with N > 0."""
    if (not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 2
            or value.shape[1] != ROW_LEN or value.shape[0] == 0):
        desc = (f"dtype {value.dtype} shape {value.shape}" if isinstance(value, np.ndarray)
                else f"type {type(value).__name__}")
        raise InputFileError(f"CIFAR-100 file {_show(path)}: b'data' has {desc}, "
                             f"expected uint8 of shape (N, {ROW_LEN}) with N > 0")
    return value


def _labels(value: Any, count: int, num_classes: int, path: Path) -> np.ndarray:
    """``b'fine_labels'`` as int64, one per image, each in [0, num_classes)."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
        labels = value.astype(np.int64)
    elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        if value and (min(value) < -(2**62) or max(value) > 2**62):
            raise InputFileError(f"CIFAR-100 file {_show(path)}: labels span [{min(value)}, {max(value)}], "
                                 f"expected [0, {num_classes - 1}] from meta")
        labels = np.asarray(value, dtype=np.int64)
    else:
        labels = None
    if labels is None or labels.shape[0] != count:
        got = (f"shape {value.shape}" if isinstance(value, np.ndarray) else
               f"{len(value)} entries" if isinstance(value, (list, tuple)) else type(value).__name__)
        raise InputFileError(f"CIFAR-100 file {_show(path)}: b'fine_labels' has {got}, "
                             f"expected {count} integer labels (one per image)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputFileError(f"CIFAR-100 file {_show(path)}: labels span [{labels.min()}, {labels.max()}], "
                             f"expected [0, {num_classes - 1}] from meta")
    return labels


def _load_part(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path)
    data = _images(_get(obj, b"data", path), path)
    labels = _labels(_get(obj, b"fine_labels", path), data.shape[0], num_classes, path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _label_names(meta: dict, path: Path) -> list[str]:
    names = _get(meta, b"fine_label_names", path)
    if (not isinstance(names, (list, tuple)) or len(names) == 0
            or not all(isinstance(n, (bytes, str)) for n in names)):
        raise InputFileError(f"CIFAR-100 file {_show(path)}: b'fine_label_names' must be a non-empty "
                             f"list of strings")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def resolve_dir(root: str | Path) -> Path:
    """Return the ``cifar-100-python`` directory given it or its parent."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(f"CIFAR-100 directory {_show(root)}: not found (expected a directory "
                             f"holding {SUBDIR}/ with files {', '.join(FILES)})")
    if (root / SUBDIR).is_dir():
        return root / SUBDIR
    if all((root / f).exists() for f in FILES):
        return root
    raise InputFileError(f"CIFAR-100 directory {_show(root)}: no {SUBDIR}/ subdirectory (expected "
                         f"{SUBDIR}/{{{','.join(FILES)}}} in the python-pickle layout)")


def load_cifar100(root: str | Path) -> CifarSplit:
    """Load ``train``, ``test`` and ``meta`` from ``root`` (or ``root/cifar-100-python``).

    Args:
        root: the ``cifar-100-python`` directory or its parent.

    Returns:
        The images and fine labels of both parts with the class names from ``meta``.

    Raises:
        InputFileError: a missing, oversized, damaged, hostile or malformed file.
    """
    d = resolve_dir(root)
    meta_path = d / "meta"
    label_names = _label_names(_unpickle(meta_path), meta_path)
    train_x, train_y = _load_part(d / "train", len(label_names))
    test_x, test_y = _load_part(d / "test", len(label_names))
    return CifarSplit(train_x, train_y, test_x, test_y, len(label_names), label_names, d)
