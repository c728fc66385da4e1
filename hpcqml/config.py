"""Run configurations: TOML files validated against the schemas the stages declare.

A config has a ``[run]`` section (output file, stage list, seed, device) and one section
per stage. Every key is checked: unknown keys, wrong types and out-of-range values are
rejected with a :class:`~hpcqml.errors.ConfigError` naming the key, the value and what is
allowed. The *resolved* config (every registered stage's section with defaults filled in)
is what gets hashed, stored in the results file and compared on resume.
"""
from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from hpcqml.errors import ConfigError

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list"}


@dataclass(frozen=True)
class Field:
    """One config key: its type, default and allowed values.

    ``kind`` is one of ``int``, ``float``, ``str``, ``bool``, ``list``; lists name the
    type of their items with ``item`` and their least length with ``min_items``. ``min``/``max``
    bound numbers (and list items),
    ``choices`` enumerates allowed strings (or list items).
    """

    kind: type
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    item: type | None = None
    min_items: int = 0
    #: False for keys that change only speed or memory (micro-batch size, threads, ...):
    #: they are left out of the stage fingerprints, so a resume may change them.
    affects_results: bool = True

    def describe(self) -> str:
        """Type, default and allowed values in one line (``hpcqml validate --explain``)."""
        kind = _TYPE_NAMES.get(self.kind, self.kind.__name__)
        if self.kind is list and self.item is not None:
            kind = f"list of {_TYPE_NAMES.get(self.item, self.item.__name__)}"
        parts = [kind, f"default {_toml_value(self.default)}"]
        if self.choices is not None:
            parts.append("one of " + ", ".join(_toml_value(c) for c in self.choices))
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return "; ".join(parts)

    def check(self, where: str, value: Any) -> Any:
        """Return ``value`` converted to this field's type, or raise ConfigError."""
        if self.kind is list:
            if not isinstance(value, list):
                raise ConfigError(f"{where} = {value!r}: expected a list, got {_type_name(value)}")
            if len(value) < self.min_items:
                raise ConfigError(f"{where} = {value!r}: needs at least {self.min_items} item(s)")
            if self.item is None:
                return list(value)
            return [self._check_scalar(f"{where}[{i}]", v, self.item) for i, v in enumerate(value)]
        return self._check_scalar(where, value, self.kind)

    def _check_scalar(self, where: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{where} = {value!r}: expected {_TYPE_NAMES.get(kind, kind.__name__)}, "
                              f"got {_type_name(value)}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise ConfigError(f"{where} = {value!r}: not one of {allowed}")
        if self.min is not None and value < self.min:
            raise ConfigError(f"{where} = {value!r}: must be >= {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{where} = {value!r}: must be <= {self.max}")
        return value


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


Schema = Mapping[str, Field]

RUN_SCHEMA: dict[str, Field] = {
    "name": Field(str, "run", doc="label of the run"),
    "output": Field(str, "results/run.h5", doc="results file (HDF5); relative to the working directory"),
    "workdir": Field(str, "", doc="checkpoints and artifacts; empty = OUTPUT with .work instead of .h5"),
    "stages": Field(list, [], item=str, doc="stages to run, in order"),
    "seed": Field(int, 0, min=0, doc="master seed; every random draw derives from it"),
    "device": Field(str, "auto", choices=("auto", "cpu", "cuda"),
                    doc="auto: GPU local_rank % device_count when CUDA is available, else CPU"),
    "threads": Field(int, 0, min=0, affects_results=False,
                     doc="torch intra-op threads per rank; 0 = OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK / "
                         "PBS ncpus, else the node's cores / its ranks"),
}

#: ``(section, key)`` pairs that change only speed, memory or bookkeeping, never a stored
#: number: left out of the stage fingerprints (besides fields marked ``affects_results=False``).
PERFORMANCE_ONLY: frozenset[tuple[str, str]] = frozenset({
    ("run", "name"), ("run", "output"), ("run", "workdir"), ("run", "stages"),
    ("run", "threads"), ("run", "device"),
    ("pretrain", "checkpoint_every"), ("train", "checkpoint_every"),
    ("spectrum", "micro_batch"), ("spectrum", "groups"), ("spectrum", "basis_device"),
    ("spectrum", "memory_format"), ("spectrum", "route"),
    ("qcm", "ref_max_dim"), ("hhl", "max_dim"),
})

#: stages whose results a stage reads (its fingerprint covers their inputs too); the
#: spectrum, qcm and hhl entries depend on the config, see :func:`upstream`.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "data": (), "pretrain": ("data",), "prune": ("pretrain", "data"), "train": ("prune", "data"),
}
_SPECTRUM_SOURCE = {"snapshots": ("train", "data"), "pruned": ("prune", "data"),
                    "pretrained": ("pretrain", "data"), "file": ("data",)}


def validate_section(section: str, values: Mapping[str, Any], schema: Schema) -> dict[str, Any]:
    """Check one section against its schema and fill in defaults."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] must be a table, got {_type_name(values)}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ConfigError(f"[{section}] unknown key {unknown[0]!r} (allowed: {', '.join(sorted(schema))})")
    out = {}
    for key, fld in schema.items():
        out[key] = fld.check(f"[{section}] {key}", values[key]) if key in values else copy.deepcopy(fld.default)
    return out


@dataclass
class RunConfig:
    """A validated configuration: ``sections['run']`` plus one dict per registered stage."""

    sections: dict[str, dict[str, Any]]
    source: str = "<memory>"
    text: str = ""
    overrides: list[str] = field(default_factory=list)

    @property
    def run(self) -> dict[str, Any]:
        return self.sections["run"]

    @property
    def stages(self) -> list[str]:
        return list(self.run["stages"])

    def canonical_json(self) -> str:
        """The resolved config as canonical JSON (sorted keys).

        ``run.stages`` and ``run.output`` are left out of the fingerprint so that one
        results file can be filled stage by stage (``hpcqml train CONFIG`` then
        ``hpcqml spectrum CONFIG``) and moved.
        """
        fingerprint = copy.deepcopy(self.sections)
        for key in ("stages", "output", "workdir", "name", "threads"):
            fingerprint["run"].pop(key, None)
        return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def result_keys(self, section: str, schema: Schema | None = None) -> dict[str, Any]:
        """The keys of ``section`` that change results and differ from their defaults.

        A default left unset and the same default written out give the same fingerprint,
        and a key added in a later release (with a default) changes no fingerprint.
        """
        values = self.sections.get(section, {})
        schema = RUN_SCHEMA if section == "run" else (schema or {})
        out = {}
        for key, value in values.items():
            fld = schema.get(key)
            if fld is not None and (not fld.affects_results or value == fld.default):
                continue
            if (section, key) in PERFORMANCE_ONLY:
                continue
            out[key] = value
        return out

    def stage_inputs(self, stage: str, schemas: Mapping[str, Schema]) -> dict[str, dict[str, Any]]:
        """Result-changing keys of ``stage``, of the stages it reads, and ``[run]``."""
        names = ["run", stage, *sorted(dependency_closure(stage, self) - {stage})]
        return {name: self.result_keys(name, schemas.get(name)) for name in names
                if name == "run" or name in self.sections}

    def stage_fingerprint(self, stage: str, schemas: Mapping[str, Schema]) -> str:
        """sha256 over :meth:`stage_inputs` (canonical JSON)."""
        text = json.dumps({"stage": stage, "inputs": self.stage_inputs(stage, schemas)},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def resolved_toml(self) -> str:
        return dumps_toml(self.sections)

    def output_path(self) -> Path:
        return Path(self.run["output"])

    def workdir(self) -> Path:
        if self.run["workdir"]:
            return Path(self.run["workdir"])
        out = self.output_path()
        return out.with_name(out.stem + ".work")


def upstream(stage: str, config: RunConfig) -> tuple[str, ...]:
    """The stages whose results ``stage`` reads directly, under ``config``."""
    sections = config.sections
    if stage == "spectrum":
        spectrum = sections.get("spectrum", {})
        reads = _SPECTRUM_SOURCE.get(spectrum.get("source", "snapshots"), ("data",))
        if not spectrum.get("eta") and "train" in sections and "train" not in reads:
            reads += ("train",)  # eta = 0: the error proxy's eta is [train] lr
        return reads
    if stage == "qcm":
        return ("prune", "data") if sections.get("qcm", {}).get("generator") == "network" else ()
    if stage == "hhl":
        return ("prune", "data") if "network" in sections.get("hhl", {}).get("cases", ()) else ()
    if stage == "report":
        return tuple(name for name in sections if name not in ("run", "report"))
    return UPSTREAM.get(stage, ())


def dependency_closure(stage: str, config: RunConfig) -> set[str]:
    """``stage`` and every stage it reads, directly or through others."""
    seen: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(upstream(name, config))
    return seen


def compare_inputs(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``section.key old -> new`` for every key that differs (absent = the default)."""
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                before = _toml_value(a[key]) if key in a else "(default)"
                after = _toml_value(b[key]) if key in b else "(default)"
                changes.append(f"{section}.{key} {before} -> {after}")
    return changes


def explain(schemas: Mapping[str, Schema]) -> str:
    """Every key's documentation, type and default, section by section."""
    lines = []
    for name, schema in [("run", RUN_SCHEMA), *sorted(schemas.items())]:
        lines.append(f"[{name}]")
        for key, fld in schema.items():
            perf = "" if fld.affects_results and (name, key) not in PERFORMANCE_ONLY else " (performance only)"
            lines.append(f"  {key}: {fld.describe()}{perf}")
            if fld.doc:
                lines.append(f"      {fld.doc}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` where value is a TOML value (bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs
    return section, key, value


def read_toml(source: str | Path, text: str | None = None) -> dict[str, Any]:
    """The TOML of config file ``source`` (or of ``text``) as a dict, unvalidated.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML (one line).
    """
    if text is None:
        try:
            text = Path(source).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config {source}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"config {source}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {source}: not valid TOML ({exc})") from None


def load_config(source: str | Path, schemas: Mapping[str, Schema],
                overrides: Iterable[str] = (), text: str | None = None) -> RunConfig:
    """Read a TOML file (or ``text``), apply ``--set`` overrides and validate everything.

    ``schemas`` maps each registered stage name to its schema; a section whose name is
    neither ``run`` nor a registered stage is an error, and so is a stage in
    ``run.stages`` that is not registered.
    """
    source = str(source)
    raw = read_toml(source, text)
    overrides = list(overrides)
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    try:
        return _validate(raw, schemas, source, text, overrides)
    except ConfigError as exc:
        raise ConfigError(f"config {source}: {exc}") from None


def _validate(raw: dict, schemas: Mapping[str, Schema], source: str, text: str,
              overrides: list[str]) -> RunConfig:
    unknown = sorted(set(raw) - {"run"} - set(schemas))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (allowed: run, {', '.join(sorted(schemas))})")
    sections = {"run": validate_section("run", raw.get("run", {}), RUN_SCHEMA)}
    for name, schema in sorted(schemas.items()):
        sections[name] = validate_section(name, raw.get(name, {}), schema)
    for stage in sections["run"]["stages"]:
        if stage not in schemas:
            raise ConfigError(f"[run] stages: unknown stage {stage!r} (available: {', '.join(sorted(schemas))})")
    if not str(sections["run"]["output"]).endswith((".h5", ".hdf5")):
        raise ConfigError(f"[run] output = {sections['run']['output']!r}: must end in .h5 or .hdf5")
    return RunConfig(sections=sections, source=source, text=text, overrides=overrides)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Write flat ``{section: {key: value}}`` tables as TOML (round-trips through tomllib)."""
    lines = []
    for name in ["run"] + sorted(k for k in sections if k != "run"):
        if name not in sections:
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in sections[name].items())
        lines.append("")
    return "\n".join(lines)
