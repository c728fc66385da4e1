"""The ``qcm`` stage end to end through the CLI: HDF5 layout, numbers, file instances, errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_cli
from hpcqml.carleman import generators as gen
from hpcqml.carleman import reference as ref
from hpcqml.carleman.instance import from_dict, to_dict


def _config(tmp_path, body: str) -> str:
    path = tmp_path / "qcm.toml"
    path.write_text(f'[run]\noutput = "{tmp_path / "out.h5"}"\nstages = ["qcm"]\n\n[qcm]\n{body}\n')
    return str(path)


def test_qcm_stage_random_instance(tmp_path):
    cfg = _config(tmp_path, "n = 2\nf = [1.0, 0.5]\nseeds = [3]\nN = [1, 2]\nT = 6\neta = 0.25\n"
                            "step_sizes = [1.0, 0.5]\nN_ref = 4")
    res = run_cli("--quiet", "run", cfg)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "out.h5", "r") as fh:
        assert sorted(fh["qcm"]) == ["f0.500_seed3", "f1.000_seed3"]
        case = fh["qcm/f1.000_seed3"]
        assert case.attrs["complete"] and case.attrs["N_ref"] == 4
        ode = from_dict(case["instance"])
        want = gen.scale_step(gen.random_quadratic(2, 1.0, 3, u_scale=0.1, stream=gen.fraction_stream(1.0)), 0.25)
        np.testing.assert_array_equal(ode.F[1].toarray(), want.F[1].toarray())
        u = ref.exact_recurrence(ode, 6)
        np.testing.assert_allclose(case["u_exact"][()], u, rtol=1e-14)
        g = case["N_2"]
        assert g.attrs["Delta"] == 6 and g.attrs["rows_M"] == 42 and g.attrs["ksp_reason"] > 0
        y = ref.forward_iteration(ref.carleman_matrix(ode, 2), ref.carleman_rhs(ode, 2),
                                  np.concatenate([ode.u_in, np.kron(ode.u_in, ode.u_in)]), 6)
        np.testing.assert_allclose(g["y"][()], y, rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(g["eta1"][()], u - y[:, :2], atol=1e-15)
        assert g["eigenvalues"].shape == (6,) and g["eigenvalues"].dtype == np.complex128
        assert g.attrs["kappa_M"] <= g.attrs["kappa_bound_general"] * (1 + 1e-9)
        if g.attrs["kappa_bound_II83_applies"]:
            assert g.attrs["kappa_M"] <= g.attrs["kappa_bound_II83"]
        assert case["discreteness_scaling/h"].shape == (2,)
        assert "perf/qcm" in fh
        stored_eta1 = g["eta1"][()]
    # the results reader hands back the typed order report of the same group
    from hpcqml.results import Results

    with Results(tmp_path / "out.h5") as results:
        rep = results.qcm["f1.000_seed3"].reports[2]
    assert rep.N == 2 and rep.lift == "paper" and rep.attrs["Delta"] == 6
    np.testing.assert_array_equal(rep.arrays["eta1"], stored_eta1)
    np.testing.assert_allclose(rep.arrays["y"], y, rtol=1e-10, atol=1e-16)


def test_qcm_stage_file_instance_and_malformed_file(tmp_path):
    inst = tmp_path / "inst.h5"
    ode = gen.logistic(1.0, 1.0, 0.3, h=0.1)
    with h5py.File(inst, "w") as fh:
        g = fh.create_group("ode")
        for k, v in to_dict(ode).items():
            g.create_dataset(k, data=v)
    cfg = _config(tmp_path, f'generator = "file"\nfile = "{inst}"\nfile_group = "ode"\nN = [1, 3]\nT = 10\n'
                            "step_sizes = []")
    res = run_cli("--quiet", "run", cfg)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "out.h5", "r") as fh:
        e1 = np.abs(fh["qcm/file/N_1/eta1"][()]).max()
        e3 = np.abs(fh["qcm/file/N_3/eta1"][()]).max()
        assert e3 < e1
    with h5py.File(inst, "a") as fh:
        data = fh["ode/F1/data"]
        data[0] = np.nan
    (tmp_path / "out.h5").unlink()
    res = run_cli("--quiet", "run", cfg, "--overwrite")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "F1 contains NaN" in res.stderr


def test_qcm_stage_network_instance(tmp_path):
    """Reduced instance of a (pruned) resnet8 on a synthetic batch: F0/F1/F2 shapes, chosen weights."""
    import torch

    from hpcqml.store import read_strings

    from hpcqml.data.synth import write_synthetic
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    write_synthetic(tmp_path / "data", n_train=32, n_test=8, classes=10)
    torch.manual_seed(0)
    model = build("resnet8-w1", num_classes=10)
    mask = {n: p.abs() > p.abs().flatten().median() for n, p in model.named_parameters() if p.dim() > 1}
    save_checkpoint(tmp_path / "pruned.pt", "resnet8-w1", 10, model, mask=mask)
    cfg = tmp_path / "net.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path / "out.h5"}"\nworkdir = "{tmp_path / "work"}"\nstages = ["qcm"]\n'
                   f'[data]\nroot = "{tmp_path / "data"}"\n'
                   f'[qcm]\ngenerator = "network"\nmodel_file = "{tmp_path / "pruned.pt"}"\nk = 3\n'
                   f'batch_size = 8\neta = 0.1\nN = [1, 2]\nT = 5\nstep_sizes = []\n')
    res = run_cli("--quiet", "run", str(cfg))
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "out.h5", "r") as fh:
        case = fh["qcm/network"]
        ode = from_dict(case["instance"])
        assert ode.n == 3 and ode.F[2].shape == (3, 9)
        F1 = ode.F[1].toarray()
        np.testing.assert_allclose(F1, F1.T, atol=1e-12)          # -eta * Hessian is symmetric
        F2 = ode.F[2].toarray().reshape(3, 3, 3)
        np.testing.assert_allclose(F2, F2.transpose(0, 2, 1), atol=1e-12)  # third derivative symmetric
        picks = read_strings(case["params"])
        assert len(picks) == 3
        flat = {n: p.detach().abs().reshape(-1) for n, p in model.named_parameters()}
        surviving = torch.cat([torch.where(mask[n].reshape(-1), v, torch.full_like(v, -1.0)) if n in mask else v
                               for n, v in flat.items()])
        top = torch.topk(surviving, 3).values
        got = sorted(float(flat[p.split("[")[0]][int(p.split("[")[1][:-1])]) for p in picks)
        np.testing.assert_allclose(got, sorted(top.tolist()), rtol=1e-6)
        assert case["N_2/eta1"].shape == (6, 3)
        # the Hessian-to-QCM link: N = 1 fraction from the Hessian (eigvalsh of -eta H), N = 2 fraction of the
        # real A with F0 = -eta grad L != 0 (numpy eigvals of the serial reference), and the F0 = 0 sums of eq. II.64
        from hpcqml.carleman.instance import PolynomialODE

        assert np.any(ode.F[0].toarray() != 0.0)
        hess = np.linalg.eigvalsh(F1)
        assert case.attrs["dissipative_fraction_N1"] == pytest.approx(np.mean(np.abs(1 + hess) < 1), abs=1e-15)
        for N in (1, 2):
            a = np.linalg.eigvals(ref.carleman_matrix(ode, N).toarray())
            g = case[f"N_{N}"].attrs
            assert g["dissipative_fraction"] == pytest.approx(np.mean(np.abs(1 + a) < 1), abs=1e-15)
            no_f0 = PolynomialODE(F=[0 * ode.F[0], ode.F[1], ode.F[2]], u_in=ode.u_in)
            a0 = np.linalg.eigvals(ref.carleman_matrix(no_f0, N).toarray())
            assert g["dissipative_fraction_F0_zero"] == pytest.approx(np.mean(np.abs(1 + a0) < 1), abs=1e-15)
        assert case["N_1"].attrs["dissipative_fraction"] == case.attrs["dissipative_fraction_N1"]


def test_qcm_stage_with_f0_noise_writes_F0_t(tmp_path):  # noqa: N802 - paper notation
    """f0_noise > 0: the instance carries F0_t (T, n), and u_exact / y use F0(t) = F0 + F0_t[t]."""
    cfg = _config(tmp_path, "n = 2\nf = [1.0]\nseeds = [4]\nN = [2]\nT = 5\neta = 0.25\n"
                            "step_sizes = [1.0, 0.5]\nN_ref = 3\nf0_noise = 0.01")
    res = run_cli("--quiet", "run", cfg)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "out.h5", "r") as fh:
        case = fh["qcm/f1.000_seed4"]
        assert case.attrs["f0_noise"] == 0.01
        assert case["instance/F0_t"].shape == (5, 2) and case["instance/F0_t"].dtype == np.float64
        ode = from_dict(case["instance"])
        np.testing.assert_array_equal(ode.F0_t, gen.f0_noise(2, 0.01, 5, 4))
        u = ref.exact_recurrence(ode, 5)
        np.testing.assert_allclose(case["u_exact"][()], u, rtol=1e-14)
        plain = from_dict({k: v for k, v in to_dict(ode).items() if k != "F0_t"})
        assert np.max(np.abs(ref.exact_recurrence(plain, 5) - u)) > 1e-3
        y = ref.forward_iteration_t(ode, 2, 5)
        np.testing.assert_allclose(case["N_2/y"][()], y, rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(case["N_2/eta1"][()], u - y[:, :2], atol=1e-15)
        assert case["N_2"].attrs["ksp_reason"] > 0
