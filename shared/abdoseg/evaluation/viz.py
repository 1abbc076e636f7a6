"""Overlay pictures of a CT and its 15-class label: axial, coronal and sagittal planes in RAS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from abdoseg.io import atomic_path
from abdoseg.labels import LABELS, NUM_CLASSES

# One fixed colour per class (RGB 0..1), background transparent; lesion in bright yellow.
CLASS_COLORS: np.ndarray = np.array([
    (0, 0, 0), (0.80, 0.35, 0.25), (0.95, 0.60, 0.20), (0.55, 0.25, 0.70), (0.95, 0.85, 0.45),
    (0.90, 0.10, 0.15), (0.20, 0.35, 0.90), (0.20, 0.80, 0.80), (0.10, 0.60, 0.60), (0.30, 0.75, 0.25),
    (0.85, 0.50, 0.75), (0.65, 0.80, 0.95), (0.55, 0.45, 0.30), (0.95, 0.45, 0.45), (1.0, 1.0, 0.0),
], dtype=np.float32)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a (X, Y, Z) volume to RAS voxel order; returns (array, spacing_mm in RAS order)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = tuple(float(zooms[int(a)]) for a in ornt[:, 0])
    return ras, spacing  # type: ignore[return-value]


def _blend(gray: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    colored = CLASS_COLORS[np.clip(label, 0, NUM_CLASSES - 1)]
    m = (label > 0)[..., None]
    return np.where(m, (1 - alpha) * rgb + alpha * colored, rgb)


def overlay_png(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, out_path: str | os.PathLike,
                title: str = "", hu_window: Sequence[float] = (-160.0, 240.0), alpha: float = 0.45,
                extra_label: np.ndarray | None = None, extra_title: str = "") -> Path:
    """Write a PNG with axial, coronal and sagittal planes through the label's centre of mass.

    Args:
        image: CT (X, Y, Z) in HU. label: (X, Y, Z) FLARE ids or None. affine: 4x4 voxel->RAS mm.
        extra_label: optional second label (e.g. ground truth) drawn as a second row.
    Planes are shown in radiological display (patient right on the image left), aspect from spacing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, sp = to_ras(np.asarray(image, dtype=np.float32), affine)
    rows = [(label, title)] + ([(extra_label, extra_title)] if extra_label is not None else [])
    rows_ras = [(to_ras(np.asarray(lab), affine)[0] if lab is not None else np.zeros(img.shape, np.uint8), t)
                for lab, t in rows]
    ref = rows_ras[0][0] if rows_ras[0][0].any() else (rows_ras[-1][0] if rows_ras[-1][0].any() else None)
    center = (np.array(np.nonzero(ref)).mean(axis=1).astype(int) if ref is not None
              else np.array(img.shape) // 2)
    lo, hi = hu_window
    gray = np.clip((img - lo) / (hi - lo), 0, 1)
    fig, axes = plt.subplots(len(rows_ras), 3, figsize=(12, 4.2 * len(rows_ras)), squeeze=False)
    for r, (lab, t) in enumerate(rows_ras):
        planes = [
            ("axial", gray[:, :, center[2]], lab[:, :, center[2]], sp[1] / sp[0]),
            ("coronal", gray[:, center[1], :], lab[:, center[1], :], sp[2] / sp[0]),
            ("sagittal", gray[center[0], :, :], lab[center[0], :, :], sp[2] / sp[1]),
        ]
        for c, (name, g, lb, aspect) in enumerate(planes):
            ax = axes[r, c]
            # RAS array: index grows toward patient right / anterior / superior. Transpose so rows
            # are the second axis, flip rows (anterior/superior up) and columns (radiological
            # view: patient right on the image left; sagittal: anterior on the left).
            rgb = _blend(g, lb, alpha).transpose(1, 0, 2)[::-1, ::-1]
            ax.imshow(rgb, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{t} — {name}" if t else name, fontsize=9)
            ax.axis("off")
    present = sorted(set(np.unique(np.concatenate([np.unique(lab) for lab, _ in rows_ras]))) - {0})
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLORS[int(k)]) for k in present]
    if handles:
        fig.legend(handles, [LABELS[int(k)] for k in present], loc="lower center", ncol=min(8, len(handles)),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(out_path)
