"""Krylov bases of the spectrum stage kept on disk, so a later run extends stored probes.

Adaptive stopping (:func:`hpcqml.stages.spectrum.adapt`) doubles the Lanczos steps of every
stored probe.  Within one run the recurrences are held in memory
(:class:`hpcqml.hessian.lockstep.LanczosEngine`); this module keeps them across runs: after a
probe is committed to the results file, every rank of the probe's group writes its running
state (:meth:`~hpcqml.hessian.lockstep.LanczosEngine.export`: the coefficients, the last two
Lanczos vectors and the basis rows of its parameter slice) to

    <workdir>/spectrum-bases/<label, '/' written ':'>/probe_NNN.rank{r}of{P}.pt

(``r`` the rank in the group, ``P`` the group size; written atomically by
:func:`hpcqml.io.atomic_torch_save`).  A later run that needs more steps for that probe
loads the state instead of rerunning the probe: going from m to m' steps then costs
m' - m products per probe instead of m'.

A file is used only when every rank of the group has one that passes every check
(decided together over the group communicator): it loads (``torch.load`` with
``weights_only=True``), its CRC-32 matches its tensors, it belongs to this operator's
label, probe and probe seed and to the stage settings that change results (the stage
fingerprint, when the runner gives one), its alphas/betas and start norm equal the
coefficients the results file stores for that probe *exactly* (so the basis belongs to
that very recurrence), and n, the group size, this rank's slice, the dtype and the
reorthogonalisation match (:meth:`~hpcqml.hessian.lockstep.LanczosEngine.mismatch`).
Otherwise the probe is rerun as without the files, and the log says which check failed.

Disk: each probe's files hold about ``(m + 2) * n * itemsize`` bytes over all ranks
(float32: 4 bytes per value), i.e. the Krylov bases of all stored probes, written with
``torch.save``.  A file is written only while the free space of the file system is at least
twice its size; otherwise one line says so and the probe is rerun by a later run that
needs more steps.  The files are not part of the results file; they are deleted when the
stage is recomputed from scratch, and ``[spectrum] keep_bases = "no"`` neither writes nor
reads them.
"""
from __future__ import annotations

import pickle
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

#: the folder of the work directory holding the bases
SUBDIR = "spectrum-bases"

#: what reading a damaged file can raise (torch's zip reader, the restricted unpickler)
_DAMAGE = (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError, AttributeError, IndexError,
           pickle.UnpicklingError)

#: the tensors of a state, in the order the checksum reads them
_TENSORS = ("alphas", "betas", "v", "v_prev", "basis")


def label_dir(workdir: Path, label: str) -> Path:
    """The folder of one operator's bases (``/`` in the label written ``:``)."""
    return Path(workdir) / SUBDIR / label.replace("/", ":")


def shard_name(probe: int, rank: int, size: int) -> str:
    """The file name of probe ``probe``'s slice on rank ``rank`` of a group of ``size``."""
    return f"probe_{int(probe):03d}.rank{int(rank)}of{int(size)}.pt"


#: the plain values of a state the checksum covers too, in this order
_VALUES = ("n", "group_size", "lo", "hi", "dtype", "reorth", "cols", "probe", "znorm2", "broke", "label",
           "probe_seed", "fingerprint")


def checksum(state: dict[str, Any]) -> int:
    """CRC-32 of the state's plain values (their ``repr``, in a fixed order) and of the bytes
    of its tensors (absent ones skipped).
    """
    import torch

    crc = zlib.crc32(repr([state.get(key) for key in _VALUES]).encode())
    for key in _TENSORS:
        t = state.get(key)
        if isinstance(t, torch.Tensor):
            crc = zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data, crc)
    return crc


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the state's tensors (about the size of its file)."""
    import torch

    return sum(t.numel() * t.element_size() for key in _TENSORS
               if isinstance(t := state.get(key), torch.Tensor))


def discard(ctx: Any, label: str) -> None:
    """Delete the bases of ``label`` (world rank 0; collective over ``ctx.comm``)."""
    where = label_dir(ctx.workdir, label)
    if ctx.rank == 0 and where.exists():
        shutil.rmtree(where, ignore_errors=True)
        ctx.log(f"{label}: Krylov bases of the earlier results deleted ({where})")
    if ctx.size > 1:
        ctx.comm.Barrier()


class Bases:
    """The on-disk Krylov bases of one operator (``label``) on this rank.

    Args:
        ctx: the stage context (work directory, log, fingerprint, world communicator).
        label: the operator's results group below ``spectrum/``.
        layout: the probe groups (:func:`hpcqml.hessian.slq.probe_groups`); probe ``l``
            belongs to group ``l mod G``, and its files to the ranks of that group.
        probe_seed: the seed the probes' start vectors are drawn with.
    """

    def __init__(self, ctx: Any, label: str, layout: Any, probe_seed: int) -> None:
        self.ctx = ctx
        self.label = label
        self.layout = layout
        self.probe_seed = int(probe_seed)
        self.dir = label_dir(ctx.workdir, label)
        self.grank = 0 if layout.comm is None else layout.comm.Get_rank()
        self.gsize = 1 if layout.comm is None else layout.comm.Get_size()
        self.skipped = False

    def path(self, probe: int) -> Path:
        """This rank's file of probe ``probe``."""
        return self.dir / shard_name(probe, self.grank, self.gsize)

    def _say(self, message: str) -> None:
        """One log line from any rank (world rank 0 through the stage log)."""
        if self.ctx.rank == 0:
            self.ctx.log(message)
        elif not self.ctx.quiet:
            print(f"[{self.ctx.name}] rank {self.ctx.rank}: {message}", file=sys.stderr, flush=True)

    def save(self, probe: int, state: dict[str, Any]) -> bool:
        """Write this rank's part of probe ``probe``'s running state (from
        :meth:`~hpcqml.hessian.lockstep.LanczosEngine.export`); False when skipped (the
        first skip is logged with its reason).
        """
        from hpcqml.io import atomic_torch_save

        size = state_bytes(state)
        target = self.path(probe)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.dir).free
        except OSError as exc:
            return self._skip(f"cannot create {self.dir} ({exc.strerror or exc})")
        if free < 2 * size:
            return self._skip(f"{free / 2**30:.2f} GiB free on the file system of {self.dir}, less than twice "
                              f"the {size / 2**30:.2f} GiB of a file")
        record = {**state, "label": self.label, "probe": int(probe), "probe_seed": self.probe_seed,
                  "fingerprint": str(self.ctx.fingerprint or "")}
        record["crc32"] = checksum(record)
        t0 = time.perf_counter()
        try:
            atomic_torch_save(record, target)
        except (OSError, RuntimeError) as exc:
            return self._skip(f"writing {target} failed ({exc})")
        self.ctx.perf.count("bases_write_seconds", time.perf_counter() - t0)
        if self.grank == 0:  # files of this probe from a run with another group size: superseded
            for old in self.dir.glob(f"probe_{int(probe):03d}.rank*of*.pt"):
                if not old.name.endswith(f"of{self.gsize}.pt"):
                    old.unlink(missing_ok=True)
        return True

    def _skip(self, why: str) -> bool:
        if not self.skipped:
            self._say(f"{self.label}: Krylov bases not written to disk ({why}); a later run that needs more "
                      "Lanczos steps reruns these probes")
            self.skipped = True
        return False

    def load(self, probe: int, stored: Any, engine: Any) -> tuple[dict[str, Any] | None, str]:
        """This rank's state of probe ``probe`` if its file passes every check, else
        ``(None, why)``.  ``stored``: the probe as the results file holds it (``alpha``,
        ``beta``, ``start_norm2``).  The tensors are memory-mapped, read when restored.
        """
        import torch

        path = self.path(probe)
        if not path.is_file():
            return None, f"no file {path.name}"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except _DAMAGE as exc:  # any damage: the file is treated as absent
            return None, f"{path.name} unreadable ({type(exc).__name__})"
        if not isinstance(state, dict):
            return None, f"{path.name} holds no Lanczos state"
        try:
            crc = checksum(state)
        except _DAMAGE as exc:  # a mapping cut short by truncation
            return None, f"{path.name} unreadable ({type(exc).__name__})"
        if crc != state.get("crc32"):
            return None, f"{path.name} is damaged (checksum)"
        why = engine.mismatch(state)
        if why is not None:
            return None, f"{path.name}: {why}"
        for key, want in (("label", self.label), ("probe", int(probe)), ("probe_seed", self.probe_seed)):
            if state.get(key) != want:
                return None, f"{path.name} is of {key} {state.get(key)!r}, not {want!r}"
        made, now = str(state.get("fingerprint", "")), str(self.ctx.fingerprint or "")
        if made and now and made != now:
            return None, f"{path.name} was made with other stage settings"
        alpha, beta = state["alphas"].numpy(), state["betas"].numpy()
        if not (np.array_equal(alpha, np.asarray(stored.alpha, dtype=np.float64))
                and np.array_equal(beta, np.asarray(stored.beta, dtype=np.float64))
                and float(state["znorm2"]) == float(stored.start_norm2)):
            return None, (f"{path.name}: its {alpha.size}-step coefficients are not those stored for the probe "
                          f"({len(stored.alpha)} steps)")
        return state, ""

    def offer(self, engine: Any, stored: dict[int, Any]) -> tuple[list[int], dict[int, str]]:
        """Hand the engine the states of the probes in ``stored`` (probe -> its stored
        result) whose files pass every check on every rank of their group (collective over
        the world: call it with the same probes on every rank).

        Returns:
            The probes offered (over all groups), and for every other probe why not.
        """
        from hpcqml.parallel import allreduce_sum

        t0 = time.perf_counter()
        mine = self.layout.owned(sorted(stored))
        states: dict[int, dict[str, Any] | None] = {}
        reasons: list[tuple[int, str]] = []
        for p in mine:
            states[p], text = self.load(p, stored[p], engine)
            if states[p] is None:
                reasons.append((p, f"rank {self.grank} of its group: {text}" if self.gsize > 1 else text))
        bad = allreduce_sum(self.layout.comm, np.array([float(states[p] is None) for p in mine] or [0.0]))
        offered = []
        for i, p in enumerate(mine):
            state = states[p]
            if bad[i] == 0 and state is not None:
                engine.offer(p, state)
                offered.append(p)
        self.ctx.perf.count("bases_check_seconds", time.perf_counter() - t0)
        if self.ctx.size > 1:
            parts = self.ctx.comm.allgather((offered if self.grank == 0 else [], reasons))
        else:
            parts = [(offered, reasons)]
        everything = sorted({p for got, _ in parts for p in got})
        why: dict[int, list[str]] = {}
        for _, part in parts:
            for p, text in part:
                why.setdefault(p, []).append(text)
        # one reason per probe (the first rank's), so the log line stays short on many ranks
        rejected = {p: texts[0] + (f" (and {len(texts) - 1} more rank(s))" if len(texts) > 1 else "")
                    for p, texts in sorted(why.items())}
        for p in sorted(set(stored) - set(everything) - set(rejected)):
            rejected[p] = "another rank of its group has no usable file"
        return everything, rejected
