"""What ``hpcqml.hhl.case`` stores and reads back, value by value, on systems whose eigen-decomposition
is chosen here.

* ``TruncatedSweep.build``: the weight of |b> below 1/kappa_a and the threshold margin (the truncation
  of eq. II.86 acts on |lambda_j| < 1/kappa_a, eq. II.87) against numpy sums over the chosen eigenvalues
  and coefficients beta_j of eq. II.84; on a diagonal M (whose eigen-decomposition LAPACK returns
  exactly, checked) with an eigenvalue exactly at 1/kappa_a and coefficients exactly at the occupancy
  cut, so that ``<`` and ``<=`` give different numbers;
* every dataset's units and description against the table "Stored units and descriptions of
  `truncated/`" in docs/schema/hhl.md, both ways;
* ``ii92_rows``: each row's keys and values, the tolerance of the II.92/II.87 comparison at a gap of
  exactly 0.02, and the whole reason text of each branch with its numbers;
* ``HHLCase``/``Part``/``read_cases`` through a scratch HDF5 file: parts, defaults, skipped groups and
  attributes stored as bytes.

The ``make mutation`` target ``hhlcase`` (tests/mutation.sh) runs these first.
"""
from __future__ import annotations


import h5py
import numpy as np
import pytest
from conftest import attr_text, schema_table, truncation_reference

from hpcqml.hhl.case import HHLCase, Part, TruncatedSweep, _plain, read_cases
from hpcqml.hhl.statevector import embed
from hpcqml.hhl.truncated import eigen_coefficients


#: the tolerance of the II.92/II.87 comparison (absolute, unsquared) and the weight below the
#: threshold that still counts as none, as hpcqml/hhl/case.py documents them
TOLERANCE = 0.02
WEIGHT_ZERO = 1e-14
#: a coefficient |beta_j| at or under this does not occupy its eigenvalue (docs/schema/hhl.md)
OCCUPIED = 1e-12

# A diagonal M: eigenvalue j is D[j] exactly and beta_j = +-B[j]; max |D| = 1, so the embedding's
# scaling by ||M||_2 is exact, and ||B|| = 1 exactly (the 1e-24 terms vanish beside 1).
D = np.array([1.0, -0.5, 0.25, 0.125, -0.2, 0.6, -0.75, 0.05])
B = np.array([0.5, 0.5, 0.5, 1e-12, 1.5e-12, 0.0, 0.5, 0.0])
T = 3                                  # 2(T+1) = 8
KAPPAS = [4.0, 5.0, 8.0, 2.0]
SPLIT = {"Delta_plus": 10, "Delta": 12, "a_plus": -0.125, "overlap_ii92": 0.9, "overlap_ii93": 10 / 12,
         "fidelity_ii92": 0.81, "fidelity_ii93": (10 / 12) ** 2}


def _rows(kappas):
    """Simulated rows as the stage gives them (values chosen: build stores them as they are)."""
    return [{"c": 6, "kappa_a": k, "overlap": 0.99 - 0.01 * i, "p_success": 0.1 + 0.01 * i,
             "leakage": 0.02 * i, "resolution": 2 * np.pi / 64} for i, k in enumerate(kappas)]


def _reference(lam, coef, kappa):
    """Eq. II.87, the Haar estimate, the weight of |b> below 1/kappa_a (conftest) and the threshold
    margin, from the chosen eigenvalues and (normalised) coefficients."""
    occupied = np.abs(np.asarray(lam)[np.abs(coef) > OCCUPIED])
    return {**truncation_reference(lam, coef, kappa), "margin": float(np.min(np.abs(occupied - 1 / kappa)))}


def _diagonal_sweep():
    system = embed(np.diag(D), B)
    assert sorted(system.eigenvalues.tolist()) == sorted(D.tolist())     # exact, the premise here
    lam, beta = eigen_coefficients(system)               # and signed unit eigenvectors: |beta_j| = |B_j|
    pairs = sorted(zip(lam.tolist(), np.abs(beta).tolist(), strict=True))
    assert pairs == sorted(zip(D.tolist(), B.tolist(), strict=True))
    assert system.scale == 1.0 and np.linalg.norm(B) == 1.0
    return TruncatedSweep.build(_rows(KAPPAS), system, dict(SPLIT), T)


def test_threshold_columns_at_exact_boundaries():
    """Diagonal M: at kappa_a = 4 the eigenvalue 0.25 = 1/kappa_a carries weight 0.25 and is not below
    the threshold (ill_weight only the 1e-24 + 2.25e-24 of the two tiny coefficients; margin 0); at
    kappa_a = 5 the eigenvalue 0.2 with |beta| = 1.5e-12 (above the cut) gives margin 0; at kappa_a = 8
    the eigenvalue 0.125 with |beta| = 1e-12 exactly (at the cut) is not occupied, so the margin is
    |0.2 - 0.125|, and nothing lies below 0.125 but the eigenvalue 0.05 of zero weight (ill_weight 0).
    Every column also against the numpy reference (1e-15 on these O(1) numbers)."""
    sw = _diagonal_sweep()
    assert sw["ill_weight"][0] == pytest.approx(1e-24 + 2.25e-24, rel=1e-12)
    assert sw["ill_weight"][1] == pytest.approx(1e-24, rel=1e-12)
    assert sw["ill_weight"][2] == 0.0
    assert sw["ill_weight"][3] == pytest.approx(0.25, rel=1e-12)      # 0.25 (and 0.125, 0.2) below 1/2
    assert list(sw["threshold_margin"][:2]) == [0.0, 0.0]
    assert sw["threshold_margin"][2] == pytest.approx(0.2 - 0.125, abs=1e-15)
    assert sw["threshold_margin"][3] == pytest.approx(0.0, abs=1e-15)      # |-0.5| = 1/2
    for i, k in enumerate(KAPPAS):
        ref = _reference(D, B, k)
        assert sw["ill_weight"][i] == pytest.approx(ref["ill"], rel=1e-12, abs=0)
        assert sw["threshold_margin"][i] == pytest.approx(ref["margin"], abs=1e-15)
        assert sw["overlap_ii87"][i] == pytest.approx(ref["ii87"], abs=1e-15)
        assert sw["overlap_haar"][i] == pytest.approx(ref["haar"], abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_columns_of_a_rotated_system(seed):
    """M = Q diag(e) Q^T with a random orthogonal Q, B = Q c (two coefficients zero); n = 6 is padded to
    D = 8.  Thresholds 1/kappa_a at least 0.015 from every eigenvalue: II.87, the Haar estimate, the
    weight below the threshold and the margin to 1e-12 of the numpy values from (e, c)."""
    e = np.array([1.0, -0.8, 0.45, -0.3, 0.2, 0.1])
    c = np.array([0.5, 0.0, 0.5, 0.5, 0.0, 0.5])
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((6, 6)))
    kappas = [1.5, 3.0, 4.0, 7.0, 12.0]
    sw = TruncatedSweep.build(_rows(kappas), embed(Q @ np.diag(e) @ Q.T, Q @ c))
    for i, k in enumerate(kappas):
        ref = _reference(e, c, k)
        for name, key in [("overlap_ii87", "ii87"), ("overlap_haar", "haar"), ("ill_weight", "ill"),
                          ("threshold_margin", "margin")]:
            assert sw[name][i] == pytest.approx(ref[key], abs=1e-12), (name, k)
    assert sw["threshold_margin"][2] == pytest.approx(0.05, abs=1e-12)       # |0.3 - 1/4|


def _schema_rows() -> dict[str, tuple[str, str]]:
    """The table "Stored units and descriptions of `truncated/`": name -> (units, description)."""
    return {name: (units, desc) for name, units, desc in
            schema_table("hhl.md", "#### Stored units and descriptions of `truncated/`")}


def test_every_truncated_dataset_has_the_units_and_description_of_the_schema(tmp_path):
    """A Carleman case with system, split and T writes exactly the datasets of the schema's table, each
    with the table's units and description word for word; the values read back are those stored."""
    sw = _diagonal_sweep()
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        sw.to_group(fh.create_group("truncated"))
    with h5py.File(tmp_path / "t.h5", "r") as fh:
        g = fh["truncated"]
        written = {name: (attr_text(ds.attrs["units"]), attr_text(ds.attrs["description"])) for name, ds in g.items()}
        back = TruncatedSweep.from_group(g)
    rows = _schema_rows()
    assert len(rows) == 16
    assert written == rows
    rows_in = _rows(KAPPAS)
    np.testing.assert_array_equal(back["clock_qubits"], [6] * 4)
    np.testing.assert_array_equal(back["kappa_a"], KAPPAS)
    for key in ("overlap", "p_success", "leakage", "resolution"):
        np.testing.assert_array_equal(back[key], [r[key] for r in rows_in])
    np.testing.assert_array_equal(back["ii92_applies"], [False, False, True, False])
    assert back.attrs == {**SPLIT, "kappa_a_paper": 8.0}


def _stored(ii87: float, ii92: float, ill: float | None = 0.0, attrs: dict | None = None) -> TruncatedSweep:
    """A sweep as read from a file: one row at the paper's kappa_a = 8 (c = 5), chosen numbers."""
    sw = TruncatedSweep()
    sw.add("clock_qubits", np.array([5]), "count", "c")
    sw.add("kappa_a", np.array([8.0]), "1", "kappa_a")
    sw.add("overlap", np.array([0.7]), "1", "simulated")
    sw.add("overlap_haar", np.array([0.6]), "1", "Haar")
    sw.add("overlap_ii87", np.array([ii87]), "1", "II.87")
    sw.add("overlap_ii92", np.array([ii92]), "1", "II.92")
    sw.add("ii92_applies", np.array([True]), "1", "applies")
    if ill is not None:
        sw.add("ill_weight", np.array([ill]), "1", "ill")
    sw.attrs.update({"Delta_plus": 12, "Delta": 12, "a_plus": -0.25, "overlap_ii93": 0.95}
                    if attrs is None else attrs)
    return sw


def test_ii92_rows_hold_every_value_under_its_key():
    """One row per ii92_applies row, with exactly the keys the report reads and the stored values;
    on the built diagonal sweep (kappa_a = 8 = 2(T+1), nothing below 1/8, II.87 = 1) the row states
    that the 2 non-dissipative modes are what II.92 counts as truncated."""
    (row,) = _stored(0.8, 0.5).ii92_rows()
    assert set(row) == {"c", "kappa_a", "simulated", "ii87", "haar", "ii92", "ii93", "gap", "agree", "reason"}
    assert (row["c"], row["kappa_a"], row["simulated"], row["ii87"], row["haar"], row["ii92"], row["ii93"]) \
        == (5, 8.0, 0.7, 0.8, 0.6, 0.5, 0.95)
    assert row["gap"] == 0.5 - 0.8 and row["agree"] is False

    (row,) = _diagonal_sweep().ii92_rows()
    ref = _reference(D, B, 8.0)
    assert (row["c"], row["kappa_a"], row["simulated"], row["ii92"], row["ii93"]) \
        == (6, 8.0, _rows(KAPPAS)[2]["overlap"], 0.9, 10 / 12)
    assert row["ii87"] == pytest.approx(1.0, abs=1e-15) and row["haar"] == pytest.approx(ref["haar"], abs=1e-15)
    assert row["gap"] == pytest.approx(-0.1, abs=1e-15) and row["agree"] is False
    assert row["reason"] == ("nothing is truncated: no weight of b lies below 1/κ_a, so II.87 = 1; II.92 counts "
                             "the 2 non-dissipative modes of A as truncated (Δ₊ = 10 of Δ = 12 modes of A "
                             "dissipative, a₊ = -0.125)")


def test_agreement_at_exactly_the_tolerance():
    """gap = 0.02 - 0.04 = -0.02 exactly (Sterbenz): agree, with that reason; the next double above
    0.04 makes |gap| exceed 0.02 by one unit in the last place of 0.04: disagree."""
    assert 0.02 - 0.04 == -TOLERANCE
    (row,) = _stored(0.04, 0.02).ii92_rows()
    assert row["agree"] is True and row["reason"] == "agree within 0.02"
    (row,) = _stored(float(np.nextafter(0.04, 1.0)), 0.02).ii92_rows()
    assert row["agree"] is False and row["reason"].startswith("nothing is truncated")


@pytest.mark.parametrize(("d_plus", "what"), [
    (12, "II.92 counts the decay of the dissipative modes as lost overlap"),
    (11, "II.92 counts the 1 non-dissipative mode of A as truncated"),
    (10, "II.92 counts the 2 non-dissipative modes of A as truncated")])
def test_reason_when_nothing_is_truncated(d_plus, what):
    """Weight below the threshold 0, II.87 = 1, II.92 = 0.87: the reason names the Delta - Delta_+
    non-dissipative modes (none: the decay of the dissipative ones), with a_+ to 3 digits."""
    attrs = {"Delta_plus": d_plus, "Delta": 12, "a_plus": -0.123456}
    (row,) = _stored(1.0, 0.87, 0.0, attrs).ii92_rows()
    assert row["reason"] == ("nothing is truncated: no weight of b lies below 1/κ_a, so II.87 = 1; "
                             f"{what} (Δ₊ = {d_plus} of Δ = 12 modes of A dissipative, a₊ = -0.123)")


def test_reason_when_weight_lies_below_the_threshold():
    """Weight 0.36 below 1/kappa_a; the weight at the zero cut 1e-14 counts as none, one rounding unit
    above it counts (printed to 3 digits); an older file without the split attributes and without
    ill_weight reads 0 of 0 modes, a_+ and the weight NaN, and no eq. II.93."""
    counts = "Δ₊ = 12 of Δ = 12 modes of A dissipative, a₊ = -0.25"
    (row,) = _stored(0.6, 0.9, 0.36).ii92_rows()
    assert row["reason"] == (f"II.92 uses mode counts of A ({counts}); II.87 uses the spectrum of M, where "
                             "0.36 of the weight of b lies below 1/κ_a")
    (row,) = _stored(1.0, 0.9, WEIGHT_ZERO).ii92_rows()
    assert row["reason"] == ("nothing is truncated: no weight of b lies below 1/κ_a, so II.87 = 1; II.92 counts "
                             f"the decay of the dissipative modes as lost overlap ({counts})")
    (row,) = _stored(1.0, 0.9, float(np.nextafter(WEIGHT_ZERO, 1.0))).ii92_rows()
    assert row["reason"] == (f"II.92 uses mode counts of A ({counts}); II.87 uses the spectrum of M, where "
                             "1e-14 of the weight of b lies below 1/κ_a")
    (row,) = _stored(1.0, 0.9, None, {}).ii92_rows()
    assert np.isnan(row["ii93"])
    assert row["reason"] == ("II.92 uses mode counts of A (Δ₊ = 0 of Δ = 0 modes of A dissipative, a₊ = nan); "
                             "II.87 uses the spectrum of M, where nan of the weight of b lies below 1/κ_a")


def _case(readout: bool, attrs: dict) -> HHLCase:
    inst, hhl, res = Part(), Part(), Part(attrs={"kappa": 12.5})
    inst.add("rhs", B, "1", "right-hand side B")
    inst.attrs["T"] = T
    hhl.add("clock_qubits", np.array([5, 6]), "count", "clock register size c")
    hhl.add("fidelity", np.array([0.9, 0.95]), "1", "fidelity")
    sw = _diagonal_sweep()
    if not readout:
        return HHLCase(attrs, inst, hhl, sw, res)
    ro = Part(attrs={"delta": 0.1, "trials": 3})
    ro.add("shots", np.array([4, 7, 5]), "count", "shots until every amplitude above delta was seen")
    return HHLCase(attrs, inst, hhl, sw, res, ro)


def _same(got: Part, want: Part) -> None:
    assert set(got.arrays) == set(want.arrays) and got.attrs == want.attrs
    for name, (data, units, desc) in want.arrays.items():
        np.testing.assert_array_equal(got.arrays[name][0], data)
        assert got.arrays[name][1:] == (units, desc), name


def test_case_round_trip_with_and_without_readout(tmp_path):
    """Each part written and read back unchanged (datasets, units, descriptions, attributes); a case
    without read-out writes no ``readout`` group and reads back None; the case's name and method from
    its attributes, else "" and "statevector"."""
    with_ro = _case(True, {"case": "random", "method": "krylov", "complete": True})
    without = _case(False, {"complete": True})
    assert without.readout is None
    with h5py.File(tmp_path / "c.h5", "w") as fh:
        with_ro.to_group(fh.create_group("hhl/random"))
        without.to_group(fh.create_group("hhl/plain"))
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        assert set(fh["hhl/random"]) == {"instance", "hhl", "truncated", "resources", "readout"}
        assert set(fh["hhl/plain"]) == {"instance", "hhl", "truncated", "resources"}
        cases = read_cases(fh)
    back = cases["random"]
    assert (back.name, back.method) == ("random", "krylov")
    for part in ("instance", "hhl", "truncated", "resources", "readout"):
        _same(getattr(back, part), getattr(with_ro, part))
    assert isinstance(back.truncated, TruncatedSweep)
    plain = cases["plain"]
    assert plain.readout is None and (plain.name, plain.method) == ("", "statevector")
    _same(plain.hhl, without.hhl)


def test_read_cases_takes_only_complete_case_groups(tmp_path):
    """/hhl holds a complete case, one marked incomplete, one without the ``complete`` attribute, one
    complete but without its ``hhl`` part, and a dataset (the model table): only the first is read.
    A file without /hhl gives no cases."""
    with h5py.File(tmp_path / "r.h5", "w") as fh:
        assert read_cases(fh) == {}
        for name, complete in [("good", True), ("broken", False), ("unmarked", None)]:
            g = fh.create_group(f"hhl/{name}")
            _case(False, {"case": name}).to_group(g)
            if complete is not None:
                g.attrs["complete"] = complete
        fh.create_group("hhl/partial/instance")
        fh["hhl/partial"].attrs["complete"] = True
        fh.create_dataset("hhl/model_table", data=np.arange(3.0))
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert list(read_cases(fh)) == ["good"]


def test_part_add_keeps_lists_and_makes_arrays_of_the_rest():
    """A list (a string column) is kept as given; anything else becomes an array."""
    p = Part()
    names = ["a", "bb"]
    p.add("names", names, "1", "labels")
    p.add("x", (1.5, 2.5), "1", "values")
    p.add("s", 3, "count", "a scalar")
    assert p.arrays["names"][0] is names
    assert isinstance(p.arrays["x"][0], np.ndarray) and p.arrays["x"][0].dtype == np.float64
    assert isinstance(p.arrays["s"][0], np.ndarray) and p.arrays["s"][0].shape == ()


def test_part_reads_defaults_and_byte_attributes(tmp_path):
    """A dataset without units or description reads as units "1" and its own name; attributes stored as
    fixed-length byte strings come back as str (UTF-8; an invalid byte as U+FFFD), on the group and on
    a dataset's units."""
    with h5py.File(tmp_path / "p.h5", "w") as fh:
        g = fh.create_group("g")
        g.create_dataset("raw", data=np.arange(2))
        ds = g.create_dataset("shots", data=np.arange(3))
        ds.attrs["units"] = np.bytes_(b"count")
        ds.attrs["description"] = np.bytes_("café".encode())
        g.attrs["label"] = np.bytes_("κ_a".encode())
        g.attrs["bad"] = np.bytes_(b"ab\xff")
        g.create_group("sub")
    with h5py.File(tmp_path / "p.h5", "r") as fh:
        assert isinstance(fh["g"].attrs["bad"], bytes)        # what h5py hands _plain
        p = Part.from_group(fh["g"])
    assert set(p.arrays) == {"raw", "shots"}
    assert p.arrays["raw"][1:] == ("1", "raw") and p.arrays["shots"][1:] == ("count", "café")
    assert p.attrs == {"label": "κ_a", "bad": "ab\ufffd"}
    assert _plain(b"\xffx") == "\ufffdx" and _plain(np.float32(0.5)) == 0.5 and type(_plain(np.int64(3))) is int
