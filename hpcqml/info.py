"""Human-readable summary of a results file (``hpcqml info``)."""
from __future__ import annotations

import json
from typing import Iterator

import h5py
import numpy as np

from hpcqml.store import is_complete, open_results

_KEY_ATTRS = 6  # attributes shown per group (besides 'complete')


def _fmt_attr(value) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=6, precision=4)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(group: h5py.Group, depth: int, max_depth: int) -> Iterator[str]:
    for name, obj in group.items():
        pad = "  " * depth
        if isinstance(obj, h5py.Dataset):
            yield f"{pad}{name}  {obj.dtype} {obj.shape}"
            continue
        mark = "" if obj.attrs.get("complete", True) else "  [incomplete]"
        attrs = [f"{k}={_fmt_attr(v)}" for k, v in obj.attrs.items() if k not in ("complete", "completed_at")]
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


def summarize(path: str, max_depth: int = 3) -> str:
    """Provenance, stage status, performance records and the group tree, as text."""
    from hpcqml.stages import PIPELINE, load_all

    registry = load_all()
    lines: list[str] = []
    with open_results(path) as fh:
        a = fh.attrs
        lines.append(f"results file: {path}")
        lines.append(f"  schema_version {_fmt_attr(a['schema_version'])}, hpcqml {_fmt_attr(a.get('hpcqml_version', '?'))}, "
                     f"created {_fmt_attr(a.get('created', '?'))}")
        for key in ("command_line", "git_commit", "mpi_size", "hosts", "start_time", "end_time", "status"):
            if f"prov_{key}" in a:
                lines.append(f"  {key}: {_fmt_attr(a[f'prov_{key}'])}")
        if "prov_versions" in a:
            versions = json.loads(a["prov_versions"])
            lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
        lines.append(f"  config sha256: {_fmt_attr(a.get('config_sha256', '?'))[:16]}")
        runs = len(fh["provenance"]) if "provenance" in fh else 0
        lines.append(f"  invocations: {runs}")
        lines.append("stages:")
        for name in PIPELINE + tuple(sorted(set(registry) - set(PIPELINE))):
            if name not in registry:
                lines.append(f"  {name:9s} not yet available")
                continue
            key = f"perf/{name}"
            if is_complete(fh, key):
                g = fh[key]
                wall = g["wall_seconds"][()]
                comm = g["comm_seconds"][()]
                peak = g["peak_host_bytes"][()] / 2**20
                counters = ", ".join(f"{c}={int(np.sum(g['counters'][c][()]))}" for c in g["counters"])
                lines.append(f"  {name:9s} complete: wall max {wall.max():.2f} s, MPI max {comm.max():.2f} s, "
                             f"peak host max {peak.max():.0f} MiB over {len(wall)} rank(s)"
                             + (f"; {counters}" if counters else ""))
            elif name in fh:
                lines.append(f"  {name:9s} partial (interrupted; rerun to resume)")
            else:
                lines.append(f"  {name:9s} not run")
        lines.append("groups:")
        lines.extend("  " + line for line in _walk(fh, 0, max_depth) if not line.startswith("provenance"))
    return "\n".join(lines)
