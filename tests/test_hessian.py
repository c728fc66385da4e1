"""Hessian-vector products, Lanczos and SLQ against exact dense computations (small cases)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian.hvp import HessianLinearOperator, param_space
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.parallel import block_bounds
from hpcqml.hessian.slq import probe_groups, run_probes
from hpcqml.hessian.spectrum import Spectrum

torch.set_num_threads(1)


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).double()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def batch(n: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 5, (n,), generator=g)


def exact_hessian(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy (eval-mode BatchNorm) by torch.func.hessian."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps, o = {}, 0
        for k, p in params.items():
            ps[k] = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, ps, (x,)), y)

    was = net.training
    net.eval()
    H = torch.func.hessian(loss)(flat0)
    net.train(was)
    return H


@pytest.fixture(scope="module")
def setup():
    net = small_net()
    x, y = batch()
    H = exact_hessian(net, x, y)
    return net, x, y, H


@pytest.mark.parametrize("route", ["double-backward", "func", "auto"])
def test_hvp_matches_explicit_hessian(setup, route):
    net, x, y, H = setup
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=len(y), route=route)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = op.matvec(v)
    assert torch.allclose(hv, H @ v, rtol=1e-10, atol=1e-12)
    assert op.route in ("double-backward", "func")


@pytest.mark.parametrize("route", ["double-backward", "func"])
def test_channels_last_layout_gives_the_same_product(setup, route):
    """The spectrum stage runs channels-last on GPUs; the flat coordinates must not change."""
    import copy

    from hpcqml.stages.spectrum import memory_format

    net, x, y, H = setup
    fmt = memory_format("channels_last", torch.device("cpu"))
    net_cl = copy.deepcopy(net).to(memory_format=fmt)
    op = HessianLinearOperator(net_cl, (x.contiguous(memory_format=fmt), y), num_data=len(y), micro_batch=10,
                               route=route)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert memory_format("auto", torch.device("cpu")) == torch.contiguous_format


def test_hvp_symmetric(setup):
    net, x, y, _ = setup
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=10, route="double-backward")
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(op.n, dtype=torch.float64, generator=g), torch.randn(op.n, dtype=torch.float64, generator=g)
    a, b = float(u @ op.matvec(v)), float(v @ op.matvec(u))
    assert abs(a - b) <= 1e-12 * max(abs(a), 1.0)


@pytest.mark.parametrize("micro", [1, 7, 10, 36])
def test_micro_batching_equals_one_pass(setup, micro):
    net, x, y, _ = setup  # 37 samples: every micro size here leaves a ragged last chunk
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    one = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=len(y), route="double-backward").matvec(v)
    for route in ("double-backward", "func"):
        many = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=micro, route=route).matvec(v)
        assert torch.allclose(many, one, rtol=1e-11, atol=1e-13)


def test_batchnorm_eval_and_state_unchanged(setup):
    net, x, y, H = setup
    net.train()
    before = {k: b.clone() for k, b in net.named_buffers()}
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=9, route="auto")
    v = torch.ones(op.n, dtype=torch.float64)
    hv = op.matvec(v)
    assert torch.allclose(hv, H @ v, rtol=1e-10, atol=1e-12)  # H was formed in eval mode
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k
    assert net.training and all(m.training for m in net.modules())
    net.eval()


def test_support_space_is_principal_submatrix(setup):
    net, x, y, H = setup
    g = torch.Generator().manual_seed(11)
    mask = {"0.weight": torch.rand(net[0].weight.shape, generator=g) < 0.3,
            "4.weight": torch.rand(net[4].weight.shape, generator=g) < 0.1}
    space = param_space(net, "support", mask)
    keep = torch.cat([mask[k].reshape(-1) if k in mask else torch.ones(p.numel(), dtype=torch.bool)
                      for k, p in net.named_parameters()])
    assert space.n == int(keep.sum())
    op = HessianLinearOperator(net, (x, y), num_data=len(y), space=space, micro_batch=16, route="func")
    v = torch.randn(space.n, dtype=torch.float64, generator=g)
    Hs = H[keep][:, keep]
    assert torch.allclose(op.matvec(v), Hs @ v, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_user_error(setup):
    net, x, y, _ = setup
    with pytest.raises(UserError, match="route"):
        HessianLinearOperator(net, (x, y), num_data=len(y), route="magic")
    with pytest.raises(UserError, match="mask"):
        param_space(net, "support", None)
    with pytest.raises(UserError, match="not a trainable"):
        param_space(net, "support", {"nope": torch.ones(1, dtype=torch.bool)})


def test_rademacher_slices_do_not_depend_on_split():
    n = (1 << 20) + 12345  # spans two generator blocks
    whole = rademacher_slice(n, 0, n, seed=3, probe=2)
    assert set(np.unique(whole)) == {-1.0, 1.0}
    for size in (2, 3):
        parts = [rademacher_slice(n, *block_bounds(n, r, size), seed=3, probe=2) for r in range(size)]
        assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(whole[:1000], rademacher_slice(n, 0, 1000, seed=3, probe=3))


def _dense_matvec(A: np.ndarray):
    At = torch.from_numpy(A)
    return lambda v: At @ v


def test_gauss_quadrature_is_exact_for_low_moments(setup):
    net, x, y, H = setup
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=37, route="double-backward")
    n, m = op.n, 20
    z = rademacher_slice(n, 0, n, seed=5, probe=0)
    res = lanczos(op.matvec, n, None, z, steps=m, state_dtype=torch.float64)
    Hn = H.numpy()
    v = z / np.linalg.norm(z)
    w = v.copy()
    for k in range(0, 8):  # degree < 2m: sum_i tau_i theta_i^k = v^T H^k v
        exact = float(v @ w)
        quad = float(np.sum(res.weights * res.nodes ** k))
        assert abs(quad - exact) <= 1e-9 * max(1.0, float(np.sum(np.abs(np.linalg.eigvalsh(Hn)) ** k)) / n * 10)
        w = Hn @ w
    assert abs(res.weights.sum() - 1.0) < 1e-12
    assert res.quad_form == pytest.approx(float(z @ Hn @ z), rel=1e-10)


def test_slq_measure_against_exact_eigenvalues(setup):
    """SLQ (m = 60, 8 probes) vs exact eigenvalues of the 845-parameter Hessian.

    Tolerances: Wasserstein-1 <= 2% of the spectral range; k-th moment (k = 1..4) within
    0.1 * mean |lambda|^k + 4 * its probe standard error; extremes to 1e-8 relative and
    inside their residual bounds; trace within 3 standard errors.
    """
    net, x, y, H = setup
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=37, route="double-backward")
    n = op.n
    ev = np.linalg.eigvalsh(H.numpy())
    res = run_probes(op.matvec, n, probe_groups(None, 1), list(range(8)), seed=17, steps=60,
                     state_dtype=torch.float64)
    s = Spectrum.from_results(res, n)
    x_, w_ = s.pooled()
    assert abs(w_.sum() - 1.0) < 1e-10
    span = ev.max() - ev.min()
    assert scipy.stats.wasserstein_distance(x_, ev, w_, None) <= 0.02 * span
    for k in range(1, 5):
        per_probe = np.array([np.sum(r.weights * r.nodes ** k) for r in res])
        se = per_probe.std(ddof=1) / np.sqrt(per_probe.size)
        assert abs(s.moment(k) - np.mean(ev ** k)) <= 0.1 * np.mean(np.abs(ev) ** k) + 4 * se, k
    (lmin, _), (lmax, rmax) = s.extremes()
    assert lmax == pytest.approx(ev.max(), rel=1e-8)
    assert lmin == pytest.approx(ev.min(), rel=1e-8)
    assert abs(lmax - ev.max()) <= rmax + 1e-10
    trace = s.trace()
    assert abs(trace.value - ev.sum()) <= 3 * trace.stderr
    # The negative mass is checked for equality with the exact spectral measure in
    # tests/test_spectrum_exact_measure.py (here many eigenvalues sit at numerical zero, so
    # only a wide window would hold, and a window that wide cannot fail).


def test_reorth_none_still_finds_extremes(setup):
    net, x, y, H = setup
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=37, route="double-backward")
    ev = np.linalg.eigvalsh(H.numpy())
    z = rademacher_slice(op.n, 0, op.n, seed=1, probe=0)
    res = lanczos(op.matvec, op.n, None, z, steps=60, reorth="none", state_dtype=torch.float64)
    assert res.nodes.max() == pytest.approx(ev.max(), rel=1e-6)


def test_ninety_percent_zero_spectrum_mass_at_zero():
    """Known spectrum, 90% exact zeros (as after pruning): mass at 0 equals ||P_0 v||^2."""
    n, n0 = 400, 360
    rng = np.random.default_rng(0)
    lam = np.concatenate([np.zeros(n0), rng.uniform(0.5, 2.0, 30), rng.uniform(-1.0, -0.4, 10)])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    P0 = Q[:, :n0]
    fractions, exact = [], []
    for p in range(4):
        z = rademacher_slice(n, 0, n, seed=9, probe=p)
        res = lanczos(_dense_matvec(A), n, None, z, steps=60, state_dtype=torch.float64)
        at_zero = np.abs(res.nodes) < 1e-8
        assert 1 <= at_zero.sum() <= 2  # rounding may split the zero cluster in two nodes
        assert np.all(np.abs(res.nodes[~at_zero]) > 0.3)
        fractions.append(res.weights[at_zero].sum())
        exact.append(np.sum((P0.T @ z) ** 2) / n)
    assert np.allclose(fractions, exact, atol=1e-8)
    assert np.mean(fractions) == pytest.approx(0.9, abs=0.03)


def test_breakdown_on_low_rank_operator():
    n = 50
    A = np.diag(np.r_[np.full(20, 2.0), np.full(20, -1.0), np.zeros(10)])
    z = rademacher_slice(n, 0, n, seed=0, probe=0)
    res = lanczos(_dense_matvec(A), n, None, z, steps=30, state_dtype=torch.float64)
    assert res.breakdown and res.steps == 3
    assert np.allclose(np.sort(res.nodes), [-1.0, 0.0, 2.0], atol=1e-10)
    assert np.allclose(res.weights[np.argsort(res.nodes)], [0.4, 0.2, 0.4], atol=1e-12)


def test_non_finite_product_names_step_and_probe():
    n = 20
    calls = {"k": 0}

    def bad(v: torch.Tensor) -> torch.Tensor:
        calls["k"] += 1
        out = v * torch.arange(1, n + 1, dtype=v.dtype)
        if calls["k"] == 4:
            out[3] = float("nan")
        return out

    z = rademacher_slice(n, 0, n, seed=0, probe=5)
    with pytest.raises(NumericalError, match=r"step_000010, probe 5, Lanczos step 3"):
        lanczos(bad, n, None, z, steps=10, state_dtype=torch.float64, probe=5, label="step_000010")


def test_float32_state_close_to_float64(setup):
    net, x, y, H = setup
    net32 = small_net().float()
    op = HessianLinearOperator(net32, (x.float(), y), num_data=len(y), micro_batch=16, route="double-backward")
    ev = np.linalg.eigvalsh(H.numpy())
    z = rademacher_slice(op.n, 0, op.n, seed=2, probe=0)
    res = lanczos(op.matvec, op.n, None, z, steps=40, state_dtype=torch.float32)
    assert res.alpha.dtype == np.float64
    assert res.nodes.max() == pytest.approx(ev.max(), rel=1e-4)


def test_pyhessian_agreement(setup):
    """PyHessian 0.1 top eigenvalue (power iteration) and trace (Hutchinson) on the same batch.

    Its ``density()`` calls ``torch.eig``, removed from current PyTorch: it cannot run.
    """
    pyhessian = pytest.importorskip("pyhessian")
    net = small_net().float()
    x, y = batch()
    x = x.float()
    H = exact_hessian(net.double(), x.double(), y).numpy()
    net = net.float()
    ev = np.linalg.eigvalsh(H)
    op = HessianLinearOperator(net, (x, y), num_data=len(y), micro_batch=37, route="double-backward")
    res = run_probes(op.matvec, op.n, probe_groups(None, 1), list(range(6)), seed=4, steps=40,
                     state_dtype=torch.float32)
    s = Spectrum.from_results(res, op.n)
    (lmin, _), (lmax, _) = s.extremes()
    trace = s.trace()
    torch.manual_seed(0)
    hc = pyhessian.hessian(net, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    top, _ = hc.eigenvalues(maxIter=500, tol=1e-7)
    dominant = ev[np.argmax(np.abs(ev))]  # power iteration finds the largest-magnitude eigenvalue
    assert top[0] == pytest.approx(dominant, rel=1e-3)
    ours = lmax if dominant > 0 else lmin
    assert ours == pytest.approx(top[0], rel=1e-3)
    samples = np.array(hc.trace(maxIter=200, tol=0.0))
    se_pyh = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - trace.value) <= 3 * np.hypot(se_pyh, trace.stderr)
    assert abs(samples.mean() - ev.sum()) <= 3 * se_pyh
    with pytest.raises((AttributeError, RuntimeError), match="eig"):
        hc.density(iter=2, n_v=1)
