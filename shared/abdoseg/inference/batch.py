"""Batch segmentation over a list of cases: resumable, shardable across torch.distributed ranks,
failure-tolerant, atomic writes.

Used by the fine bundle's inference and by the label_fusion bundle's pseudo-labeling: both are
"run a segmenter over a datalist and write ``<case>.nii.gz``". Scale-out is plain ``torchrun``:
each rank takes every ``world_size``-th case; there is no coordinator.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from abdoseg.io import InputError, case_id_from_image, exit_if_failed, remove_stale_partials, save_nifti

logger = logging.getLogger(__name__)

SegmentFn = Callable[[dict], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class BatchReport:
    """Outcome of :func:`run_batch` on this rank."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (case_id, image path, reason)

    def summary(self) -> str:
        lines = [f"{len(self.done)} written, {len(self.skipped)} already present, {len(self.failed)} failed"]
        lines += [f"  FAILED {cid}: {reason}" for cid, _, reason in self.failed]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Exit non-zero (after everything else ran) when any case failed (:func:`abdoseg.io.exit_if_failed`)."""
        exit_if_failed([reason for _, _, reason in self.failed])


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size) from an initialized torch.distributed group, else torchrun's env vars, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - torch always present in practice
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Items for ``rank``: every ``world_size``-th item starting at ``rank`` (disjoint, covering)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def output_path_for(item: dict, output_dir: str | os.PathLike, suffix: str = ".nii.gz") -> Path:
    """``<output_dir>/<case_id><suffix>``; the case id comes from ``item["case_id"]`` or the image name."""
    case_id = item.get("case_id") or case_id_from_image(item["image"])
    return Path(output_dir) / f"{case_id}{suffix}"


def run_batch(
    items: Sequence[dict],
    segment: SegmentFn,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    desc: str = "segment",
    rank: int | None = None,
    world_size: int | None = None,
    output_dtype: type = np.uint8,
    verbose: bool = True,
) -> BatchReport:
    """Run ``segment(item) -> (mask, affine)`` on this rank's share of ``items``.

    Args:
        items: datalist entries, each with an ``"image"`` path (optionally ``"case_id"``).
        segment: returns the mask (X, Y, Z) in the input's voxel grid and its 4x4 affine.
        output_dir: masks go to ``<output_dir>/<case_id>.nii.gz``, written atomically.
        overwrite: recompute cases whose output already exists (default: skip them = resume).
        rank, world_size: shard selection; default from torch.distributed / torchrun env.
        verbose: log each failure as it happens and print :meth:`BatchReport.summary` at the
            end; ``False`` for callers that list the failures themselves (each reason once;
            tracebacks of unexpected errors go to the debug log).
    Returns:
        :class:`BatchReport` for this rank. Per-case errors never stop the batch.
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_rank_world()
    mine = shard(items, rank, world_size)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for p in remove_stale_partials(output_dir):  # what a killed earlier run was writing
        logger.info("removed %s (left by an interrupted run)", p)
    report = BatchReport()
    bar = tqdm(mine, desc=f"{desc} [rank {rank}/{world_size}]" if world_size > 1 else desc,
               unit="case", disable=None, file=sys.stderr)
    for item in bar:
        out = output_path_for(item, output_dir)
        case_id = out.name[: -len(".nii.gz")]
        if out.exists() and not overwrite:
            report.skipped.append(case_id)
            continue
        bar.set_postfix_str(case_id)
        try:
            mask, affine = segment(item)
            save_nifti(np.asarray(mask).astype(output_dtype, copy=False), affine, out)
        except InputError as exc:
            report.failed.append((case_id, str(item.get("image")), str(exc)))
            if verbose:
                logger.error("%s", exc)
        except OSError as exc:  # unreadable input, full disk, read-only output: the reason is enough
            where = exc.filename if getattr(exc, "filename", None) else item.get("image")
            reason = f"{where}: {exc.strerror or type(exc).__name__} ({out.name} not written)"
            report.failed.append((case_id, str(item.get("image")), reason))
            if verbose:
                logger.error("%s", reason)
        except Exception as exc:  # keep the batch going; the reason is reported at the end
            reason = f"{item.get('image')}: {type(exc).__name__}: {exc}"
            report.failed.append((case_id, str(item.get("image")), reason))
            (logger.error if verbose else logger.debug)("%s\n%s", reason, traceback.format_exc())
        else:
            report.done.append(case_id)
    if verbose:
        print(report.summary(), file=sys.stderr)
    return report
