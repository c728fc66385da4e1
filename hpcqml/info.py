"""Human-readable summary of a results file (``hpcqml info``), read through :mod:`hpcqml.results`."""
from __future__ import annotations

from typing import Any, Iterator

import h5py
import numpy as np

from hpcqml.results import Results, decode, provenance_facts

_KEY_ATTRS = 6  # attributes shown per group (besides bookkeeping ones)
_HIDDEN = ("complete", "completed_at", "description")
#: groups summarised above the tree instead of inside it
_BOOKKEEPING = ("provenance", "fingerprints")


def fmt_value(value: Any) -> str:
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


def estimate_text(d: h5py.Dataset, fmt: str = "{:.4g}") -> str:
    """A stored estimate ``[value, standard error, low, high]`` as ``value ± s.e.``, with
    "± unknown" where no standard error exists (fewer than 3 probes) and "(unresolved)" where
    the Ritz values do not decide it.
    """
    value, se = (float(v) for v in d[()][:2])
    text = f"{fmt.format(value)} ± " + (f"{se:.2g}" if np.isfinite(se) else "unknown")
    return text + ("" if bool(d.attrs.get("resolved", True)) else " (unresolved)")


def _primary(res: h5py.Group) -> str:
    """The mode convention a spectrum result names as primary."""
    a = res["proxy"].attrs if "proxy" in res else {}
    return str(decode(a.get("primary", a.get("convention", "paper"))))


def _train_result(fh: h5py.File) -> list[str]:
    g = fh["train"]
    test = g["test_accuracy"][()] if "test_accuracy" in g else np.zeros(0)
    ok = np.isfinite(test)
    acc = f"final test accuracy {test[ok][-1]:.4f}" if ok.any() else "no test accuracy measured"
    sparsity = f", final sparsity {g['sparsity'][()][-1]:.3f}" if "sparsity" in g else ""
    return [f"  train: {fmt_value(g.attrs.get('model', '?'))}, {int(g['step'].shape[0])} steps; {acc}{sparsity}"]


def _spectrum_result(fh: h5py.File) -> list[str]:
    lines = []
    for label, g in fh["spectrum"].items():
        if "result/estimates" not in g:
            continue
        res = g["result"]
        e = res["estimates"]
        parts = [f"n {int(res.attrs.get('n', 0)):,}"]
        if "trace" in e:
            parts.append(f"trace {estimate_text(e['trace'])}")
        if "lambda_max" in res.attrs:
            parts.append(f"λ_max {float(res.attrs['lambda_max']):.4g}")
        if "negative_mass" in e:
            delta = e["negative_mass"].attrs.get("delta")
            below = f"-{float(delta):.3g}" if delta is not None else "-delta"
            parts.append(f"mass below {below} {estimate_text(e['negative_mass'])}")
        conv = _primary(res)
        pe = res.get(f"proxy/{conv}/estimates")
        if pe is not None:
            for stem, name in (("error_proxy_t", "E({t})"), ("error_proxy_no_cutoff_t", "E({t}) no cutoff")):
                ts = sorted(int(k[len(stem):]) for k in pe if k.startswith(stem) and k[len(stem):].isdigit())
                parts += [f"{name.format(t=t)} {estimate_text(pe[f'{stem}{t}'])}" for t in ts[:2]]
        lines.append(f"    {label}: " + ", ".join(parts))
    return ([f"  spectrum ({len(lines)} state(s); E(t) in the primary convention):"] + lines) if lines else []


def _qcm_result(fh: h5py.File) -> list[str]:
    kappas, violated, orders = [], 0, set()
    cases = [g for g in fh["qcm"].values() if isinstance(g, h5py.Group)]
    for case in cases:
        for key in case:
            if key.startswith("N_"):
                a = case[key].attrs
                orders.add(int(key[2:]))
                if "kappa_M" in a and np.isfinite(a["kappa_M"]):
                    kappas.append(float(a["kappa_M"]))
                violated += bool(str(decode(a.get("violated_bounds", ""))).strip(","))
    span = f"κ(M) {min(kappas):.4g}–{max(kappas):.4g}" if kappas else "κ(M) not computed"
    return [f"  qcm: {len(cases)} case(s), N = {', '.join(map(str, sorted(orders))) or '–'}; {span}; "
            f"{violated} order(s) with a violated bound"]


def _hhl_result(fh: h5py.File) -> list[str]:
    lines = []
    for label, g in fh["hhl"].items():
        if "hhl/clock_qubits" not in g:
            continue
        h = g["hhl"]
        i = int(np.argmax(h["clock_qubits"][()]))
        lines.append(f"  hhl {label} case: fidelity {float(h['fidelity'][i]):.6f} at {int(h['clock_qubits'][i])} "
                     f"clock qubits, leakage {float(h['leakage'][i]):.3g}")
    return lines


def _key_results(fh: h5py.File) -> list[str]:
    """One or a few lines of key results per stage that left them (the values a reader looks for first)."""
    lines = []
    for group, lines_of in (("train", _train_result), ("spectrum", _spectrum_result), ("qcm", _qcm_result),
                            ("hhl", _hhl_result)):
        if group in fh and fh[group].attrs.get("complete", True):
            lines += lines_of(fh)
    return lines


def _short_stage_lines(res: Results) -> list[str]:
    """Per stage: its state, and wall time and ranks where it completed."""
    lines = []
    for name, st in res.stages.items():
        stale = f" [stale: {st.stale_because}]" if st.stale else ""
        perf = res.perf.get(name)
        timing = f", {perf.wall_seconds.max():.1f} s on {perf.ranks} rank(s)" if perf is not None else ""
        state = {"partial": "partial (interrupted; rerun to resume)"}.get(st.state, st.state)
        lines.append(f"  {name:9s} {state}{timing if st.state == 'complete' else ''}{stale}")
    return lines


def summarize(path: str, max_depth: int = 3, full: bool = False) -> str:
    """What ran and its key results (final accuracy, trace ± s.e., E(t), κ(M), HHL fidelity);
    with ``full``, also every performance record and the group tree, as text.
    """
    with Results(path) as res:
        a = res.attrs
        lines = [f"results file: {path}",
                 f"  schema_version {fmt_value(a.get('schema_version', '?'))}, "
                 f"hpcqml {fmt_value(a.get('hpcqml_version', '?'))}, created {fmt_value(a.get('created', '?'))}"]
        facts = provenance_facts(res.latest, a)
        lines += [f"  {fact.label}: {fact.text}" for fact in (facts if full else facts[:2])]
        runs = res.provenance
        lines.append(f"  invocations: {len(runs)} (" + ", ".join(f"{r.name[4:]} {r.status}" for r in runs) + ")")
        lines.append("stages:")
        lines += _stage_lines(res) if full else _short_stage_lines(res)
        results = res.read(_key_results)
        if results:
            lines += ["results:", *results]
        if not full:
            lines.append("(hpcqml info --all: provenance details, performance records and the group tree)")
            return "\n".join(lines)
        lines.append("groups:")
        lines += res.read(lambda fh: ["  " + line for line in _walk(fh, 0, max_depth)])
    return "\n".join(lines)
