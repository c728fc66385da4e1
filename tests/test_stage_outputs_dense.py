"""The spectrum stage's stored numbers against a dense Hessian and against their definitions.

Small case: a ResNet-8 whose measured parameter space (``wrt = "support"``) is ~50
coordinates, so the Hessian of the mean cross-entropy on the stage's batch is formed densely
here, in float64, with plain autograd (one double-backward per coordinate), independently
of the package's Hessian-vector products. Against it:

* each probe's Gauss quadrature reproduces the spectral moments ``v^T H^p v`` (exact for
  ``p <= 2k - 1``, Golub-Meurant) and ``z^T H z`` (the Hutchinson sample);
* every stored Ritz interval ``theta +- residual`` holds an eigenvalue of the dense ``H``;

and the stored estimates are recomputed with numpy from the stored nodes and weights with
the stored settings (cutoff, eta, convention, eq. II.28, III.12-III.13, II.93).
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpcqml.config import load_config
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import load_all

torch.set_num_threads(1)

STEP = 10
SEED = 3
BATCH = 8
STEPS = 10
PROBES = 3
ETA = 0.5          # [spectrum] eta: the eta convention has modes on both sides of |1 + a| = 1


def _workdir(tmp_path):
    """Synthetic data and one snapshot with a mask of ~50 coordinates over every parameter."""
    from hpcqml.data.synth import write_synthetic
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    work = tmp_path / "run.work"
    write_synthetic(work / "data", n_train=120, n_test=10, classes=10, seed=0)
    torch.manual_seed(0)
    model = build("resnet8-w1", 10)
    gen = torch.Generator().manual_seed(1)
    mask = {}
    for name, p in model.named_parameters():
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.randperm(p.numel(), generator=gen)[:2]] = True     # two coordinates of each tensor
        mask[name] = keep.reshape(p.shape)
    save_checkpoint(work / "snapshots" / f"step_{STEP:06d}.pt", "resnet8-w1", 10, model, mask=mask, step=STEP,
                    results=str((tmp_path / "run.h5").resolve()))
    return work


def _dense_hessian(tmp_path) -> tuple[np.ndarray, list]:
    """Float64 Hessian of the mean cross-entropy over the stage's batch w.r.t. the support coordinates."""
    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.training.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run.work" / "snapshots" / f"step_{STEP:06d}.pt")
    model = ck.model.double().eval()
    data = load_cifar100(tmp_path / "run.work" / "data")
    idx = batch_indices(len(data.train_y), BATCH, SEED, STEP)
    x = to_tensor(data.train_x[idx]).double()
    y = torch.from_numpy(data.train_y[idx])
    params = [p for _, p in model.named_parameters()]
    masks = [ck.mask[name].reshape(-1) for name, _ in model.named_parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="mean")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.cat([gr.reshape(-1)[m] for gr, m in zip(grads, masks, strict=True)])
    rows = []
    for i in range(g.numel()):
        second = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(s.reshape(-1) if s is not None else torch.zeros(p.numel(), dtype=p.dtype))[m]
                               for s, p, m in zip(second, params, masks, strict=True)]))
    H = torch.stack(rows).detach().numpy()
    return (H + H.T) / 2, masks


def _config(tmp_path, cutoff: float):
    text = (f'[run]\noutput = "{tmp_path}/run.h5"\nworkdir = "{tmp_path}/run.work"\ndevice = "cpu"\n'
            f'stages = ["spectrum"]\nseed = {SEED}\nthreads = 1\n[spectrum]\nbatch_size = {BATCH}\n'
            f'micro_batch = 5\nlanczos_steps = {STEPS}\nprobes = {PROBES}\nroute = "double-backward"\n'
            f'wrt = "support"\nt_max = 6\nproxy_t = [2, 5]\ncutoff = {cutoff!r}\neta = {ETA!r}\n')
    schemas = {k: s.schema for k, s in load_all().items()}
    return load_config("<test>", schemas, text=text)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spectrum_dense")
    _workdir(tmp)
    H, _ = _dense_hessian(tmp)
    lam = np.linalg.eigvalsh(H)
    # A cutoff between the eigenvalue magnitudes, so that applying it (or not) changes every estimate.
    cutoff = float(np.round(np.median(np.abs(lam[np.abs(lam) > 1e-8])), 4))
    path = run_pipeline(_config(tmp, cutoff), world(), quiet=True)
    return {"path": path, "H": H, "lam": lam, "cutoff": cutoff}


def _probes(fh):
    grp = fh[f"spectrum/step_{STEP:06d}"]
    return [grp[k] for k in sorted(grp) if k.startswith("probe_")]


def test_case_is_small_and_nontrivial(stage):
    H, lam = stage["H"], stage["lam"]
    assert 20 <= H.shape[0] <= 100
    assert lam.min() < -1e-3 and lam.max() > 1e-3         # an indefinite Hessian
    with h5py.File(stage["path"], "r") as fh:
        r = fh[f"spectrum/step_{STEP:06d}/result"]
        assert r.attrs["n"] == H.shape[0] and r.attrs["batch_size"] == BATCH


def test_probe_quadrature_reproduces_dense_moments(stage):
    """sum_i w_i theta_i^p = v^T H^p v for p <= 2k - 1 (Gauss quadrature of the spectral measure of v)."""
    from hpcqml.hessian.lanczos import rademacher_slice

    H = stage["H"]
    n = H.shape[0]
    scale = np.abs(stage["lam"]).max()
    with h5py.File(stage["path"], "r") as fh:
        probes = _probes(fh)
        assert len(probes) == PROBES
        for g in probes:
            z = rademacher_slice(n, 0, n, int(g.attrs["probe_seed"]), int(g.attrs["probe"]))
            v = z / np.linalg.norm(z)
            nodes, weights = g["nodes"][()], g["weights"][()]
            k = nodes.size
            # float32 products and basis: relative error ~ k * eps32 * cond-free ~ 1e-5 of ||H||^p;
            # 1e-3 is far below a factor of 2 (the Hessian of a mean over twice the batch).
            for p in range(0, min(2 * k - 1, 6) + 1):
                want = v @ np.linalg.matrix_power(H, p) @ v
                got = np.sum(weights * nodes ** p)
                assert got == pytest.approx(want, abs=1e-3 * scale ** p), (g.name, p)
            assert g.attrs["quad_form"] == pytest.approx(z @ H @ z, abs=1e-3 * scale * n)
            np.testing.assert_allclose(g["alpha"][0], v @ H @ v, atol=1e-4 * scale)


def test_ritz_intervals_hold_dense_eigenvalues(stage):
    """Each stored interval theta +- residual contains an eigenvalue of the dense H (Ritz bound)."""
    lam = stage["lam"]
    slack = 1e-4 * np.abs(lam).max()   # float32 rounding of theta and of the residual itself
    with h5py.File(stage["path"], "r") as fh:
        for g in _probes(fh):
            for theta, r in zip(g["nodes"][()], g["residuals"][()], strict=True):
                assert np.min(np.abs(lam - theta)) <= r + slack, (g.name, theta, r)
        res = fh[f"spectrum/step_{STEP:06d}/result"]
        assert res.attrs["lambda_max"] <= lam.max() + res.attrs["lambda_max_residual"] + slack
        assert res.attrs["lambda_min"] >= lam.min() - res.attrs["lambda_min_residual"] - slack


def _kept(nodes, cutoff):
    return np.abs(nodes) >= cutoff


def _growth(nodes, convention, eta):
    a = -nodes if convention == "paper" else -eta * nodes        # eq. II.65 / the paper's a = -lambda
    return np.abs(1.0 + a)


@pytest.mark.parametrize("convention", ["eta", "paper"])
def test_stored_estimates_recomputed_from_stored_nodes(stage, convention):
    with h5py.File(stage["path"], "r") as fh:
        res = fh[f"spectrum/step_{STEP:06d}/result"]
        pg = res[f"proxy/{convention}"]
        cutoff, eta = float(pg.attrs["cutoff"]), float(pg.attrs["eta"])
        assert cutoff == pytest.approx(stage["cutoff"]) and eta == pytest.approx(ETA)
        nodes, weights = res["nodes"][()], res["weights"][()]
        ok = ~np.isnan(nodes)
        x, w = nodes[ok], weights[ok] / nodes.shape[0]              # pooled SLQ measure
        kept = _kept(x, cutoff)
        assert 0 < kept.sum() < x.size                              # the cutoff removes some nodes, not all
        g = _growth(x, convention, eta)
        t = res["proxy/t"][()]
        proxy = np.array([np.sum(w[kept] * g[kept] ** tt) / np.sum(w[kept]) for tt in t])   # eq. III.12-III.13
        # Sums of < 50 positive float64 terms: relative rounding ~1e-15; 1e-10 is generous.
        np.testing.assert_allclose(pg["nodes"][()], proxy, rtol=1e-10)
        np.testing.assert_allclose(pg["log_nodes"][()], np.log(proxy), rtol=1e-10, atol=1e-12)
        est = pg["estimates"]
        frac = np.sum(w[kept & (g < 1)]) / np.sum(w[kept])          # eq. II.28
        assert est["dissipative_fraction_nodes"][0] == pytest.approx(frac, rel=1e-10)
        assert est["overlap_ii93"][0] == pytest.approx(np.sum(w[g < 1]) / np.sum(w), rel=1e-10)   # eq. II.93
        for T in (2, 5):
            assert est[f"error_proxy_t{T}"][0] == pytest.approx(proxy[list(t).index(T)], rel=1e-10)
        # Per probe, each from its own nodes alone.
        for p in range(nodes.shape[0]):
            xp, wp = nodes[p][ok[p]], weights[p][ok[p]]
            kp, gp = _kept(xp, cutoff), _growth(xp, convention, eta)
            want = np.sum(wp[kp & (gp < 1)]) / np.sum(wp[kp])
            assert est["dissipative_fraction_nodes_per_probe"][p] == pytest.approx(want, rel=1e-10)
        # The grid version: Riemann sums over the stored density (eq. III.12 on the paper's grid).
        grid, rho = res["density/grid"][()], res["density/rho"][()]
        gk = _kept(grid, cutoff)
        gg = _growth(grid, convention, eta)
        grid_proxy = np.array([np.sum(rho[gk] * gg[gk] ** tt) / np.sum(rho[gk]) for tt in t])
        np.testing.assert_allclose(pg["grid"][()], grid_proxy, rtol=1e-8)


def test_trace_per_probe_is_the_dense_quadratic_form(stage):
    from hpcqml.hessian.lanczos import rademacher_slice

    H = stage["H"]
    n = H.shape[0]
    with h5py.File(stage["path"], "r") as fh:
        res = fh[f"spectrum/step_{STEP:06d}/result"]
        seed = int(res.attrs["probe_seed"])
        want = np.array([(z := rademacher_slice(n, 0, n, seed, p)) @ H @ z for p in range(PROBES)])
        scale = np.abs(stage["lam"]).max() * n
        np.testing.assert_allclose(res["estimates/trace_per_probe"][()], want, atol=1e-3 * scale)
        assert res["estimates/trace"][0] == pytest.approx(want.mean(), abs=1e-3 * scale)
