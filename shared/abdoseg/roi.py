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

The coarse network inference that produces the mask lives in :mod:`abdoseg.coarse`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RoiBox", "EmptyRoiWarning", "roi_from_mask", "largest_component", "map_box_between_grids",
           "scale_box", "margin_voxels"]

_EPS = 1e-6


class EmptyRoiWarning(UserWarning):
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
    """Boolean mask of the largest connected component of ``mask != 0`` (cc3d, 26-connectivity
    in 3D). With ``min_fraction`` (0..1), keep every component at least that fraction of the
    largest one's size. Empty input -> all False."""
    import cc3d

    fg = _to_numpy(mask) != 0
    if not fg.any():
        return fg
    if fg.ndim == 2:
        connectivity = 8 if connectivity == 26 else connectivity
    labels, n = cc3d.connected_components(fg, connectivity=connectivity, return_N=True)
    if n <= 1:
        return fg
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    if min_fraction is None:
        return labels == int(np.argmax(sizes))
    keep = np.flatnonzero(sizes >= float(min_fraction) * sizes.max())
    keep = keep[keep > 0]
    return np.isin(labels, keep)


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
