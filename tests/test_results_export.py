"""``hpcqml.results`` for notebook users: values with their units and descriptions, strings
as ``str``, and exports to pandas and xarray that keep both.

The file is written here with the store's own dataset writer, so every expected value is
known without running a stage.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from hpcqml.hessian.spectrum import Spectrum
from hpcqml.results import QcmCase, Section, _state_spectrum, cases_table
from hpcqml.store import write_dataset

pandas = pytest.importorskip("pandas")
xarray = pytest.importorskip("xarray")


@pytest.fixture()
def log_group(tmp_path):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("train")
        write_dataset(g, "step", np.arange(4, dtype=np.int64), "count", "training step")
        write_dataset(g, "loss", np.array([2.0, 1.5, 1.2, 1.1]), "nat", "mean training loss")
        write_dataset(g, "phase", np.array(["warm", "warm", "sparse", "sparse"], dtype=object), "1", "phase name")
        write_dataset(g, "weights", np.ones((4, 3)), "1", "a matrix that is not a column")
        g.attrs["lr"] = 0.1
        g.attrs["model"] = "resnet8-w1"
    with h5py.File(path, "r") as f:
        yield Section.from_group("train", f["train"])


def test_section_values_carry_units_and_descriptions(log_group):
    q = log_group.quantity("loss")
    assert (q.units, q.description) == ("nat", "mean training loss")
    np.testing.assert_array_equal(q.value, [2.0, 1.5, 1.2, 1.1])
    assert str(q) == "loss [nat]: mean training loss"
    assert list(log_group.arrays["phase"]) == ["warm", "warm", "sparse", "sparse"]  # str, not bytes
    with pytest.raises(KeyError, match="no dataset 'nope'"):
        log_group.quantity("nope")


def test_section_to_dataframe_keeps_columns_and_units(log_group):
    df = log_group.to_dataframe()
    assert set(df.columns) == {"loss", "phase", "step"}
    assert df["loss"].tolist() == [2.0, 1.5, 1.2, 1.1]
    assert df.attrs["units"]["loss"] == "nat" and df.attrs["descriptions"]["step"] == "training step"
    assert df.attrs["attrs"] == {"lr": 0.1, "model": "resnet8-w1"}
    assert "weights" not in df.columns  # two-dimensional: only in to_xarray


def test_section_to_xarray_keeps_every_array(log_group):
    ds = log_group.to_xarray()
    assert ds["loss"].dims == ("row",) and ds["loss"].attrs["units"] == "nat"
    assert ds["weights"].shape == (4, 3) and ds["weights"].attrs["description"] == "a matrix that is not a column"
    assert ds.attrs["lr"] == 0.1


def test_spectrum_exports_match_the_stored_nodes(tmp_path):
    nodes = np.array([[-1.0, 0.5, 2.0], [0.1, 3.0, np.nan]])
    weights = np.array([[0.2, 0.3, 0.5], [0.6, 0.4, np.nan]])
    sp = Spectrum(n=10, nodes=nodes, weights=weights, residuals=np.full_like(nodes, 1e-3),
                  quad_forms=np.array([5.0, 6.0]), probes=np.array([0, 1]), steps=np.array([3, 2]),
                  breakdown=np.array([False, False]))
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        sp.to_hdf5(f.create_group("result"), units="nat")
    with h5py.File(path, "r") as f:
        state = _state_spectrum("step_000000", f["result"])
    df = state.to_dataframe()
    assert len(df) == 5  # the padding node of probe 1 is dropped
    assert df.loc[(df.probe == 1) & (df.node == 1), "theta"].item() == 3.0
    assert df.attrs["units"]["theta"] == "nat"
    ds = state.to_xarray()
    np.testing.assert_array_equal(ds["weight"].sel(probe=0).values, [0.2, 0.3, 0.5])
    assert ds["theta"].attrs["units"] == "nat"


def test_qcm_case_and_case_table():
    orders = {n: Section(f"N_{n}", {"error_total": 10.0 ** -n, "kappa_M": 3.0 * n, "solver": "gmres"}, {})
              for n in (1, 2)}
    case = QcmCase("f1.000_seed0", {"f": 1.0, "seed": 0}, orders)
    df = case.to_dataframe()
    assert df["N"].tolist() == [1, 2] and df["error_total"].tolist() == [0.1, 0.01]
    assert df.attrs["attrs"] == {"f": 1.0, "seed": 0}
    table = cases_table({"a": Section("a", {"fidelity": 0.9}, {}), "b": Section("b", {"fidelity": 0.8}, {})})
    assert table.loc["b", "fidelity"] == 0.8
