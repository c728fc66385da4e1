"""The HDF5 layout of one ``hhl`` case (``/hhl/<case>``, docs/schema/hhl.md), defined once.

:class:`HHLCase` holds everything the ``hhl`` stage computes for one linear system: the
instance (``instance/``), plain HHL per clock size (``hhl/``), truncated HHL per
``(c, kappa_a)`` (``truncated/``, a :class:`TruncatedSweep`), the resource estimates
(``resources/``) and the read-out (``readout/``).  :meth:`HHLCase.to_group` writes it inside
the store's atomic commit and :meth:`HHLCase.from_group` reads it back, so the stage and the
report share one definition of the layout.  No torch here.

The truncated sweep stores, per row, four numbers on the same M:

* ``overlap``: the simulated truncated-HHL overlap |<x|<well|x~>| (unsquared);
* ``overlap_ii87``: eq. II.87 from the exact eigen-decomposition of the embedded system;
* ``overlap_haar``: the annealed Haar estimate, eq. II.89-II.91;
* ``overlap_ii92``: the paper's eq. II.92 from the Carleman mode counts.  It has no kappa_a in it:
  it is the paper's estimate for ``kappa_a = 2(T+1)`` (column ``ii92_applies`` marks that row).

"overlap" always means the unsquared <x|x~>; "fidelity" always its square (``fidelity``,
``fidelity_ii87``, ``fidelity_haar``, ``fidelity_ii92``).  :meth:`TruncatedSweep.ii92_rows`
states where eq. II.92 and eq. II.87 disagree and why (docs/science.md, "Eq. II.92 against
eq. II.87").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

#: |eq. II.92 - eq. II.87| above this counts as a disagreement (absolute, on unsquared overlaps).
II92_TOLERANCE = 0.02

#: weight of |b> below 1/kappa_a (a sum of squared eigen-coefficients of a unit vector) at or
#: under this counts as none: rounding of the eigen-decomposition leaves about 1e-16 per term
ILL_WEIGHT_ZERO = 1e-14


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class Part:
    """One subgroup: datasets ``name -> (data, units, description)`` and scalar attributes."""

    arrays: dict[str, tuple[Any, str, str]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, data: Any, units: str, description: str) -> None:
        """Add dataset ``name`` with its units and one-line description."""
        self.arrays[name] = (np.asarray(data) if not isinstance(data, list) else data, units, description)

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self.arrays[name][0])

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def to_group(self, group: h5py.Group) -> None:
        """Write the datasets (through :func:`hpcqml.store.write_dataset`) and the attributes."""
        from hpcqml.store import write_dataset

        for name, (data, units, description) in self.arrays.items():
            write_dataset(group, name, data, units, description)
        for name, value in self.attrs.items():
            group.attrs[name] = value

    @classmethod
    def from_group(cls, group: h5py.Group) -> Part:
        """The part a group holds (string datasets stay bytes, as h5py reads them)."""
        arrays = {}
        for name, ds in group.items():
            if isinstance(ds, h5py.Dataset):
                arrays[name] = (ds[()], str(_plain(ds.attrs.get("units", "1"))),
                                str(_plain(ds.attrs.get("description", name))))
        return cls(arrays=arrays, attrs={k: _plain(v) for k, v in group.attrs.items()})


@dataclass
class TruncatedSweep(Part):
    """``truncated/``: truncated HHL (eq. II.86) per (c, kappa_a) beside eq. II.87, II.89-II.91 and II.92."""

    @classmethod
    def build(cls, rows: list[dict[str, Any]], system: Any = None, split: dict[str, Any] | None = None,
              T: int | None = None) -> TruncatedSweep:
        """The sweep from the simulated rows (keys ``c``, ``kappa_a``, ``overlap``, ``p_success``,
        ``leakage``, ``resolution``).

        Args:
            rows: one dict per simulated truncated run.
            system: the dense Hermitian embedding (:func:`hpcqml.hhl.statevector.embed`); eq. II.87,
                the Haar estimate, the weight below the threshold and the threshold margin need its
                eigen-decomposition and are left out without it (krylov method).
            split: Carleman cases: ``Delta_plus``, ``Delta``, ``a_plus``, ``overlap_ii92``,
                ``overlap_ii93`` (and their fidelities), stored as attributes and eq. II.92 per row.
            T: Carleman cases: the number of steps (eq. II.92 applies at kappa_a = 2(T+1)).
        """
        from hpcqml.hhl.truncated import closed_form_overlap, eigen_coefficients, haar_average_overlap

        def col(key: str, dtype: Any) -> np.ndarray:
            return np.array([r[key] for r in rows], dtype=dtype)

        kappas = col("kappa_a", np.float64)
        out = cls()
        out.add("clock_qubits", col("c", np.int64), "count", "clock register size c")
        out.add("kappa_a", kappas, "1", "truncation parameter kappa_a (eq. II.86)")
        overlap = col("overlap", np.float64)
        out.add("overlap", overlap, "1",
                "simulated truncated HHL: |<x|<well|x~>| with the full solution (unsquared overlap)")
        out.add("fidelity", overlap**2, "1", "simulated truncated HHL: fidelity = overlap squared")
        out.add("p_success", col("p_success", np.float64), "1",
                "probability of ancilla 1 and clock 0, both flag branches")
        out.add("leakage", col("leakage", np.float64), "1", "1 - p_success/p_ancilla")
        out.add("resolution", col("resolution", np.float64), "1", "one clock bin 2 pi/(t0 2^c) in units of ||M||_2")
        if system is not None:
            lam, beta = eigen_coefficients(system)
            ii87 = np.array([closed_form_overlap(lam, beta, k) for k in kappas], dtype=np.float64)
            haar = np.array([haar_average_overlap(system.spectrum, k) for k in kappas], dtype=np.float64)
            out.add("overlap_ii87", ii87, "1", "eq. II.87 from the exact eigen-decomposition (unsquared overlap)")
            out.add("fidelity_ii87", ii87**2, "1", "eq. II.87 squared (fidelity)")
            out.add("overlap_haar", haar, "1", "annealed Haar estimate eq. II.89-II.91 (unsquared overlap)")
            out.add("fidelity_haar", haar**2, "1", "Haar estimate squared (fidelity)")
            w2 = np.abs(beta) ** 2
            out.add("ill_weight", np.array([float(np.sum(w2[np.abs(lam) < 1.0 / k])) for k in kappas]), "1",
                    "weight of |b> on eigenvalues below the threshold, sum |beta_j|^2 over |lambda_j| < 1/kappa_a")
            occupied = np.abs(lam[np.abs(beta) > 1e-12])
            out.add("threshold_margin", np.array([float(np.min(np.abs(occupied - 1.0 / k))) for k in kappas]), "1",
                    "min over occupied eigenvalues of | |lambda| - 1/kappa_a |")
        if split is not None:
            out.attrs.update(split)
            ii92 = float(split["overlap_ii92"])
            out.add("overlap_ii92", np.full(kappas.shape, ii92), "1",
                    "eq. II.92 from the Carleman mode counts (unsquared; it has no kappa_a: stated for 2(T+1))")
            out.add("fidelity_ii92", np.full(kappas.shape, ii92**2), "1", "eq. II.92 squared (fidelity)")
            if T is not None:
                out.attrs["kappa_a_paper"] = float(2 * (T + 1))
                out.add("ii92_applies", kappas == float(2 * (T + 1)), "1",
                        "this row's kappa_a is the paper's 2(T+1), the one eq. II.92 is stated for")
        return out

    @classmethod
    def from_group(cls, group: h5py.Group) -> TruncatedSweep:
        part = Part.from_group(group)
        return cls(arrays=part.arrays, attrs=part.attrs)

    def ii92_rows(self) -> list[dict[str, Any]]:
        """Eq. II.92 beside eq. II.87, the Haar estimate and the simulation at kappa_a = 2(T+1), one
        row per clock size, with whether II.92 and II.87 agree within :data:`II92_TOLERANCE` and why not.

        Empty for a sweep without eq. II.92 or II.87 (file systems, the krylov method) or without
        the paper's kappa_a.
        """
        if "ii92_applies" not in self or "overlap_ii87" not in self:
            return []
        rows = []
        for i in np.flatnonzero(self["ii92_applies"]):
            ii92, ii87 = float(self["overlap_ii92"][i]), float(self["overlap_ii87"][i])
            gap = ii92 - ii87
            rows.append({"c": int(self["clock_qubits"][i]), "kappa_a": float(self["kappa_a"][i]),
                         "simulated": float(self["overlap"][i]), "ii87": ii87, "haar": float(self["overlap_haar"][i]),
                         "ii92": ii92, "ii93": float(self.attrs.get("overlap_ii93", np.nan)), "gap": gap,
                         "agree": abs(gap) <= II92_TOLERANCE, "reason": self._reason(i, gap)})
        return rows

    def _reason(self, i: int, gap: float) -> str:
        """Why eq. II.92 and eq. II.87 differ on this row, in words with the numbers."""
        if abs(gap) <= II92_TOLERANCE:
            return f"agree within {II92_TOLERANCE:g}"
        a = self.attrs
        d_plus, d_all, a_plus = int(a.get("Delta_plus", 0)), int(a.get("Delta", 0)), float(a.get("a_plus", np.nan))
        ill = float(self["ill_weight"][i]) if "ill_weight" in self else float("nan")
        counts = f"Δ₊ = {d_plus} of Δ = {d_all} modes of A dissipative, a₊ = {a_plus:.3g}"
        # no '|' in these texts: the report puts them in markdown table cells.  The weight below
        # the threshold is a sum of |beta_j|^2 from an eigen-decomposition: a coefficient that is
        # zero in exact arithmetic comes out at rounding level, so "nothing truncated" is a
        # weight within a few units of rounding of 0, not an exact 0.0
        if abs(ill) <= ILL_WEIGHT_ZERO:
            rest = d_all - d_plus
            what = ("II.92 counts the decay of the dissipative modes as lost overlap"
                    if rest == 0 else
                    f"II.92 counts the {rest} non-dissipative mode{'s' if rest != 1 else ''} of A as truncated")
            return (f"nothing is truncated: no weight of b lies below 1/κ_a, so II.87 = 1; {what} "
                    f"({counts})")
        return (f"II.92 uses mode counts of A ({counts}); II.87 uses the spectrum of M, where "
                f"{ill:.3g} of the weight of b lies below 1/κ_a")


@dataclass
class HHLCase:
    """One ``/hhl/<case>`` group: its attributes and its five parts (``readout`` may be absent)."""

    attrs: dict[str, Any]
    instance: Part
    hhl: Part
    truncated: TruncatedSweep
    resources: Part
    readout: Part | None = None

    @property
    def name(self) -> str:
        return str(self.attrs.get("case", ""))

    @property
    def method(self) -> str:
        return str(self.attrs.get("method", "statevector"))

    def to_group(self, group: h5py.Group) -> None:
        """Write the whole case into ``group`` (called inside :meth:`hpcqml.store.ResultsStore.commit`)."""
        self.instance.to_group(group.create_group("instance"))
        self.hhl.to_group(group.create_group("hhl"))
        self.truncated.to_group(group.create_group("truncated"))
        self.resources.to_group(group.create_group("resources"))
        if self.readout is not None:
            self.readout.to_group(group.create_group("readout"))
        for name, value in self.attrs.items():
            group.attrs[name] = value

    @classmethod
    def from_group(cls, group: h5py.Group) -> HHLCase:
        """The case a group written by :meth:`to_group` holds (older files: what is there)."""
        def part(name: str) -> Part:
            return Part.from_group(group[name]) if name in group else Part()

        return cls(attrs={k: _plain(v) for k, v in group.attrs.items()}, instance=part("instance"),
                   hhl=part("hhl"),
                   truncated=TruncatedSweep.from_group(group["truncated"]) if "truncated" in group
                   else TruncatedSweep(),
                   resources=part("resources"), readout=Part.from_group(group["readout"]) if "readout" in group
                   else None)


def read_cases(fh: h5py.File) -> dict[str, HHLCase]:
    """Every complete ``/hhl/<case>`` group of an open results file, by name (the model table left out)."""
    if "hhl" not in fh:
        return {}
    return {k: HHLCase.from_group(g) for k, g in fh["hhl"].items()
            if isinstance(g, h5py.Group) and "hhl" in g and bool(g.attrs.get("complete", False))}
