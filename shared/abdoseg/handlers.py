"""Ignite handlers for the bundles' trainers.

:class:`EpochCheckpointSaver` saves the network's inference weights at chosen epochs. Seed 003
labels its unlabeled cases with three checkpoints of one teacher (S1 = the latest, S2, S3 =
earlier epochs; the lesion is a 2-of-3 vote, :func:`abdoseg.fusion.fuse_unlabeled`); MONAI's
``CheckpointSaver`` keeps the best and the last model, or every N epochs, but not a list of
named epochs. In a bundle's ``train.json``::

    "handlers": [..., {"_target_": "abdoseg.handlers.EpochCheckpointSaver",
                       "save_dir": "@ckpt_dir", "network": "@network",
                       "epochs": [-2, -1, 0], "filenames": ["S3.pt", "S2.pt", "S1.pt"]}]

(``epochs`` <= 0 count back from ``max_epochs``, so the three last epochs stay the three last
when a CPU run overrides ``max_epochs``). ``abdoseg rounds --checkpoint_names "['S1','S2','S3']"``
then finds ``<ckpt_dir>/S1.pt`` etc.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from abdoseg.io import atomic_path

__all__ = ["EpochCheckpointSaver"]

logger = logging.getLogger(__name__)


def _inference_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    try:
        from abdoseg.checkpoints import inference_state_dict
    except ImportError:  # older layout: the helper lived in the cascade module
        from abdoseg.cascade import inference_state_dict  # type: ignore[no-redef]
    return inference_state_dict(network)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class EpochCheckpointSaver:
    """Save plain inference state dicts of ``network`` at the end of chosen epochs.

    What is saved is :func:`abdoseg.checkpoints.inference_state_dict` (DDP/DataParallel
    ``module`` unwrapped, DynUNet deep-supervision heads dropped): the file loads strictly into
    the inference config's ``network_def`` (:func:`abdoseg.checkpoints.load_weights`), like
    ``model.pt``. Only rank 0 writes (every rank may attach the handler); each file is written
    under a temporary name and renamed into place (:func:`abdoseg.io.atomic_path`), so a killed
    run never leaves a truncated checkpoint.

    Args:
        save_dir: output folder (created when needed).
        epochs: 1-based epoch numbers at whose end to save. A value ``e <= 0`` means
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
        if not self.epochs:
            raise ValueError("EpochCheckpointSaver: epochs is empty")
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
