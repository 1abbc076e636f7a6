"""Crop a CT to the body before any network sees it, so the reconstruction field of view (air
around the patient, the -1024/-2048 padding outside a circular FOV) cannot change the answer.

:class:`CropToBodyd` is MONAI's invertible ``CropForegroundd`` with the body as foreground
(voxels above ``threshold_hu``) and a margin in millimetres: the box is the body's bounding box
plus ``margin_mm`` of air on every side, padded with air (``pad_hu``) where the image ends
sooner. The same CT stored with a wider or a tighter field of view therefore gives the same
cropped array (air below the HU windows' lower end is one value to the networks), and the
inverse (from the transform trace, as ``Invertd`` does) puts the mask back on the CT's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForegroundd

from abdoseg.geometry import affine_spacing_mm

__all__ = ["CropToBodyd"]


class CropToBodyd(CropForegroundd):
    """``keys`` (channel-first, HU) cropped to ``source_key``'s body box + ``margin_mm``.

    Args:
        keys: images to crop (the CT; labels too when present).
        source_key: the CT whose voxels above ``threshold_hu`` are the body.
        threshold_hu: body = voxels above this (default -500 HU: soft tissue, bone, the table;
            not air, not lung parenchyma at the body's edge).
        margin_mm: air kept around the body box (mm; one value, or one per spatial axis, e.g.
            ``[40, 40, 0]`` for in-plane only on a RAS image: a scan's ends cut through the body,
            so no air belongs above or below it); converted to voxels per axis from the affine.
        pad_hu: value of the voxels added where the box reaches beyond the image (air).
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", threshold_hu: float = -500.0,
                 margin_mm: float | Sequence[float] = 0.0, pad_hu: float = -1024.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, source_key=source_key, select_fn=_everything, margin=0,
                         allow_smaller=False, mode="constant", value=float(pad_hu),
                         allow_missing_keys=allow_missing_keys)
        self.threshold_hu = float(threshold_hu)
        self.margin_mm = tuple(float(m) for m in (margin_mm if isinstance(margin_mm, Sequence) else [margin_mm] * 3))
        if len(self.margin_mm) != 3 or min(self.margin_mm) < 0:
            raise ValueError(f"margin_mm must be one value or three values >= 0, got {margin_mm!r}")

    def margin_voxels(self, image: Any) -> list[int]:
        """``margin_mm`` in voxels along each spatial axis of ``image`` (rounded up)."""
        affine = image.affine if isinstance(image, MetaTensor) else np.eye(4)
        spacing = affine_spacing_mm(np.asarray(affine, dtype=np.float64))
        return [int(math.ceil(m / s)) if s > 0 else 0 for m, s in zip(self.margin_mm, spacing)]

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict:  # type: ignore[override]
        source = data[self.source_key]
        if bool((source > self.threshold_hu).any()):
            self.cropper.select_fn, self.cropper.margin = self._body, self.margin_voxels(source)
        else:  # no body at all (an all-air volume): keep the whole volume, as it is
            self.cropper.select_fn, self.cropper.margin = _everything, 0
        return super().__call__(data, lazy=lazy)

    def _body(self, x: Any) -> Any:
        return x > self.threshold_hu


def _everything(x: Any) -> Any:
    return x == x  # True everywhere (NaN-free input: ValidateCTd refuses NaN)
