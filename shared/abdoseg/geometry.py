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


def affine_spacing_mm(affine: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) per axis of an (N+1)x(N+1) voxel->world affine: the norms of its direction
    columns (MONAI's ``affine_to_spacing``; a zero column stays 0, it is not replaced by 1)."""
    from monai.data.utils import affine_to_spacing

    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in affine_to_spacing(a, r=a.shape[0] - 1, dtype=np.float64, suppress_zeros=False))
