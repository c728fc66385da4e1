"""``hpcqml calibrate``: what a gradient and a Hessian-vector product cost on this machine, and
the wall time of a run's model stages predicted from that.

Calibration times the configured model on random inputs of the CIFAR shape (the cost of a
product does not depend on the pixel values): one gradient of the mean cross-entropy over a
micro-batch, and one Hessian-vector product over the same micro-batch on the configured
product route, each the median of a few repeats after a warm-up.  The results are seconds
per sample, stored as JSON (``--out``, by default ``calibration.json`` beside the config's
results file) with the machine, thread count and versions they were measured with, so
``hpcqml validate`` can reuse them without timing anything.

The prediction (:func:`stage_seconds`) counts samples through each model stage and divides
by the ranks, assuming perfect data parallelism (communication, I/O and start-up are not
included, so it is a lower bound for many ranks):

* pretrain: ``epochs * ceil(n_train / B) * B`` gradient samples;
* train: ``steps * B`` gradient samples;
* spectrum: ``states * probes * m * B_H`` product samples, with the probe and step budgets
  of adaptive stopping as the upper end when they are set.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcqml.errors import InputFileError, UserError

#: CIFAR-100 has this many training images (the synthetic set's count is in [data]).
CIFAR100_TRAIN = 50_000


@dataclass(frozen=True)
class Calibration:
    """Measured seconds per sample of one model on one machine (see the module docstring)."""

    model: str
    classes: int
    device: str
    threads: int
    micro_batch: int
    route: str
    gradient_s_per_sample: float
    product_s_per_sample: float
    host: str
    cpu: str
    torch_version: str
    measured_at: str

    def matches(self, model: str, classes: int, device: str) -> bool:
        """Whether this calibration was measured for that model, class count and device type."""
        return (self.model, self.classes, self.device) == (model, classes, device)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median_seconds(fn: Any, repeats: int, sync: Any) -> float:
    fn()  # warm-up: allocator, autograd graph caches
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def measure(model_name: str, classes: int, *, micro_batch: int = 64, route: str | None = None,
            device: str = "cpu", repeats: int = 3, seed: int = 0) -> Calibration:
    """Time one gradient and one Hessian-vector product of ``model_name`` per sample.

    Args:
        model_name: a model of the zoo (``resnet<6n+2>-w<k>``).
        classes: output classes of the classifier.
        micro_batch: samples per timed pass (the stage's micro-batch).
        route: product route (None: the device type's default).
        device: ``cpu`` or ``cuda``.
        repeats: timed repeats after one warm-up (the median is kept).
        seed: seed of the random inputs and parameters.

    Returns:
        The calibration, per sample.
    """
    import torch

    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.models import build

    if micro_batch < 1 or repeats < 1:
        raise UserError(f"calibrate: micro_batch ({micro_batch}) and repeats ({repeats}) must be >= 1")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    model = build(model_name, classes, device=dev)
    x = torch.randn(micro_batch, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, classes, (micro_batch,), generator=gen).to(dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    model.train()
    grad_s = _median_seconds(gradient, repeats, sync)
    model.eval()
    op = HessianLinearOperator(model, (x, y), loss_fn, route=route, micro_batch=micro_batch)
    v = torch.randn(op.n, generator=gen, dtype=torch.float32).to(dev)
    prod_s = _median_seconds(lambda: op.matvec(v), repeats, sync)
    return Calibration(model=model_name, classes=int(classes), device=dev.type, threads=torch.get_num_threads(),
                       micro_batch=int(micro_batch), route=str(op.route_used or op.route),
                       gradient_s_per_sample=grad_s / micro_batch, product_s_per_sample=prod_s / micro_batch,
                       host=platform.node(), cpu=_cpu_name(), torch_version=torch.__version__,
                       measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def save(cal: Calibration, path: str | Path) -> Path:
    """Write ``cal`` as JSON (creating the folder)."""
    from hpcqml.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(asdict(cal), indent=2) + "\n").encode())
    return path


def load(path: str | Path) -> Calibration:
    """Read a calibration file; one-line InputFileError for a missing or malformed one."""
    from hpcqml.io import read_limited

    path = Path(path)
    try:
        raw = json.loads(read_limited(path, 1 << 20).decode("utf-8"))
        return Calibration(**{k: raw[k] for k in Calibration.__dataclass_fields__})
    except FileNotFoundError:
        raise InputFileError(f"calibration {path}: not found (run 'hpcqml calibrate CONFIG')") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"calibration {path}: not a calibration file ({type(exc).__name__}: {exc})") from None


def default_path(config: Any) -> Path:
    """``calibration.json`` beside the config's results file."""
    return Path(config.run["output"]).with_name("calibration.json")


def model_of(config: Any) -> tuple[str, int]:
    """The configured model and its class count (the data set's)."""
    data = config.sections.get("data", {})
    classes = int(data.get("synth_classes", 100)) if data.get("source", "synthetic") == "synthetic" else 100
    return str(config.sections["pretrain"]["model"]), classes


def _train_samples(config: Any) -> int:
    data = config.sections.get("data", {})
    return int(data.get("synth_train", CIFAR100_TRAIN)) if data.get("source", "synthetic") == "synthetic" \
        else CIFAR100_TRAIN


def _spectrum_states(config: Any) -> int:
    """Model states the spectrum stage measures: its ``steps`` list, else the training
    snapshots (every ``snapshot_every`` steps from 0, plus ``snapshot_steps``), else one.
    """
    sp = config.sections["spectrum"]
    if sp.get("source") in ("pruned", "pretrained", "file"):
        return 1
    if sp.get("steps"):
        return len(set(sp["steps"]))
    tr = config.sections.get("train", {})
    steps, every = int(tr.get("steps", 0)), int(tr.get("snapshot_every", 0) or 0)
    snapshots = set(range(0, steps + 1, every)) if every else set()
    snapshots |= {int(s) for s in tr.get("snapshot_steps", ()) if int(s) <= steps}
    return max(len(snapshots), 1)


def stage_seconds(config: Any, cal: Calibration, ranks: int, states: int | None = None) -> dict[str, tuple[float, str]]:
    """Predicted wall seconds of the model stages the config runs, with how each was counted.

    Args:
        config: a validated run config.
        cal: the calibration of this machine.
        ranks: MPI ranks of the run (the work is divided evenly).
        states: model states the spectrum stage measures (None: from ``[spectrum] steps``,
            else ``[train] steps / snapshot_every + 1``).

    Returns:
        ``{stage: (seconds, "how it was counted")}`` for pretrain, train and spectrum when the
        config runs them.
    """
    ranks = max(int(ranks), 1)
    stages = set(config.run.get("stages", ()))
    out: dict[str, tuple[float, str]] = {}
    g, h = cal.gradient_s_per_sample, cal.product_s_per_sample
    if "pretrain" in stages:
        pre = config.sections["pretrain"]
        batch = int(pre["batch_size"])
        samples = int(pre["epochs"]) * math.ceil(_train_samples(config) / batch) * batch
        out["pretrain"] = (samples * g / ranks, f"{samples:,} gradient samples x {g:.3g} s / {ranks} ranks")
    if "train" in stages:
        tr = config.sections["train"]
        samples = int(tr["steps"]) * int(tr["batch_size"])
        out["train"] = (samples * g / ranks, f"{samples:,} gradient samples x {g:.3g} s / {ranks} ranks")
    if "spectrum" in stages:
        sp = config.sections["spectrum"]
        if states is None:
            states = _spectrum_states(config)
        probes = max(int(sp.get("probes", 1)), int(sp.get("max_probes", 0) or 0))
        steps = max(int(sp.get("lanczos_steps", 1)), int(sp.get("max_lanczos_steps", 0) or 0))
        samples = states * probes * steps * int(sp["batch_size"])
        out["spectrum"] = (samples * h / ranks,
                           f"{states} state(s) x {probes} probes x {steps} steps x B={sp['batch_size']} = "
                           f"{samples:,} product samples x {h:.3g} s / {ranks} ranks")
    return out


def estimate_lines(config: Any, cal: Calibration, ranks: int) -> list[str]:
    """``validate``'s time estimate lines from a calibration."""
    lines = []
    for stage, (seconds, how) in stage_seconds(config, cal, ranks).items():
        lines.append(f"time {stage}: about {_human(seconds)} ({how}; calibrated {cal.measured_at} on "
                     f"{cal.cpu}, {cal.threads} thread(s); compute only, no communication)")
    return lines


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hpcqml calibrate``."""
    parser.add_argument("config", help="run config whose model to time")
    parser.add_argument("--out", help="calibration file (default: calibration.json beside the results file)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (median kept)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="samples per timed pass (default: the config's [spectrum] micro_batch, at most 64)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def cli_main(args: argparse.Namespace) -> int:
    """``hpcqml calibrate``: time the configured model, store the result, print the estimates."""
    from hpcqml.config import load_config
    from hpcqml.stages import schemas

    config = load_config(args.config, schemas(), args.overrides)
    model, classes = model_of(config)
    sp = config.sections.get("spectrum", {})
    micro = args.micro_batch or min(int(sp.get("micro_batch", 64)), 64)
    route = sp.get("route") if sp.get("route") not in (None, "auto") else None
    device = "cuda" if config.run.get("device") == "cuda" else "cpu"
    cal = measure(model, classes, micro_batch=micro, route=route, device=device, repeats=args.repeats)
    path = save(cal, args.out or default_path(config))
    print(f"calibration of {model} ({classes} classes) on {cal.cpu}, {cal.threads} thread(s): "
          f"gradient {cal.gradient_s_per_sample * 1e3:.3g} ms/sample, H.v ({cal.route}) "
          f"{cal.product_s_per_sample * 1e3:.3g} ms/sample -> {path}")
    for line in estimate_lines(config, cal, 1):
        print(f"# estimate (1 rank): {line}")
    return 0
