"""Degenerate, edge and hostile qcm inputs; bounds that do not hold are flagged."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import run_cli
from hpcqml.carleman import generators as gen
from hpcqml.carleman import reference as ref
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE, load_instance, to_dict
from hpcqml.errors import InputFileError

N_ORDERS, T = (1, 2), 4


def _ode(kind: str) -> PolynomialODE:
    n = 1 if kind == "n1" else 2
    rng = np.random.default_rng(0)
    F1 = -0.2 * np.eye(n)
    F2 = rng.uniform(-0.05, 0.05, (n, n * n))
    u = np.array([0.1, -0.05])[:n]
    F1, F2, u = {"A0": (0 * F1, 0 * F2, u), "F1zero": (0 * F1, F2, u), "F2zero": (F1, 0 * F2, u),
                 "u0": (F1, F2, 0 * u)}.get(kind, (F1, F2, u))
    return PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.csr_matrix(F1), sp.csr_matrix(F2)], u_in=u)


def _write_instance(path, ode: PolynomialODE) -> None:
    with h5py.File(path, "w") as fh:
        for key, val in to_dict(ode).items():
            fh.create_dataset(key, data=val)


def _config(tmp_path, body: str, name: str = "c") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[run]\noutput = "{tmp_path / name}.h5"\nstages = ["qcm"]\n[qcm]\n{body}\n')
    return str(path)


def _run_in_process(cfg: str) -> None:
    from hpcqml.cli import main

    assert main(["--quiet", "run", cfg]) == 0


def _bidiagonal_kappa(T: int) -> float:
    """κ of the (T+1) x (T+1) block bidiagonal M with I on the diagonal and -I below (A = 0, eq. II.79)."""
    M = np.eye(T + 1) - np.eye(T + 1, k=-1)
    s = np.linalg.svd(M, compute_uv=False)
    return float(s[0] / s[-1])


@pytest.mark.parametrize("kind", ["A0", "F1zero", "F2zero", "u0", "n1"])
def test_degenerate_instances_run_and_kappa_of_A0_is_exact(tmp_path, kind):  # noqa: N802 - paper notation
    ode = _ode(kind)
    _write_instance(tmp_path / "inst.h5", ode)
    _run_in_process(_config(tmp_path, f'generator = "file"\nfile = "{tmp_path / "inst.h5"}"\nN = [1, 2]\nT = {T}\n'
                                      "step_sizes = [1.0, 0.5]"))
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        case = fh["qcm/file"]
        u = ref.exact_recurrence(ode, T)
        np.testing.assert_allclose(case["u_exact"][()], u, rtol=1e-14)
        for N in N_ORDERS:
            g = case[f"N_{N}"]
            y = ts.carleman_trajectory(ode, N, T)
            np.testing.assert_allclose(g["eta1"][()], u - y, atol=1e-14)
            assert g.attrs["ksp_reason"] > 0 and np.isfinite(g.attrs["kappa_M"])
            if kind == "A0":
                assert g.attrs["norm_A"] == 0.0 and g.attrs["sigma_min_A"] == 0.0
                assert g.attrs["eigen_method"] == "zero matrix (exact)"
                np.testing.assert_array_equal(g["eigenvalues"][()], 0.0)
                assert g.attrs["kappa_M"] == pytest.approx(_bidiagonal_kappa(T), rel=1e-12)
                assert np.isnan(g.attrs["order_II60"])
            if kind == "u0":
                assert g.attrs["measured_II57"] == 0.0 and g.attrs["holds_II57"] == "true"
            if kind == "F2zero" and N == 2:
                # linear map: no truncation error, but the discrete map's u⊗u is not (I + A) u⊗u
                assert g.attrs["bound_II57"] == 0.0 and g.attrs["holds_II57"] == "false"
                assert "II57" in g.attrs["violated_bounds"].split(",")
            assert g.attrs["holds_discrete"] == "true", (kind, N)   # the discrete-map bound always holds
            # every flag is one of three words; none is true by default
            flags = {k: v for k, v in g.attrs.items() if k.startswith("holds_")}
            assert flags and set(flags.values()) <= {"true", "false", "not evaluated"}


def test_A0_through_the_cli_on_two_ranks(tmp_path):  # noqa: N802 - paper notation
    _write_instance(tmp_path / "inst.h5", _ode("A0"))
    cfg = _config(tmp_path, f'generator = "file"\nfile = "{tmp_path / "inst.h5"}"\nN = [2]\nT = 6\n'
                            "step_sizes = []\ndense_limit = 10")
    res = run_cli("--quiet", "run", cfg, ranks=2)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        g = fh["qcm/file/N_2"]
        assert g.attrs["ranks"] == 2 and g.attrs["norm_A"] == 0.0
        assert g.attrs["kappa_M"] == pytest.approx(_bidiagonal_kappa(6), rel=1e-9)  # Lanczos beyond dense_limit


def test_scalar_discrete_logistic_flags_II57_and_names_no_order(tmp_path):  # noqa: N802 - paper notation
    """Logistic map, N = 10, T = 10: the discreteness error exceeds eq. II.57, and no N reaches eps."""
    eps = 1e-6
    _run_in_process(_config(tmp_path, f'generator = "logistic"\nN = [10]\nT = 10\neps = {eps}\nstep_sizes = []\n'
                                      'lift = "both"'))
    ode = gen.logistic(1.0, 1.0, 0.1, h=0.25)
    u = ref.exact_recurrence(ode, 10)
    best = min(np.max(np.abs(u - ts.carleman_trajectory(ode, N, 10))) for N in range(1, 21))
    assert best > eps  # the discreteness floor: no order reaches the target
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        g = fh["qcm/logistic/N_10"]
        a = g.attrs
        assert a["holds_II57"] == "false" and a["measured_II57"] > a["bound_II57"]
        assert "II57" in a["violated_bounds"].split(",")
        split = fh["qcm/logistic/split/N_10"]
        assert np.max(np.abs(split["discreteness"][()])) > 100 * np.max(np.abs(split["truncation"][()]))
        assert np.isfinite(a["order_II60_formula"]) and a["order_II60_checked"]
        assert np.isnan(a["order_II60"]) and a["order_II60_measured"] > eps
        assert a["holds_discrete"] == "true"
        assert np.all(g["eta_norm"][()] <= g["bound_discrete"][()] + a["bounds_atol"])
        # the exact lift of the map at the same order: no discreteness floor.  Direct iteration in float64
        # gives 4.2e-13 at N = 10 (ratio about 0.09 per order), against the paper lift's 3.5e-4.
        d = fh["qcm/logistic/discrete_N_10"].attrs
        assert d["lift"] == "discrete" and a["lift"] == "paper"
        assert d["max_abs_eta1"] < 1e-11 and a["max_abs_eta1"] > 3e-4
        assert d["holds_II57"] == "not evaluated" and d["holds_discrete"] == "true"
        assert d["dissipative_count_scope"] == "complete"
    from hpcqml.report.build import make_report

    summary = make_report([tmp_path / "c.h5"], tmp_path / "rep", quiet=True)
    text = summary.markdown.read_text()
    section = text[text.index("#### Violated bounds"):]
    assert "| logistic | 10 | II57 |" in section


def test_T0_is_a_one_line_config_error(tmp_path):  # noqa: N802 - paper notation
    res = run_cli("--quiet", "run", _config(tmp_path, "T = 0"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "T" in res.stderr


def _hostile(tmp_path, kind: str):
    path = tmp_path / f"{kind}.h5"
    good = to_dict(_ode("F1zero"))
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path
    with h5py.File(path, "w") as fh:
        for key, val in good.items():
            if kind == "u_in_strings" and key == "u_in":
                fh.create_dataset(key, data=np.array(["a", "b"], dtype=h5py.string_dtype()))
            elif kind == "u_in_matrix" and key == "u_in":
                fh.create_dataset(key, data=np.zeros((2, 2)))
            elif kind == "absurd_u_in" and key == "u_in":
                fh.create_dataset(key, shape=(10**10,), dtype="f8", chunks=(1024,))  # declared, never written
            elif kind == "absurd_q" and key == "q":
                fh.create_dataset(key, data=np.int64(10**9))
            elif kind == "absurd_data" and key == "F2/data":
                fh.create_dataset(key, shape=(10**10,), dtype="f8", chunks=(1024,))
            elif kind == "float_indices" and key == "F2/indices":
                fh.create_dataset(key, data=val.astype(np.float64) + 0.5)
            elif kind == "missing_F2" and key.startswith("F2/"):
                continue
            else:
                fh.create_dataset(key, data=val)
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
    return path


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "u_in_strings", "u_in_matrix", "absurd_u_in",
                                  "absurd_q", "absurd_data", "float_indices", "missing_F2"])
def test_hostile_instance_files_give_one_line_errors(tmp_path, kind):
    path = _hostile(tmp_path, kind)
    with pytest.raises(InputFileError) as info:
        load_instance(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_hostile_instance_file_through_the_cli(tmp_path):
    path = _hostile(tmp_path, "absurd_u_in")
    res = run_cli("--quiet", "run", _config(tmp_path, f'generator = "file"\nfile = "{path}"\nT = 3'))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "u_in" in res.stderr
    assert not (tmp_path / "c.h5").exists() or "qcm" not in h5py.File(tmp_path / "c.h5", "r")
