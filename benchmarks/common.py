"""Shared benchmark plumbing: machine description, a printed table, and a durable record.

Each benchmark measures ratios against a baseline *in the same run* (same machine, same
inputs) and calls :func:`record`, which prints the table and appends the figures with
provenance to ``results/bench.h5`` (one group per run: ``/<benchmark>/<UTC timestamp>``).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Mapping, Sequence

import h5py

from hpcqml.io import atomic_write
from hpcqml.store import _git_commit, _versions, utc_now

BENCH_FILE = Path(os.environ.get("HPCQML_BENCH_FILE", Path(__file__).resolve().parent.parent / "results" / "bench.h5"))


def machine() -> str:
    """One line naming the machine the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{socket.gethostname()}: {cpu}, {os.cpu_count()} cores"  # the machine, not this rank's binding
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def table(rows: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table of ``rows`` (all rows share the first row's keys)."""
    keys = list(rows[0])
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def record(benchmark: str, rows: Sequence[Mapping[str, object]], notes: str = "") -> None:
    """Print the table and append it, with provenance, to ``results/bench.h5``."""
    print(f"\n## {benchmark}  ({machine()}, {utc_now()})")
    if notes:
        print(notes)
    print(table(rows))
    BENCH_FILE.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def update(out) -> None:
        if BENCH_FILE.exists():
            with open(BENCH_FILE, "rb") as src:
                shutil.copyfileobj(src, out)
            out.seek(0)
        with h5py.File(out, "a") as fh:
            fh.attrs.setdefault("schema_version", "bench-1.0")
            key = f"{benchmark}/{stamp}"
            if key in fh:
                del fh[key]
            g = fh.require_group(key)
            g.attrs["machine"] = machine()
            g.attrs["time"] = utc_now()
            g.attrs["git_commit"] = _git_commit()
            g.attrs["versions"] = json.dumps(_versions(), sort_keys=True)
            g.attrs["platform"] = platform.platform()
            g.attrs["notes"] = notes
            g.attrs["rows_json"] = json.dumps(list(rows), default=float)
    atomic_write(BENCH_FILE, update)
