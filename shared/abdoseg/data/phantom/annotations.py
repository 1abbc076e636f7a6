"""Label derivation for the phantom: FLARE23-style partial labels and two imperfect pseudo labels.

Pure functions on label arrays (uint8, FLARE ids). Proportions follow the FLARE23 training set:
of its 2200 partially labeled cases ~40 % carry a single class (mostly tumor only), ~10 % all 13
organs, the rest some organs; ~68 % have a tumor annotation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from abdoseg.labels import LESION_ID, ORGAN_IDS

THIN_CLASSES = (7, 8, 10)                    # adrenals, esophagus
SWAP_PAIRS = ((4, 12), (12, 4), (11, 12), (12, 11), (6, 5), (1, 9))
MIN_FULL_CASES = 4                           # the first labeled cases are always fully annotated


def sample_annotation(rng: np.random.Generator, index: int, has_lesion: bool) -> dict:
    """Which classes a labeled case carries.

    ``index`` is the 0-based case number; cases ``index < MIN_FULL_CASES`` are always "all" so every
    dataset has fully labeled cases. Returns ``{"kind": "all"|"single"|"some", "classes": [...],
    "force_lesion": bool}`` where ``force_lesion`` asks the anatomy for at least one lesion.
    """
    r = rng.random()
    if index < MIN_FULL_CASES or r < 0.10:
        return {"kind": "all", "classes": list(ORGAN_IDS) + [LESION_ID], "force_lesion": False}
    if r < 0.50:
        if rng.random() < 0.85:
            return {"kind": "single", "classes": [LESION_ID], "force_lesion": True}
        return {"kind": "single", "classes": [int(rng.choice(ORGAN_IDS))], "force_lesion": False}
    k = int(rng.integers(2, 13))
    organs = sorted(int(c) for c in rng.choice(ORGAN_IDS, size=k, replace=False))
    with_tumor = rng.random() < 0.48
    return {"kind": "some", "classes": organs + ([LESION_ID] if with_tumor else []),
            "force_lesion": with_tumor and rng.random() < 0.8}


def partial_label(full: np.ndarray, annotated: list[int]) -> np.ndarray:
    """Keep only ``annotated`` classes of the full label; every other voxel becomes 0."""
    keep = np.isin(full, np.asarray(annotated, dtype=full.dtype))
    return np.where(keep, full, 0).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray, cls: int) -> float:
    """Dice of class ``cls`` between two label arrays (1.0 when both are empty)."""
    x, y = a == cls, b == cls
    s = int(x.sum()) + int(y.sum())
    return 1.0 if s == 0 else 2.0 * int((x & y).sum()) / s


def mean_organ_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over organ classes present in ``b`` (the reference)."""
    present = [c for c in ORGAN_IDS if (b == c).any()]
    return float(np.mean([dice(a, b, c) for c in present])) if present else 1.0


def _organ_boxes(lab: np.ndarray, pad: int) -> dict[int, tuple[slice, ...]]:
    objs = ndimage.find_objects(lab, max_label=max(ORGAN_IDS))
    out = {}
    for c in ORGAN_IDS:
        sl = objs[c - 1] if c - 1 < len(objs) else None
        if sl is None:
            continue
        out[c] = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(sl, lab.shape))
    return out


def _sigma_vox(sigma_mm: float, spacing_mm, min_vox: float = 0.5) -> tuple[float, ...]:
    return tuple(max(min_vox, sigma_mm / sp) for sp in spacing_mm)


def pseudo_label_a(organs: np.ndarray, spacing_mm, rng: np.random.Generator) -> np.ndarray:
    """Pseudo label "A": per-organ slight dilation or erosion plus occasional false-positive blobs.

    ``organs``: organ-only truth (1..13, lesion voxels carry their organ). Boundary shift comes
    from thresholding a Gaussian-smoothed mask (sigma 1.5 mm, at least 0.6 voxel) at 0.28-0.42 (grow) or 0.58-0.72 (shrink;
    never for the thin adrenals and esophagus).
    """
    out = organs.copy()
    for c, sl in _organ_boxes(organs, 4).items():
        m = organs[sl] == c
        sm = ndimage.gaussian_filter(m.astype(np.float32), _sigma_vox(1.5, spacing_mm, 0.6))
        erode = rng.random() < 0.5 and c not in THIN_CLASSES   # thin structures only grow
        thr = rng.uniform(0.58, 0.72) if erode else rng.uniform(0.28, 0.42)
        new = sm > thr
        sub = out[sl]
        if thr > 0.5:
            sub[m & ~new] = 0
        else:
            sub[new & (organs[sl] == 0) & (sub == 0)] = c
    # occasional false-positive blob of some organ next to it
    if rng.random() < 0.6:
        c = int(rng.choice([1, 3, 11, 12, 4]))
        idx = np.argwhere(organs == c)
        if len(idx):
            p = idx[rng.integers(len(idx))] + (rng.normal(0, 25, 3) / np.asarray(spacing_mm)).astype(int)
            r_mm = rng.uniform(4, 10)
            rad = np.ceil(r_mm / np.asarray(spacing_mm)).astype(int)
            lo = np.maximum(p - rad, 0)
            hi = np.minimum(p + rad + 1, organs.shape)
            if (hi > lo).all():
                g = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
                d2 = sum(((gi - pi) * sp) ** 2 for gi, pi, sp in zip(g, p, spacing_mm))
                blob = d2 < r_mm ** 2
                sub = out[tuple(slice(a, b) for a, b in zip(lo, hi))]
                sub[blob & (sub == 0)] = c
    return out


def pseudo_label_b(organs: np.ndarray, spacing_mm, rng: np.random.Generator) -> np.ndarray:
    """Pseudo label "B": smoother boundaries (sigma 1.5-2.5 mm), sometimes misses part of a thin
    structure (adrenal / esophagus) and sometimes relabels a slab of one organ as its neighbour."""
    best = np.zeros(organs.shape, np.uint8)
    out = np.zeros_like(organs)
    for c, sl in _organ_boxes(organs, 5).items():
        m = (organs[sl] == c).astype(np.float32)
        p = ndimage.gaussian_filter(m, _sigma_vox(rng.uniform(1.5, 2.5), spacing_mm, 0.75))
        q = np.clip(p * 255, 0, 255).astype(np.uint8)
        b, o = best[sl], out[sl]
        win = (q > 127) & (q > b)
        b[win] = q[win]
        o[win] = c
    if rng.random() < 0.35:
        c = int(rng.choice(THIN_CLASSES))
        zs = np.nonzero((out == c).any(axis=(0, 1)))[0]
        if len(zs):
            n = max(1, int(len(zs) * rng.uniform(0.4, 1.0)))
            start = int(rng.integers(0, len(zs) - n + 1))
            zsl = slice(zs[start], zs[start + n - 1] + 1)
            sub = out[:, :, zsl]
            sub[sub == c] = 0
    if rng.random() < 0.3:
        src, dst = SWAP_PAIRS[int(rng.integers(len(SWAP_PAIRS)))]
        zs = np.nonzero((out == src).any(axis=(0, 1)))[0]
        if len(zs):
            width = max(1, int(round(rng.uniform(10, 25) / spacing_mm[2])))
            z0 = int(rng.choice(zs))
            sub = out[:, :, z0:z0 + width]
            sub[sub == src] = dst
    return out
