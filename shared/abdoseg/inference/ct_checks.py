"""Input checks of the inference chain: is this array a 3D CT in Hounsfield units?

:func:`check_ct_volume` (pure, numpy) and its MONAI dictionary transform :class:`ValidateCTd`,
the first step after ``LoadImaged`` / ``EnsureChannelFirstd`` in every inference config.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from abdoseg.geometry import affine_spacing_mm
from abdoseg.io import AbdosegWarning, InputError

__all__ = ["check_ct_volume", "check_affine", "plausibility_problems", "fov_padding_value", "air_painted_classes",
           "ValidateCTd", "ImplausibleCTWarning", "MIN_VOXELS_PER_AXIS", "CT_MAX_AT_LEAST_HU", "CT_MIN_AT_MOST_HU"]

#: Input checks (see :func:`check_ct_volume`).
MIN_VOXELS_PER_AXIS: int = 4
CT_MAX_AT_LEAST_HU: float = 100.0
CT_MIN_AT_MOST_HU: float = -200.0

#: Plausibility (warnings, see :func:`plausibility_problems`): voxel sizes of abdominal CT (mm).
PLAUSIBLE_SPACING_MM: tuple[float, float] = (0.3, 8.0)
#: The cross-section (second-largest extent) must be able to hold an abdomen (mm) ...
MIN_ABDOMEN_FOV_MM: float = 150.0
#: ... and no axis longer than a whole body (mm).
MAX_FOV_MM: float = 2500.0
#: No HU value (even on the extended CT scale) lies outside this range.
HU_SCALE_LIMIT: float = 32768.0
#: Air, fat, soft tissue, bone: at least this fraction of the voxels lies in ``BODY_HU_RANGE``.
BODY_HU_RANGE: tuple[float, float] = (-1100.0, 3100.0)
MIN_BODY_HU_FRACTION: float = 0.5
#: An affine whose 3x3 part has a condition number above this is (numerically) singular.
MAX_AFFINE_CONDITION: float = 1e6
#: Circular scan FOV (see :func:`fov_padding_value`): the in-plane corners of at least this fraction
#: of the slices hold the padding value, and the points ``FOV_EDGE_INSET`` (fraction of the width)
#: inside the edge midpoints do not.
FOV_PADDED_SLICE_FRACTION: float = 0.5
FOV_EDGE_INSET: float = 0.04
#: Organs on air (see :func:`air_painted_classes`): a predicted organ whose mean HU lies below this
#: (air -1000; abdominal organs 0..200, fat -100, a gas-filled stomach well above it) and that is at
#: least this large (mL).
AIR_ORGAN_MEAN_HU: float = -800.0
AIR_ORGAN_MIN_ML: float = 1.0
#: Classes checked for air: solid organs, vessels, gallbladder, lesion. The esophagus (10),
#: stomach (11) and duodenum (12) are left out: their lumen may be filled with gas (an
#: air-filled esophagus of 7 mL at -908 HU is normal anatomy, not a wrong answer).
AIR_CHECKED_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)


class ImplausibleCTWarning(AbdosegWarning):
    """The input is accepted but unusual for an abdominal CT (voxel size, field of view, value
    scale); the result may be poor and the run slow. The message names the file and the reason."""


def check_affine(affine: Any, path: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming ``path`` unless ``affine`` (4x4 voxel -> world) is finite and
    invertible: a NaN/inf entry or a singular 3x3 part (a zero or repeated axis) has no geometry."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputError(path, f"expected a 4x4 affine, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = [f"[{i},{j}]" for i, j in zip(*np.nonzero(~np.isfinite(a)))]
        raise InputError(path, f"the affine (voxel -> world matrix) has NaN/infinite entries at {', '.join(bad)}")
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    cond = np.linalg.cond(m / np.where(norms > 0, norms, 1.0)[None, :]) if np.all(norms > 0) else np.inf
    if not np.isfinite(cond) or cond > MAX_AFFINE_CONDITION:
        raise InputError(path, "the affine (voxel -> world matrix) is singular (a zero or repeated axis): "
                               f"spacing {tuple(round(float(v), 6) for v in norms)} mm; the header has no usable geometry")


def plausibility_problems(shape: Sequence[int], spacing_mm: Sequence[float] | None, array: Any = None,
                          lo: float | None = None, hi: float | None = None,
                          padding: float | None = None) -> list[str]:
    """What is unusual for an abdominal CT (empty list: nothing): voxel size outside
    ``PLAUSIBLE_SPACING_MM``, a field of view that cannot hold an abdomen or is longer than a body,
    values beyond any HU scale or mostly outside ``BODY_HU_RANGE`` (e.g. scaled by 1000); voxels
    holding ``padding`` (outside the scan field of view) are left out of the value fractions."""
    problems = []
    if spacing_mm is not None:
        sp = np.asarray(spacing_mm, dtype=np.float64)[:3]
        txt = " x ".join(f"{v:g}" for v in sp)
        if sp.min() < PLAUSIBLE_SPACING_MM[0]:
            problems.append(f"voxel size {txt} mm is below {PLAUSIBLE_SPACING_MM[0]:g} mm (abdominal CT: 0.5-1 mm "
                            "in plane); check the header spacing")
        if sp.max() > PLAUSIBLE_SPACING_MM[1]:
            problems.append(f"voxel size {txt} mm is above {PLAUSIBLE_SPACING_MM[1]:g} mm (abdominal CT: <= 5 mm); "
                            "check the header spacing (large fields of view are slow and use much memory)")
        fov = np.asarray(shape[:3], dtype=np.float64) * sp
        fov_txt = " x ".join(f"{v:.0f}" for v in fov)
        if np.sort(fov)[1] < MIN_ABDOMEN_FOV_MM:
            problems.append(f"field of view {fov_txt} mm cannot hold an abdomen (need >= {MIN_ABDOMEN_FOV_MM:g} mm "
                            "across)")
        if fov.max() > MAX_FOV_MM:
            problems.append(f"field of view {fov_txt} mm is longer than a body (> {MAX_FOV_MM:g} mm); "
                            "check the header spacing")
    if lo is not None and hi is not None and (hi >= HU_SCALE_LIMIT or lo < -HU_SCALE_LIMIT):
        problems.append(f"values [{lo:g}, {hi:g}] lie beyond any Hounsfield scale (|HU| < {HU_SCALE_LIMIT:g}); "
                        "are they scaled (x1000?)")
    elif array is not None:
        sample = array[tuple(slice(None, None, 2) for _ in range(min(array.ndim, 3)))]
        if padding is not None:
            sample = sample[sample != padding]
        if sample.size:
            inside = np.count_nonzero((sample >= BODY_HU_RANGE[0]) & (sample <= BODY_HU_RANGE[1])) / sample.size
            if inside < MIN_BODY_HU_FRACTION:
                problems.append(f"only {100 * inside:.0f}% of the voxels lie in [{BODY_HU_RANGE[0]:g}, "
                                f"{BODY_HU_RANGE[1]:g}] HU (air to bone); are the values scaled?")
    return problems


def fov_padding_value(array: Any) -> float | None:
    """The padding value outside a circular scan field of view, or ``None`` when there is none.

    Scanners reconstruct a disc inscribed in the square slice and fill the corners with one
    padding value (-1024, -2000, -3024, or -1024 below data stored with a +1024 offset). In-plane
    axes are the first two (NIfTI voxel order). A value is padding when it is the array's minimum,
    all four in-plane corners of at least ``FOV_PADDED_SLICE_FRACTION`` of the slices hold it, and
    at least three of the four points ``FOV_EDGE_INSET`` inside the edge midpoints (inside the
    disc) do not. Air at one constant value around a body that does not reach the slice edges is
    not padding (its edge midpoints hold it too).
    """
    arr = np.asarray(array)
    if arr.ndim < 3 or min(arr.shape[:2]) < 8:
        return None
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    lo = arr.min()
    nx, ny = arr.shape[:2]
    ix, iy = max(1, int(round(FOV_EDGE_INSET * nx))), max(1, int(round(FOV_EDGE_INSET * ny)))
    corners = arr[[0, 0, nx - 1, nx - 1], [0, ny - 1, 0, ny - 1], :] == lo  # (4, Z)
    mids = arr[[nx // 2, nx // 2, ix, nx - 1 - ix], [iy, ny - 1 - iy, ny // 2, ny // 2], :] != lo
    padded = corners.all(axis=0) & (mids.sum(axis=0) >= 3)
    return float(lo) if padded.mean() >= FOV_PADDED_SLICE_FRACTION else None


def air_painted_classes(mask: np.ndarray, image: np.ndarray, spacing_mm: Sequence[float],
                        max_mean_hu: float = AIR_ORGAN_MEAN_HU, min_ml: float = AIR_ORGAN_MIN_ML,
                        classes: Sequence[int] = AIR_CHECKED_CLASSES) -> list[tuple[int, float, float]]:
    """``[(class id, volume mL, mean HU)]`` of the predicted ``classes`` of at least ``min_ml``
    whose mean CT value lies below ``max_mean_hu``: organs painted on air, as happens when a small
    body lies in a large field of view or the values are not HU. Gas-filled hollow organs are not
    in the default ``classes`` (:data:`AIR_CHECKED_CLASSES`). Pure; ``mask`` and ``image`` share
    one grid."""
    m = np.asarray(mask)
    img = np.asarray(image)
    if m.size != img.size:
        raise ValueError(f"mask has {m.size} voxels, image {img.size}")
    fg = m.reshape(-1) > 0  # foreground only: no full-size float copy of the CT
    labels = m.reshape(-1)[fg].astype(np.intp, copy=False)
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64)[:3])) / 1000.0
    counts = np.bincount(labels, minlength=1)
    sums = np.bincount(labels, weights=img.reshape(-1)[fg].astype(np.float64), minlength=1)
    out = []
    checked = {int(c) for c in classes}
    for c in np.flatnonzero(counts[1:]) + 1:
        if int(c) not in checked:
            continue
        ml, mean = counts[c] * voxel_ml, sums[c] / counts[c]
        if ml >= min_ml and mean < max_mean_hu:
            out.append((int(c), round(float(ml), 1), round(float(mean), 1)))
    return out


def _range_without(arr: np.ndarray, padding: float | None, chunk_voxels: int = 1 << 24) -> tuple[float, float, int]:
    """``(min, max, count)`` of the voxels of ``arr`` that do not hold ``padding`` (all when
    ``None``), a few slices at a time (no full-size temporary). Raises ValueError when none is left."""
    if padding is None:
        return float(arr.min()), float(arr.max()), int(arr.size)
    per_slice = max(1, int(arr.size // max(1, arr.shape[-1])))
    step = max(1, chunk_voxels // per_slice)
    lo_all, hi_all = arr.min(), arr.max()  # initial values of the dtype (no inf for integers)
    lo, hi, n = np.inf, -np.inf, 0
    for k in range(0, arr.shape[-1], step):
        block = arr[..., k:k + step]
        keep = block != padding
        m = int(np.count_nonzero(keep))
        if m:
            lo = min(lo, float(block.min(where=keep, initial=hi_all)))
            hi = max(hi, float(block.max(where=keep, initial=lo_all)))
            n += m
    if n == 0:
        raise ValueError("every voxel holds the padding value")
    return lo, hi, n


def check_ct_volume(array: Any, spacing_mm: Sequence[float] | None, path: str | os.PathLike,
                    affine: Any = None) -> None:
    """Raise :class:`InputError` naming ``path`` unless ``array`` looks like a 3D CT in HU.

    Accepted: exactly 3 spatial axes (trailing singleton axes are tolerated), at least
    ``MIN_VOXELS_PER_AXIS`` voxels per axis, finite values, positive finite spacing, and a HU-like
    range: some value <= ``CT_MIN_AT_MOST_HU`` (air/fat, present around and inside every abdomen)
    and some value >= ``CT_MAX_AT_LEAST_HU`` (enhanced organs, bone). The two-sided test rejects
    unscaled scanner values (min >= 0), MR, and images normalised to [0, 1] without rejecting CTs
    whose padding value is -1024/-2048/-3024. The range is that of the voxels inside the scan
    field of view: the padding outside a circular FOV (:func:`fov_padding_value`) is left out, so
    data stored with a +1024 offset (air at 0) and padded with -1024 are refused like the same
    data without padding. ``affine`` (when given) must be finite and invertible (:func:`check_affine`).

    Accepted with an :class:`ImplausibleCTWarning` naming the file: whatever
    :func:`plausibility_problems` finds (10 mm or 0.1 mm voxels, a field of view too small for an
    abdomen, values scaled x1000).
    """
    if affine is not None:
        check_affine(affine, path)
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
    arr = arr.reshape(shape)
    pad = fov_padding_value(arr)
    lo, hi, n_inside = _range_without(arr, pad)  # the values the scanner measured
    where = "" if pad is None else (f" inside the scan field of view ({100 * n_inside / arr.size:.0f}% of the "
                                    f"voxels; padding value {pad:g} outside it left out)")
    if hi < CT_MAX_AT_LEAST_HU or lo > CT_MIN_AT_MOST_HU:
        hint = "is the rescale slope/intercept applied, and is this a CT?"
        if pad is not None and lo >= 0:
            hint = (f"the data look stored with an offset (e.g. +1024: air at {lo:g}); subtract it (apply the "
                    "rescale intercept) and keep the padding below -1000")
        raise InputError(path, f"value range [{lo:g}, {hi:g}]{where} does not look like CT in Hounsfield units "
                               f"(need min <= {CT_MIN_AT_MOST_HU:g} and max >= {CT_MAX_AT_LEAST_HU:g}); {hint}")
    problems = plausibility_problems(shape, spacing_mm, arr, lo, hi, padding=pad)
    if problems:  # one line per file
        warnings.warn(f"{path}: unusual for an abdominal CT: {'; '.join(problems)}", ImplausibleCTWarning,
                      stacklevel=2)


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
            spacing = affine = None
            if isinstance(img, MetaTensor):
                affine = np.asarray(img.affine)
                check_affine(affine, path)  # before the spacing is derived from it
                spacing = affine_spacing_mm(affine)
            check_ct_volume(arr, spacing, path, affine=affine)
        return d
