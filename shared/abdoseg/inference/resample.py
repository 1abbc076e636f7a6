"""Fine-grid class scores -> uint8 labels on the grid the CT had before ``Spacingd``.

The fine network sees the ROI crop resampled by MONAI ``Spacingd`` (as in training). Its class
scores live on that fine grid; the mask must live on the CT's own grid. Resampling 15 score
channels to full resolution and taking the argmax would hold ``15 x X x Y x Z`` floats (1.2 GB
for a 512 x 512 x 150 crop), so :func:`resample_scores_to_labels` does it separably, plane by
plane, and argmaxes on the way (same labels, a fraction of the memory and time).

The geometry is MONAI's: output voxel ``i`` of the pre-``Spacingd`` grid sits at fine-grid
coordinate ``scale * i + offset`` per axis (``inv(fine_affine) @ crop_affine``, diagonal because
``Spacing`` keeps the axis directions); scores are interpolated linearly there, clamped at the
border (``Spacingd``'s ``padding_mode="border"``).

:class:`ScoresToLabelsd` is the postprocessing transform: it turns ``pred`` (fine-grid scores) into
labels on the pre-``Spacingd`` grid, with the image's transform trace, so that MONAI's ``Invertd``
then undoes the ROI crop and the orientation exactly (the ``Spacingd`` inverse is then the
identity: source and destination affines agree).

Array order is NIfTI voxel order (X, Y, Z).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import TraceKeys

__all__ = ["AxisMap", "torch_interpolate_axis_map", "spacing_axis_maps", "resample_scores_to_labels", "ScoresToLabelsd"]

#: Budget (number of float32 elements) of the upsampled score planes cached at a time.
SLAB_ELEMENTS: int = 16_000_000

#: (scale, offset): output index i samples the source at ``scale * i + offset`` (voxel units).
AxisMap = tuple[float, float]


def torch_interpolate_axis_map(n_in: int, n_out: int) -> AxisMap:
    """The axis map of ``F.interpolate(..., align_corners=False)`` from ``n_in`` to ``n_out`` samples."""
    scale = n_in / n_out
    return scale, 0.5 * scale - 0.5


def spacing_axis_maps(fine_affine: Any, target_affine: Any, atol: float = 1e-4) -> list[AxisMap]:
    """Per-axis maps from a target grid (e.g. the ROI crop before ``Spacingd``) to the fine grid
    made from it by ``Spacingd``: ``inv(fine_affine) @ target_affine`` must be diagonal + shift."""
    fine = np.asarray(fine_affine, dtype=np.float64)
    target = np.asarray(target_affine, dtype=np.float64)
    m = np.linalg.solve(fine, target)
    lin = m[:3, :3]
    if not np.allclose(lin - np.diag(np.diag(lin)), 0.0, atol=atol):
        raise ValueError(f"fine and target grids are not axis-aligned to each other (map {lin.round(4).tolist()})")
    return [(float(lin[k, k]), float(m[k, 3])) for k in range(3)]


def _linear_source(axis_map: AxisMap, n_in: int, start: int, stop: int, device: torch.device):
    """Source indices ``i0, i1`` and weights ``w`` (of ``i1``) for outputs ``start..stop-1``."""
    scale, offset = axis_map
    o = torch.arange(start, stop, device=device, dtype=torch.float64)
    s = (o * scale + offset).clamp_(min=0.0, max=float(n_in - 1))
    i0 = s.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w = (s - i0.double()).float()
    return i0, i1, w


def _lerp_axis(x: torch.Tensor, dim: int, axis_map: AxisMap, n_out: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` to ``n_out`` samples at ``axis_map``."""
    n_in = x.shape[dim]
    if n_in == n_out and axis_map == (1.0, 0.0):
        return x
    i0, i1, w = _linear_source(axis_map, n_in, 0, n_out, x.device)
    shape = [1] * x.ndim
    shape[dim] = n_out
    return torch.lerp(x.index_select(dim, i0), x.index_select(dim, i1), w.view(shape))


def _resample_planes(planes: torch.Tensor, map_x: AxisMap, map_y: AxisMap, xo: int, yo: int) -> torch.Tensor:
    """Bilinear resampling of (K, C, Xi, Yi) planes to (K, C, Xo, Yo) at the axis maps, clamped at
    the border (``grid_sample`` with ``align_corners=True`` normalisation: voxel-exact, and ~5x
    faster on CPU than two gather + lerp passes)."""
    xi, yi = planes.shape[2], planes.shape[3]
    if (xi, yi) == (xo, yo) and tuple(map_x) == (1.0, 0.0) and tuple(map_y) == (1.0, 0.0):
        return planes

    def norm(axis_map: AxisMap, n_in: int, n_out: int) -> torch.Tensor:
        src = torch.arange(n_out, dtype=torch.float64, device=planes.device) * axis_map[0] + axis_map[1]
        src = src.clamp(0.0, float(n_in - 1))
        return (2.0 * src / max(1, n_in - 1) - 1.0).to(planes.dtype) if n_in > 1 else torch.zeros_like(src, dtype=planes.dtype)

    gx, gy = norm(map_x, xi, xo), norm(map_y, yi, yo)
    # grid_sample's last grid dimension is (w, h) = (index into Yi, index into Xi)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij")[::-1], -1)[None].expand(planes.shape[0], -1, -1, -1)
    return torch.nn.functional.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over dim 0 (``max(0).indices``: first maximum on ties, as ``argmax``, and
    several times faster than ``argmax(0)`` on CPU for (C, X, Y) planes)."""
    return scores.max(0).indices.to(torch.uint8)


def resample_scores_to_labels(scores: torch.Tensor, out_shape: Sequence[int],
                              axis_maps: Sequence[AxisMap] | None = None,
                              slab_elements: int = SLAB_ELEMENTS) -> torch.Tensor:
    """Linearly resample class scores ``(C, X, Y, Z)`` to ``out_shape`` and argmax -> uint8 labels.

    Args:
        scores: (C, Xi, Yi, Zi) logits or probabilities.
        out_shape: (Xo, Yo, Zo).
        axis_maps: per axis, output index ``i`` samples the source at ``scale * i + offset``
            (clamped to the source); default: ``F.interpolate(align_corners=False)``'s map.
        slab_elements: at most this many upsampled scores are cached at a time.

    Returns:
        (Xo, Yo, Zo) uint8 labels, equal to the argmax of the fully resampled scores (up to float
        rounding at exact ties), computed separably: each needed source Z-plane is resampled in
        X/Y once and argmaxed once; an output slice between source planes ``a`` and ``b`` takes
        their common label wherever the two planes agree (a blend of two score vectors that both
        peak at class k peaks at k) and blends + argmaxes only the other pixels.
    """
    c, xi, yi, zi = scores.shape
    xo, yo, zo = (int(v) for v in out_shape)
    if axis_maps is None:
        axis_maps = [torch_interpolate_axis_map(n, m) for n, m in zip((xi, yi, zi), (xo, yo, zo))]
    identity = all(tuple(m) == (1.0, 0.0) for m in axis_maps)
    if identity and (xi, yi, zi) == (xo, yo, zo):
        return _argmax_classes(scores)
    planes_in = scores.permute(3, 0, 1, 2).float().contiguous()  # (Zi, C, Xi, Yi)
    out = torch.empty((zo, xo * yo), dtype=torch.uint8, device=scores.device)
    slab = max(1, min(zo, slab_elements // max(1, c * xo * yo)))
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # plane -> (scores (C, XoYo), labels (XoYo,))
    for z0 in range(0, zo, slab):
        z1 = min(zo, z0 + slab)
        i0, i1, w = _linear_source(axis_maps[2], zi, z0, z1, scores.device)
        need = sorted(set(i0.tolist()) | set(i1.tolist()))
        cache = {k: v for k, v in cache.items() if k in need}
        missing = [k for k in need if k not in cache]
        if missing:
            up = planes_in[missing]
            up = _resample_planes(up, axis_maps[0], axis_maps[1], xo, yo)
            up = up.reshape(len(missing), c, xo * yo)
            cache.update({k: (up[j], _argmax_classes(up[j])) for j, k in enumerate(missing)})
        for j, (a, b, wj) in enumerate(zip(i0.tolist(), i1.tolist(), w.tolist())):
            scores_a, labels_a = cache[a]
            if a == b or wj == 0.0:
                out[z0 + j] = labels_a
                continue
            scores_b, labels_b = cache[b]
            differ = (labels_a != labels_b).nonzero(as_tuple=True)[0]
            row = labels_a.clone()
            if differ.numel():
                blended = torch.lerp(scores_a.index_select(1, differ), scores_b.index_select(1, differ), wj)
                row[differ] = _argmax_classes(blended)
            out[z0 + j] = row
    return out.reshape(zo, xo, yo).permute(1, 2, 0)


def _resample_sheared(scores: torch.Tensor, fine_affine: np.ndarray, target_affine: np.ndarray,
                      target_shape: Sequence[int]) -> torch.Tensor:
    """Labels of ``scores`` resampled by MONAI ``SpatialResample`` (bilinear, border) from the fine
    grid to a target grid that is not axis-aligned to it; needs C x target voxels of memory."""
    from monai.transforms import SpatialResample

    src = MetaTensor(scores.float(), affine=torch.as_tensor(fine_affine))
    out = SpatialResample(mode="bilinear", padding_mode="border")(
        src, dst_affine=torch.as_tensor(target_affine), spatial_size=tuple(int(v) for v in target_shape))
    return _argmax_classes(out.as_tensor())


def _spacing_op_index(image: MetaTensor) -> int:
    for i in range(len(image.applied_operations) - 1, -1, -1):
        if image.applied_operations[i].get(TraceKeys.CLASS_NAME) in ("Spacing", "SpatialResample"):
            return i
    raise ValueError("ScoresToLabelsd: the image's preprocessing applied no Spacingd")


def _traced_ids(transform: Any, depth: int = 3) -> set[int]:
    """ids of ``transform`` and the transforms it wraps (``Spacingd`` -> ``Spacing`` ->
    ``SpatialResample``): the id a trace entry carries is the innermost one's."""
    ids = {id(transform)}
    if depth > 0:
        for value in vars(transform).values():
            if hasattr(value, "get_transform_info"):
                ids |= _traced_ids(value, depth - 1)
    return ids


class ScoresToLabelsd(MapTransform):
    """Postprocessing: the inverse of the preprocessing for class scores.

    ``data[key]``: (C, X', Y', Z') scores on the fine grid (the inferer's output for the
    preprocessed ``data[image_key]``). Output: (1, X, Y, Z) uint8 labels on the CT's own grid.
    The ``Spacingd`` step is inverted by :func:`resample_scores_to_labels` (linear score
    resampling + argmax, never a full-resolution score volume); every spatial transform before
    it (the ROI crop, the orientation) by its own MONAI ``inverse``, in reverse order, from the
    image's transform trace - what ``Invertd`` does, minus the one step it cannot do cheaply.

    Args:
        keys: prediction key(s).
        transform: the preprocessing that produced ``data[image_key]`` (the same instance).
        image_key: the preprocessed image (its trace gives every grid).
    """

    def __init__(self, keys: KeysCollection, transform: Any, image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.image_key = image_key

    def _invertible(self) -> list[Any]:
        from monai.transforms import Compose, InvertibleTransform

        flat = self.transform.flatten().transforms if isinstance(self.transform, Compose) else [self.transform]
        return [t for t in flat if isinstance(t, InvertibleTransform)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from copy import deepcopy

        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"ScoresToLabelsd: {self.image_key!r} must be a MetaTensor with its transform trace")
        ops = image.applied_operations
        k = _spacing_op_index(image)
        if k != len(ops) - 1:
            raise ValueError(f"ScoresToLabelsd: Spacingd must be the last spatial transform, got "
                             f"{[o.get(TraceKeys.CLASS_NAME) for o in ops[k + 1:]]} after it")
        spacing_op = ops[k]
        target_affine = np.asarray(torch.as_tensor(spacing_op[TraceKeys.EXTRA_INFO]["src_affine"]).cpu(), dtype=np.float64)
        target_shape = tuple(int(v) for v in spacing_op[TraceKeys.ORIG_SIZE])
        fine_affine = np.asarray(image.affine.cpu(), dtype=np.float64)
        try:
            maps: list[AxisMap] | None = spacing_axis_maps(fine_affine, target_affine)
        except ValueError:  # sheared grid (e.g. gantry tilt): full trilinear resampling by MONAI
            maps = None
        inverses = [t for t in reversed(self._invertible()) if spacing_op[TraceKeys.ID] not in _traced_ids(t)]
        for key in self.key_iterator(d):
            scores = d[key]
            scores = scores.as_tensor() if isinstance(scores, MetaTensor) else torch.as_tensor(scores)
            if scores.ndim == 5:
                scores = scores[0]
            if maps is not None:
                labels = resample_scores_to_labels(scores, target_shape, maps)[None]
            else:
                labels = _resample_sheared(scores, fine_affine, target_affine, target_shape)[None]
            meta = {m: v for m, v in image.meta.items() if m != "affine"}
            out = MetaTensor(labels, affine=torch.as_tensor(target_affine), meta=meta)
            out.applied_operations = deepcopy(ops[:k])
            for t in inverses:
                if not out.applied_operations:
                    break
                out = t.inverse({self.image_key: out})[self.image_key]
            if out.applied_operations:
                raise RuntimeError(f"ScoresToLabelsd: could not invert {[o.get(TraceKeys.CLASS_NAME) for o in out.applied_operations]}")
            d[key] = out
        return d
