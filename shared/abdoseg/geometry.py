"""Voxel-grid geometry shared by every stage: spacing of an affine, RAS orientation of an affine.

Array order is NIfTI voxel order (X, Y, Z); spacings are (X, Y, Z) in mm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["affine_spacing_mm"]


def affine_spacing_mm(affine: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) of the 3 axes = column norms of the 4x4 voxel->world affine."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a * a).sum(axis=0)))  # type: ignore[return-value]
