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
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from hpcqml.errors import ConfigError

#: integers a config may hold: those an HDF5 attribute (int64) stores exactly
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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
    #: True for keys whose stored work the stage extends in place (a probe count, a budget,
    #: a tolerance of adaptive stopping): left out of the stage fingerprints and recorded
    #: beside them, so a changed value reruns the stage, which keeps its stored work.
    extendable: bool = False

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
        return self._check_bounds(where, value, kind)

    def _check_bounds(self, where: str, value: Any, kind: type) -> Any:
        """``value``, already of type ``kind``, checked against finiteness, range and choices."""
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r}: must be a finite number")
        if kind is int and not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(f"{where} = {value!r}: outside the 64-bit signed integer range "
                              f"[{INT64_MIN}, {INT64_MAX}] the results file can store")
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
    "name": Field(str, "run", affects_results=False, doc="label of the run"),
    "output": Field(str, "results/run.h5", affects_results=False,
                    doc="results file (HDF5); relative to the working directory"),
    "workdir": Field(str, "", affects_results=False,
                     doc="checkpoints and artifacts; empty = OUTPUT with .work instead of .h5"),
    "stages": Field(list, [], item=str, affects_results=False, doc="stages to run, in order"),
    "seed": Field(int, 0, min=0, doc="master seed; every random draw derives from it"),
    "device": Field(str, "auto", choices=("auto", "cpu", "cuda"), affects_results=False,
                    doc="auto: GPU local_rank % device_count when CUDA is available, else CPU"),
    "threads": Field(int, 0, min=0, affects_results=False,
                     doc="torch intra-op threads per rank; 0 = OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK / "
                         "PBS ncpus, else the node's cores / its ranks"),
    "node_memory_gib": Field(float, 0.0, min=0.0, affects_results=False,
                             doc="memory of one node the run is meant for, in GiB, which the memory "
                                 "estimates are compared with; 0 = the job's allocation (SLURM_MEM_PER_NODE, "
                                 "SLURM_MEM_PER_CPU, the PBS script's mem), else this machine's"),
}

#: what a stage reads: a function of the validated sections returning the names of the
#: stages whose results it reads directly (each stage declares its own; see hpcqml.stages)
Reads = Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, ...]]

#: fixed reads of stages registered without a ``reads`` function (ad-hoc stages); the
#: stages of this package declare theirs and are not listed here
UPSTREAM: dict[str, tuple[str, ...]] = {}


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
    #: stage name -> what it reads (:data:`Reads`), as the stages declare it
    reads: Mapping[str, Reads] = field(default_factory=dict)

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
        for key in ("stages", "output", "workdir", "name", "threads", "node_memory_gib"):
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
            if fld is not None and (not fld.affects_results or fld.extendable or value == fld.default):
                continue
            out[key] = value
        return out

    def extendable_keys(self, section: str, schema: Schema | None) -> dict[str, Any]:
        """The values of ``section``'s extendable keys (see :attr:`Field.extendable`), defaults included."""
        values = self.sections.get(section, {})
        return {key: values[key] for key, fld in (schema or {}).items() if fld.extendable and key in values}

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
    """The stages whose results ``stage`` reads directly, under ``config`` (its declared
    ``reads`` applied to the validated sections; :data:`UPSTREAM` for a stage without one).
    """
    reads = config.reads.get(stage)
    return tuple(reads(config.sections)) if reads is not None else UPSTREAM.get(stage, ())


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


def explain(schemas: Mapping[str, Schema], config: RunConfig | None = None,
            order: Iterable[str] = ()) -> str:
    """Every key's documentation, type and default, section by section.

    Args:
        schemas: stage name -> schema.
        config: a validated config; its value of each key is shown beside the default
            ("value 8 (default 4)"), and the sections it does not use are marked so.
        order: section names in the order to list them (the pipeline's); others follow sorted.

    Returns:
        The text of ``hpcqml validate --explain``.
    """
    first = [name for name in order if name in schemas]
    names = first + sorted(name for name in schemas if name not in first)
    lines = []
    for name, schema in [("run", RUN_SCHEMA), *((n, schemas[n]) for n in names)]:
        used = config is None or name in config.sections
        lines.append(f"[{name}]" + ("" if used else "  (not in this config)"))
        values = config.sections.get(name, {}) if config is not None and used else {}
        for key, fld in schema.items():
            note = "" if fld.affects_results else " (not in the fingerprint)"
            note = " (extendable: a rerun keeps the stored work)" if fld.extendable else note
            here = f"value {_toml_value(values[key])}; " if key in values else ""
            lines.append(f"  {key}: {here}{fld.describe()}{note}")
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
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config {source}: file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {source}: not a text file (byte {exc.start} is not UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"config {source}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {source}: not valid TOML ({exc})") from None


def load_config(source: str | Path, schemas: Mapping[str, Schema],
                overrides: Iterable[str] = (), text: str | None = None,
                reads: Mapping[str, Reads] | None = None) -> RunConfig:
    """Read a TOML file (or ``text``), apply ``--set`` overrides and validate everything.

    ``schemas`` maps each registered stage name to its schema; a section whose name is
    neither ``run`` nor a registered stage is an error, and so is a stage in
    ``run.stages`` that is not registered. ``reads`` maps stage names to what they read
    (the stage fingerprints follow it); the runner binds the registry's when it is omitted.
    """
    source = str(source)
    raw = read_toml(source, text)
    overrides = list(overrides)
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    try:
        config = _validate(raw, schemas, source, text, overrides)
    except ConfigError as exc:
        raise ConfigError(f"config {source}: {exc}") from None
    config.reads = dict(reads or {})
    return config


def _validate(raw: dict[str, Any], schemas: Mapping[str, Schema], source: str, text: str | None,
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
    return RunConfig(sections=sections, source=source, text=text or "", overrides=overrides)


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
