"""Input checks of the inference chain: is this array a 3D CT in Hounsfield units?

:func:`check_ct_volume` (pure, numpy) and its MONAI dictionary transform :class:`ValidateCTd`,
the first step after ``LoadImaged`` / ``EnsureChannelFirstd`` in every inference config.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from abdoseg.geometry import affine_spacing_mm
from abdoseg.io import InputError

__all__ = ["check_ct_volume", "ValidateCTd", "MIN_VOXELS_PER_AXIS", "CT_MAX_AT_LEAST_HU", "CT_MIN_AT_MOST_HU"]

#: Input checks (see :func:`check_ct_volume`).
MIN_VOXELS_PER_AXIS: int = 4
CT_MAX_AT_LEAST_HU: float = 100.0
CT_MIN_AT_MOST_HU: float = -200.0


def check_ct_volume(array: Any, spacing_mm: Sequence[float] | None, path: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming ``path`` unless ``array`` looks like a 3D CT in HU.

    Accepted: exactly 3 spatial axes (trailing singleton axes are tolerated), at least
    ``MIN_VOXELS_PER_AXIS`` voxels per axis, finite values, positive finite spacing, and a HU-like
    range: some value <= ``CT_MIN_AT_MOST_HU`` (air/fat, present around and inside every abdomen)
    and some value >= ``CT_MAX_AT_LEAST_HU`` (enhanced organs, bone). The two-sided test rejects
    unscaled scanner values (min >= 0), MR, and images normalised to [0, 1] without rejecting CTs
    whose padding value is -1024/-2048/-3024.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    shape = tuple(int(s) for s in arr.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D CT volume, got a {len(shape)}D image of shape {tuple(arr.shape)}")
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InputError(path, f"volume of shape {shape} has fewer than {MIN_VOXELS_PER_AXIS} voxels along an axis "
                               "(a single slice or a 2D image is not a 3D CT)")
    if spacing_mm is not None:
        sp = np.asarray(spacing_mm, dtype=np.float64)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(path, f"invalid voxel spacing {tuple(sp.tolist())} mm")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(path, f"unsupported voxel type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise InputError(path, f"{int((~finite).sum())} voxels are NaN or infinite")
    lo, hi = float(arr.min()), float(arr.max())
    if hi < CT_MAX_AT_LEAST_HU or lo > CT_MIN_AT_MOST_HU:
        raise InputError(path, f"value range [{lo:g}, {hi:g}] does not look like CT in Hounsfield units "
                               f"(need min <= {CT_MIN_AT_MOST_HU:g} and max >= {CT_MAX_AT_LEAST_HU:g}); "
                               "is the rescale slope/intercept applied, and is this a CT?")


class ValidateCTd(MapTransform):
    """Dictionary transform: :func:`check_ct_volume` on ``keys`` (after LoadImaged /
    EnsureChannelFirstd); the error names the source file from the MetaTensor's meta."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = getattr(img, "meta", {}) or {}
            path = meta.get("filename_or_obj", key)
            arr = img
            if isinstance(img, torch.Tensor) and img.ndim == 4 and img.shape[0] == 1:
                arr = img[0]
            spacing = None
            if isinstance(img, MetaTensor):
                spacing = affine_spacing_mm(np.asarray(img.affine))
            check_ct_volume(arr, spacing, path)
        return d
