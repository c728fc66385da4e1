"""Human-readable summary of a results file (``hpcqml info``), read through :mod:`hpcqml.results`."""
from __future__ import annotations

from typing import Iterator

import h5py
import numpy as np

from hpcqml.results import Results, decode, provenance_facts

_KEY_ATTRS = 6  # attributes shown per group (besides bookkeeping ones)
_HIDDEN = ("complete", "completed_at", "description")
#: groups summarised above the tree instead of inside it
_BOOKKEEPING = ("provenance", "fingerprints")


def fmt_value(value) -> str:
    """One attribute value as short text (strings decoded, arrays abbreviated)."""
    value = decode(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return "[" + ", ".join(str(v) for v in value.ravel()[:6]) + (", ..." if value.size > 6 else "") + "]"
        return np.array2string(value, threshold=6, precision=4)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataset_line(name: str, dset: h5py.Dataset, pad: str) -> str:
    units = decode(dset.attrs.get("units", ""))
    return f"{pad}{name}  {dset.dtype} {dset.shape}" + (f" [{units}]" if units else "")


def _walk(group: h5py.Group, depth: int, max_depth: int) -> Iterator[str]:
    for name, obj in group.items():
        if depth == 0 and name in _BOOKKEEPING:
            continue
        pad = "  " * depth
        if isinstance(obj, h5py.Dataset):
            yield _dataset_line(name, obj, pad)
            continue
        mark = "" if obj.attrs.get("complete", True) else "  [incomplete]"
        if obj.attrs.get("stale", False):
            mark += "  [stale]"
        attrs = [f"{k}={fmt_value(v)}" for k, v in obj.attrs.items() if k not in _HIDDEN]
        shown = ", ".join(attrs[:_KEY_ATTRS]) + (", ..." if len(attrs) > _KEY_ATTRS else "")
        yield f"{pad}{name}/{mark}" + (f"  ({shown})" if shown else "")
        if depth + 1 < max_depth:
            children = list(obj.keys())
            if len(children) > 12 and all(isinstance(obj[c], h5py.Group) for c in children):
                yield from _walk_subset(children, depth + 1)
            else:
                yield from _walk(obj, depth + 1, max_depth)


def _walk_subset(children: list[str], depth: int) -> Iterator[str]:
    """Long runs of sibling groups (one per step): the first three and the last two."""
    pad = "  " * depth
    head, tail = children[:3], children[-2:]
    for name in head:
        yield f"{pad}{name}/"
    yield f"{pad}... ({len(children) - 5} more groups)"
    for name in tail:
        yield f"{pad}{name}/"


def _stage_lines(res: Results) -> list[str]:
    lines = []
    for name, st in res.stages.items():
        stale = f" [stale: {st.stale_because}]" if st.stale else ""
        perf = res.perf.get(name)
        if st.state == "complete" and perf is not None:
            counters = ", ".join(f"{c}={int(np.sum(v))}" for c, v in perf.counters.items())
            lines.append(f"  {name:9s} complete{stale}: wall max {perf.wall_seconds.max():.2f} s, "
                         f"MPI max {perf.comm_seconds.max():.2f} s, peak host max "
                         f"{perf.peak_host_bytes.max() / 2**20:.0f} MiB over {perf.ranks} rank(s)"
                         + (f"; {counters}" if counters else ""))
        elif st.state == "partial":
            lines.append(f"  {name:9s} partial (interrupted; rerun to resume){stale}")
        else:
            lines.append(f"  {name:9s} not run")
    return lines


def summarize(path: str, max_depth: int = 3) -> str:
    """Provenance, stage status, performance records and the group tree, as text."""
    with Results(path) as res:
        a = res.attrs
        lines = [f"results file: {path}",
                 f"  schema_version {fmt_value(a.get('schema_version', '?'))}, "
                 f"hpcqml {fmt_value(a.get('hpcqml_version', '?'))}, created {fmt_value(a.get('created', '?'))}"]
        lines += [f"  {fact.label}: {fact.text}" for fact in provenance_facts(res.latest, a)]
        runs = res.provenance
        lines.append(f"  invocations: {len(runs)} (" + ", ".join(f"{r.name[4:]} {r.status}" for r in runs) + ")")
        lines.append("stages:")
        lines += _stage_lines(res)
        lines.append("groups:")
        lines += res.read(lambda fh: ["  " + line for line in _walk(fh, 0, max_depth)])
    return "\n".join(lines)
