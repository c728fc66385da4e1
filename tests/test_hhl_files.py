"""Linear systems from files (hpcqml.hhl.systems): the three formats agree, hostile files are refused
before anything large is allocated, and the hhl stage runs HHL on them through the CLI."""
import os
import resource

import h5py
import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
from conftest import run_cli

from hpcqml.errors import InputFileError
from hpcqml.hhl.systems import (
    PETSC_MAT_CLASSID,
    PETSC_VEC_CLASSID,
    detect_format,
    load_system,
)


def _system(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    M = np.eye(n) + 0.3 * rng.standard_normal((n, n))
    M[0, n - 1] = 0.0  # one structural zero, so CSR and dense differ
    return M, rng.standard_normal(n)


def write_hdf5(path, M, b, csr: bool = False) -> None:
    with h5py.File(path, "w") as fh:
        if csr:
            A = sp.csr_matrix(M)
            g = fh.create_group("M")
            g["data"], g["indices"], g["indptr"] = A.data, A.indices, A.indptr
            g["shape"] = np.array(A.shape, dtype=np.int64)
        else:
            fh["M"] = M
        fh["b"] = b


def write_petsc(path, M, b) -> None:
    """MatView + VecView through petsc4py's binary viewer (writes PATH and PATH.info)."""
    from petsc4py import PETSc

    A = sp.csr_matrix(M)
    mat = PETSc.Mat().createAIJ(A.shape, csr=(A.indptr.astype(PETSc.IntType), A.indices.astype(PETSc.IntType),
                                              A.data), comm=PETSc.COMM_SELF)
    mat.assemble()
    vec = PETSc.Vec().createWithArray(np.array(b, dtype=np.float64), comm=PETSc.COMM_SELF)
    viewer = PETSc.Viewer().createBinary(str(path), mode="w", comm=PETSc.COMM_SELF)
    try:
        mat.view(viewer)
        vec.view(viewer)
    finally:
        for obj in (viewer, vec, mat):
            obj.destroy()


def write_mtx(path, rhs, M, b) -> None:
    sio.mmwrite(str(path), sp.coo_matrix(M), precision=17)
    sio.mmwrite(str(rhs), np.asarray(b).reshape(-1, 1), precision=17)


@pytest.fixture
def files(tmp_path):
    M, b = _system()
    out = {"M": M, "b": b}
    write_hdf5(tmp_path / "dense.h5", M, b)
    write_hdf5(tmp_path / "csr.hdf5", M, b, csr=True)
    write_petsc(tmp_path / "sys.petsc", M, b)
    write_mtx(tmp_path / "sys.mtx", tmp_path / "b.mtx", M, b)
    out.update({k: tmp_path / k for k in ("dense.h5", "csr.hdf5", "sys.petsc", "sys.mtx", "b.mtx")})
    return out


def test_three_formats_read_the_same_system(files):
    M, b = files["M"], files["b"]
    for name, fmt, rhs in (("dense.h5", "hdf5", ""), ("csr.hdf5", "hdf5", ""), ("sys.petsc", "petsc", ""),
                           ("sys.mtx", "mtx", files["b.mtx"])):
        got = load_system(files[name], rhs_path=rhs)
        assert got.fmt == fmt and got.M.dtype == np.float64 and got.b.dtype == np.float64
        assert np.array_equal(got.M.toarray(), M) and np.array_equal(got.b, b), name
    assert detect_format("x.PETSC") == "petsc" and detect_format("x.bin", "hdf5") == "hdf5"
    with pytest.raises(InputFileError, match="extension"):
        detect_format("system.txt")


def _refused(path, match, **kw):
    with pytest.raises(InputFileError, match=match) as err:
        load_system(path, **kw)
    named = [str(path)] + ([str(kw["rhs_path"])] if kw.get("rhs_path") else [])
    assert "\n" not in str(err.value) and any(p in str(err.value) for p in named)


def test_missing_and_random_files_are_refused(tmp_path, files):
    for ext in (".h5", ".petsc", ".mtx"):
        rhs = files["b.mtx"] if ext == ".mtx" else ""
        _refused(tmp_path / f"nope{ext}", "not found", rhs_path=rhs)
        junk = tmp_path / f"junk{ext}"
        junk.write_bytes(np.random.default_rng(1).bytes(4096))
        _refused(junk, "not a readable HDF5|not a PETSc binary Mat|not a MatrixMarket", rhs_path=rhs)
    _refused(tmp_path, "not a regular file", fmt="hdf5")
    _refused(files["sys.mtx"], "second .mtx")  # MatrixMarket without a right-hand side
    _refused(files["dense.h5"], "only used with MatrixMarket", rhs_path=files["b.mtx"])


def test_truncated_files_are_refused(tmp_path, files):
    for name in ("dense.h5", "sys.petsc", "sys.mtx"):
        raw = files[name].read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(raw[: len(raw) * 2 // 3])
        _refused(cut, "not a readable HDF5|damaged|bytes, but|MatrixMarket",
                 rhs_path=files["b.mtx"] if name.endswith(".mtx") else "")


def test_hdf5_wrong_types_and_shapes(tmp_path):
    M, b = _system()
    cases = {
        "nonsquare": ({"M": np.ones((3, 4)), "b": np.ones(3)}, "square"),
        "short_b": ({"M": M, "b": b[:-1]}, r"'b' has shape \(4,\), expected \(5,\)"),
        "complex": ({"M": M.astype(np.complex128), "b": b}, "complex"),
        "strings": ({"M": np.array([b"ab", b"cd"]), "b": b}, "expected .n, n.|real number type"),
        "nan": ({"M": np.where(np.eye(5) > 0, np.nan, M), "b": b}, "NaN or Inf"),
        "no_b": ({"M": M}, "needs datasets"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as fh:
            for key, val in data.items():
                fh[key] = val
        _refused(path, match)
    bad_csr = tmp_path / "csr.h5"
    with h5py.File(bad_csr, "w") as fh:
        g = fh.create_group("M")
        g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 9]), np.array([0, 1, 2])
        g["shape"] = np.array([2, 2])
        fh["b"] = np.ones(2)
    _refused(bad_csr, "column outside")


def test_absurd_declared_sizes_are_refused_before_allocation(tmp_path):
    """Headers announcing 10^12 rows: refused from the header alone (the address space is capped
    at 2 GiB in a child process, so an attempt to allocate would fail loudly instead)."""
    huge = 10**12
    h5 = tmp_path / "huge.h5"
    with h5py.File(h5, "w") as fh:
        fh.create_dataset("M", shape=(huge, huge), dtype=np.float64, chunks=(1, 1))
        fh["b"] = np.ones(1)
    petsc = tmp_path / "huge.petsc"
    petsc.write_bytes(np.array([PETSC_MAT_CLASSID, 2**31 - 1, 2**31 - 1, 2**31 - 1], dtype=">i4").tobytes()
                      + b"\0" * 64)
    mtx = tmp_path / "huge.mtx"
    mtx.write_text(f"%%MatrixMarket matrix coordinate real general\n{huge} {huge} {huge}\n1 1 1.0\n")
    pid = os.fork()
    if pid == 0:  # child: limited address space; the exit code says what happened (5: an exception)
        code = 5
        try:
            resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
            outcome = 0
            for path in (h5, petsc, mtx):
                try:
                    load_system(path, rhs_path=mtx if path == mtx else "")
                    outcome = 3
                except InputFileError as exc:
                    outcome = outcome if "limit" in str(exc) else 4
            code = outcome
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)


def test_petsc_header_checks(tmp_path, files):
    raw = files["sys.petsc"].read_bytes()
    ints = np.frombuffer(raw[:16], dtype=">i4").copy()
    for label, change, match in (("classid", (0, 42), "not a PETSc binary Mat"),
                                 ("nonsquare", (2, 4), "square"),
                                 ("dense", (3, -1), "dense PETSc"),
                                 ("nnz", (3, 10**6), "non-zeros in a")):
        bad = ints.copy()
        bad[change[0]] = change[1]
        path = tmp_path / f"{label}.petsc"
        path.write_bytes(bad.tobytes() + raw[16:])
        _refused(path, match)
    extra = tmp_path / "extra.petsc"
    extra.write_bytes(raw + b"\0" * 8)
    _refused(extra, "bytes, but")
    wrong_vec = bytearray(raw)
    off = len(raw) - 8 * 5 - 8
    wrong_vec[off:off + 4] = np.array([PETSC_VEC_CLASSID + 1], dtype=">i4").tobytes()
    path = tmp_path / "vec.petsc"
    path.write_bytes(bytes(wrong_vec))
    _refused(path, "expected a PETSc Vec")
    nan = bytearray(raw)
    nan[-8:] = np.array([np.nan], dtype=">f8").tobytes()
    path = tmp_path / "nan.petsc"
    path.write_bytes(bytes(nan))
    _refused(path, "NaN or Inf")


def test_petsc_info_file_beside_the_input_is_never_read(tmp_path, files):
    """PETSc inserts the lines of PATH.info into its options database; the loader reads a private copy."""
    from petsc4py import PETSc

    info = files["sys.petsc"].with_name("sys.petsc.info")
    info.write_text("-hhl_test_injected_option 1\n")
    load_system(files["sys.petsc"])
    assert not PETSc.Options().hasName("hhl_test_injected_option")


def test_mtx_wrong_types_and_shapes(tmp_path, files):
    M, b = files["M"], files["b"]
    cplx = tmp_path / "cplx.mtx"
    sio.mmwrite(str(cplx), sp.coo_matrix(M.astype(np.complex128)))
    _refused(cplx, "field 'complex'", rhs_path=files["b.mtx"])
    rect = tmp_path / "rect.mtx"
    sio.mmwrite(str(rect), sp.coo_matrix(np.ones((3, 4))))
    _refused(rect, "square", rhs_path=files["b.mtx"])
    short = tmp_path / "short_b.mtx"
    sio.mmwrite(str(short), b[:-1].reshape(-1, 1))
    _refused(files["sys.mtx"], "b must be 5 x 1", rhs_path=short)
    nan = tmp_path / "nan.mtx"
    nan.write_text("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 nan\n2 2 1.0\n")
    two = tmp_path / "two.mtx"
    sio.mmwrite(str(two), np.ones((2, 1)))
    _refused(nan, "NaN or Inf", rhs_path=two)
    lying = tmp_path / "lying.mtx"
    lying.write_text("%%MatrixMarket matrix coordinate real general\n2 2 9\n1 1 1.0\n")
    _refused(lying, "declares 9 entries", rhs_path=two)


# ---------------------------------------------------------------------------------------
# through the CLI
CONFIG = """
[run]
output = "{out}"
stages = ["hhl"]
seed = 0
[hhl]
cases = {cases}
n = 2
N = 2
T = 3
clock_qubits = [3, 12]
readout_trials = 20
{extra}
"""


def _run(tmp_path, name, cases, extra="", out=None, ranks=0):
    out = out or tmp_path / f"{name}.h5"
    cfg = tmp_path / f"{name}.toml"
    extra = extra if "kappa_a" in extra else extra + "\nkappa_a = [4.0]"
    cfg.write_text(CONFIG.format(out=out, cases=cases, extra=extra))
    return run_cli("--quiet", "run", str(cfg), ranks=ranks, timeout=600), out


@pytest.mark.timeout(900)
def test_stage_on_files_equals_the_carleman_case_and_numpy(tmp_path):
    """The block system of the random case, written in each format, gives the same fidelities;
    at c = 12 HHL agrees with numpy's solution to 1 - F < 1e-6."""
    res, out = _run(tmp_path, "carleman", '["random"]')
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        g = fh["hhl/random"]
        M_dense = None
        B = g["instance/rhs"][()]
        want = {k: g[f"hhl/{k}"][()] for k in ("fidelity", "p_success", "leakage", "x_norm_estimate")}
        want_trunc = g["truncated/overlap"][()]
    from hpcqml.carleman import generators as gen
    from hpcqml.carleman.reference import block_system, carleman_matrix

    ode = gen.scale_step(gen.random_quadratic(2, 0.7, 0, u_scale=0.1), 0.25)
    M_dense, B2 = block_system(carleman_matrix(ode, 2), ode, 2, 3)
    assert np.array_equal(B2, B)
    M_dense = M_dense.toarray()
    x = np.linalg.solve(M_dense, B)
    write_hdf5(tmp_path / "c.h5", M_dense, B, csr=True)
    write_petsc(tmp_path / "c.petsc", M_dense, B)
    write_mtx(tmp_path / "c.mtx", tmp_path / "cb.mtx", M_dense, B)
    for name, extra in (("h5", f'system_file = "{tmp_path / "c.h5"}"'),
                        ("petsc", f'system_file = "{tmp_path / "c.petsc"}"'),
                        ("mtx", f'system_file = "{tmp_path / "c.mtx"}"\nsystem_rhs_file = "{tmp_path / "cb.mtx"}"')):
        res, out = _run(tmp_path, name, '["file"]', extra=extra, ranks=2 if name == "petsc" else 0)
        assert res.returncode == 0, res.stderr
        with h5py.File(out, "r") as fh:
            g = fh["hhl/file"]
            assert g["instance"].attrs["generator"] == "file"
            assert np.allclose(g["instance/x_ref"][()], x, rtol=1e-10, atol=1e-12)
            for key, val in want.items():
                assert np.allclose(g[f"hhl/{key}"][()], val, rtol=1e-9, atol=1e-12), (name, key)
            assert np.allclose(g["truncated/overlap"][()], want_trunc, rtol=1e-9)
            fid = g["hhl/fidelity"][()]
            assert fid[-1] > 1 - 1e-6 > 1 - 1e-2 > fid[0]  # 1 - F = 3.7e-8 at c = 12
            est = g["hhl/x_norm_estimate"][-1]
            assert abs(est / np.linalg.norm(x) - 1) < 1e-3
            assert "qcm_eigenvalues" not in g["instance"]
            assert g["hhl/fidelity"].attrs["units"] == "1" and g["hhl/fidelity"].attrs["description"]


@pytest.mark.timeout(600)
def test_cli_refuses_bad_files_without_damaging_results(tmp_path, files):
    """One case per format through the CLI: a one-line error, exit 2, and the results file of an
    earlier run stays a readable results file (the runner discards the hhl groups whose settings
    changed before the stage reads the new file; nothing is half-written)."""
    res, out = _run(tmp_path, "good", '["file"]', extra=f'system_file = "{files["dense.h5"]}"')
    assert res.returncode == 0, res.stderr
    junk = tmp_path / "junk.petsc"
    junk.write_bytes(np.array([PETSC_MAT_CLASSID], dtype=">i4").tobytes() + os.urandom(100))
    cut = tmp_path / "cut.mtx"
    cut.write_text("%%MatrixMarket matrix coordinate real general\n5 5 25\n1 1 1.0\n")
    for name, extra in (("h5", f'system_file = "{tmp_path / "missing.h5"}"'),
                        ("petsc", f'system_file = "{junk}"'),
                        ("mtx", f'system_file = "{cut}"\nsystem_rhs_file = "{files["b.mtx"]}"')):
        res, _ = _run(tmp_path, f"bad_{name}", '["file"]', extra=extra + "", out=out,
                      ranks=2 if name == "petsc" else 0)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("hpcqml: error")]
        assert len(lines) == 1 and "system file" in lines[0], res.stderr
        info = run_cli("info", str(out))
        assert info.returncode == 0, info.stderr
        with h5py.File(out, "r") as fh:
            assert "schema_version" in fh.attrs
            assert "hhl/file" not in fh or fh["hhl/file"].attrs["complete"]


def test_config_cross_checks(tmp_path, files):
    res, _ = _run(tmp_path, "nofile", '["file"]', extra="kappa_a = [2.0]")
    assert res.returncode == 2 and "system_file is empty" in res.stderr
    res, _ = _run(tmp_path, "both", '["random"]', extra='t0 = 2.0\nclock_mapping = "exact"')
    assert res.returncode == 2 and "either t0" in res.stderr
    res, _ = _run(tmp_path, "k0", '["file"]', extra=f'system_file = "{files["dense.h5"]}"\nkappa_a = [0.0]')
    assert res.returncode == 2 and "2(T+1)" in res.stderr
