"""Voxel-grid geometry shared by every stage: spacing of an affine, when two affines are one grid.

Array order is NIfTI voxel order (X, Y, Z); spacings are (X, Y, Z) in mm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["AFFINE_TOL_MM", "affine_difference_mm", "affines_match", "affine_spacing_mm"]

AFFINE_TOL_MM: float = 1e-3
"""Largest absolute difference (mm, entry-wise) between two 4x4 affines of the same voxel grid:
an image and its label (``abdoseg prepare``), a prediction and its ground truth (``abdoseg
evaluate``), a mask and its CT. Far above float32 header rounding (~1e-5 mm at 500 mm), far
below any real shift of a grid."""


def affine_difference_mm(a: Any, b: Any) -> float:
    """Largest absolute entry-wise difference (mm) between two affines."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def affines_match(a: Any, b: Any, tol_mm: float = AFFINE_TOL_MM) -> bool:
    """True when two affines agree entry-wise within ``tol_mm`` (mm)."""
    return affine_difference_mm(a, b) <= tol_mm


def affine_spacing_mm(affine: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) of the 3 axes = column norms of the 4x4 voxel->world affine."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a * a).sum(axis=0)))  # type: ignore[return-value]
