"""The ``hhl`` stage end to end through the CLI: HDF5 layout, numbers, rank independence, errors."""
import h5py
import numpy as np
import pytest
from conftest import run_cli

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
clock_qubits = [3, 6]
kappa_a = [0.0, 4.0]
readout_trials = 30
k = 1
batch_size = 2
"""


def _run(tmp_path, name, cases, ranks=0, extra=""):
    out = tmp_path / f"{name}.h5"
    cfg = tmp_path / f"{name}.toml"
    text = CONFIG.format(out=out, cases=cases)
    if "kappa_a" in extra:
        text = text.replace("kappa_a = [0.0, 4.0]\n", "")
    cfg.write_text(text + extra)
    res = run_cli("--quiet", "run", str(cfg), ranks=ranks, timeout=600)
    return res, out


@pytest.mark.timeout(600)
def test_stage_writes_documented_layout_and_rank_independent_numbers(tmp_path):
    res, out = _run(tmp_path, "one", '["random", "network"]')
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        for case in ("random", "network"):
            g = fh[f"hhl/{case}"]
            assert g.attrs["complete"]
            inst = g["instance"]
            size, n = inst.attrs["system_size"], inst.attrs["n"]
            assert n == (2 if case == "random" else 1)  # network: k = 1 parameter
            assert size == (3 + 1) * (n + n * n) and inst.attrs["dilated"]
            dim = inst.attrs["embedded_dim"]
            assert dim == {24: 64, 8: 16}[size]
            assert inst["x_ref"].shape == (size,) and inst["qcm_eigenvalues"].shape == (n + n * n,)
            assert inst.attrs["reference_rel_residual"] < 1e-10
            hh = g["hhl"]
            assert list(hh["clock_qubits"][:]) == [3, 6]
            assert hh["states"].shape == (2, size)
            assert hh["fidelity"][1] > 0.99 and hh["fidelity"][1] > hh["fidelity"][0]
            assert np.all((hh["p_success"][:] > 0) & (hh["p_success"][:] <= hh["p_ancilla"][:]))
            tr = g["truncated"]
            assert tr["overlap"].shape == tr["overlap_ii87"].shape == (4,)
            ka = tr["kappa_a"][:]
            assert set(ka) == {8.0, 4.0}  # 0 stands for 2(T+1)
            assert np.all(np.abs(tr["overlap"][:] - tr["overlap_ii87"][:])
                          <= np.maximum(tr["resolution"][:] * 4, 0.05))
            assert 0 <= tr.attrs["fidelity_ii93"] <= 1
            rs = g["resources"].attrs
            assert 2 ** rs["system_qubits"] == dim and rs["constants"].startswith("unknown")
            assert rs["kappa"] <= rs["kappa_bound_ii83"] * 10
            ro = g["readout"]
            assert ro["shots"].shape == (30,) and ro.attrs["r"] >= 1
            assert ro.attrs["expected_ii99"] >= ro.attrs["uniform_r_H_r"] - 1e-9  # equal weights minimise II.99
        assert fh["hhl/network"]["instance"].attrs["generator"] == "network"
        table = fh["hhl/model_table"]
        assert list(table["n"][:]) == [7_451_044, 103_703_700]
        random_one = {k: fh[f"hhl/random/hhl/{k}"][()] for k in ("fidelity", "p_success", "states")}
    res2, out2 = _run(tmp_path, "two", '["random"]', ranks=2)
    assert res2.returncode == 0, res2.stderr
    with h5py.File(out2, "r") as fh:
        for key, val in random_one.items():
            assert np.allclose(fh[f"hhl/random/hhl/{key}"][()], val, rtol=1e-10, atol=1e-13), key


def test_stage_refuses_oversized_instance(tmp_path):
    res, _ = _run(tmp_path, "big", '["random"]', extra='max_dim = 32\nmethod = "statevector"\n')
    assert res.returncode != 0
    assert "exceeds max_dim = 32" in res.stderr and res.stderr.strip().count("\n") == 0


def test_network_case_reads_a_pruned_checkpoint(tmp_path):
    import torch

    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint
    from hpcqml.training.pruning import prune_

    torch.manual_seed(3)
    model = build("resnet8-w1", num_classes=10)
    mask = prune_(model, 0.1)
    ckpt = save_checkpoint(tmp_path / "pruned.pt", "resnet8-w1", 10, model, mask=mask)
    res, out = _run(tmp_path, "ckpt", '["network"]', extra=f'model_file = "{ckpt}"\n')
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        inst = fh["hhl/network/instance"]
        assert inst.attrs["network_source"] == f"checkpoint {ckpt}"
        assert fh["hhl/network/hhl/fidelity"][-1] > 0.99
    missing, _ = _run(tmp_path, "missing", '["network"]', extra=f'model_file = "{tmp_path}/nope.pt"\n')
    assert missing.returncode != 0 and "model_file" in missing.stderr and "not found" in missing.stderr


def test_sweep_config_is_valid(repo):
    res = run_cli("validate", str(repo / "jobs/configs/hhl-reduced.toml"))
    assert res.returncode == 0, res.stderr
    assert 'cases = ["random", "network"]' in res.stdout
    assert "clock_qubits = [3, 4, 5, 6, 7, 8, 9, 10]" in res.stdout


def test_scale_config_is_valid_and_estimates_both_methods(repo):
    """validate prints, per case of the size sweep, memory and time of both methods and the one used."""
    res = run_cli("validate", str(repo / "jobs/configs/hhl_scale.toml"))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("# estimate: hhl: case random")]
    assert len(lines) == 5  # T = 166666 and the four sizes_T
    big = next(ln for ln in lines if "1,000,002 rows" in ln)
    assert "statevector" in big and "krylov" in big and big.endswith("method used: krylov")
    assert all(" GiB, ~" in ln for ln in lines)


def test_statevector_above_max_dim_is_refused_by_validate(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "big.h5", cases='["random"]').replace("T = 3", "T = 400")
                   + 'method = "statevector"\n')
    res = run_cli("validate", str(cfg))
    assert res.returncode != 0 and "exceeds max_dim" in res.stderr


def test_exact_clock_mapping_and_t0_from_the_config(tmp_path):
    """A symmetric 2x2 system with eigenvalues {2, 1} read from a file: with clock_mapping = "exact"
    3 clock qubits invert it exactly and ||x|| comes out of the success probability."""
    th = 0.3
    Q = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    M, B = Q @ np.diag([2.0, 1.0]) @ Q.T, np.array([1.0, 2.0])
    x = np.linalg.solve(M, B)
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as fh:
        fh["M"], fh["b"] = M, B
    common = f'system_file = "{path}"\nkappa_a = [0.75]\n'
    res, out = _run(tmp_path, "exact", '["file"]', extra=common + 'clock_mapping = "exact"\n')
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        g = fh["hhl/file"]
        assert not g["instance"].attrs["dilated"] and g["instance"].attrs["embedded_dim"] == 2
        assert list(g["hhl/clock_qubits"][()]) == [3, 6]
        assert np.all(g["hhl/clock_exact"][()])
        assert np.all(1.0 - g["hhl/fidelity"][()] < 1e-12) and np.all(g["hhl/leakage"][()] < 1e-12)
        assert np.allclose(g["hhl/t0"][()], 2 * np.pi * 2 / np.array([8, 64]))
        assert np.allclose(g["hhl/x_norm_estimate"][()], np.linalg.norm(x), rtol=1e-12)
        assert g["instance"].attrs["x_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
        for name, dset in g["hhl"].items():
            assert dset.attrs["units"] and dset.attrs["description"], name
    res, out = _run(tmp_path, "t0", '["file"]', extra=common + "t0 = 2.0\nC = 0.05\n")
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as fh:
        g = fh["hhl/file/hhl"]
        assert np.all(g["t0"][()] == 2.0) and np.all(g["C"][()] == 0.05)
        assert g["fidelity"][0] < 1 - 1e-4  # t0 = 2 puts neither eigenvalue on a 3-qubit clock value


def test_reference_solver_owns_and_destroys_its_petsc_objects():
    from mpi4py import MPI
    from petsc4py import PETSc

    from hpcqml.errors import NumericalError
    from hpcqml.hhl.reference import ReferenceSolver, reference_solution

    rng = np.random.default_rng(0)
    M, b = np.eye(6) + 0.3 * rng.standard_normal((6, 6)), rng.standard_normal(6)
    ref = reference_solution(M, b, MPI.COMM_SELF)
    assert np.allclose(ref.x, np.linalg.solve(M, b), rtol=1e-12) and ref.rel_residual < 1e-13
    assert "prefix hhl_" in ref.method
    opts = PETSc.Options()
    opts["hhl_ksp_max_it"], opts["hhl_pc_type"] = 1, "none"
    try:
        solver = ReferenceSolver(M, b, MPI.COMM_SELF)
        with pytest.raises(NumericalError, match="diverged"), solver:
            objects = (solver.ksp, solver.mat, solver.rhs, solver.sol)
            assert solver.ksp.getOptionsPrefix() == "hhl_" and solver.ksp.getPC().getType() == "none"
            solver.solve()
        assert all(obj.handle == 0 for obj in objects)  # destroyed on the error path
    finally:
        opts.delValue("hhl_ksp_max_it")
        opts.delValue("hhl_pc_type")


def test_hhl_petsc_options_reach_the_reference_ksp(tmp_path):
    cfg = tmp_path / "div.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "div.h5", cases='["random"]'))
    res = run_cli("--quiet", "run", str(cfg), "-hhl_ksp_max_it", "1", "-hhl_pc_type", "none", timeout=600)
    assert res.returncode == 1, res.stderr
    assert "KSP (prefix hhl_) diverged" in res.stderr and res.stderr.strip().count("\n") == 0


@pytest.mark.timeout(600)
def test_krylov_method_stores_the_statevector_numbers(tmp_path):
    """method = "krylov" against "statevector" on the same case (tolerance 1e-10: Chebyshev bound
    1e-13 plus recurrence rounding, see tests/test_hhl_krylov.py); the size sweep makes one group per T."""
    outs = {}
    for method in ("statevector", "krylov"):
        res, outs[method] = _run(tmp_path, method, '["random"]',
                                 extra=f'method = "{method}"\nsizes_T = [3, 5]\n')
        assert res.returncode == 0, res.stderr
    with h5py.File(outs["statevector"], "r") as sv, h5py.File(outs["krylov"], "r") as kr:
        for name in ("random", "random_T5"):
            a, b = sv[f"hhl/{name}"], kr[f"hhl/{name}"]
            assert a.attrs["method"] == "statevector" and b.attrs["method"] == "krylov"
            for key in ("fidelity", "density_fidelity", "p_success", "p_ancilla", "leakage", "x_norm_estimate"):
                assert np.allclose(a[f"hhl/{key}"][()], b[f"hhl/{key}"][()], rtol=0, atol=1e-10), key
            assert np.allclose(a["hhl/states"][()], b["hhl/states"][()], rtol=0, atol=1e-10)
            for key in ("overlap", "fidelity", "p_success", "leakage"):
                assert np.allclose(a[f"truncated/{key}"][()], b[f"truncated/{key}"][()], rtol=0, atol=1e-10), key
            for g in (a, b):
                # fidelity |<x_ref|x>|^2 from the stored x blocks and the PETSc reference solution
                x_ref = g["instance/x_ref"][()] / np.linalg.norm(g["instance/x_ref"][()])
                want = np.abs(g["hhl/states"][()] @ x_ref) ** 2
                assert np.allclose(g["hhl/fidelity"][()], want, rtol=0, atol=1e-10)
                # eq. II.93 squared, from the modes of A counted here (|1 + a| < 1, eq. II.28)
                qcm = g["instance/qcm_eigenvalues"][()]
                assert np.min(np.abs(np.abs(1 + qcm) - 1)) > 1e-6    # no mode on the boundary
                share = np.count_nonzero(np.abs(1 + qcm) < 1) / qcm.size
                assert 0 < share < 1 and g["truncated"].attrs["fidelity_ii93"] == pytest.approx(share**2, rel=1e-12)
            assert "spectrum_H" not in b["instance"] and "overlap_ii87" not in b["truncated"]
            assert np.all(b["hhl/chebyshev_error_bound"][()] <= 1e-13)
            assert np.all(b["hhl/chebyshev_degree"][()] > 0)
        assert b["instance"].attrs["system_size"] == (5 + 1) * 6
        _check_scale_figure(kr, tmp_path)


def _check_scale_figure(fh, tmp_path):
    """The size-sweep figure draws, per clock size, the stored fidelity and p_success at each S."""
    from hpcqml.report import figures

    kept = {}
    original = figures._save

    def keep(fig, where, name):
        kept[name] = fig
        return original(fig, where, name)

    figures._save = keep
    try:
        figures.fig_hhl_scale(fh, tmp_path)
    finally:
        figures._save = original
    ax1, ax2 = kept["hhl_scale.png"].axes
    assert "fidelity" in ax1.get_ylabel() and "success" in ax2.get_ylabel() and ax2.get_yscale() == "log"
    sizes = [fh[f"hhl/{g}/instance"].attrs["system_size"] for g in ("random", "random_T5")]
    for ax, key in ((ax1, "fidelity"), (ax2, "p_success")):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {"c = 3", "c = 6"}
        for i, c in enumerate((3, 6)):
            x, y = lines[f"c = {c}"].get_data()
            assert list(x) == sorted(sizes)
            want = [fh[f"hhl/{g}/hhl/{key}"][i] for g in ("random", "random_T5")]
            assert np.allclose(y, want, rtol=0, atol=0)
