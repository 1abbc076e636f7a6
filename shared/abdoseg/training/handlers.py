"""Ignite handlers for the bundles' trainers.

:class:`EpochCheckpointSaver` saves the network's inference weights at chosen epochs. Seed 003
labels its unlabeled cases with three checkpoints of one teacher (S1 = the latest, S2, S3 =
earlier epochs; the lesion is a 2-of-3 vote, :func:`abdoseg.label_fusion.rules.fuse_unlabeled`); MONAI's
``CheckpointSaver`` keeps the best and the last model, or every N epochs, but not a list of
named epochs. In a bundle's ``train.json``::

    "handlers": [..., {"_target_": "abdoseg.training.handlers.EpochCheckpointSaver",
                       "save_dir": "@ckpt_dir", "network": "@network",
                       "epochs": [-2, -1, 0], "filenames": ["S3.pt", "S2.pt", "S1.pt"]}]

(``epochs`` <= 0 count back from ``max_epochs``, so the three last epochs stay the three last
when a CPU run overrides ``max_epochs``). ``abdoseg rounds --checkpoint_names "['S1','S2','S3']"``
then finds ``<ckpt_dir>/S1.pt`` etc.

:class:`ModelSaver` is the one writer of ``models/model.pt``: the best validated weights, or
the last ones when no validation ran (a run shorter than ``val_interval``, or one without
validation data, as MONAI Label's training on a few labels often is), so no run leaves old
weights in place. :class:`TrainStatsWriter`
keeps a small JSON of the training's progress (epoch, loss, best metric, times) that MONAI Label
shows as ``train_stats``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from abdoseg.io import atomic_path

__all__ = ["EpochCheckpointSaver", "ModelSaver", "LearningCurveRecorder", "TimeBudget", "TrainStatsWriter",
           "WallClockPolyLR"]

logger = logging.getLogger(__name__)


def _inference_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    from abdoseg.networks.checkpoints import inference_state_dict

    return inference_state_dict(network)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class EpochCheckpointSaver:
    """Save plain inference state dicts of ``network`` at the end of chosen epochs.

    What is saved is :func:`abdoseg.networks.checkpoints.inference_state_dict` (DDP/DataParallel
    ``module`` unwrapped, DynUNet deep-supervision heads dropped): the file loads strictly into
    the inference config's ``network_def`` (:func:`abdoseg.networks.checkpoints.load_weights`), like
    ``model.pt``. Only rank 0 writes (every rank may attach the handler); each file is written
    under a temporary name and renamed into place (:func:`abdoseg.io.atomic_path`), so a killed
    run never leaves a truncated checkpoint.

    Args:
        save_dir: output folder (created when needed).
        epochs: 1-based epoch numbers at whose end to save (empty: the handler saves nothing, so
            a config can keep it in its handler list and a preset fill the list). A value ``e <= 0`` means
            ``max_epochs + e`` (0 = the last epoch, -1 = the one before), resolved against the
            engine's ``state.max_epochs`` when the epoch ends. Epochs outside
            ``1..max_epochs`` never come and are reported once as a warning.
        network: the trained module (may be DDP-wrapped).
        filename_template: file name with ``{epoch}`` (the resolved epoch number), used when
            ``filenames`` is None.
        filenames: optional file names, one per entry of ``epochs`` (e.g. ``["S3.pt", "S2.pt",
            "S1.pt"]``).

    Attributes:
        saved: ``{file name: resolved epoch}`` written by this process so far.

    Use ``handler.attach(engine)`` (or list it under a MONAI trainer's ``train_handlers``, which
    calls ``attach``); it runs on ``Events.EPOCH_COMPLETED``.
    """

    def __init__(self, save_dir: str | os.PathLike, epochs: Sequence[int], network: torch.nn.Module,
                 filename_template: str = "model_epoch{epoch}.pt", filenames: Sequence[str] | None = None) -> None:
        self.save_dir = Path(save_dir)
        self.epochs = [int(e) for e in ([epochs] if isinstance(epochs, int) else epochs)]
        if filenames is not None:
            names = [str(f) for f in filenames]
            if len(names) != len(self.epochs):
                raise ValueError(f"EpochCheckpointSaver: {len(names)} filenames for {len(self.epochs)} epochs")
            if len(set(names)) != len(names):
                raise ValueError(f"EpochCheckpointSaver: filenames repeat: {names}")
            self.filenames: list[str] | None = names
        else:
            if "{epoch}" not in filename_template:
                raise ValueError(f"EpochCheckpointSaver: filename_template needs '{{epoch}}', got {filename_template!r}")
            self.filenames = None
        self.filename_template = str(filename_template)
        self.network = network
        self.saved: dict[str, int] = {}
        self._warned = False

    def resolve(self, max_epochs: int) -> list[tuple[int, str]]:
        """``[(epoch, file name)]`` for a run of ``max_epochs`` epochs (epochs <= 0 counted back)."""
        out = []
        for i, e in enumerate(self.epochs):
            ep = int(max_epochs) + e if e <= 0 else e
            name = self.filenames[i] if self.filenames is not None else self.filename_template.format(epoch=ep)
            out.append((ep, name))
        return out

    def attach(self, engine) -> None:  # ignite.engine.Engine
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        max_epochs = int(engine.state.max_epochs)
        plan = self.resolve(max_epochs)
        if not self._warned:
            self._warned = True
            never = [(e, n) for e, n in plan if not 1 <= e <= max_epochs]
            if never:
                logger.warning("EpochCheckpointSaver: %s lie outside epochs 1..%d and will not be saved",
                               ", ".join(f"{n} (epoch {e})" for e, n in never), max_epochs)
        epoch = int(engine.state.epoch)
        due = [name for e, name in plan if e == epoch]
        if not due or _rank() != 0:
            return
        state = {k: v.detach().cpu() for k, v in _inference_state_dict(self.network).items()}
        for name in due:
            path = self.save_dir / name
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            self.saved[name] = epoch
            logger.info("EpochCheckpointSaver: epoch %d -> %s", epoch, path)


def _validated_epoch(evaluator: Any) -> int:
    """Trainer epoch of the evaluator's best key metric in this run, or -1 if it never validated
    (MONAI's ``Workflow`` starts ``state.best_metric_epoch`` at -1; an empty validation loader
    skips the run and leaves it there)."""
    state = getattr(evaluator, "state", None)
    return int(getattr(state, "best_metric_epoch", -1) or -1) if state is not None else -1


class ModelSaver:
    """The one writer of ``model.pt``: the best validated weights while training runs, or the
    last weights when no validation ran.

    After every validation whose key metric is the best so far (MONAI's ``Workflow`` keeps
    ``state.best_metric_epoch``), the network's inference weights are written to ``filename``;
    so after a run with at least one validation the file is the best validated model. A run in
    which no validation ran (``max_epochs < val_interval``, or an empty validation datalist, e.g.
    MONAI Label with one or two labeled images) would otherwise leave the previous ``model.pt`` in
    place while reporting success: at the end of such a run the last epoch's weights are written
    and the log says why. The file is a plain state dict of
    :func:`abdoseg.networks.checkpoints.inference_state_dict` (deep-supervision heads dropped, DDP
    unwrapped), written atomically by rank 0 only.

    Args:
        save_dir: output folder (the bundle's ``ckpt_dir``).
        network: the trained module (may be DDP-wrapped).
        evaluator: the validation engine (``@validate#evaluator``); ``None`` = never validated,
            save at the end.
        filename: file name in ``save_dir`` (default ``model.pt``, what inference loads).

    Attributes:
        best_epoch: trainer epoch of the weights written after a validation, or -1.
        saved: the path written at the end of the last run (no validation ran), or ``None``.
    """

    def __init__(self, save_dir: str | os.PathLike, network: torch.nn.Module, evaluator: Any = None,
                 filename: str = "model.pt") -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.evaluator = evaluator
        self.filename = str(filename)
        self.best_epoch = -1
        self.saved: Path | None = None

    def attach(self, engine) -> None:  # ignite.engine.Engine (the trainer)
        from ignite.engine import Events

        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.COMPLETED, self.completed)
        # registered after the evaluator's own key-metric comparison, so best_metric_epoch is current
        if self.evaluator is not None and not self.evaluator.has_event_handler(self.validated, Events.EPOCH_COMPLETED):
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.validated)

    def _write(self) -> Path:
        path = self.save_dir / self.filename
        state = {k: v.detach().cpu() for k, v in _inference_state_dict(self.network).items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path

    def started(self, engine) -> None:
        self.best_epoch, self.saved = -1, None

    def validated(self, evaluator) -> None:
        """After a validation: write the weights if its key metric is the best of this run."""
        epoch = int(evaluator.state.epoch)
        if _rank() != 0 or _validated_epoch(evaluator) != epoch:
            return
        path = self._write()
        self.best_epoch = epoch
        logger.info("ModelSaver: best %s so far at epoch %d -> %s", getattr(evaluator.state, "best_metric", "?"),
                    epoch, path)

    def completed(self, engine) -> None:
        """End of training: write the last weights when no validation wrote any."""
        if _rank() != 0 or self.best_epoch >= 1:
            return
        self.saved = self._write()
        logger.info("ModelSaver: no validation ran in this training (max_epochs %d, or no validation data): "
                    "%s = the weights after epoch %d", int(engine.state.max_epochs), self.saved, int(engine.state.epoch))


def _scalar(value: Any) -> Any:
    """JSON-friendly metric value (tensors and numpy numbers to floats/lists, NaN to None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "size", 2) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _loss_from_output(output: Any) -> float | None:
    if isinstance(output, list) and output:  # MONAI decollated output: one dict per sample
        output = output[0]
    if isinstance(output, dict):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.detach().cpu().item())
    if isinstance(output, (int, float)):
        return float(output)
    return None


class TrainStatsWriter:
    """Write the training's progress to a JSON file at the start, after every epoch and at the end.

    The content follows MONAI Label's ``train_stats`` (``monailabel.tasks.train.handler``):
    ``epoch``, ``total_epochs``, ``start_ts``, ``current_time`` (while running) or ``total_time``
    (finished), ``best_metric``, ``best_metric_epoch``, ``train``/``eval`` metric dicts, plus
    ``status`` (``RUNNING``/``DONE``), ``iteration``, ``loss`` (mean training loss of the last
    epoch) and ``loss_per_epoch``. The MONAI Label app (``monailabel_app``) returns it from its
    trainer's ``stats()``, which the viewer shows as ``train_stats``. Rank 0 only; atomic writes, so
    a reader never sees half a file.

    Args:
        path: JSON file to (over)write.
        evaluator: the validation engine (``@validate#evaluator``), for the best metric; optional.
        loss_transform: ``engine.state.output -> float | None`` (default: the ``"loss"`` entry of
            MONAI's trainer output).
    """

    def __init__(self, path: str | os.PathLike, evaluator: Any = None,
                 loss_transform: Callable[[Any], float | None] | None = None) -> None:
        self.path = Path(path)
        self.evaluator = evaluator
        self.loss_transform = loss_transform or _loss_from_output
        self.start_ts = time.time()
        self.loss_per_epoch: list[float | None] = []
        self._losses: list[float] = []

    def attach(self, engine) -> None:  # ignite.engine.Engine
        from ignite.engine import Events

        for event, fn in ((Events.STARTED, self.started), (Events.ITERATION_COMPLETED, self.iteration_completed),
                          (Events.EPOCH_COMPLETED, self.epoch_completed), (Events.COMPLETED, self.completed)):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def started(self, engine) -> None:
        self.start_ts = time.time()
        self.loss_per_epoch = []
        self._losses = []
        self.write(engine, "RUNNING")

    def iteration_completed(self, engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)

    def epoch_completed(self, engine) -> None:
        self.loss_per_epoch.append(sum(self._losses) / len(self._losses) if self._losses else None)
        self._losses = []
        self.write(engine, "RUNNING")

    def completed(self, engine) -> None:
        self.write(engine, "DONE")

    def stats(self, engine, status: str) -> dict[str, Any]:
        state = engine.state
        elapsed = str(timedelta(seconds=int(time.time() - self.start_ts)))
        out: dict[str, Any] = {
            "status": status,
            "epoch": int(state.epoch),
            "total_epochs": int(state.max_epochs) if state.max_epochs is not None else None,
            "iteration": int(state.iteration),
            "start_ts": int(self.start_ts),
            ("total_time" if status == "DONE" else "current_time"): elapsed,
            "loss": self.loss_per_epoch[-1] if self.loss_per_epoch else None,
            "loss_per_epoch": list(self.loss_per_epoch),
            "train": {"metrics": {k: _scalar(v) for k, v in (state.metrics or {}).items()}},
        }
        ev = getattr(self.evaluator, "state", None)
        if ev is not None:
            out["best_metric"] = _scalar(getattr(ev, "best_metric", None))
            out["best_metric_epoch"] = int(getattr(ev, "best_metric_epoch", -1) or -1)
            out["eval"] = {"metrics": {k: _scalar(v) for k, v in (getattr(ev, "metrics", None) or {}).items()},
                           "key_metric_name": getattr(ev, "key_metric_name", None),
                           "best_metric": out["best_metric"], "best_metric_epoch": out["best_metric_epoch"]}
        return out

    def write(self, engine, status: str) -> None:
        if _rank() != 0:
            return
        stats = self.stats(engine, status)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps(stats, indent=2))


def from_engine_channels(keys: Sequence[str] = ("pred", "label"), channels: Sequence[int] | None = None) -> Callable:
    """MONAI's ``from_engine(keys)`` restricted to chosen one-hot channels, for a key metric on some
    classes only (seed 002 keeps the tumor model's checkpoint with the best *lesion* score:
    ``channels=[0, 14]`` with ``MeanDice(include_background=False)`` is the lesion Dice).

    ``channels=None``: every channel (plain ``from_engine``). Each item of the engine output
    holds ``(C, *S)`` tensors; the selection keeps ``(len(channels), *S)``.
    """
    from monai.handlers import from_engine

    base = from_engine(list(keys))
    if channels is None:
        return base
    idx = [int(c) for c in channels]
    if not idx:
        raise ValueError("from_engine_channels: channels is empty")

    def select(output: Any) -> tuple:
        return tuple([x[idx] for x in items] for items in base(output))

    return select


class TimeBudget:
    """Stop training after ``limit_s`` seconds of wall time (``ignite.handlers.TimeLimit``, checked
    after every iteration), as a MONAI train handler (``train_handlers`` call ``attach``).

    The trainer then ends as if its last epoch were done: ``Events.COMPLETED`` fires, so
    :class:`ModelSaver` and MONAI's ``CheckpointSaver(save_final=True)`` still write their
    files. Useful for equal-budget comparisons (``scripts/bench.py systems``) and for "train
    for 10 minutes" on a laptop; the learning-rate schedule still counts ``max_epochs``.
    """

    def __init__(self, limit_s: float) -> None:
        if not limit_s > 0:
            raise ValueError(f"TimeBudget: limit_s must be > 0, got {limit_s}")
        self.limit_s = float(limit_s)

    def attach(self, engine) -> None:  # ignite.engine.Engine
        from ignite.engine import Events
        from ignite.handlers import TimeLimit

        engine.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(int(max(1, round(self.limit_s)))))


class WallClockPolyLR:
    """Polynomial learning-rate decay over a wall-time budget instead of an epoch count.

    Before every iteration each parameter group's learning rate is set to
    ``initial_lr * (1 - elapsed_s / budget_s) ** power`` (floored at ``min_fraction`` of it), with
    the clock started when the trainer starts. An epoch-counted schedule (``PolynomialLR`` over
    ``max_epochs``) reaches zero at the epoch cap, which on a slower or faster machine comes
    before or long after the minutes one has; this one reaches its floor when the minutes run
    out. Pair it with :class:`TimeBudget` at the same ``budget_s`` (and drop the epoch-level
    ``LrScheduleHandler``), e.g. as a ``train.json`` overlay::

        {"train#handlers#0": {"_target_": "abdoseg.training.handlers.WallClockPolyLR",
                              "optimizer": "@optimizer", "budget_s": 900}}

    Wall time makes the run depend on the machine's speed: use it for equal-time comparisons
    (``scripts/bench.py learning``), an epoch-counted schedule for reproducible training.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, budget_s: float, power: float = 0.9,
                 min_fraction: float = 0.0) -> None:
        if not budget_s > 0:
            raise ValueError(f"WallClockPolyLR: budget_s must be > 0, got {budget_s}")
        if not 0.0 <= min_fraction < 1.0:
            raise ValueError(f"WallClockPolyLR: min_fraction must lie in [0, 1), got {min_fraction}")
        self.optimizer = optimizer
        self.budget_s = float(budget_s)
        self.power = float(power)
        self.min_fraction = float(min_fraction)
        self.initial_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.t0: float | None = None

    def factor(self, elapsed_s: float) -> float:
        """Learning-rate factor after ``elapsed_s`` seconds of training (pure)."""
        remaining = max(0.0, 1.0 - float(elapsed_s) / self.budget_s)
        return max(self.min_fraction, remaining**self.power)

    def attach(self, engine) -> None:  # ignite.engine.Engine
        from ignite.engine import Events

        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)

    def started(self, engine) -> None:
        self.t0 = time.perf_counter()

    def iteration_started(self, engine) -> None:
        f = self.factor(time.perf_counter() - (self.t0 if self.t0 is not None else time.perf_counter()))
        for group, lr0 in zip(self.optimizer.param_groups, self.initial_lrs):
            group["lr"] = lr0 * f


class LearningCurveRecorder:
    """Snapshot the network every ``every_s`` seconds of training, with what the training has
    spent to get there: the points of a learning curve (accuracy vs compute).

    At each snapshot (and at the end) it saves the plain inference state dict as
    ``save_dir/curve_<k>.pt`` (``k`` = 0, 1, ...) and rewrites ``save_dir/curve.json`` (atomic)
    with one entry per snapshot: ``file``, ``wall_s`` (since the trainer started, data loading
    and cache filling included), ``cpu_s`` (this process's CPU seconds, all threads), ``data_s``
    (wall seconds spent waiting for the data loader), ``iteration``, ``epoch``, ``samples`` (patches
    seen) and ``voxels`` (patch voxels seen). ``wall_s`` counts training only when validation does
    not run in between (``val_interval`` >= ``max_epochs``), as in ``scripts/bench.py learning``.
    Rank 0 only.

    Args:
        save_dir: folder for the snapshots and ``curve.json`` (created).
        every_s: seconds of training between snapshots (> 0).
        network: the trained module.
        image_key: the batch's image entry, shape (N, C, *spatial), for the sample/voxel counts.
    """

    def __init__(self, save_dir: str | os.PathLike, every_s: float, network: torch.nn.Module,
                 image_key: str = "image") -> None:
        if not every_s > 0:
            raise ValueError(f"LearningCurveRecorder: every_s must be > 0, got {every_s}")
        self.save_dir = Path(save_dir)
        self.every_s = float(every_s)
        self.network = network
        self.image_key = image_key
        self.points: list[dict[str, Any]] = []

    def attach(self, engine) -> None:  # ignite.engine.Engine
        from ignite.engine import Events

        for event, fn in ((Events.STARTED, self.started), (Events.GET_BATCH_STARTED, self.batch_started),
                          (Events.GET_BATCH_COMPLETED, self.batch_completed),
                          (Events.ITERATION_COMPLETED, self.iteration_completed), (Events.COMPLETED, self.completed)):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def started(self, engine) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.data_s, self.samples, self.voxels = 0.0, 0, 0
        self.points = []
        self._batch_t0 = self.t0

    def batch_started(self, engine) -> None:
        self._batch_t0 = time.perf_counter()

    def batch_completed(self, engine) -> None:
        self.data_s += time.perf_counter() - self._batch_t0
        batch = engine.state.batch
        image = batch.get(self.image_key) if isinstance(batch, dict) else None
        if isinstance(image, torch.Tensor) and image.ndim >= 3:
            self.samples += int(image.shape[0])
            self.voxels += int(image.shape[0]) * int(math.prod(image.shape[2:]))

    def iteration_completed(self, engine) -> None:
        if time.perf_counter() - self.t0 >= self.every_s * (len(self.points) + 1):
            self.snapshot(engine)

    def completed(self, engine) -> None:
        if not self.points or self.points[-1]["iteration"] != int(engine.state.iteration):
            self.snapshot(engine)

    def snapshot(self, engine) -> None:
        if _rank() != 0:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        name = f"curve_{len(self.points)}.pt"
        with atomic_path(self.save_dir / name) as tmp:
            torch.save(_inference_state_dict(self.network), tmp)
        self.points.append({"file": name, "wall_s": round(time.perf_counter() - self.t0, 2),
                            "cpu_s": round(time.process_time() - self.c0, 2), "data_s": round(self.data_s, 2),
                            "iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch),
                            "samples": self.samples, "voxels": self.voxels})
        with atomic_path(self.save_dir / "curve.json") as tmp:
            Path(tmp).write_text(json.dumps(self.points, indent=1))
