"""The per-step log of the sparse-training run (paper Sec. III B, Fig. 2) and its HDF5 layout.

:class:`TrainingLog` is the one place that knows the layout of the ``train`` group (and of
``train_log``, the log of an unfinished run): :meth:`TrainingLog.to_group` writes it, the
train stage commits it through the store, and :meth:`TrainingLog.from_group` reads it back
(``hpcqml.results``).  numpy only: the reader imports no torch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import h5py

#: (units, description) of each per-step dataset, in the order they are written
HISTORY_DOCS: dict[str, tuple[str, str]] = {
    "step": ("count", "update number t (1-based)"),
    "loss": ("nat", "mean cross-entropy over the batch of update t, before the update"),
    "batch_accuracy": ("1", "fraction of the batch of update t classified correctly, before the update"),
    "test_loss": ("nat", "mean cross-entropy over the test set after update t (NaN = not measured)"),
    "test_accuracy": ("1", "fraction of the test set classified correctly after update t (NaN = not measured)"),
    "sparsity": ("1", "fraction of prunable weights equal to zero after update t and its download"),
    "sparsity_before_download": ("1", "fraction of prunable weights equal to zero after update t, before a download"),
    "download": ("1", "True where the weights were re-pruned to keep_fraction after update t"),
    "quantum_eligible": ("1", "True where update t is not among the classical steps after a download"),
}
HISTORY_KEYS: tuple[str, ...] = tuple(HISTORY_DOCS)
#: the dtype each per-step dataset is stored with (float64 for the others)
HISTORY_DTYPES: dict[str, type] = {"step": np.int64, "download": np.bool_, "quantum_eligible": np.bool_}
SNAPSHOT_DOC = ("count", "steps t whose model state is in <workdir>/snapshots/step_t.pt")


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class TrainingLog:
    """The per-step log after ``len(step)`` updates, and the snapshot steps kept so far.

    ``columns`` maps each key of :data:`HISTORY_KEYS` to one value per update (index
    t - 1); ``snapshot_steps`` lists the steps whose model file exists; ``attrs`` holds the
    group's attributes (settings, ``fingerprint``, ``steps_done``) as read back;
    ``units`` and ``descriptions`` what the file says of each dataset.
    """

    columns: dict[str, np.ndarray]
    snapshot_steps: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_history(cls, history: Mapping[str, Sequence[Any]], snapshots: Sequence[int] | set[int],
                     done: int) -> TrainingLog:
        """The log of a run after ``done`` steps from the training loop's history lists.

        Snapshot steps beyond ``done`` (planned but not reached) are left out.
        """
        columns: dict[str, np.ndarray] = {k: np.asarray(history[k], dtype=HISTORY_DTYPES.get(k, np.float64))
                                          for k in HISTORY_KEYS}
        steps = np.array(sorted(int(t) for t in snapshots if t <= done), dtype=np.int64)
        return cls(columns=columns, snapshot_steps=steps)

    @property
    def steps(self) -> int:
        """How many updates the log covers."""
        return int(self.columns["step"].size) if "step" in self.columns else 0

    def to_group(self, group: h5py.Group) -> None:
        """Write the per-step datasets and ``snapshot_steps`` into ``group`` (units and
        description on each; the attributes are the commit's).
        """
        from hpcqml.store import write_dataset

        for k in HISTORY_KEYS:
            units, description = HISTORY_DOCS[k]
            data: np.ndarray = np.asarray(self.columns[k], dtype=HISTORY_DTYPES.get(k, np.float64))
            write_dataset(group, k, data, units, description)
        write_dataset(group, "snapshot_steps", np.asarray(self.snapshot_steps, dtype=np.int64), *SNAPSHOT_DOC)

    @classmethod
    def from_group(cls, group: h5py.Group) -> TrainingLog:
        """Read a ``train`` or ``train_log`` group.

        Every dataset found is read (a file written before a column existed simply lacks
        it; a column added later is read without a change here).
        """
        import h5py

        columns: dict[str, np.ndarray] = {}
        units: dict[str, str] = {}
        descriptions: dict[str, str] = {}
        snapshots = np.zeros(0, dtype=np.int64)
        for name, item in group.items():
            if not isinstance(item, h5py.Dataset):
                continue
            units[name] = str(_text(item.attrs.get("units", "")))
            descriptions[name] = str(_text(item.attrs.get("description", "")))
            if name == "snapshot_steps":
                snapshots = np.asarray(item[()], dtype=np.int64)
            else:
                columns[name] = item[()]
        attrs = {k: _text(v) for k, v in group.attrs.items()}
        return cls(columns=columns, snapshot_steps=snapshots, attrs=attrs, units=units, descriptions=descriptions)
