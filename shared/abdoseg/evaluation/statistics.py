"""Per-case numbers a clinician can read from a 15-class mask and its CT: organ volumes (mL), mean HU,
lesion count and per-lesion volumes.

All functions are pure (arrays in, plain dicts out), so ``abdoseg segment --statistics`` and tests
share the same code. Arrays are in NIfTI voxel order (X, Y, Z); spacing in mm in the same order.
1 mL = 1000 mm^3.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from abdoseg.labels import LABELS, LESION_ID, NUM_CLASSES

#: Connectivity used to separate lesions (same as :mod:`abdoseg.inference.postprocess`).
LESION_CONNECTIVITY: int = 26


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in mL: ``prod(spacing_mm) / 1000``."""
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing_mm must be 3 positive numbers, got {tuple(np.ravel(sp).tolist())}")
    return float(np.prod(sp) / 1000.0)


def label_statistics(label: np.ndarray, image: np.ndarray | None, spacing_mm: Sequence[float],
                     connectivity: int = LESION_CONNECTIVITY) -> dict[str, Any]:
    """Volumes, mean intensities and lesion components of a FLARE23 label volume.

    Args:
        label: (X, Y, Z) integer class ids 0..14 (:data:`abdoseg.labels.LABELS`).
        image: (X, Y, Z) CT in HU on the same grid, or ``None`` (then every ``mean_HU`` is ``None``).
        spacing_mm: voxel spacing (X, Y, Z) in mm.
        connectivity: 6, 18 or 26 (cc3d) for splitting the lesion class into lesions.
    Returns:
        ``{"spacing_mm": [3 floats], "voxel_volume_mL": float,
        "classes": {name: {"id", "voxels", "volume_mL", "mean_HU"}} for ids 1..14 (absent classes:
        0 voxels, 0 mL, mean_HU None),
        "lesions": {"count", "total_volume_mL", "lesions": [{"volume_mL", "voxels", "mean_HU",
        "centroid_voxel": [x, y, z]}], largest first}}``.
        volume_mL = voxels * prod(spacing_mm) / 1000; mean_HU = mean of ``image`` over the voxels.
    """
    import cc3d

    lab = np.asarray(label)
    if lab.ndim != 3:
        raise ValueError(f"label must be 3D (X, Y, Z), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"label must hold integer class ids, got {lab.dtype}")
    img = None
    if image is not None:
        img = np.asarray(image)
        if img.shape != lab.shape:
            raise ValueError(f"image shape {img.shape} != label shape {lab.shape}")
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= NUM_CLASSES):
        raise ValueError(f"label values must lie in 0..{NUM_CLASSES - 1}, got [{int(lab.min())}, {int(lab.max())}]")
    vox_ml = voxel_volume_ml(spacing_mm)

    flat = lab.ravel()
    fg = np.flatnonzero(flat)  # foreground only: a fraction of a whole CT
    fg_ids = flat[fg].astype(np.int64)
    counts = np.bincount(fg_ids, minlength=NUM_CLASSES)
    sums = (np.bincount(fg_ids, weights=img.ravel()[fg].astype(np.float64), minlength=NUM_CLASSES)
            if img is not None else None)
    del fg, fg_ids
    classes: dict[str, dict[str, Any]] = {}
    for cid in range(1, NUM_CLASSES):
        n = int(counts[cid])
        mean = float(sums[cid] / n) if (sums is not None and n > 0) else None
        classes[LABELS[cid]] = {"id": cid, "voxels": n, "volume_mL": n * vox_ml, "mean_HU": mean}

    lesions: list[dict[str, Any]] = []
    if counts[LESION_ID] > 0:
        cc = cc3d.connected_components(lab == LESION_ID, connectivity=connectivity)
        n_cc = int(cc.max())
        where = np.nonzero(cc)  # only lesion voxels: memory scales with the lesion burden
        ids = cc[where].astype(np.int64)
        sizes = np.bincount(ids, minlength=n_cc + 1)
        centroids = [np.bincount(ids, weights=w.astype(np.float64), minlength=n_cc + 1) for w in where]
        hu = (np.bincount(ids, weights=img[where].astype(np.float64), minlength=n_cc + 1)
              if img is not None else None)
        for k in range(1, n_cc + 1):
            n = int(sizes[k])
            lesions.append({
                "volume_mL": n * vox_ml,
                "voxels": n,
                "mean_HU": float(hu[k] / n) if hu is not None else None,
                "centroid_voxel": [float(c[k] / n) for c in centroids],
            })
        lesions.sort(key=lambda d: (-d["voxels"], d["centroid_voxel"]))
    return {
        "spacing_mm": [float(s) for s in spacing_mm],
        "voxel_volume_mL": vox_ml,
        "classes": classes,
        "lesions": {"count": len(lesions), "total_volume_mL": int(counts[LESION_ID]) * vox_ml, "lesions": lesions},
    }
