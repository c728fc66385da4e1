"""Linear systems ``M x = b`` read from files: HDF5, PETSc binary and MatrixMarket.

The files are untrusted input (they may sit in a shared directory that others can write):
every loader checks the sizes a file declares against ``max_rows`` *before* it allocates
anything, refuses complex, non-finite, non-square or mismatched data, and reports every
problem as one :class:`InputFileError` line naming the file and the cause. Nothing in a
file is executed or deserialised into objects.

Formats (full description in ``docs/schema/hhl.md``):

* ``hdf5`` (``.h5``, ``.hdf5``): dataset ``b`` (n,) and either a dense dataset ``M`` (n, n)
  or a group ``M`` holding CSR arrays ``data`` (nnz,), ``indices`` (nnz,), ``indptr``
  (n+1,) and ``shape`` (2,); real floating or integer dtypes.
* ``petsc`` (``.petsc``, ``.bin``, ``.dat``): one AIJ ``Mat`` followed by one ``Vec`` as
  written by ``MatView``/``VecView`` on a binary viewer (big-endian, 32-bit indices,
  float64 values). The header integers are read with numpy and the whole file is checked
  against the size they imply; the bytes that passed the checks are then loaded by
  petsc4py from a private copy (so a ``.info`` file beside the input, whose lines PETSc
  would insert into its options database, is never read, and the file cannot change
  between the check and the load).
* ``mtx`` (``.mtx``): the matrix in MatrixMarket format (``coordinate`` or ``array``,
  ``real`` or ``integer``); the right-hand side in a second MatrixMarket file with one
  column (``rhs_path``). The size line is read with ``scipy.io.mminfo`` before the body.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import InputFileError
from hpcqml.io import open_hdf5_read

#: Recognised format names (``auto`` picks one from the file extension).
FORMATS = ("auto", "hdf5", "petsc", "mtx")
EXTENSIONS = {".h5": "hdf5", ".hdf5": "hdf5", ".petsc": "petsc", ".bin": "petsc", ".dat": "petsc", ".mtx": "mtx"}

#: PETSc binary class ids (``MAT_FILE_CLASSID``, ``VEC_FILE_CLASSID``).
PETSC_MAT_CLASSID = 1211216
PETSC_VEC_CLASSID = 1211214
_PETSC_INT = np.dtype(">i4")
_PETSC_REAL = np.dtype(">f8")

#: Bytes per stored entry allowed in a MatrixMarket file (a line "i j value" with room for comments).
MTX_BYTES_PER_ENTRY = 128
MTX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class FileSystem:
    """A linear system read from a file.

    Attributes:
        M: the matrix, CSR float64 (n, n).
        b: the right-hand side, float64 (n,).
        path: the file the matrix came from.
        fmt: the format name (``hdf5``, ``petsc`` or ``mtx``).
        rhs_path: the file ``b`` came from (MatrixMarket) or ``""`` (same file).
    """

    M: sp.csr_matrix
    b: np.ndarray
    path: str
    fmt: str
    rhs_path: str = ""


def detect_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """The format of ``path``: ``fmt`` itself, or from the extension when ``fmt = "auto"``."""
    if fmt not in FORMATS:
        raise InputFileError(f"system file {path}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    found = EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise InputFileError(f"system file {path}: cannot tell the format from the extension "
                             f"(known: {', '.join(sorted(EXTENSIONS))}); set system_format")
    return found


def load_system(path: str | os.PathLike, fmt: str = "auto", rhs_path: str | os.PathLike = "",
                max_rows: int = 4096) -> FileSystem:
    """Read ``M`` and ``b`` from ``path`` (and ``rhs_path`` for MatrixMarket).

    Args:
        path: the system file.
        fmt: ``auto`` (from the extension), ``hdf5``, ``petsc`` or ``mtx``.
        rhs_path: MatrixMarket only: the file holding ``b`` (n x 1); must be empty otherwise.
        max_rows: largest ``n`` accepted; checked against the declared size before reading data.

    Returns:
        The :class:`FileSystem`.

    Raises:
        InputFileError: missing, unreadable, malformed, oversized or non-finite input.
    """
    fmt = detect_format(path, fmt)
    path = _existing(path)
    if fmt == "mtx":
        if not rhs_path:
            raise InputFileError(f"system file {path}: MatrixMarket needs the right-hand side in a "
                                 "second .mtx file (system_rhs_file)")
        rhs = _existing(rhs_path)
        M = _mtx_matrix(path, max_rows)
        M, b = _finish(path, M, _mtx_vector(rhs, M.shape[0]))
        return FileSystem(M=M, b=b, path=str(path), fmt=fmt, rhs_path=str(rhs))
    if rhs_path:
        raise InputFileError(f"system file {path}: system_rhs_file is only used with MatrixMarket; "
                             f"the {fmt} file holds b itself")
    M, b = _hdf5_system(path, max_rows) if fmt == "hdf5" else _petsc_system(path, max_rows)
    return FileSystem(M=M, b=b, path=str(path), fmt=fmt)


# ---------------------------------------------------------------------------------------
# shared checks
def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"system file {p}: not found")
    if not p.is_file():
        raise InputFileError(f"system file {p}: not a regular file")
    return p


def _check_rows(path: Path, rows: int, cols: int, max_rows: int) -> int:
    if rows != cols:
        raise InputFileError(f"system file {path}: M must be square, declared {rows} x {cols}")
    if rows < 1:
        raise InputFileError(f"system file {path}: M declares {rows} rows")
    if rows > max_rows:
        raise InputFileError(f"system file {path}: M declares {rows} rows, above the limit {max_rows} "
                             "(raise [hhl] max_dim)")
    return int(rows)


def _finish(path: Path, M: sp.spmatrix, b: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Common final checks: real, finite, b of length n; returns CSR float64 and float64."""
    M = sp.csr_matrix(M)
    if np.iscomplexobj(M.data) or np.iscomplexobj(b):
        raise InputFileError(f"system file {path}: complex entries are not supported (real systems only)")
    M = sp.csr_matrix(M, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if b.shape[0] != M.shape[0]:
        raise InputFileError(f"system file {path}: b has length {b.shape[0]}, M is {M.shape[0]} x {M.shape[1]}")
    if not (np.all(np.isfinite(M.data)) and np.all(np.isfinite(b))):
        raise InputFileError(f"system file {path}: M or b contains NaN or Inf")
    return M, b


def _real_dtype(path: Path, name: str, dtype: np.dtype) -> None:
    if dtype.kind == "c":
        raise InputFileError(f"system file {path}: {name} is complex; only real systems are supported")
    if dtype.kind not in "fiu":
        raise InputFileError(f"system file {path}: {name} has dtype {dtype}, expected a real number type")


# ---------------------------------------------------------------------------------------
# HDF5
def _hdf5_system(path: Path, max_rows: int) -> tuple[sp.csr_matrix, np.ndarray]:
    import h5py

    fh = open_hdf5_read(path, "system file")
    try:
        with fh:
            if "M" not in fh or "b" not in fh:
                raise InputFileError(f"system file {path}: needs datasets 'M' (or a CSR group 'M') and 'b'")
            M = _hdf5_csr(path, fh["M"], max_rows) if isinstance(fh["M"], h5py.Group) \
                else _hdf5_dense(path, fh["M"], max_rows)
            b = _hdf5_array(path, fh["b"], "b", (M.shape[0],))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputFileError):
            raise
        raise InputFileError(f"system file {path}: damaged HDF5 data ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _finish(path, M, b)


def _hdf5_array(path: Path, obj: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read dataset ``obj`` after checking that it is a real array of exactly ``shape``."""
    import h5py

    if not isinstance(obj, h5py.Dataset):
        raise InputFileError(f"system file {path}: '{name}' is not a dataset")
    _real_dtype(path, name, obj.dtype)
    if obj.shape != shape:
        raise InputFileError(f"system file {path}: '{name}' has shape {obj.shape}, expected {shape}")
    return np.asarray(obj[()])


def _hdf5_dense(path: Path, dset: Any, max_rows: int) -> sp.csr_matrix:
    if len(dset.shape) != 2:
        raise InputFileError(f"system file {path}: 'M' has shape {dset.shape}, expected (n, n)")
    n = _check_rows(path, dset.shape[0], dset.shape[1], max_rows)
    return sp.csr_matrix(_hdf5_array(path, dset, "M", (n, n)))


def _hdf5_csr(path: Path, grp: Any, max_rows: int) -> sp.csr_matrix:
    for key in ("data", "indices", "indptr", "shape"):
        if key not in grp:
            raise InputFileError(f"system file {path}: CSR group 'M' lacks '{key}'")
    shape = _hdf5_array(path, grp["shape"], "M/shape", (2,))
    if shape.dtype.kind not in "iu":
        raise InputFileError(f"system file {path}: 'M/shape' must hold integers")
    n = _check_rows(path, int(shape[0]), int(shape[1]), max_rows)
    nnz = grp["data"].shape[0] if len(grp["data"].shape) == 1 else -1
    if not 0 <= nnz <= n * n:
        raise InputFileError(f"system file {path}: 'M/data' has shape {grp['data'].shape}, "
                             f"expected (nnz,) with nnz <= {n * n}")
    data = _hdf5_array(path, grp["data"], "M/data", (nnz,))
    indices = _index_array(path, grp["indices"], "M/indices", (nnz,))
    indptr = _index_array(path, grp["indptr"], "M/indptr", (n + 1,))
    _check_csr(path, indices, indptr, n, nnz)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def _index_array(path: Path, dset: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _hdf5_array(path, dset, name, shape)
    if arr.dtype.kind not in "iu":
        raise InputFileError(f"system file {path}: '{name}' must hold integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _check_csr(path: Path, indices: np.ndarray, indptr: np.ndarray, n: int, nnz: int) -> None:
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise InputFileError(f"system file {path}: 'M/indptr' must rise from 0 to nnz = {nnz}")
    if nnz and (indices.min() < 0 or indices.max() >= n):
        raise InputFileError(f"system file {path}: 'M/indices' has a column outside 0..{n - 1}")


# ---------------------------------------------------------------------------------------
# PETSc binary
def _petsc_layout(path: Path, raw: bytes, max_rows: int) -> tuple[int, int]:
    """Check the header integers and the file size they imply; returns ``(n, nnz)``."""
    if len(raw) < 4 * _PETSC_INT.itemsize:
        raise InputFileError(f"system file {path}: {len(raw)} bytes, too short for a PETSc Mat header")
    classid, rows, cols, nnz = (int(v) for v in np.frombuffer(raw, dtype=_PETSC_INT, count=4))
    if classid != PETSC_MAT_CLASSID:
        raise InputFileError(f"system file {path}: not a PETSc binary Mat (class id {classid}, "
                             f"expected {PETSC_MAT_CLASSID})")
    n = _check_rows(path, rows, cols, max_rows)
    if nnz < 0:
        raise InputFileError(f"system file {path}: dense PETSc Mat format (nnz = {nnz}) is not supported; "
                             "write the matrix as AIJ")
    if nnz > n * n:
        raise InputFileError(f"system file {path}: header declares {nnz} non-zeros in a {n} x {n} matrix")
    mat_bytes = 4 * _PETSC_INT.itemsize + n * _PETSC_INT.itemsize + nnz * (_PETSC_INT.itemsize + _PETSC_REAL.itemsize)
    expected = mat_bytes + 2 * _PETSC_INT.itemsize + n * _PETSC_REAL.itemsize
    if len(raw) != expected:
        raise InputFileError(f"system file {path}: {len(raw)} bytes, but a {n} x {n} Mat with {nnz} non-zeros "
                             f"followed by a Vec of length {n} takes {expected}")
    vec_id, vec_n = (int(v) for v in np.frombuffer(raw, dtype=_PETSC_INT, count=2, offset=mat_bytes))
    if vec_id != PETSC_VEC_CLASSID or vec_n != n:
        raise InputFileError(f"system file {path}: after the Mat expected a PETSc Vec of length {n} "
                             f"(class id {vec_id}, length {vec_n})")
    lengths = np.frombuffer(raw, dtype=_PETSC_INT, count=n, offset=4 * _PETSC_INT.itemsize).astype(np.int64)
    cols_idx = np.frombuffer(raw, dtype=_PETSC_INT, count=nnz,
                             offset=(4 + n) * _PETSC_INT.itemsize).astype(np.int64)
    if np.any(lengths < 0) or int(lengths.sum()) != nnz:
        raise InputFileError(f"system file {path}: row lengths do not add up to nnz = {nnz}")
    if nnz and (cols_idx.min() < 0 or cols_idx.max() >= n):
        raise InputFileError(f"system file {path}: a column index lies outside 0..{n - 1}")
    return n, nnz


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refusing files larger than ``limit`` before reading them."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise InputFileError(f"system file {path}: {size} bytes, above the {limit} a system of the "
                                 "allowed size can take")
        return fh.read(limit + 1)


def _petsc_system(path: Path, max_rows: int) -> tuple[sp.csr_matrix, np.ndarray]:
    n_max = max_rows
    limit = 24 + 4 * n_max + 12 * n_max * n_max + 8 * n_max
    raw = _read_bounded(path, limit)
    _petsc_layout(path, raw, max_rows)
    with tempfile.TemporaryDirectory(prefix="hpcqml-petsc-") as private:
        copy = Path(private) / "system.bin"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        M, b = _petsc_load(path, copy)
    return _finish(path, M, b)


def _petsc_load(path: Path, copy: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Load one Mat and one Vec from ``copy`` with petsc4py on this process alone."""
    from petsc4py import PETSc

    viewer = mat = vec = None
    try:
        viewer = PETSc.Viewer().createBinary(str(copy), mode="r", comm=PETSc.COMM_SELF)
        mat = PETSc.Mat().create(comm=PETSc.COMM_SELF)
        mat.setType(PETSc.Mat.Type.SEQAIJ)
        mat.load(viewer)
        vec = PETSc.Vec().create(comm=PETSc.COMM_SELF)
        vec.setType(PETSc.Vec.Type.SEQ)
        vec.load(viewer)
        indptr, indices, data = mat.getValuesCSR()
        n = mat.getSize()[0]
        M = sp.csr_matrix((data.copy(), indices.copy(), indptr.copy()), shape=(n, n))
        return M, vec.getArray().copy()
    except PETSc.Error as exc:
        raise InputFileError(f"system file {path}: PETSc could not load it (error {exc.ierr})") from None
    finally:
        for obj in (vec, mat, viewer):
            if obj is not None:
                obj.destroy()


# ---------------------------------------------------------------------------------------
# MatrixMarket
def _mtx_info(path: Path) -> tuple[int, int, int, str, str]:
    """``(rows, cols, entries, layout, field)`` from the header and size line only."""
    from scipy.io import mminfo

    try:
        rows, cols, entries, layout, field, _ = mminfo(str(path))
    except (ValueError, OSError, IndexError, UnicodeDecodeError) as exc:
        raise InputFileError(f"system file {path}: not a MatrixMarket file ({type(exc).__name__})") from None
    if field not in ("real", "integer"):
        raise InputFileError(f"system file {path}: MatrixMarket field {field!r}; only real and integer "
                             "entries are supported")
    return int(rows), int(cols), int(entries), str(layout), str(field)


def _mtx_read(path: Path, rows: int, cols: int, entries: int) -> Any:
    from scipy.io import mmread

    if entries < 0 or entries > rows * cols:
        raise InputFileError(f"system file {path}: declares {entries} entries in a {rows} x {cols} matrix")
    limit = MTX_HEADER_BYTES + MTX_BYTES_PER_ENTRY * max(entries, 1)
    size = path.stat().st_size
    if size > limit:
        raise InputFileError(f"system file {path}: {size} bytes, more than {limit} for {entries} entries")
    try:
        out = mmread(str(path))
    except (ValueError, OSError, IndexError, UnicodeDecodeError, TypeError) as exc:
        raise InputFileError(f"system file {path}: damaged MatrixMarket data ({type(exc).__name__})") from None
    if out.shape != (rows, cols):
        raise InputFileError(f"system file {path}: read a {out.shape} matrix, header declares {rows} x {cols}")
    return out


def _mtx_matrix(path: Path, max_rows: int) -> sp.csr_matrix:
    rows, cols, entries, _, _ = _mtx_info(path)
    _check_rows(path, rows, cols, max_rows)
    return sp.csr_matrix(_mtx_read(path, rows, cols, entries), dtype=np.float64)


def _mtx_vector(path: Path, n: int) -> np.ndarray:
    rows, cols, entries, _, _ = _mtx_info(path)
    if cols != 1 or rows != n:
        raise InputFileError(f"system file {path}: b must be {n} x 1, declared {rows} x {cols}")
    out = _mtx_read(path, rows, cols, entries)
    return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64).reshape(-1)
