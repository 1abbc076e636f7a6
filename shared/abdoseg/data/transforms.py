"""MONAI dictionary transforms of the training chains: partial-label masks, the ROI crop that
mimics the inference ROI, the fixed-size resampling of seed 000 / seed 004, and per-class contrast
randomization."""

from __future__ import annotations

import math
from typing import Any, Hashable, Iterable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Spacingd

from abdoseg.geometry import affine_spacing_mm

from abdoseg.labels import NUM_CLASSES

__all__ = ["AnnotatedClassesd", "annotated_mask", "RandForegroundRoiCropd", "SpacingToSized", "RandClassIntensityShiftd"]


def annotated_mask(annotated_classes: Iterable[int] | None, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Bool tensor (C,) with True at background (always) and every listed class id.

    ``None`` means a fully labeled case: all True. Raises ValueError for ids outside 0..C-1.
    """
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[0] = True
    if annotated_classes is None:
        mask[:] = True
        return mask
    for c in annotated_classes:
        ci = int(c)
        if not 0 <= ci < num_classes:
            raise ValueError(f"annotated_classes: class id {c} outside 0..{num_classes - 1}")
        mask[ci] = True
    return mask


class AnnotatedClassesd(MapTransform):
    """Turn a datalist item's ``"annotated_classes"`` list into a (C,) bool tensor.

    After batching (``list_data_collate``) the output key holds the (B, C) ``annotated`` mask that
    :class:`abdoseg.training.losses.MarginalExclusionLoss` takes.

    Args:
        keys: the key holding the class-id list (default ``"annotated_classes"``).
        output_key: where to write the mask (default ``"annotated"``).
        num_classes: C (default 15).
        missing: what to do when the key is absent: ``"all"`` (fully labeled, e.g. fused or
            pseudo labels; default) or ``"error"``.
        remove_source: drop the list key after conversion (default True): lists of different
            lengths cannot be collated into a batch by MONAI's ``list_data_collate``.
    """

    def __init__(
        self,
        keys: KeysCollection = "annotated_classes",
        output_key: str = "annotated",
        num_classes: int = NUM_CLASSES,
        missing: str = "all",
        remove_source: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if missing not in ("all", "error"):
            raise ValueError(f"missing must be 'all' or 'error', got {missing!r}")
        if len(self.keys) != 1:
            raise ValueError("AnnotatedClassesd takes exactly one key")
        self.output_key = output_key
        self.num_classes = int(num_classes)
        self.missing = missing
        self.remove_source = remove_source

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if key not in d:
            if self.missing == "error":
                raise KeyError(f"datalist item has no {key!r} (item keys: {sorted(map(str, d))})")
            d[self.output_key] = annotated_mask(None, self.num_classes)
            return d
        value = d[key]
        if isinstance(value, torch.Tensor):
            value = value.flatten().tolist()
        d[self.output_key] = annotated_mask(value, self.num_classes)
        if self.remove_source and key != self.output_key:
            del d[key]
        return d


class RandForegroundRoiCropd(Randomizable, MapTransform):
    """Crop ``keys`` to the foreground bounding box of ``source_keys`` + a jittered margin in mm,
    mimicking the inference ROI (coarse foreground box + ``margin_mm``) on the original grid.

    Applied after ``Orientationd`` and before ``Spacingd``, on channel-first MetaTensors. The
    foreground is the union of ``> 0`` over the source keys that are present (e.g. the label and a
    full-organ pseudo label, so that a tumor-only partial label still gives the abdomen box).
    Each side of each axis gets ``margin_mm + U(-jitter_mm, +jitter_mm)`` (never below 0), rounded
    up to voxels; no foreground -> no crop. The crop updates the affine (MONAI ``SpatialCrop``).

    Args:
        keys: keys to crop (image, label, ...).
        source_keys: keys whose foreground defines the box.
        margin_mm: mean margin (mm), the inference ``margin_mm``.
        jitter_mm: half-width of the uniform margin jitter (mm); 0 -> deterministic.
    """

    def __init__(self, keys: KeysCollection, source_keys: KeysCollection = "label", margin_mm: float = 20.0,
                 jitter_mm: float = 10.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_keys = [source_keys] if isinstance(source_keys, str) else list(source_keys)
        self.margin_mm = float(margin_mm)
        self.jitter_mm = float(jitter_mm)
        self._margins = np.full((3, 2), self.margin_mm)

    def randomize(self, data: Any = None) -> None:
        self._margins = self.margin_mm + self.R.uniform(-self.jitter_mm, self.jitter_mm, size=(3, 2))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from monai.transforms import SpatialCrop

        d = dict(data)
        fg = None
        ref = None
        for k in self.source_keys:
            if k in d:
                arr = d[k]
                arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
                m = (arr[0] if arr.ndim == 4 else arr) > 0
                fg = m if fg is None else (fg | m)
                ref = d[k]
        self.randomize()
        margins = self._margins
        if fg is None or not fg.any():
            return d
        spacing = affine_spacing_mm(np.asarray(ref.affine)) if isinstance(ref, MetaTensor) else (1.0, 1.0, 1.0)
        start, stop = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(fg.any(axis=other))
            lo = int(math.ceil(max(0.0, margins[axis, 0]) / spacing[axis]))
            hi = int(math.ceil(max(0.0, margins[axis, 1]) / spacing[axis]))
            start.append(max(0, int(idx[0]) - lo))
            stop.append(min(fg.shape[axis], int(idx[-1]) + 1 + hi))
        crop = SpatialCrop(roi_start=start, roi_end=stop)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class SpacingToSized(Spacingd):
    """Resample each case onto a grid of a fixed size (seed 000: the ROI at 160 x 160 x 160;
    seed 004: 160^3 coarse, 192^3 fine), whatever its field of view.

    A ``Spacingd`` whose ``pixdim`` is chosen per case: ``pixdim_k = (n_k - 1) * spacing_k /
    (size_k - 1)``, so the first and last voxel centres of each axis stay where they were and the
    output has exactly ``spatial_size`` voxels (an anisotropic spacing that depends on the case). Being MONAI's ``Spacing`` underneath, it is traced and inverted as one
    (:class:`abdoseg.inference.resample.ScoresToLabelsd` maps the scores back through it).

    Args:
        keys: keys to resample together (the first one present sets the grid).
        spatial_size: output voxels per axis (X, Y, Z).
        mode, padding_mode, dtype, allow_missing_keys: as ``Spacingd``.

    Shapes: ``(C, X, Y, Z)`` -> ``(C, *spatial_size)``.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Iterable[int], mode: Any = "bilinear",
                 padding_mode: Any = "border", dtype: Any = np.float64, allow_missing_keys: bool = False) -> None:
        size = tuple(int(n) for n in spatial_size)
        if len(size) != 3 or min(size) < 2:
            raise ValueError(f"SpacingToSized: spatial_size must be 3 voxel counts >= 2, got {list(spatial_size)}")
        super().__init__(keys, pixdim=(1.0, 1.0, 1.0), mode=mode, padding_mode=padding_mode, dtype=dtype,
                         allow_missing_keys=allow_missing_keys)
        self.spatial_size = size

    def pixdim_for(self, affine: Any, spatial_shape: Iterable[int]) -> tuple[float, float, float]:
        """The spacing (mm) that maps a field of view of ``spatial_shape`` voxels onto ``spatial_size``
        (an axis of one voxel keeps its spacing; it becomes ``size`` copies)."""
        spacing = affine_spacing_mm(np.asarray(affine, dtype=np.float64))
        return tuple(float(max(n - 1, 1)) * float(sp) / (m - 1)
                     for n, sp, m in zip(spatial_shape, spacing, self.spatial_size))

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict:
        d = dict(data)
        ref = next((d[k] for k in self.key_iterator(d)), None)
        if ref is None:
            return d
        affine = ref.affine if isinstance(ref, MetaTensor) else np.eye(4)
        self.spacing_transform.pixdim = np.asarray(self.pixdim_for(affine, ref.shape[1:]), dtype=np.float64)
        return super().__call__(d, lazy)


class RandClassIntensityShiftd(Randomizable, MapTransform):
    """Per-class contrast randomization (domain randomization in the spirit of SynthSeg): each
    labelled structure of a case gets its own random intensity offset, so the network cannot rely
    on the exact attenuation of an organ (phantom kidneys are not real enhancing kidneys; contrast
    phases and scanners differ).

    With probability ``prob`` per call; then every class of ``classes`` present in ``label_key``
    gets, with probability ``class_prob``, an offset ``U(-max_shift, max_shift)`` added to the
    image inside it. Units are the image's after intensity normalization (0.1 = 65 HU with the
    bundle's [-325, 325] -> [0, 1] window). Background (0) and classes not in ``classes`` are
    unchanged; voxels a partial label leaves unannotated are background here.

    Args:
        keys: image key(s) to shift.
        label_key: integer class ids, same spatial shape as the image(s).
        prob: probability of randomizing a case at all.
        max_shift: half-width of the uniform offset.
        class_prob: per-class probability of an offset, once a case is randomized.
        classes: class ids eligible (default 1..14).

    Shapes: image ``(C, X, Y, Z)``, label ``(1, X, Y, Z)``; dtype and meta kept.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", prob: float = 0.0, max_shift: float = 0.1,
                 class_prob: float = 0.5, classes: Iterable[int] | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0 or not 0.0 <= class_prob <= 1.0 or max_shift < 0:
            raise ValueError(f"RandClassIntensityShiftd: prob/class_prob in [0, 1], max_shift >= 0; got "
                             f"{prob}, {class_prob}, {max_shift}")
        self.label_key = label_key
        self.prob = float(prob)
        self.max_shift = float(max_shift)
        self.class_prob = float(class_prob)
        self.classes = list(range(1, NUM_CLASSES)) if classes is None else [int(c) for c in classes]
        self._offsets: dict[int, float] = {}

    def randomize(self, data: Any = None) -> None:
        self._offsets = {}
        if self.R.random_sample() >= self.prob:
            return
        for c in self.classes:
            if self.R.random_sample() < self.class_prob:
                self._offsets[c] = float(self.R.uniform(-self.max_shift, self.max_shift))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._offsets or self.label_key not in d:
            return d
        label = torch.as_tensor(d[self.label_key])
        label = label[0] if label.ndim == 4 else label
        shift = torch.zeros(label.shape, dtype=torch.float32, device=label.device)
        for c, off in self._offsets.items():
            shift[label == c] = off
        for key in self.key_iterator(d):
            img = d[key]
            d[key] = img + shift.to(device=img.device, dtype=img.dtype)
        return d
