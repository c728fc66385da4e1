"""The one instance builder of the qcm and hhl stages, and the reduced network instance
(eq. II.65) built from the Hessian operator, against an independent autograd computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.carleman import generators as gen
from hpcqml.carleman.cases import random_instance
from hpcqml.stages._network import network_instance

torch.set_num_threads(1)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.BatchNorm1d(5),
                                torch.nn.Linear(5, 3))
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.35, 0.45)
    return model.double().eval()


def _reference(model, x, y, picks, eta):
    """F0, F1 and F2 by torch.autograd.functional on the k chosen coordinates (independent route)."""
    base = {nm: p.detach().clone() for nm, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(z):
        ps = dict(base)
        for j, (nm, i) in enumerate(picks):
            delta = torch.zeros(base[nm].numel(), dtype=torch.float64)
            delta = delta.index_add(0, torch.tensor([i]), z[j:j + 1])
            ps[nm] = ps[nm] + delta.view_as(base[nm])
        out = torch.func.functional_call(model, (ps, buffers), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    k = len(picks)
    z0 = torch.zeros(k, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(loss, z0).numpy()
    H = torch.autograd.functional.hessian(loss, z0).numpy()
    D3 = torch.autograd.functional.jacobian(lambda z: torch.autograd.functional.hessian(loss, z, create_graph=True),
                                            z0).numpy()
    return -eta * g.reshape(k, 1), -eta * H, -0.5 * eta * D3.reshape(k, k * k)


def test_network_instance_matches_autograd_on_chosen_coordinates():
    model = _tiny_model()
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    mask = {"0.weight": torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) < 0.5}
    k, eta = 5, 0.3
    ode = network_instance(model, torch.nn.functional.cross_entropy, x, y, k, eta, mask=mask)
    picks = [(s.split("[")[0], int(s.split("[")[1][:-1])) for s in ode.meta["params"]]
    # picks are the k largest surviving magnitudes, largest first, spanning several parameters
    mags = [abs(float(dict(model.named_parameters())[nm].detach().view(-1)[i])) for nm, i in picks]
    assert mags == sorted(mags, reverse=True) and len({nm for nm, _ in picks}) > 1
    for nm, i in picks:
        assert nm not in mask or bool(mask[nm].view(-1)[i])
    F0, F1, F2 = _reference(model, x, y, picks, eta)
    np.testing.assert_allclose(ode.F[0].toarray(), F0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ode.F[1].toarray(), F1, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ode.F[2].toarray(), F2, rtol=1e-10, atol=1e-14)
    assert not model.training   # the caller's mode is kept


@pytest.mark.parametrize("kind", ["random", "sparse"])
def test_random_instance_is_the_scaled_generator(kind):
    ode = random_instance(kind, 3, 0.5, 7, eta=0.25, u_scale=0.2, div_range=0.05, f2_per_row=2)
    make = gen.random_quadratic if kind == "random" else gen.sparse_quadratic
    extra = {} if kind == "random" else {"f2_per_row": 2}
    ref = gen.scale_step(make(3, 0.5, 7, u_scale=0.2, div_range=0.05, **extra), 0.25)
    for a, b in zip(ode.F, ref.F, strict=True):
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    np.testing.assert_array_equal(ode.u_in, ref.u_in)
    with pytest.raises(ValueError):
        random_instance("dense", 3, 0.5, 7, eta=0.25, u_scale=0.2)


@pytest.mark.parametrize("stage", ["qcm", "hhl"])
def test_pruned_checkpoint_of_another_run_is_refused(tmp_path, stage):
    """``<workdir>/pruned.pt`` stamped by another run is refused in one line naming the file
    and that run, before any instance is built."""
    from hpcqml.config import load_config
    from hpcqml.errors import UserError
    from hpcqml.models import build
    from hpcqml.parallel import world
    from hpcqml.runner import run_pipeline
    from hpcqml.stages import load_all
    from hpcqml.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    work = tmp_path / "run.work"
    save_checkpoint(work / "pruned.pt", "resnet8-w1", 10, build("resnet8-w1", num_classes=10),
                    fingerprint="0123456789abcdef", results=str(tmp_path / "other.h5"))
    body = 'generator = "network"\nk = 2\nN = [1]\nT = 2\nstep_sizes = []' if stage == "qcm" \
        else 'cases = ["network"]\nk = 1\nT = 2'
    text = (f'[run]\noutput = "{tmp_path / "run.h5"}"\nworkdir = "{work}"\nstages = ["{stage}"]\n'
            f'device = "cpu"\nthreads = 1\n[{stage}]\n{body}\n')
    cfg = load_config("<test>", {k: s.schema for k, s in load_all().items()}, text=text)
    with pytest.raises(UserError) as err:
        run_pipeline(cfg, world(), quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "pruned.pt" in msg and "other.h5" in msg and "0123456789ab" in msg
