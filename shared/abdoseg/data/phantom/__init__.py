"""Synthetic abdominal CT phantom: the project's embedded FLARE23-style dataset.

``generate(out_dir)`` writes the layout of interface 1 (see README / notes): labeled cases with
partial labels, unlabeled cases, pseudo labels A and B for every training case, a validation
split with full ground truth and the hidden full truth of training cases. ``make_case`` builds
one case in memory.

Every case is a pure function of ``(seed, case index)`` (numpy SeedSequence), so a case does
not depend on how many cases are generated or in which order, and reruns are byte-identical.
Anatomy lives in a world frame in mm (see ``anatomy``); volumes are painted in canonical RAS
voxel order and then reoriented to the case's axis codes (RAS, LPS, LAS, ...), so the anatomy is
right in world coordinates whatever the header orientation.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from abdoseg.io import InputError, ensure_writable_dir, save_json, save_nifti
from abdoseg.labels import LABELS, LESION_ID
from abdoseg.data.phantom.anatomy import Anatomy, Grid, render, sample_anatomy
from abdoseg.data.phantom.annotations import (partial_label, pseudo_label_a, pseudo_label_b,
                                         sample_annotation)

GENERATOR_VERSION = "1.0"
CASE_PREFIX = "PHANTOM_"

PRESETS: dict[str, dict[str, Any]] = {
    # matrix: in-plane size choices; fov_mm: in-plane field of view; slices: (min, max);
    # dz_mm: slice spacing range before the slice count is clipped to ``slices``.
    "small": dict(matrix=(96, 112, 128), fov_mm=(360, 430), slices=(20, 60), dz_mm=(4.5, 8.0),
                  n_labeled=12, n_unlabeled=4, n_val=4),
    "medium": dict(matrix=(192, 224, 256), fov_mm=(350, 440), slices=(40, 160), dz_mm=(2.0, 5.0),
                   n_labeled=40, n_unlabeled=20, n_val=10),
    "full": dict(matrix=(512,), spacing_mm=(0.62, 0.98), slices=(55, 554),
                 dz_choices=(0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0),
                 n_labeled=24, n_unlabeled=12, n_val=6),
}
# Header orientations drawn for cases (axis flips as real CT exports have them).
AXCODES_P: dict[str, float] = {"LPS": 0.3, "RAS": 0.25, "LAS": 0.15, "RPS": 0.1, "LPI": 0.1, "RAI": 0.1}
SPLITS = ("train_labeled", "unlabeled", "validation")
#: ``generate(slices=...)`` bounds (a CT needs a few slices; more than a whole-body scan is a typo).
SLICES_RANGE = (4, 2000)


@dataclass
class CasePlan:
    """Everything drawn for one case before rendering (cheap)."""

    index: int
    annotation: dict
    anatomy: Anatomy
    grid: Grid
    axcodes: str
    world_shift_mm: np.ndarray
    noise_hu: float
    psf_mm: float
    seeds: list[np.random.SeedSequence]

    @property
    def out_shape(self) -> list[int]:
        perm = _perm(self.axcodes)
        return [self.grid.shape[p] for p in perm]

    @property
    def out_spacing_mm(self) -> list[float]:
        perm = _perm(self.axcodes)
        return [round(self.grid.spacing_mm[p], 6) for p in perm]


def _perm(axcodes: str) -> list[int]:
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    return [int(a) for a in ornt[:, 0]]


def _check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise InputError(preset, f"unknown phantom preset; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def plan_case(seed: int, index: int, preset: str = "small", slices: int | None = None,
              shape: tuple[int, int, int] | None = None, spacing_mm: tuple[float, float, float] | None = None,
              axcodes: str | None = None) -> CasePlan:
    """Draw case ``index`` of dataset ``seed``: annotation kind, anatomy and acquisition.

    ``shape`` / ``spacing_mm`` (output voxel order, mm) and ``axcodes`` override the drawn values;
    ``slices`` fixes the number of slices only.
    """
    cfg = _check_preset(preset)
    ss = np.random.SeedSequence([int(seed), int(index)])
    seeds = ss.spawn(6)   # 0 plan, 1 render, 2 noise, 3 pseudo A, 4 pseudo B, 5 spare
    rng = np.random.default_rng(seeds[0])
    n_les = int(rng.choice(5, p=[0.3, 0.3, 0.2, 0.12, 0.08]))
    ann = sample_annotation(rng, index, n_les > 0)
    if ann["force_lesion"] and n_les == 0:
        n_les = 1
    anat = sample_anatomy(rng, n_les)
    # acquisition
    ax = axcodes or str(rng.choice(list(AXCODES_P), p=list(AXCODES_P.values())))
    try:
        perm = _perm(ax)
    except Exception as exc:
        raise InputError(str(axcodes), f"invalid axis codes ({exc})") from exc
    if sorted(perm) != [0, 1, 2]:
        raise InputError(str(axcodes), "axis codes must name each of L/R, A/P, S/I once")
    z_top = float(rng.uniform(112, 170))
    z_bot = float(rng.uniform(-110, -50)) if rng.random() < 0.5 else float(rng.uniform(-330, -250))
    cov = z_top - z_bot
    m = int(rng.choice(cfg["matrix"]))
    if "spacing_mm" in cfg:
        sxy = float(rng.uniform(*cfg["spacing_mm"]))
        dz = float(rng.choice(cfg["dz_choices"]))
    else:
        sxy = float(rng.uniform(*cfg["fov_mm"])) / m
        dz = float(rng.uniform(*cfg["dz_mm"]))
    nz = int(np.clip(round(cov / dz), *cfg["slices"]))
    if slices is not None:
        nz = int(slices)
        dz = float(np.clip(cov / nz, 0.8, 5.0))
    else:
        dz = cov / nz if "dz_choices" not in cfg else dz
    canon_shape = [m, m, nz]
    canon_sp = [sxy, sxy, dz]
    if shape is not None:
        for i, p in enumerate(perm):
            canon_shape[p] = int(shape[i])
    if spacing_mm is not None:
        for i, p in enumerate(perm):
            canon_sp[p] = float(spacing_mm[i])
    if min(canon_shape) < 1 or min(canon_sp) <= 0:
        raise InputError(str(shape), "shape and spacing must be positive")
    cov = canon_shape[2] * canon_sp[2]
    if cov < z_top - z_bot:
        z_bot = z_top - cov
    else:    # longer coverage than drawn: extend toward the pelvis, then the chest
        z_bot = max(z_top - cov, -340.0)
        z_top = z_bot + cov
    cx, cy = rng.uniform(-12, 12), rng.uniform(-15, 15)
    xs = ((np.arange(canon_shape[0]) - (canon_shape[0] - 1) / 2) * canon_sp[0] + cx).astype(np.float32)
    ys = ((np.arange(canon_shape[1]) - (canon_shape[1] - 1) / 2) * canon_sp[1] + cy).astype(np.float32)
    zs = (z_bot + (np.arange(canon_shape[2]) + 0.5) * canon_sp[2]).astype(np.float32)
    shift = np.array([rng.uniform(-30, 30), rng.uniform(-220, 40), rng.uniform(-900, 100)])
    return CasePlan(index=index, annotation=ann, anatomy=anat, grid=Grid(xs, ys, zs), axcodes=ax,
                    world_shift_mm=shift, noise_hu=float(rng.uniform(10, 20)), psf_mm=float(rng.uniform(0.4, 0.9)),
                    seeds=seeds)


def _acquire(hu: np.ndarray, body: np.ndarray, spacing_mm, plan: CasePlan) -> np.ndarray:
    """Partial-volume blur (PSF + slice profile), correlated noise inside the body, int16 HU."""
    sig = [np.sqrt((0.35 * sp) ** 2 + plan.psf_mm ** 2) / sp for sp in spacing_mm[:2]] + [0.42]
    ndimage.gaussian_filter(hu, sig, output=hu, truncate=3.0)
    rng = np.random.default_rng(plan.seeds[2])
    nz = hu.shape[2]
    step = max(1, 4_000_000 // (hu.shape[0] * hu.shape[1]))
    scale = None
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        n = rng.standard_normal(hu[:, :, k0:k1].shape, dtype=np.float32)
        n = ndimage.gaussian_filter(n, (0.7, 0.7, 0), truncate=3.0)
        if scale is None:
            scale = plan.noise_hu / max(float(n.std()), 1e-6)
        sub = hu[:, :, k0:k1]
        m = body[:, :, k0:k1] | (sub > -990)
        sub[m] += (n * np.float32(scale))[m]
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    return hu.astype(np.int16)


def _reorient(arr: np.ndarray, axcodes: str) -> np.ndarray:
    tr = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                         nib.orientations.axcodes2ornt(tuple(axcodes)))
    return np.ascontiguousarray(nib.orientations.apply_orientation(arr, tr))


def _affine(plan: CasePlan) -> np.ndarray:
    g = plan.grid
    aff = np.diag(list(g.spacing_mm) + [1.0])
    aff[:3, 3] = np.array([g.xs[0], g.ys[0], g.zs[0]], float) + plan.world_shift_mm
    tr = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                         nib.orientations.axcodes2ornt(tuple(plan.axcodes)))
    return aff @ nib.orientations.inv_ornt_aff(tr, g.shape)


def build_case(plan: CasePlan) -> dict[str, np.ndarray]:
    """Render a planned case: ``image`` int16, ``label`` (organs + lesion), ``organs`` (organs only)
    uint8, all in the case's output orientation, plus ``affine`` (4x4) and ``canon_spacing``."""
    hu, organs, label, body = render(plan.anatomy, plan.grid, np.random.default_rng(plan.seeds[1]))
    image = _acquire(hu, body, plan.grid.spacing_mm, plan)
    del hu, body
    return {"image": _reorient(image, plan.axcodes), "label": _reorient(label, plan.axcodes),
            "organs": _reorient(organs, plan.axcodes), "affine": _affine(plan)}


def make_case(seed: int, preset: str = "small", shape: tuple[int, int, int] | None = None,
              spacing_mm: tuple[float, float, float] | None = None, axcodes: str | None = None,
              slices: int | None = None, index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case in memory: ``(image int16 HU, label uint8 (0..14), affine 4x4)``.

    Arrays are in NIfTI voxel order for ``axcodes`` (drawn when None); ``shape`` and
    ``spacing_mm`` in that same order. Same arguments give identical arrays. ``index`` selects the
    case number within dataset ``seed`` (``index=k`` equals case ``PHANTOM_{k+1:04d}``).
    """
    plan = plan_case(seed, index, preset, slices=slices, shape=shape, spacing_mm=spacing_mm, axcodes=axcodes)
    c = build_case(plan)
    return c["image"], c["label"], c["affine"]


# ------------------------------------------------------------------------------------------
# dataset writer
# ------------------------------------------------------------------------------------------

def case_id(index: int) -> str:
    return f"{CASE_PREFIX}{index + 1:04d}"


def _case_files(split: str, cid: str) -> dict[str, str]:
    if split == "train_labeled":
        return {"image": f"imagesTr/{cid}_0000.nii.gz", "partial": f"labelsTr/{cid}.nii.gz",
                "pseudo_A": f"pseudo_A/{cid}.nii.gz", "pseudo_B": f"pseudo_B/{cid}.nii.gz",
                "truth": f"groundtruth/labelsTr/{cid}.nii.gz"}
    if split == "unlabeled":
        return {"image": f"unlabeledTr/{cid}_0000.nii.gz", "pseudo_A": f"pseudo_A/{cid}.nii.gz",
                "pseudo_B": f"pseudo_B/{cid}.nii.gz", "truth": f"groundtruth/unlabeledTr/{cid}.nii.gz"}
    return {"image": f"imagesVal/{cid}_0000.nii.gz", "truth": f"labelsVal/{cid}.nii.gz"}


def _case_meta(plan: CasePlan, split: str) -> dict:
    ann = plan.annotation["classes"] if split == "train_labeled" else sorted(LABELS)[1:]
    if split == "unlabeled":
        ann = []
    return {"split": split, "annotated_classes": [int(c) for c in ann], "shape": plan.out_shape,
            "spacing_mm": plan.out_spacing_mm, "axcodes": plan.axcodes, "phase": plan.anatomy.phase,
            "n_lesions": len(plan.anatomy.lesions)}


def _write_case(root: str, seed: int, index: int, split: str, preset: str, slices: int | None) -> dict:
    plan = plan_case(seed, index, preset, slices=slices)
    meta = _case_meta(plan, split)
    files = {k: Path(root) / v for k, v in _case_files(split, case_id(index)).items()}
    if all(p.is_file() for p in files.values()):
        return meta
    c = build_case(plan)
    aff = c["affine"]
    out = {"image": c["image"], "truth": c["label"]}
    if split == "train_labeled":
        out["partial"] = partial_label(c["label"], plan.annotation["classes"])
    if split != "validation":
        sp = plan.out_spacing_mm
        out["pseudo_A"] = pseudo_label_a(c["organs"], sp, np.random.default_rng(plan.seeds[3]))
        out["pseudo_B"] = pseudo_label_b(c["organs"], sp, np.random.default_rng(plan.seeds[4]))
    for key, path in files.items():
        if not path.is_file():
            save_nifti(out[key], aff, path)
    return meta


def _int_arg(value: Any, name: str) -> int:
    """``value`` as an int (fire passes strings for odd input), else :class:`InputError` naming the flag."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(value, bool) or not np.isfinite(f) or f != int(f):
        raise InputError(name, f"must be an integer, got {value!r}")
    return int(f)


def generate(out_dir: str, preset: str = "small", seed: int = 0, n_labeled: int | None = None,
             n_unlabeled: int | None = None, n_val: int | None = None, workers: int = 1,
             slices: int | None = None) -> str:
    """Write a FLARE23-style phantom dataset to ``out_dir``; returns the path of dataset.json.

    Cases ``PHANTOM_0001..`` are numbered labeled first, then unlabeled, then validation. Existing
    case files are kept (resumable; writes are atomic). ``slices`` fixes the slice count of every
    case (benchmarks). Raises InputError when ``out_dir`` holds a phantom made with other settings.
    """
    cfg = _check_preset(preset)
    counts = {"train_labeled": cfg["n_labeled"] if n_labeled is None else _int_arg(n_labeled, "--n_labeled"),
              "unlabeled": cfg["n_unlabeled"] if n_unlabeled is None else _int_arg(n_unlabeled, "--n_unlabeled"),
              "validation": cfg["n_val"] if n_val is None else _int_arg(n_val, "--n_val")}
    if min(counts.values()) < 0:
        raise InputError(out_dir, f"case counts must be >= 0, got {counts}")
    seed, workers = _int_arg(seed, "--seed"), _int_arg(workers, "--workers")
    if workers < 1:
        raise InputError("--workers", f"must be >= 1, got {workers}")
    if slices is not None:
        slices = _int_arg(slices, "--slices")
        if not SLICES_RANGE[0] <= slices <= SLICES_RANGE[1]:
            raise InputError("--slices", f"must be between {SLICES_RANGE[0]} and {SLICES_RANGE[1]}, got {slices}")
    root = ensure_writable_dir(out_dir)  # arguments checked first: a bad call leaves nothing behind
    gen = {"version": GENERATOR_VERSION, "preset": preset, "seed": int(seed), "slices": slices,
           "n_labeled": counts["train_labeled"], "n_unlabeled": counts["unlabeled"], "n_val": counts["validation"]}
    marker = root / ".phantom_generator.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if any(old.get(k) != gen[k] for k in ("version", "preset", "seed", "slices")):
            raise InputError(out_dir, f"holds a phantom made with other settings {old}; use an empty folder")
    save_json(gen, marker)
    jobs = []
    i = 0
    for split in SPLITS:
        for _ in range(counts[split]):
            jobs.append((str(root), int(seed), i, split, preset, slices))
            i += 1
    from tqdm import tqdm

    metas: dict[int, dict] = {}
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as ex:
            futs = {ex.submit(_write_case, *j): j[2] for j in jobs}
            from concurrent.futures import as_completed
            for f in tqdm(as_completed(futs), total=len(futs), desc="phantom", unit="case"):
                metas[futs[f]] = f.result()
    else:
        for j in tqdm(jobs, desc="phantom", unit="case"):
            metas[j[2]] = _write_case(*j)
    dataset = {
        "name": "abdoseg-phantom",
        "description": "Synthetic abdominal CT phantom in the FLARE23 layout (13 organs + lesion); "
                       "labelsTr are partial, pseudo_A/B imperfect full-organ labels, groundtruth/ hidden truth.",
        "labels": {str(k): v for k, v in LABELS.items()},
        "generator": gen,
        "cases": {case_id(k): metas[k] for k in sorted(metas)},
    }
    return str(save_json(dataset, root / "dataset.json"))


__all__ = ["generate", "make_case", "plan_case", "build_case", "PRESETS", "case_id"]
