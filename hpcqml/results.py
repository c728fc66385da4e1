"""Read a results file as typed objects: ``hpcqml.results.open(path)``.

The one reader of the layout :mod:`hpcqml.store` writes (``docs/results-schema.md``), used
by ``hpcqml info``, the report and the notebook, so that no reader hard-codes HDF5 paths::

    import hpcqml.results
    with hpcqml.results.open("results/demo.h5") as res:
        res.latest.status, res.latest.versions["petsc"]
        res.perf["spectrum"].wall_seconds.max()
        res.spectra["step_000010"].nodes          # Ritz nodes, one row per probe
        res.spectra["step_000010"].spectrum.negative_mass()   # an estimate with its uncertainty
        res.training.arrays["loss"]
        res.qcm["f1.000_seed0"].orders[2].arrays["eta1"]

Everything is read when first asked for; a file whose bytes are damaged gives one
:class:`~hpcqml.errors.InputFileError` naming it. Only :mod:`h5py` and :mod:`numpy` are
imported (``hpcqml info`` starts fast) until spectra are asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import h5py
import numpy as np

from hpcqml.perf import PerfRecord
from hpcqml.store import DAMAGE_ERRORS, damaged, is_complete, open_results
from hpcqml.training.log import TrainingLog

T = TypeVar("T")


def decode(value: Any) -> Any:
    """An attribute or dataset value with bytes decoded to ``str`` (arrays of them too)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O"):
        return np.array([decode(v) for v in value.ravel()], dtype=object).reshape(value.shape)
    if isinstance(value, np.generic):
        return value.item()
    return value


def attrs_of(obj: h5py.HLObject) -> dict[str, Any]:
    """All attributes of a group or dataset, decoded."""
    return {k: decode(v) for k, v in obj.attrs.items()}


def arrays_of(group: h5py.Group) -> dict[str, np.ndarray]:
    """The datasets directly inside ``group`` as arrays (strings decoded)."""
    return {k: decode(v[()]) for k, v in group.items() if isinstance(v, h5py.Dataset)}


def labels_of(group: h5py.Group) -> tuple[dict[str, str], dict[str, str]]:
    """``(units, descriptions)`` of the datasets directly inside ``group``, by name."""
    units, descriptions = {}, {}
    for k, v in group.items():
        if isinstance(v, h5py.Dataset):
            units[k] = str(decode(v.attrs.get("units", "")))
            descriptions[k] = str(decode(v.attrs.get("description", "")))
    return units, descriptions


@dataclass(frozen=True)
class Quantity:
    """A stored array with what it means: ``value`` in ``units``, described by ``description``."""

    name: str
    value: Any
    units: str
    description: str

    def __str__(self) -> str:
        return f"{self.name} [{self.units}]: {self.description}"


#: Clearer names for stored datasets whose names read alike, by the group they live in
#: (shell patterns on the group's path).  In ``proxy/<C>`` the dataset ``grid`` is the error
#: proxy E(t) on the t grid computed from the smoothed density, while ``density/grid`` is a
#: grid of eigenvalues.  :meth:`Section.array`, :meth:`Section.quantity` and
#: :class:`ProxyCurve` accept either name; the stored names are unchanged, so older files read
#: as before (docs/results-schema.md, "Clearer names").
ALIASES: dict[str, dict[str, str]] = {
    "/spectrum/*/result/proxy/*": {
        "error_proxy_nodes": "nodes",
        "error_proxy_density": "grid",
        "log_error_proxy_nodes": "log_nodes",
        "log_error_proxy_density": "log_grid",
        "log_error_proxy_nodes_stderr": "log_nodes_stderr",
    },
    "/spectrum/*/result/density": {"eigenvalue_grid": "grid", "density": "rho"},
}


def aliases_for(path: str) -> dict[str, str]:
    """The clearer names (clear name -> stored name) of the datasets in the group at ``path``."""
    import fnmatch

    path = "/" + path.strip("/")
    out: dict[str, str] = {}
    for pattern, names in ALIASES.items():
        if fnmatch.fnmatchcase(path, pattern):
            out.update(names)
    return out


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        from hpcqml.errors import UserError

        raise UserError("to_dataframe() needs pandas: pip install pandas (make install brings it)") from None
    return pandas


def _xarray() -> Any:
    try:
        import xarray
    except ImportError:
        from hpcqml.errors import UserError

        raise UserError("to_xarray() needs xarray: pip install xarray (make install brings it)") from None
    return xarray


def _scalar_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes that fit in one table cell (numbers, strings, booleans)."""
    return {k: v for k, v in attrs.items() if isinstance(v, (int, float, str, bool, np.number, np.bool_))}


@dataclass
class Invocation:
    """One invocation of hpcqml on the file (``/provenance/run_NNN``)."""

    name: str
    status: str
    start_time: str
    end_time: str
    command_line: str
    mpi_size: int
    hosts: list[str]
    versions: dict[str, str]
    seeds: dict[str, int]
    attrs: dict[str, Any] = field(repr=False)

    @classmethod
    def from_group(cls, name: str, group: h5py.Group) -> "Invocation":
        a = attrs_of(group)
        hosts = a.get("hosts", [])
        if isinstance(hosts, str):  # files before typed provenance kept JSON text
            hosts = json.loads(hosts) if hosts.startswith("[") else [hosts]
        versions = {k[8:]: str(v) for k, v in a.items() if k.startswith("version_")}
        if "versions" in a:
            versions.update(json.loads(a["versions"]))
        seeds = {k[5:]: int(v) for k, v in a.items() if k.startswith("seed_")}
        if "seeds" in a:
            seeds.update(json.loads(a["seeds"]))
        return cls(name=name, status=str(a.get("status", "unknown")), start_time=str(a.get("start_time", "")),
                   end_time=str(a.get("end_time", "")), command_line=str(a.get("command_line", "")),
                   mpi_size=int(a.get("mpi_size", 0)), hosts=[str(h) for h in np.ravel(hosts)],
                   versions=versions, seeds=seeds, attrs=a)

    def get(self, key: str, default: Any = "") -> Any:
        """Any other recorded attribute (``job_id``, ``threads``, ``petsc_options``, ...)."""
        return self.attrs.get(key, default)


@dataclass(frozen=True)
class Fact:
    """One line of a provenance summary: ``label: text``; ``code`` marks a command or digest."""

    label: str
    text: str
    code: bool = False


def provenance_facts(inv: Invocation | None, file_attrs: dict[str, Any]) -> list[Fact]:
    """The latest invocation as labelled lines, the one summary ``hpcqml info`` prints as
    text and ``hpcqml report`` as Markdown.

    Args:
        inv: the latest invocation (None: none recorded).
        file_attrs: the file's root attributes (version, config digest).
    """
    if inv is None:
        return [Fact("latest invocation", "none recorded")]
    end = inv.end_time or "(running)"
    facts = [Fact(f"latest invocation {inv.name}", f"{inv.status}, {inv.start_time} -> {end}"),
             Fact("command_line", inv.command_line, code=True)]
    if inv.get("petsc_options"):
        facts.append(Fact("petsc_options", str(inv.get("petsc_options")), code=True))
    facts += [Fact("mpi_size", f"{inv.mpi_size} on {', '.join(inv.hosts)}; job id {inv.get('job_id', 'none')}; "
                               f"threads {inv.get('threads', '?')} ({inv.get('threads_source', '?')})"),
              Fact("code", f"hpcqml {decode(file_attrs.get('hpcqml_version', '?'))}, "
                           f"git {inv.get('git_commit', '?')}"),
              Fact("config sha256", str(decode(file_attrs.get("config_sha256", "?")))[:16], code=True)]
    if inv.get("error"):
        facts.append(Fact("error", str(inv.get("error"))))
    if inv.versions:
        facts.append(Fact("versions", ", ".join(f"{k} {v}" for k, v in sorted(inv.versions.items()))))
    return facts


@dataclass
class StageState:
    """Whether a stage ran, and whether its results still match its inputs."""

    name: str
    state: str  # "complete", "partial" or "not run"
    stale: bool = False
    stale_because: str = ""
    fingerprint: str = ""


@dataclass
class Section:
    """A stage's group (or a case/state inside it): its attributes and its arrays.

    ``units`` and ``descriptions`` give, by array name, what the store wrote beside each
    dataset; :meth:`quantity` bundles one array with both, :meth:`to_dataframe` and
    :meth:`to_xarray` export the arrays with them.
    """

    name: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]
    children: dict[str, "Section"] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    #: clearer names of some arrays (clear name -> stored name, :data:`ALIASES`)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_group(cls, name: str, group: h5py.Group, depth: int = 3) -> "Section":
        kids = {}
        if depth > 0:
            kids = {k: cls.from_group(k, v, depth - 1) for k, v in group.items() if isinstance(v, h5py.Group)}
        units, descriptions = labels_of(group)
        return cls(name=name, attrs=attrs_of(group), arrays=arrays_of(group), children=kids,
                   units=units, descriptions=descriptions, aliases=aliases_for(str(group.name)))

    def stored_name(self, name: str) -> str:
        """The stored name of array ``name`` (a clearer alias is translated; others pass unchanged)."""
        return name if name in self.arrays else self.aliases.get(name, name)

    def array(self, name: str) -> np.ndarray:
        """The array ``name`` (its stored name or a clearer alias)."""
        return self.quantity(name).value

    def quantity(self, name: str) -> Quantity:
        """The array ``name`` (its stored name or a clearer alias) with its units and description."""
        stored = self.stored_name(name)
        if stored not in self.arrays:
            raise KeyError(f"{self.name}: no dataset {name!r} (have {', '.join(sorted(self.arrays)) or 'none'})")
        return Quantity(name, self.arrays[stored], self.units.get(stored, ""), self.descriptions.get(stored, ""))

    def to_dataframe(self) -> Any:
        """The one-dimensional arrays of the longest common length as a pandas DataFrame.

        Each column's units and description are in ``df.attrs["units"]`` and
        ``df.attrs["descriptions"]``; the section's attributes in ``df.attrs["attrs"]``.
        Arrays of other lengths or more dimensions are left out (use :meth:`to_xarray`).
        """
        pandas = _pandas()
        columns = {k: v for k, v in self.arrays.items() if np.ndim(v) == 1}
        lengths = [len(v) for v in columns.values()]
        length = max(set(lengths), key=lambda n: (lengths.count(n), n)) if lengths else 0
        columns = {k: v for k, v in columns.items() if len(v) == length}
        df = pandas.DataFrame(columns)
        df.attrs.update(units={k: self.units.get(k, "") for k in columns},
                        descriptions={k: self.descriptions.get(k, "") for k in columns},
                        attrs=_scalar_attrs(self.attrs), name=self.name)
        return df

    def to_xarray(self) -> Any:
        """Every array as an xarray Dataset variable, with ``units`` and ``description``
        attributes; dimensions are named ``<array>_dim<i>`` except that arrays of one shared
        length share the dimension ``row``.
        """
        xarray = _xarray()
        common = self.to_dataframe().columns if self.arrays else []
        variables = {}
        for k, v in self.arrays.items():
            dims = ("row",) if k in common else tuple(f"{k}_dim{i}" for i in range(np.ndim(v)))
            variables[k] = xarray.Variable(dims, np.asarray(v), attrs={"units": self.units.get(k, ""),
                                                                       "description": self.descriptions.get(k, "")})
        return xarray.Dataset(variables, attrs={"name": self.name, **_scalar_attrs(self.attrs)})


@dataclass
class ProxyCurve:
    """The error proxy E(t) of one mode convention on t = 0..t_max (``spectrum/<label>/result/proxy/<C>``).

    Eq. III.12/III.13 with a = -eta lambda (``eta``) or a = -lambda (``paper``), eq. II.65.
    The stored dataset names are kept; the fields have clearer names (:data:`ALIASES`):
    ``error_proxy_nodes`` is stored as ``nodes`` (from the Ritz nodes and weights),
    ``error_proxy_density`` as ``grid`` (from the smoothed density on its eigenvalue grid;
    a curve over t, not a grid).  ``t`` is ``proxy/t`` (count); every curve is dimensionless.
    """

    convention: str
    t: np.ndarray
    error_proxy_nodes: np.ndarray
    error_proxy_density: np.ndarray | None
    log_error_proxy_nodes: np.ndarray | None
    log_error_proxy_density: np.ndarray | None
    #: jackknife standard error of ``log_error_proxy_nodes`` over the probes (NaN below 3 probes)
    log_error_proxy_nodes_stderr: np.ndarray | None
    attrs: dict[str, Any]

    @classmethod
    def from_group(cls, convention: str, group: h5py.Group, t: np.ndarray) -> "ProxyCurve":
        """Read one ``proxy/<C>`` group (stored names, or the clearer ones should a writer use them)."""
        names = aliases_for(str(group.name))

        def get(clear: str) -> np.ndarray | None:
            for key in (clear, names.get(clear, clear)):
                if key in group and isinstance(group[key], h5py.Dataset):
                    return np.asarray(group[key][()])
            return None

        nodes = get("error_proxy_nodes")
        if nodes is None:
            raise KeyError(f"{group.name}: no error proxy from the nodes (dataset 'nodes')")
        return cls(convention=convention, t=t, error_proxy_nodes=nodes, error_proxy_density=get("error_proxy_density"),
                   log_error_proxy_nodes=get("log_error_proxy_nodes"),
                   log_error_proxy_density=get("log_error_proxy_density"),
                   log_error_proxy_nodes_stderr=get("log_error_proxy_nodes_stderr"), attrs=attrs_of(group))


def proxy_curves(result: h5py.Group) -> dict[str, ProxyCurve]:
    """The error-proxy curves of one ``spectrum/<label>/result`` group, by convention (empty if none)."""
    proxy = result.get("proxy")
    if not isinstance(proxy, h5py.Group):
        return {}
    out = {}
    for conv, g in proxy.items():
        if isinstance(g, h5py.Group) and ("nodes" in g or "error_proxy_nodes" in g):
            length = len(g["nodes"] if "nodes" in g else g["error_proxy_nodes"])
            t = proxy["t"][()] if "t" in proxy else np.arange(length, dtype=np.float64)
            out[conv] = ProxyCurve.from_group(conv, g, np.asarray(t))
    return out


@dataclass
class StateSpectrum:
    """The SLQ result of one model state (``/spectrum/<label>/result``).

    ``spectrum`` is the :class:`hpcqml.hessian.spectrum.Spectrum` the stage wrote (per-probe
    nodes, weights, residual bounds; its methods give every estimate with its uncertainty);
    ``grid``/``rho``/``sigma`` the stored smoothed density; ``attrs`` the result's attributes.
    """

    label: str
    spectrum: Any   # hpcqml.hessian.spectrum.Spectrum
    grid: np.ndarray | None
    rho: np.ndarray | None
    sigma: float | None
    attrs: dict[str, Any]
    #: the eigenvalue units the stage wrote on the nodes (those of the loss per parameter squared)
    units: str = ""
    #: the error-proxy curves E(t) by mode convention (``eta``, ``paper``)
    proxy: dict[str, ProxyCurve] = field(default_factory=dict)

    @property
    def eigenvalue_grid(self) -> np.ndarray | None:
        """The eigenvalues the smoothed density is evaluated at (stored as ``density/grid``)."""
        return self.grid

    @property
    def density(self) -> np.ndarray | None:
        """The smoothed density on :attr:`eigenvalue_grid` (stored as ``density/rho``)."""
        return self.rho

    @property
    def nodes(self) -> np.ndarray:
        """Ritz nodes, one row per probe (NaN-padded)."""
        return self.spectrum.nodes

    @property
    def weights(self) -> np.ndarray:
        """Gauss weights, one row per probe (each row sums to 1)."""
        return self.spectrum.weights

    def to_dataframe(self) -> Any:
        """The SLQ nodes in long form: one row per (probe, node) with ``theta`` (eigenvalue
        units), ``weight`` (Gauss weight within its probe, dimensionless) and ``residual``
        (the node's residual bound, eigenvalue units); padding rows are dropped.
        """
        pandas = _pandas()
        sp = self.spectrum
        probe = np.repeat(np.asarray(sp.probes, dtype=np.int64), sp.nodes.shape[1])
        index = np.tile(np.arange(sp.nodes.shape[1], dtype=np.int64), sp.nodes.shape[0])
        df = pandas.DataFrame({"probe": probe, "node": index, "theta": sp.nodes.ravel(),
                               "weight": sp.weights.ravel(), "residual": sp.residuals.ravel()})
        df = df[np.isfinite(df["theta"].to_numpy())].reset_index(drop=True)
        df.attrs.update(units={"probe": "count", "node": "count", "theta": self.units, "weight": "1",
                               "residual": self.units},
                        descriptions={"theta": "Ritz value (Gauss node) of the probe's Lanczos run",
                                      "weight": "Gauss weight; the SLQ measure gives it weight/n_probes",
                                      "residual": "residual bound |beta_k s_ki| of the Ritz pair"},
                        state=self.label)
        return df

    def to_xarray(self) -> Any:
        """Nodes, weights and residual bounds as an xarray Dataset over (probe, node), and the
        smoothed density over ``eigenvalue`` when one is stored.
        """
        xarray = _xarray()
        sp = self.spectrum
        coords = {"probe": np.asarray(sp.probes, dtype=np.int64), "node": np.arange(sp.nodes.shape[1])}
        data: dict[str, tuple[tuple[str, ...], Any, dict[str, str]]] = {
                "theta": (("probe", "node"), sp.nodes, {"units": self.units, "description": "Ritz values"}),
                "weight": (("probe", "node"), sp.weights, {"units": "1", "description": "Gauss weights"}),
                "residual": (("probe", "node"), sp.residuals,
                             {"units": self.units, "description": "residual bounds of the Ritz pairs"})}
        if self.grid is not None and self.rho is not None:
            coords["eigenvalue"] = self.grid
            data["density"] = (("eigenvalue",), self.rho, {
                "units": f"1/({self.units})", "description": f"Gaussian-smoothed SLQ density, sigma {self.sigma}"})
        return xarray.Dataset(data, coords=coords, attrs={"state": self.label, **_scalar_attrs(self.attrs)})


def _state_spectrum(label: str, result: h5py.Group) -> StateSpectrum:
    """Read one ``spectrum/<label>/result`` group (imports the Hessian package, hence torch)."""
    from hpcqml.hessian.spectrum import Spectrum

    dens = result.get("density")
    return StateSpectrum(
        label=label, spectrum=Spectrum.from_hdf5(result),
        grid=dens["grid"][()] if dens is not None and "grid" in dens else None,
        rho=dens["rho"][()] if dens is not None and "rho" in dens else None,
        sigma=float(dens.attrs["sigma"]) if dens is not None and "sigma" in dens.attrs else None,
        attrs=attrs_of(result), units=str(decode(result["nodes"].attrs.get("units", ""))) if "nodes" in result else "",
        proxy=proxy_curves(result))


@dataclass
class QcmCase:
    """One Carleman instance: its attributes and one :class:`Section` per order ``N``."""

    label: str
    attrs: dict[str, Any]
    orders: dict[int, Section]
    #: the typed report of each order N (:class:`hpcqml.carleman.analysis.OrderReport`)
    reports: dict[int, Any] = field(default_factory=dict)

    def to_dataframe(self) -> Any:
        """One row per Carleman order ``N``: that order's scalar attributes (errors, bounds,
        condition numbers, flags), with the case's own attributes in ``df.attrs``.
        """
        pandas = _pandas()
        rows = [{"N": n, **_scalar_attrs(sec.attrs)} for n, sec in self.orders.items()]
        df = pandas.DataFrame(rows)
        df.attrs.update(case=self.label, attrs=_scalar_attrs(self.attrs))
        return df


def cases_table(cases: dict[str, Any]) -> Any:
    """One row per case (a Section or QcmCase): its scalar attributes, indexed by label."""
    pandas = _pandas()
    rows = {label: _scalar_attrs(case.attrs) for label, case in cases.items()}
    return pandas.DataFrame.from_dict(rows, orient="index")


class Results:
    """A results file opened for reading; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file: h5py.File = open_results(self.path)

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def read(self, fn: Callable[[h5py.File], T]) -> T:
        """``fn(h5py file)``, with damage reported as one InputFileError."""
        try:
            return fn(self.file)
        except DAMAGE_ERRORS as exc:
            raise damaged(self.path, exc) from None

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (schema version, config, the latest invocation as ``prov_*``)."""
        return self.read(attrs_of)

    @cached_property
    def provenance(self) -> list[Invocation]:
        """Every invocation, oldest first."""
        def body(fh: h5py.File) -> list[Invocation]:
            runs = fh.get("provenance", {})
            return [Invocation.from_group(k, runs[k]) for k in sorted(runs)]
        return self.read(body)

    @property
    def latest(self) -> Invocation | None:
        """The latest invocation (what the root ``prov_*`` attributes mirror)."""
        return self.provenance[-1] if self.provenance else None

    @cached_property
    def perf(self) -> dict[str, PerfRecord]:
        """Complete performance records by stage."""
        def body(fh: h5py.File) -> dict[str, PerfRecord]:
            perf = fh.get("perf", {})
            return {k: PerfRecord.from_group(k, perf[k]) for k in perf if is_complete(fh, f"perf/{k}")}
        return self.read(body)

    @cached_property
    def stages(self) -> dict[str, StageState]:
        """Every pipeline stage (and any other found in the file) with its state."""
        def body(fh: h5py.File) -> dict[str, StageState]:
            prints = fh.get("fingerprints", {})
            out = {}
            order = [str(decode(v)) for v in fh.attrs.get("pipeline", [])]  # the runner's registry order
            for name in order + [name for name in (*prints, *fh.get("perf", {})) if name not in order]:
                if name in out:
                    continue
                a = attrs_of(prints[name]) if name in prints else {}
                if is_complete(fh, f"perf/{name}"):
                    state = "complete"
                elif name in fh or name in prints:
                    state = "partial"
                else:
                    state = "not run"
                out[name] = StageState(name, state, bool(a.get("stale", False)), str(a.get("stale_because", "")),
                                       str(a.get("sha256", "")))
            return out
        return self.read(body)

    def section(self, path: str, depth: int = 3) -> Section | None:
        """Any group as a :class:`Section` (``None`` when absent)."""
        def body(fh: h5py.File) -> Section | None:
            group = fh.get(path)
            return Section.from_group(path.rsplit("/", 1)[-1], group, depth) if isinstance(group, h5py.Group) else None
        return self.read(body)

    @cached_property
    def spectra(self) -> dict[str, StateSpectrum]:
        """SLQ results by state label, in file order (the first call imports torch)."""
        def body(fh: h5py.File) -> dict[str, StateSpectrum]:
            return {label: _state_spectrum(label, g["result"]) for label, g in fh.get("spectrum", {}).items()
                    if isinstance(g, h5py.Group) and "result" in g}
        return self.read(body)

    @cached_property
    def training(self) -> Section | None:
        """The sparse-training log (``/train``): per-step arrays and run attributes, as a
        :class:`Section` (:attr:`training_log` gives the same as a typed log).
        """
        log = self.training_log
        if log is None:
            return None
        arrays = {**log.columns, "snapshot_steps": log.snapshot_steps}
        return Section(name="train", attrs=dict(log.attrs), arrays=arrays, units=dict(log.units),
                       descriptions=dict(log.descriptions))

    @cached_property
    def training_log(self) -> TrainingLog | None:
        """The sparse-training log (``/train``) read by :meth:`TrainingLog.from_group`; None
        when the stage has not completed (an unfinished run's log is :meth:`unfinished_training_log`).
        """
        return self._training_log("train")

    def unfinished_training_log(self) -> TrainingLog | None:
        """The log an unfinished training run committed at its last checkpoint (``/train_log``)."""
        return self._training_log("train_log")

    def _training_log(self, key: str) -> TrainingLog | None:
        def body(fh: h5py.File) -> TrainingLog | None:
            group = fh.get(key)
            return TrainingLog.from_group(group) if isinstance(group, h5py.Group) else None
        return self.read(body)

    @cached_property
    def qcm(self) -> dict[str, QcmCase]:
        """Carleman cases by label, each with its orders ``N``."""
        from hpcqml.carleman.analysis import OrderReport

        def body(fh: h5py.File) -> dict[str, QcmCase]:
            out = {}
            for label, case in fh.get("qcm", {}).items():
                if not isinstance(case, h5py.Group):
                    continue
                orders = {int(k[2:]): Section.from_group(k, case[k], 2) for k in case
                          if k.startswith("N_") and k[2:].isdigit()}
                reports = {n: OrderReport.from_group(case[f"N_{n}"]) for n in orders}
                out[label] = QcmCase(label, attrs_of(case), dict(sorted(orders.items())), dict(sorted(reports.items())))
            return out
        return self.read(body)

    @cached_property
    def hhl(self) -> dict[str, Section]:
        """Simulated-HHL cases by label."""
        def body(fh: h5py.File) -> dict[str, Section]:
            return {k: Section.from_group(k, v, 2) for k, v in fh.get("hhl", {}).items() if isinstance(v, h5py.Group)}
        return self.read(body)

    @cached_property
    def hhl_cases(self) -> dict[str, Any]:
        """Complete simulated-HHL cases by label, as typed :class:`hpcqml.hhl.case.HHLCase` values
        (plain, truncated eq. II.86 with eq. II.87/II.92 beside it, resources, read-out).
        """
        from hpcqml.hhl.case import read_cases

        return self.read(read_cases)

    def datasets(self) -> Iterator[tuple[str, h5py.Dataset]]:
        """Every dataset in the file with its path."""
        found: list[tuple[str, h5py.Dataset]] = []
        self.read(lambda fh: fh.visititems(
            lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None))
        yield from found


def open(path: str | Path) -> Results:
    """Open a results file for reading (one-line errors for missing, foreign or damaged files)."""
    return Results(path)


def missing_descriptions(path: str | Path) -> list[str]:
    """Datasets of a results file that lack a non-empty ``units`` or ``description`` attribute."""
    with Results(path) as res:
        return [name for name, dset in res.datasets()
                if not str(decode(dset.attrs.get("units", ""))).strip()
                or not str(decode(dset.attrs.get("description", ""))).strip()]


def assert_self_describing(path: str | Path) -> None:
    """Raise AssertionError listing every dataset without ``units`` and ``description``.

    Point it at any results file (``make demo`` writes ``results/demo.h5``).
    """
    missing = missing_descriptions(path)
    if missing:
        raise AssertionError(f"{len(missing)} dataset(s) in {path} lack units/description: "
                             + ", ".join(missing))


def find_results(name: str = "results/demo.h5", start: str | Path | None = None,
                 env: str = "HPCQML_RESULTS") -> Path:
    """Locate a results file: ``$HPCQML_RESULTS`` if set, else ``name`` relative to
    ``start`` (default: the working directory) or any folder above it (so a notebook
    started in ``notebooks/`` finds the repository's ``results/``).
    """
    import os

    explicit = os.environ.get(env)
    if explicit:
        return Path(explicit)
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{name} not found in {here} or above it; run 'make demo' or set {env}")

