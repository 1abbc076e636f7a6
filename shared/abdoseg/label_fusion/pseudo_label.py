"""Pseudo-labeling: run a teacher (one or more checkpoints) over a datalist, one NIfTI per case.

Used by the ``label_fusion`` bundle (``configs/pseudo_label.json``: by default its own teacher,
i.e. its ``configs/inference.json`` = the fine cascade with the teacher weights; ``--teacher_bundle``
names another) and by ``abdoseg rounds``.
For every checkpoint ``name`` the masks go to ``<output_dir>/<name>/<case_id>.nii.gz``.

The per-case work is :func:`abdoseg.inference.batch.run_batch`, which gives the operational properties:
finished cases are skipped on a rerun (resume), every write is atomic (a killed run leaves no
truncated file), and under ``torchrun`` each rank takes every ``WORLD_SIZE``-th case (no
coordinator). NIfTI gzip streams are written with mtime 0, so reruns are byte-identical.

The teacher is pluggable: ``teacher_factory(checkpoint_path) -> segment`` where
``segment(item) -> (mask (X, Y, Z) uint8 in the image's voxel grid, affine 4x4)``. The default,
:func:`bundle_teacher`, builds ``segment`` from a MONAI bundle inference config (the
``fine_organ_tumor`` bundle): ``network_def`` loaded with the checkpoint's plain state dict, then
``preprocessing`` -> ``inferer`` -> ``postprocessing`` -- the same ids MONAI Label uses.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from abdoseg.inference.batch import BatchReport, SegmentFn, run_batch
from abdoseg.io import InputError, case_id_from_image, exit_if_failed

logger = logging.getLogger(__name__)

TeacherFactory = Callable[[str], SegmentFn]

DEFAULT_KEYS: tuple[str, ...] = ("training", "unlabeled")


def datalist_items(datalist: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
                   keys: Sequence[str] = DEFAULT_KEYS) -> list[dict[str, Any]]:
    """Items of ``keys`` in a datalist (interface 2) with absolute paths, ``case_id`` and ``split``.

    Args:
        datalist: datalist JSON path; its paths are relative to ``dataset_dir``.
        dataset_dir: dataset root (default: the datalist's folder).
        keys: datalist sections to read, in order; absent sections are skipped. A case listed in
            several sections is kept once (first occurrence).
    Raises:
        InputError: datalist missing or unreadable, or a section that is not a list.
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    if not path.is_file():
        raise InputError(path, "datalist file not found")
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable JSON datalist ({exc})") from exc
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for key in keys:
        if key not in content:
            continue
        if not isinstance(content[key], list):
            raise InputError(path, f"section {key!r} is not a list")
        for item in load_decathlon_datalist(str(path), True, key, base_dir=str(base)):
            if "image" not in item:
                raise InputError(path, f"an item of {key!r} has no 'image'")
            cid = case_id_from_image(item["image"])
            if cid in seen:
                continue
            seen.add(cid)
            items.append({**item, "case_id": cid, "split": key})
    return items


def checkpoint_map(checkpoints: str | os.PathLike | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Normalize a checkpoint spec to ``{name: path}`` (name = output sub-folder).

    Accepts a mapping (kept), a single ``.pt`` file (name = file stem), a folder (its ``*.pt``
    files sorted by name) or a list of files. Raises :class:`InputError` for missing files.
    """
    if isinstance(checkpoints, Mapping):
        out = {str(k): str(v) for k, v in checkpoints.items()}
    else:
        paths: list[Path]
        if isinstance(checkpoints, (str, os.PathLike)):
            p = Path(checkpoints)
            paths = sorted(p.glob("*.pt")) if p.is_dir() else [p]
            if p.is_dir() and not paths:
                raise InputError(p, "no *.pt checkpoint in this folder")
        else:
            paths = [Path(c) for c in checkpoints]
        out = {}
        for p in paths:
            if p.stem in out:
                raise InputError(p, f"two checkpoints share the name {p.stem!r}; pass a mapping name -> path")
            out[p.stem] = str(p)
    if not out:
        raise ValueError("no checkpoint given")
    for name, p in out.items():
        if not Path(p).is_file():
            raise InputError(p, f"checkpoint {name!r} not found")
    return out


def _image_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    try:
        img = nib.load(path)
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def bundle_teacher(checkpoint: str, inference_config: str | Sequence[str], bundle_root: str | None = None,
                   device: str = "cpu", overrides: Mapping[str, Any] | None = None) -> SegmentFn:
    """``segment`` function of a MONAI bundle inference config with ``checkpoint`` loaded.

    Args:
        checkpoint: plain state dict of the config's ``network_def``.
        inference_config: the teacher bundle's ``configs/inference.json`` (or a list to merge).
        bundle_root: the teacher bundle folder (default: the folder above the first config's).
        device: torch device for the networks (the config's ``device``).
        overrides: further config id -> value pairs.
    Returns:
        ``segment(item) -> (mask (X, Y, Z) uint8, affine)``: the bundle's ``preprocessing`` ->
        ``inferer(image, network)`` -> ``postprocessing`` (its writer dropped), as MONAI Label
        composes them (:func:`abdoseg.inference.segmenter.segmenter_from_bundle`).
    """
    from abdoseg.inference.segmenter import segmenter_from_bundle

    configs = [inference_config] if isinstance(inference_config, (str, os.PathLike)) else list(inference_config)
    root = Path(bundle_root) if bundle_root is not None else Path(configs[0]).resolve().parents[1]
    configs = [str(Path(c).resolve()) for c in configs]
    return segmenter_from_bundle(root, device=device, overrides=overrides, model_path=checkpoint,
                                 config=configs if len(configs) > 1 else configs[0])


def pseudo_label(items: Sequence[dict], teacher_factory: TeacherFactory,
                 checkpoints: str | Sequence[str] | Mapping[str, str], output_dir: str | os.PathLike,
                 overwrite: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> dict[str, BatchReport]:
    """Pseudo-label ``items`` with every checkpoint: ``<output_dir>/<name>/<case_id>.nii.gz``.

    Args:
        items: datalist items with absolute ``image`` paths (see :func:`datalist_items`).
        teacher_factory: ``factory(checkpoint_path) -> segment`` (e.g. a partial of
            :func:`bundle_teacher`, or any config-defined callable).
        checkpoints: see :func:`checkpoint_map`.
        output_dir: root of the per-checkpoint folders.
        overwrite: recompute existing outputs (default: skip them = resume).
        rank, world_size: shard; default torch.distributed / torchrun env (``RANK``,
            ``WORLD_SIZE``).
    Returns:
        ``{checkpoint name: BatchReport}`` for this rank. A checkpoint whose outputs all exist
        already is not even loaded.
    """
    from abdoseg.inference.batch import distributed_rank_world, output_path_for, shard

    ckpts = checkpoint_map(checkpoints)
    if rank is None or world_size is None:
        rank, world_size = distributed_rank_world()
    reports: dict[str, BatchReport] = {}
    for name, path in ckpts.items():
        out_dir = Path(output_dir) / name
        mine = shard(list(items), rank, world_size)
        if not overwrite and all(output_path_for(it, out_dir).exists() for it in mine):
            reports[name] = BatchReport(skipped=[output_path_for(it, out_dir).name[:-7] for it in mine])
            logger.info("pseudo-label %s: all %d case(s) of rank %d already present", name, len(mine), rank)
            continue
        segment = teacher_factory(path)
        reports[name] = run_batch(items, segment, out_dir, overwrite=overwrite, desc=f"pseudo-label {name}",
                                  rank=rank, world_size=world_size)
    return reports


def raise_if_failed(reports: Mapping[str, BatchReport]) -> dict[str, dict[str, int]]:
    """Exit non-zero when any checkpoint's batch had a failed case; else counts per checkpoint."""
    exit_if_failed([f"[{name}] {reason}" for name, rep in reports.items() for _, _, reason in rep.failed],
                   "pseudo-label case(s) failed")
    return {name: {"written": len(r.done), "skipped": len(r.skipped)} for name, r in reports.items()}
