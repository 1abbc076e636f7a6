"""Region of interest (ROI) boxes from a coarse foreground mask.

Pure functions (numpy + cc3d):

* :func:`roi_from_mask` - bounding box of the largest connected foreground component plus a
  margin in mm, clipped to the volume; empty mask -> whole volume + :class:`EmptyRoiWarning`.
* :class:`RoiBox` - ``start``/``stop`` voxel indices (stop exclusive), ``.slices``,
  ``.to_json(affine)`` (voxel start/stop + world mm corners), ``.is_whole_volume``.
* :func:`map_box_between_grids` / :func:`scale_box` - carry a box from the grid the coarse net
  ran on (resampled, possibly reoriented) to the original CT grid through the affines,
  conservatively (every original voxel that overlaps the box is kept).

Arrays are in NIfTI voxel order (X, Y, Z); spacings in mm in the same order.

Coarse stage:

* :func:`coarse_box_to_original` - coarse-grid foreground mask -> ROI on the coarse grid and on
  the CT's grid. The one ROI rule of the project: the coarse bundle's :class:`CoarseRoiBoxd` and
  the cascade's :class:`abdoseg.inference.coarse_roi.CoarseRoiCropd` both call it.
* :class:`CoarseRoiBoxd` / :class:`SaveCoarseOutputsd` - MONAI dictionary transforms for
  ``bundles/coarse_roi/configs/inference.json`` (ROI JSON + coarse mask NIfTI in the CT's
  geometry, written atomically).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abdoseg.geometry import affine_spacing_mm
from abdoseg.io import AbdosegWarning

__all__ = ["RoiBox", "EmptyRoiWarning", "roi_from_mask", "largest_component", "map_box_between_grids",
           "scale_box", "margin_voxels", "CoarseRoiResult", "coarse_box_to_original",
           "CoarseRoiBoxd", "SaveCoarseOutputsd"]

_EPS = 1e-6


class EmptyRoiWarning(AbdosegWarning):
    """The coarse mask had no foreground: the ROI falls back to the whole volume."""


@dataclass(frozen=True)
class RoiBox:
    """Axis-aligned voxel box ``[start, stop)`` inside a volume of ``shape`` (all (X, Y, Z))."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        start = tuple(int(v) for v in self.start)
        stop = tuple(int(v) for v in self.stop)
        shape = tuple(int(v) for v in self.shape)
        if not len(start) == len(stop) == len(shape):
            raise ValueError(f"start {start}, stop {stop} and shape {shape} differ in length")
        for a, b, n in zip(start, stop, shape):
            if not 0 <= a < b <= n:
                raise ValueError(f"invalid box start={start} stop={stop} for shape {shape}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "RoiBox":
        """The box covering the whole volume."""
        return cls((0,) * len(shape), tuple(shape), tuple(shape))

    @property
    def slices(self) -> tuple[slice, ...]:
        """``array[box.slices]`` crops an (X, Y, Z) array; use ``(..., *box.slices)`` with channels."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> tuple[int, ...]:
        """Box size in voxels."""
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def is_whole_volume(self) -> bool:
        return all(a == 0 for a in self.start) and self.stop == self.shape

    @property
    def volume_fraction(self) -> float:
        """Box voxels / volume voxels."""
        return float(np.prod(self.size, dtype=np.float64) / np.prod(self.shape, dtype=np.float64))

    def contains_fraction(self, mask: Any) -> float:
        """Fraction of the nonzero voxels of ``mask`` (same grid) inside the box (1.0 if empty)."""
        m = np.asarray(mask) != 0
        total = int(m.sum())
        return 1.0 if total == 0 else float(m[self.slices].sum()) / total

    def to_json(self, affine: Any | None = None) -> dict[str, Any]:
        """JSON-ready dict: voxel ``start``/``stop`` (stop exclusive), ``shape``, ``size``,
        ``is_whole_volume``, ``volume_fraction``; with a 4x4 voxel->world ``affine`` also
        ``world_first_voxel_mm`` / ``world_last_voxel_mm`` (centres of the voxels at ``start``
        and ``stop - 1``) and ``world_min_mm`` / ``world_max_mm`` (axis-aligned world bounds of
        the box's outer voxel faces)."""
        out: dict[str, Any] = {
            "start": list(self.start),
            "stop": list(self.stop),
            "shape": list(self.shape),
            "size": list(self.size),
            "is_whole_volume": self.is_whole_volume,
            "volume_fraction": self.volume_fraction,
        }
        if affine is not None:
            a = np.asarray(affine, dtype=np.float64)
            first = _apply(a, np.asarray(self.start, dtype=np.float64)[None])[0]
            last = _apply(a, np.asarray(self.stop, dtype=np.float64)[None] - 1.0)[0]
            corners = _apply(a, _corners(np.asarray(self.start) - 0.5, np.asarray(self.stop) - 0.5))
            out.update(
                world_first_voxel_mm=[float(v) for v in first],
                world_last_voxel_mm=[float(v) for v in last],
                world_min_mm=[float(v) for v in corners.min(0)],
                world_max_mm=[float(v) for v in corners.max(0)],
                affine=a.tolist(),
            )
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RoiBox":
        return cls(tuple(d["start"]), tuple(d["stop"]), tuple(d["shape"]))


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (n+1)x(n+1) affine to (N, n) points."""
    n = points.shape[1]
    return points @ affine[:n, :n].T + affine[:n, n]


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 2**n corners of the box [lo, hi] as (2**n, n)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    n = lo.shape[0]
    idx = np.array(np.meshgrid(*[[0, 1]] * n, indexing="ij")).reshape(n, -1).T
    return np.where(idx == 1, hi, lo)


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, ndim)
    if arr.size != ndim:
        raise ValueError(f"{name}: expected 1 or {ndim} values, got {arr.size}")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite and >= 0, got {arr.tolist()}")
    return arr


def margin_voxels(margin_mm: float | Sequence[float], spacing_mm: Sequence[float]) -> tuple[int, ...]:
    """Margin in voxels per axis: ``ceil(margin_mm / spacing_mm)`` (never less than asked)."""
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing.tolist()}")
    margin = _per_axis(margin_mm, spacing.size, "margin_mm")
    return tuple(int(math.ceil(m / s - _EPS)) for m, s in zip(margin, spacing))


def _to_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):  # torch tensor / MetaTensor
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def largest_component(mask: Any, connectivity: int = 26, min_fraction: float | None = None) -> np.ndarray:
    """Boolean mask of the largest connected component of ``mask != 0`` (26-connectivity in 3D,
    8 in 2D). With ``min_fraction`` (0..1), keep every component at least that fraction of the
    largest one's size. Empty input -> all False. The binary case of
    :func:`abdoseg.inference.postprocess.keep_largest_organ_components`, the project's one component filter."""
    from abdoseg.inference.postprocess import keep_largest_organ_components

    fg = _to_numpy(mask) != 0
    if not fg.any():
        return fg
    if fg.ndim == 2:
        connectivity = 8 if connectivity == 26 else connectivity
    kept = keep_largest_organ_components(fg.view(np.uint8), organ_ids=(1,), connectivity=connectivity,
                                         min_fraction_of_largest=1.0 if min_fraction is None else float(min_fraction))
    return kept != 0


def roi_from_mask(
    mask: Any,
    spacing_mm: Sequence[float],
    margin_mm: float | Sequence[float] = 20.0,
    margin_lower_mm: float | Sequence[float] | None = None,
    margin_upper_mm: float | Sequence[float] | None = None,
    largest_only: bool = True,
    min_component_fraction: float | None = None,
) -> RoiBox:
    """ROI box of a foreground mask.

    Args:
        mask: (X, Y, Z) bool/int numpy array or torch tensor; nonzero = foreground (a leading
            channel axis of size 1 is dropped).
        spacing_mm: voxel spacing (X, Y, Z) in mm.
        margin_mm: margin added on both sides (one value or one per axis), in mm; rounded up
            to whole voxels per axis.
        margin_lower_mm, margin_upper_mm: override the margin below (towards index 0) /
            above (towards the last index), e.g. seed 001's asymmetric padding.
        largest_only: use only the largest connected component (cc3d, 26-connected).
        min_component_fraction: with ``largest_only``, also keep components at least this
            fraction of the largest one (robust to a coarse mask split in two large pieces).

    Returns:
        :class:`RoiBox` clipped to the volume. Empty foreground -> whole volume and an
        :class:`EmptyRoiWarning` (never an exception).
    """
    arr = _to_numpy(mask)
    if arr.ndim == len(spacing_mm) + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != len(spacing_mm):
        raise ValueError(f"mask has shape {arr.shape} but spacing_mm has {len(spacing_mm)} values")
    shape = arr.shape
    fg = largest_component(arr, min_fraction=min_component_fraction) if largest_only else arr != 0
    if not fg.any():
        warnings.warn(f"empty foreground mask (shape {shape}): ROI = whole volume", EmptyRoiWarning, stacklevel=2)
        return RoiBox.whole(shape)
    lo_m = margin_voxels(margin_mm if margin_lower_mm is None else margin_lower_mm, spacing_mm)
    hi_m = margin_voxels(margin_mm if margin_upper_mm is None else margin_upper_mm, spacing_mm)
    start, stop = [], []
    for axis in range(arr.ndim):
        other = tuple(a for a in range(arr.ndim) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        start.append(max(0, int(idx[0]) - lo_m[axis]))
        stop.append(min(shape[axis], int(idx[-1]) + 1 + hi_m[axis]))
    return RoiBox(tuple(start), tuple(stop), shape)


def map_box_between_grids(box: RoiBox, src_affine: Any, dst_affine: Any, dst_shape: Sequence[int]) -> RoiBox:
    """Carry ``box`` (voxel indices on the grid with ``src_affine``) to the grid with
    ``dst_affine`` / ``dst_shape`` (both 4x4 voxel->world, e.g. resampled coarse grid -> original
    CT grid). The box's outer voxel faces are mapped through world space; every destination
    voxel whose cell overlaps the mapped box is included, then the result is clipped to the
    volume. Works for any axis permutation/flip (reorientation) and any scaling.

    A whole-volume source box gives the whole destination volume.
    """
    dst_shape = tuple(int(v) for v in dst_shape)
    if box.is_whole_volume:
        return RoiBox.whole(dst_shape)
    src = np.asarray(src_affine, dtype=np.float64)
    dst = np.asarray(dst_affine, dtype=np.float64)
    corners = _corners(np.asarray(box.start) - 0.5, np.asarray(box.stop) - 0.5)
    dst_vox = _apply(np.linalg.inv(dst) @ src, corners)
    a = dst_vox.min(0)
    b = dst_vox.max(0)
    start = [max(0, int(math.floor(v - 0.5 + _EPS)) + 1) for v in a]
    stop = [min(n, int(math.ceil(v + 0.5 - _EPS))) for v, n in zip(b, dst_shape)]
    for i, n in enumerate(dst_shape):  # box entirely outside (should not happen): keep it valid
        if start[i] >= stop[i]:
            start[i], stop[i] = 0, n
    return RoiBox(tuple(start), tuple(stop), dst_shape)


def scale_box(box: RoiBox, dst_shape: Sequence[int]) -> RoiBox:
    """Carry a box from a grid of ``box.shape`` to a resized grid of ``dst_shape`` covering the
    same extent (``align_corners=False`` resize, as ``Resize``/``F.interpolate`` do)."""
    src_shape = np.asarray(box.shape, dtype=np.float64)
    r = np.asarray(dst_shape, dtype=np.float64) / src_shape
    n = len(dst_shape)
    src_aff = np.eye(n + 1)
    src_aff[:n, :n] = np.diag(r)
    src_aff[:n, n] = 0.5 * r - 0.5
    return map_box_between_grids(box, src_aff, np.eye(n + 1), dst_shape)


# --------------------------------------------------------------------------------------------
# Coarse network inference (plain function + MONAI transforms)
# --------------------------------------------------------------------------------------------


@dataclass
class CoarseRoiResult:
    """The coarse stage's result (written by the coarse bundle as ``<case>_roi.json``).

    box: ROI in voxel indices of the input volume (X, Y, Z).
    coarse_box: the same ROI on the coarse grid.
    coarse_mask: (x, y, z) uint8 foreground mask on the coarse grid (RAS, coarse spacing).
    coarse_affine: 4x4 voxel->world affine of ``coarse_mask``.
    """

    box: RoiBox
    coarse_box: RoiBox
    coarse_mask: np.ndarray
    coarse_affine: np.ndarray

    def to_json(self, affine: Any) -> dict[str, Any]:
        """ROI JSON written by the bundle: the box on the original grid (with world mm corners)
        plus the coarse-grid box."""
        out = self.box.to_json(affine)
        out["coarse"] = self.coarse_box.to_json(self.coarse_affine)
        out["coarse_foreground_voxels"] = int(np.count_nonzero(self.coarse_mask))
        return out


def coarse_box_to_original(mask: Any, coarse_affine: Any, original_affine: Any, original_shape: Sequence[int],
                           margin_mm: float | Sequence[float], min_component_fraction: float | None = None,
                           ) -> tuple[RoiBox, RoiBox]:
    """ROI of a coarse-grid mask, on the coarse grid and mapped to the original grid."""
    coarse_box = roi_from_mask(mask, affine_spacing_mm(coarse_affine), margin_mm,
                               min_component_fraction=min_component_fraction)
    box = map_box_between_grids(coarse_box, coarse_affine, original_affine, original_shape)
    return box, coarse_box


def _meta(x: Any) -> dict:
    return dict(getattr(x, "meta", {}) or {})


class CoarseRoiBoxd:
    """MONAI dictionary transform (post-processing, before ``Invertd``): from the discrete coarse
    prediction ``data[key]`` ((1, x, y, z) MetaTensor on the coarse grid) and the original
    geometry of ``data[image_key]`` (LoadImaged meta ``original_affine``/``spatial_shape``),
    compute the ROI and store its JSON dict in ``data[roi_key]``."""

    def __init__(self, keys: str = "pred", image_key: str = "image", roi_key: str = "roi",
                 margin_mm: float | Sequence[float] = 20.0, min_component_fraction: float | None = None) -> None:
        self.key = keys if isinstance(keys, str) else keys[0]
        self.image_key = image_key
        self.roi_key = roi_key
        self.margin_mm = margin_mm
        self.min_component_fraction = min_component_fraction

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        pred = d[self.key]
        meta = _meta(d[self.image_key])
        coarse_affine = np.asarray(pred.affine if hasattr(pred, "affine") else meta["affine"], dtype=np.float64)
        original_affine = np.asarray(meta["original_affine"], dtype=np.float64)
        original_shape = tuple(int(v) for v in np.asarray(meta["spatial_shape"]).reshape(-1)[:3])
        mask = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
        mask = (mask.reshape(mask.shape[-3:]) > 0).astype(np.uint8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyRoiWarning)
            box, coarse_box = coarse_box_to_original(mask, coarse_affine, original_affine, original_shape,
                                                     self.margin_mm, self.min_component_fraction)
        src = meta.get("filename_or_obj", "<input>")
        for w in caught:  # re-raise with the file name
            warnings.warn(f"{src}: {w.message}", w.category, stacklevel=2)
        result = CoarseRoiResult(box, coarse_box, mask, coarse_affine)
        out = result.to_json(original_affine)
        out.update(source=str(src), margin_mm=self.margin_mm)
        d[self.roi_key] = out
        return d


class SaveCoarseOutputsd:
    """MONAI dictionary transform (post-processing, after ``Invertd``): write
    ``{output_dir}/{case}_coarse.nii.gz`` (uint8 foreground mask in the CT's geometry) and
    ``{output_dir}/{case}_roi.json`` (``data[roi_key]``), both atomically. ``case`` is the input
    file name without extension and FLARE's ``_0000`` suffix."""

    def __init__(self, keys: str = "pred", image_key: str = "image", roi_key: str = "roi",
                 output_dir: str = "./eval", save_mask: bool = True) -> None:
        self.key = keys if isinstance(keys, str) else keys[0]
        self.image_key = image_key
        self.roi_key = roi_key
        self.output_dir = output_dir
        self.save_mask = save_mask

    def __call__(self, data: dict) -> dict:
        from pathlib import Path

        from abdoseg.io import case_id_from_image, save_json, save_nifti

        meta = _meta(data[self.image_key])
        case = case_id_from_image(str(meta.get("filename_or_obj", "case")))
        out_dir = Path(self.output_dir)
        if self.save_mask:
            pred = data[self.key]
            arr = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
            arr = (arr.reshape(arr.shape[-3:]) > 0.5).astype(np.uint8)
            affine = np.asarray(meta["original_affine"], dtype=np.float64)
            expected = tuple(int(v) for v in np.asarray(meta["spatial_shape"]).reshape(-1)[:3])
            if arr.shape != expected:
                raise ValueError(f"{case}: inverted mask shape {arr.shape} != CT shape {expected}")
            save_nifti(arr, affine, out_dir / f"{case}_coarse.nii.gz")
        if self.roi_key in data:
            save_json(data[self.roi_key], out_dir / f"{case}_roi.json")
        return data
