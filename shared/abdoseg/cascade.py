"""Two-stage cascade inference: raw CT (HU, any orientation) -> coarse ROI net -> fine net on the ROI
-> 15-class label volume on the input's exact voxel grid.

Everything happens inside a MONAI :class:`~monai.inferers.Inferer`, so MONAI Label (which only
uses the ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` ids of
``inference.json``) runs the full cascade: the coarse network is built from the config and its
weights are loaded by the inferer from ``coarse_checkpoint`` (the fine bundle ships its own copy
at ``models/coarse_model.pt``, referenced as ``$@bundle_root + '/models/coarse_model.pt'``).

Steps of :class:`CascadeInferer` (all resampling with torch on the inference device):

1. Reorient the (1, 1, X, Y, Z) HU volume to RAS by exact axis permutation/flip (no interpolation).
2. Window HU, resample to ``coarse_spacing_mm`` (trilinear), run the coarse net.
3. ROI = bounding box of the largest foreground component + ``margin_mm``
   (:func:`abdoseg.roi.roi_from_mask`); mapped to voxel indices of the original grid.
   Nothing found -> the whole volume, with a warning.
4. Crop the original CT, window, resample the crop to ``fine_spacing_mm``.
5. Fine net: one forward pass when the crop fits in ``roi_size`` (padded to the network's
   divisor), else sliding window (``sw_overlap``, constant blending, no TTA).
6. Logits are resampled (trilinear) back to the crop's original grid slab by slab and
   argmax-ed, so full-resolution 15-channel volumes never exist in memory.
7. Pasted into a full-size background volume, orientation undone.

Array order is NIfTI voxel order (X, Y, Z); spacings are (X, Y, Z) in mm.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from monai.transforms import MapTransform, Randomizable

from abdoseg.geometry import affine_spacing_mm
from abdoseg.inference.ct_checks import ValidateCTd, check_ct_volume  # noqa: F401
from abdoseg.io import InputError
from abdoseg.labels import NUM_CLASSES
from abdoseg.preprocessing import COARSE_ROI_SIZE, COARSE_SPACING_MM, HU_WINDOW, ROI_MARGIN_MM

logger = logging.getLogger(__name__)

#: Default fine-network spacing (X, Y, Z) in mm. Seed 001 uses 0.8 x 0.8 x 2.5 mm on a GPU; the
#: CPU-friendly default here is coarser (see bundles/fine_organ_tumor/docs/README.md).
FINE_SPACING_MM: tuple[float, float, float] = (2.0, 2.0, 3.0)
#: Default fine inference window (voxels at FINE_SPACING_MM = 384 x 384 x 384 mm): most abdominal
#: ROIs fit in one pass, so no overlapping windows are computed.
FINE_ROI_SIZE: tuple[int, int, int] = (192, 192, 128)
#: Budget (number of float32 elements) of one slab when resampling logits back.
_SLAB_ELEMENTS: int = 48_000_000



# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------


def ras_orientation(affine: Any) -> np.ndarray:
    """nibabel ``io_orientation``: row i = (RAS axis that voxel axis i maps to, +1/-1)."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ValueError("affine has no usable orientation")
    return ornt


def to_ras(volume: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Reorient ``(..., X, Y, Z)`` to RAS axis order/direction (exact: flips + permutation)."""
    lead = volume.ndim - 3
    flip_dims = [lead + i for i in range(3) if ornt[i, 1] < 0]
    if flip_dims:
        volume = torch.flip(volume, flip_dims)
    # output axis j holds input axis i where ornt[i, 0] == j
    perm = [int(np.where(ornt[:, 0] == j)[0][0]) for j in range(3)]
    return volume.permute(*range(lead), *[lead + p for p in perm])


def from_ras(volume: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`to_ras`."""
    lead = volume.ndim - 3
    inv = [int(ornt[i, 0]) for i in range(3)]  # input axis i sits at RAS axis ornt[i, 0]
    volume = volume.permute(*range(lead), *[lead + p for p in inv])
    flip_dims = [lead + i for i in range(3) if ornt[i, 1] < 0]
    if flip_dims:
        volume = torch.flip(volume, flip_dims)
    return volume


def resampled_shape(shape: Sequence[int], spacing_mm: Sequence[float],
                    target_spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """Grid size covering the same extent at ``target_spacing_mm`` (at least 1 voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_mm, target_spacing_mm))  # type: ignore[return-value]


def window(volume: torch.Tensor, hu_window: Sequence[float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to ``hu_window`` and scale to [0, 1] (float32), as :func:`abdoseg.preprocessing.window_hu`."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return (volume.float().clamp(lo, hi) - lo) / (hi - lo)


def resample_volume(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of ``(B, C, X, Y, Z)`` to ``shape`` (align_corners=False)."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    return F.interpolate(volume, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)


def _linear_source(n_out: int, n_in: int, start: int, stop: int, device: torch.device):
    """Source indices/weights of torch's linear interpolation (align_corners=False) for outputs
    ``start..stop-1`` of an axis of ``n_in`` -> ``n_out`` samples."""
    scale = n_in / n_out
    o = torch.arange(start, stop, device=device, dtype=torch.float64)
    s = ((o + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = s.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w = (s - i0.double()).float()
    return i0, i1, w


def _argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over dim 0 (``max(0).indices``: first maximum on ties, as ``argmax``, and
    several times faster than ``argmax(0)`` on CPU for (C, X, Y) planes)."""
    return scores.max(0).indices.to(torch.uint8)


def resample_scores_to_labels(scores: torch.Tensor, out_shape: Sequence[int],
                              slab_elements: int = _SLAB_ELEMENTS) -> torch.Tensor:
    """Trilinear-resample class scores ``(C, X, Y, Z)`` to ``out_shape`` and argmax -> uint8 labels.

    Same labels as ``F.interpolate(scores[None], out_shape, mode="trilinear",
    align_corners=False)[0].argmax(0)`` (up to float rounding at exact ties), computed separably
    without full-resolution scores: each needed source Z-plane is upsampled in X/Y once (bilinear),
    argmaxed once and cached; an output slice between source planes ``a`` and ``b`` takes their
    common label wherever the two planes agree (a blend of two score vectors that both peak at
    class k peaks at k) and blends + argmaxes only the other pixels (the boundaries crossing
    between the planes). Work proceeds in Z slabs; at most ``slab_elements`` upsampled scores are
    cached at a time.
    """
    c, xi, yi, zi = scores.shape
    xo, yo, zo = (int(v) for v in out_shape)
    if (xi, yi, zi) == (xo, yo, zo):
        return _argmax_classes(scores)
    planes_in = scores.permute(3, 0, 1, 2).float().contiguous()  # (Zi, C, Xi, Yi)
    out = torch.empty((zo, xo * yo), dtype=torch.uint8, device=scores.device)
    slab = max(1, min(zo, slab_elements // max(1, c * xo * yo)))
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # plane -> (scores (C, XoYo), labels (XoYo,))
    for z0 in range(0, zo, slab):
        z1 = min(zo, z0 + slab)
        i0, i1, w = _linear_source(zo, zi, z0, z1, scores.device)
        need = sorted(set(i0.tolist()) | set(i1.tolist()))
        cache = {k: v for k, v in cache.items() if k in need}
        missing = [k for k in need if k not in cache]
        if missing:
            up = planes_in[missing]
            if (xi, yi) != (xo, yo):
                up = F.interpolate(up, size=(xo, yo), mode="bilinear", align_corners=False)
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


def _network_divisor(network: Any, default: int = 16) -> tuple[int, int, int]:
    """Product of the network's strides per axis (DynUNet ``strides``), else ``default``."""
    strides = getattr(network, "strides", None)
    if not strides:
        return (default,) * 3  # type: ignore[return-value]
    div = [1, 1, 1]
    for s in strides:
        s = [int(s)] * 3 if isinstance(s, int) else [int(v) for v in s]
        div = [d * v for d, v in zip(div, s)]
    return tuple(div)  # type: ignore[return-value]


def _n_windows(size: int, window: int, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference places along an axis (same formula)."""
    if size <= window:
        return 1
    interval = max(1, int(window * (1 - overlap)))
    return int(math.ceil((size - window) / interval)) + 1


def _tight_window(size: int, roi: int, divisor: int, overlap: float) -> int:
    """Smallest window (multiple of ``divisor``, at most ``roi``) that tiles ``size`` with no more
    windows than ``roi`` would: e.g. 200 voxels with roi 192 -> 2 windows of 128, not 2 of 192.
    Never larger than the divisor-padded size (a thin axis is not padded up to the window)."""
    roi = max(divisor, (roi // divisor) * divisor)
    target = _n_windows(size, roi, overlap)
    for w in range(divisor, roi + 1, divisor):
        if _n_windows(size, w, overlap) <= target:
            return w
    return roi


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a plain state dict (``weights_only``); accepts ``{"state_dict": ...}``/``{"model": ...}`` wrappers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    sd = torch.load(str(path), map_location=map_location, weights_only=True)
    for key in ("state_dict", "model", "network"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


# ----------------------------------------------------------------------------------------------
# the inferer
# ----------------------------------------------------------------------------------------------
class CascadeInferer(Inferer):
    """Coarse ROI -> fine segmentation of a whole CT, returning labels on the input grid.

    Args:
        coarse_network: coarse ROI network (module, e.g. ``abdoseg.networks.PocketUNet``); its
            output is reduced to foreground by ``argmax > 0`` (or ``sigmoid > 0.5`` for 1 channel).
            ``None``: no coarse stage, the fine net runs on the whole CT (single-stage baseline).
        coarse_checkpoint: state dict file for ``coarse_network``, loaded on first use; ``None``
            keeps the module's current weights.
        coarse_spacing_mm: coarse resampling target (X, Y, Z) mm.
        coarse_roi_size: coarse sliding-window size (voxels).
        fine_spacing_mm: fine resampling target (X, Y, Z) mm.
        margin_mm: margin around the coarse foreground box (mm).
        roi_size: fine patch size (voxels at ``fine_spacing_mm``); sliding window only when the
            resampled ROI is larger along some axis.
        sw_overlap: sliding-window overlap (0..1).
        sw_batch_size: windows per forward pass.
        mode: ``"labels"`` -> (1, 1, X, Y, Z) uint8; ``"probs"`` -> (1, C, X, Y, Z) float32 softmax
            (background = 1 outside the ROI; memory heavy, for small volumes / analysis).
        hu_window: HU clip window before scaling to [0, 1].
        amp: float16 autocast when the device is CUDA.
        device: inference device; default: the fine network's device.
        num_classes: fine output channels.
    """

    _scores_are_probs: bool = False  # fine_scores returns logits (False) or probabilities (True)

    def __init__(
        self,
        coarse_network: torch.nn.Module | None,
        coarse_checkpoint: str | os.PathLike | None = None,
        coarse_spacing_mm: Sequence[float] = COARSE_SPACING_MM,
        coarse_roi_size: Sequence[int] = COARSE_ROI_SIZE,
        fine_spacing_mm: Sequence[float] = FINE_SPACING_MM,
        margin_mm: float = ROI_MARGIN_MM,
        roi_size: Sequence[int] = FINE_ROI_SIZE,
        sw_overlap: float = 0.25,
        sw_batch_size: int = 1,
        mode: str = "labels",
        hu_window: Sequence[float] = HU_WINDOW,
        amp: bool = True,
        device: str | torch.device | None = None,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        if mode not in ("labels", "probs"):
            raise ValueError(f"mode must be 'labels' or 'probs', got {mode!r}")
        self.coarse_network = coarse_network
        self.coarse_checkpoint = None if coarse_checkpoint in (None, "") else str(coarse_checkpoint)
        self._coarse_loaded = self.coarse_checkpoint is None
        self.coarse_spacing_mm = tuple(float(v) for v in coarse_spacing_mm)
        self.coarse_roi_size = tuple(int(v) for v in coarse_roi_size)
        self.fine_spacing_mm = tuple(float(v) for v in fine_spacing_mm)
        self.margin_mm = float(margin_mm)
        self.roi_size = tuple(int(v) for v in roi_size)
        self.sw_overlap = float(sw_overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.mode = mode
        self.hu_window = tuple(float(v) for v in hu_window)
        self.amp = bool(amp)
        self.device = None if device is None else torch.device(device)
        self.num_classes = int(num_classes)
        self.last_roi: dict | None = None  # ROI of the last call (original voxel indices), for logs/tests

    # -- helpers ------------------------------------------------------------------------------
    def _device_for(self, network: Any) -> torch.device:
        if self.device is not None:
            return self.device
        try:
            return next(network.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    def _autocast(self, device: torch.device):
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _prepare_coarse(self, device: torch.device) -> torch.nn.Module:
        net = self.coarse_network
        if not self._coarse_loaded:
            net.load_state_dict(load_state_dict_file(self.coarse_checkpoint, map_location="cpu"))
            self._coarse_loaded = True
        net.to(device).eval()
        return net

    def _predict(self, network: Any, x: torch.Tensor, roi_size: Sequence[int], device: torch.device) -> torch.Tensor:
        """Logits (1, C, *x.shape[2:]) of ``network``: one padded pass if ``x`` fits ``roi_size``,
        else sliding window with constant blending."""
        spatial = tuple(x.shape[2:])
        with self._autocast(device):
            if all(s <= r for s, r in zip(spatial, roi_size)):
                div = _network_divisor(network)
                padded = [int(math.ceil(s / d) * d) for s, d in zip(spatial, div)]
                if all(p == d for p, d in zip(padded, div)):  # 1x1x1 bottleneck: instance norm needs > 1 voxel
                    padded[0] *= 2
                pad = []
                for s, p in reversed(list(zip(spatial, padded))):
                    pad += [0, p - s]
                xp = F.pad(x, pad) if any(pad) else x
                out = _first_output(network(xp))
                out = out[:, :, : spatial[0], : spatial[1], : spatial[2]]
            else:
                # windows never larger than the (divisor-padded) input along an axis: a thin axis
                # is not padded up to the full window
                div = _network_divisor(network)
                window_size = [_tight_window(s, int(r), d, self.sw_overlap) for r, s, d in zip(roi_size, spatial, div)]
                out = sliding_window_inference(
                    x, roi_size=window_size, sw_batch_size=self.sw_batch_size,
                    predictor=lambda t: _first_output(network(t)), overlap=self.sw_overlap,
                    mode="constant",
                )
        return torch.as_tensor(out).float()

    def fine_scores(self, x: torch.Tensor, network: Any, device: torch.device) -> torch.Tensor:
        """Class scores (1, C, *spatial) of the fine stage on the windowed, resampled crop ``x``.
        Scores are logits here; subclasses may return probabilities (argmax is what matters)."""
        return self._predict(network, x, self.roi_size, device)

    # -- main -----------------------------------------------------------------------------------
    def coarse_roi(self, ras_hu: torch.Tensor, spacing_mm: Sequence[float], device: torch.device) -> tuple[slice, slice, slice]:
        """ROI slices (RAS voxel indices of ``ras_hu`` (1, 1, X, Y, Z)) from the coarse network."""
        from abdoseg.roi import EmptyRoiWarning, RoiBox, roi_from_mask, scale_box

        shape = tuple(ras_hu.shape[2:])
        if self.coarse_network is None:
            return RoiBox.whole(shape).slices  # type: ignore[return-value]
        cshape = resampled_shape(shape, spacing_mm, self.coarse_spacing_mm)
        coarse_in = resample_volume(window(ras_hu.to(device), self.hu_window), cshape)
        net = self._prepare_coarse(device)
        with torch.no_grad():
            logits = self._predict(net, coarse_in, self.coarse_roi_size, device)
        if logits.shape[1] == 1:
            fg = torch.sigmoid(logits[0, 0]) > 0.5
        else:
            fg = logits[0].argmax(0) > 0
        mask = fg.cpu().numpy()
        del coarse_in, logits, fg
        if not mask.any():
            warnings.warn("coarse network found no foreground; segmenting the whole volume", EmptyRoiWarning,
                          stacklevel=3)
            return RoiBox.whole(shape).slices  # type: ignore[return-value]
        csp = tuple(n * s / c for n, s, c in zip(shape, spacing_mm, cshape))  # actual coarse spacing
        box = scale_box(roi_from_mask(mask, csp, self.margin_mm), shape)
        return box.slices  # type: ignore[return-value]

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Segment ``inputs`` (1, 1, X, Y, Z) HU with its affine (MetaTensor; plain tensor -> 1 mm
        identity, with a warning). Returns (1, 1, X, Y, Z) uint8 labels, or (1, C, X, Y, Z) float32
        probabilities in ``mode="probs"``, as a MetaTensor carrying the input's meta, on the
        input's device."""
        if inputs.ndim != 5 or inputs.shape[0] != 1 or inputs.shape[1] != 1:
            raise ValueError(f"CascadeInferer expects (1, 1, X, Y, Z), got {tuple(inputs.shape)}")
        if isinstance(inputs, MetaTensor):
            affine = np.asarray(inputs.affine.cpu().numpy() if hasattr(inputs.affine, "cpu") else inputs.affine,
                                dtype=np.float64)
            if affine.ndim == 3:
                affine = affine[0]
        else:
            warnings.warn("CascadeInferer got a plain tensor: assuming 1 mm RAS voxels", stacklevel=2)
            affine = np.eye(4)
        device = self._device_for(network)
        spacing = affine_spacing_mm(affine)
        ornt = ras_orientation(affine)
        ras_spacing = [0.0, 0.0, 0.0]
        for i in range(3):
            ras_spacing[int(ornt[i, 0])] = spacing[i]
        hu = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        ras = to_ras(hu, ornt)
        ras_shape = tuple(ras.shape[2:])

        with torch.no_grad():
            roi = self.coarse_roi(ras, ras_spacing, device)
            crop = ras[:, :, roi[0], roi[1], roi[2]].to(device)
            crop_shape = tuple(crop.shape[2:])
            fshape = resampled_shape(crop_shape, ras_spacing, self.fine_spacing_mm)
            x = resample_volume(window(crop, self.hu_window), fshape)
            del crop
            scores = self.fine_scores(x, network, device)[0]  # (C, fx, fy, fz)
            del x
            if self.mode == "labels":
                full = torch.zeros(ras_shape, dtype=torch.uint8, device=device)
                full[roi] = resample_scores_to_labels(scores, crop_shape)
                result = from_ras(full, ornt).contiguous()[None, None]
            else:
                probs = scores if self._scores_are_probs else torch.softmax(scores.float(), 0)
                c = probs.shape[0]
                full = torch.zeros((c, *ras_shape), dtype=torch.float32, device=device)
                full[0] = 1.0
                full[(slice(None), *roi)] = resample_volume(probs[None], crop_shape)[0]
                result = from_ras(full, ornt).contiguous()[None]
            del scores
        self.last_roi = {"ras_slices": [(s.start, s.stop) for s in roi], "ras_shape": list(ras_shape)}
        result = result.to(inputs.device)
        if isinstance(inputs, MetaTensor):
            meta = {k: v for k, v in inputs.meta.items() if k != "affine"}
            result = MetaTensor(result, affine=inputs.affine, meta=meta)
        return result


class EnsembleCascadeInferer(CascadeInferer):
    """:class:`CascadeInferer` whose fine stage is several networks merged by ordered class rules
    (seed 002's CFS: organs from the organ model, lesion from the averaged tumor models).

    Args:
        members: fine networks, each ``{"network": module | None, "checkpoint": path | None}``;
            ``network: None`` means the network passed to ``__call__`` (the bundle's
            ``network_def`` + ``models/model.pt``, which is what MONAI Label loads).
        rules: ordered ``{"members": [member indices], "classes": [class ids]}``. Each rule
            averages the softmax of its members; the first rule gives the base prediction (classes
            outside its list become background); every later rule overwrites the voxels where its
            own argmax falls in its ``classes``. E.g. CFS:
            ``[{"members": [0], "classes": [1..13]}, {"members": [1, 2], "classes": [14]}]``.
        **kwargs: :class:`CascadeInferer` arguments.
    """

    def __init__(self, coarse_network: torch.nn.Module, members: Sequence[Mapping[str, Any]],
                 rules: Sequence[Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__(coarse_network, **kwargs)
        if not members or not rules:
            raise ValueError("EnsembleCascadeInferer needs at least one member and one rule")
        self.members = [dict(m) for m in members]
        for m in self.members:
            m.setdefault("network", None)
            m.setdefault("checkpoint", None)
            m["_loaded"] = m["checkpoint"] in (None, "")
        self.rules = []
        for r in rules:
            idx = [int(i) for i in r["members"]]
            if not idx or any(i < 0 or i >= len(self.members) for i in idx):
                raise ValueError(f"rule {r} refers to members outside 0..{len(self.members) - 1}")
            self.rules.append({"members": idx, "classes": [int(c) for c in r["classes"]]})
        self._scores_are_probs = True

    def _member_net(self, i: int, network: Any, device: torch.device) -> Any:
        m = self.members[i]
        if m["network"] is None:
            if network is None:
                raise ValueError(f"ensemble member {i} uses the call's network, but none was given")
            return network
        net = m["network"]
        if not m["_loaded"]:
            net.load_state_dict(load_state_dict_file(m["checkpoint"], map_location="cpu"))
            m["_loaded"] = True
        net.to(device).eval()
        return net

    def fine_scores(self, x: torch.Tensor, network: Any, device: torch.device) -> torch.Tensor:
        cache: dict[int, torch.Tensor] = {}

        def probs(i: int) -> torch.Tensor:
            if i not in cache:
                cache[i] = torch.softmax(self._predict(self._member_net(i, network, device), x, self.roi_size, device), 1)
            return cache[i]

        merged: torch.Tensor | None = None
        for k, rule in enumerate(self.rules):
            p = torch.stack([probs(i) for i in rule["members"]]).mean(0)  # (1, C, ...)
            lab = p.argmax(1, keepdim=True)
            inside = torch.isin(lab, torch.tensor(rule["classes"], device=lab.device))
            if k == 0:
                background = torch.zeros_like(p)
                background[:, 0] = 1.0
                merged = torch.where(inside | (lab == 0), p, background)
            else:
                merged = torch.where(inside, p, merged)
        assert merged is not None
        return merged


# ----------------------------------------------------------------------------------------------
# input checks and the batch segment function
# ----------------------------------------------------------------------------------------------
class CascadeSegmenter:
    """``segment(item) -> (uint8 mask (X, Y, Z), affine 4x4)`` for :func:`abdoseg.batch.run_batch`,
    composed exactly like MONAI Label does it: ``preprocessing`` -> ``inferer(network)`` ->
    ``postprocessing``.

    ``preprocessing`` must load ``item["image"]`` (LoadImaged, NibabelReader keeps the file's
    affine) and leave it unresampled; any loader error becomes an :class:`InputError` naming the
    file. The returned affine is the file's own (``original_affine``), so the mask overlays the
    input exactly.
    """

    def __init__(self, preprocessing: Callable, inferer: Callable, network: torch.nn.Module,
                 postprocessing: Callable | None = None, image_key: str = "image", pred_key: str = "pred") -> None:
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.postprocessing = postprocessing
        self.image_key = image_key
        self.pred_key = pred_key

    def __call__(self, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        path = str(item[self.image_key])
        try:
            data = self.preprocessing({self.image_key: path})
        except InputError:
            raise
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
            cause: BaseException = exc
            while cause.__cause__ is not None:
                if isinstance(cause.__cause__, InputError):
                    raise cause.__cause__ from None
                cause = cause.__cause__
            raise InputError(path, f"could not be read as a CT image ({type(cause).__name__}: {cause})") from exc
        img = data[self.image_key]
        if not isinstance(img, MetaTensor) or img.ndim != 4:
            raise InputError(path, f"preprocessing must yield a channel-first (1, X, Y, Z) MetaTensor, got {tuple(img.shape)}")
        self.network.eval()
        with torch.no_grad():
            pred = self.inferer(img[None], self.network)
        data[self.pred_key] = pred[0]
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        mask = data[self.pred_key]
        mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if mask.ndim == 4:
            mask = mask[0]
        meta = img.meta
        affine = meta.get("original_affine", img.affine)
        affine = np.asarray(affine.cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        if mask.shape != tuple(img.shape[1:]):
            raise RuntimeError(f"{path}: mask shape {mask.shape} != image shape {tuple(img.shape[1:])}")
        return mask.astype(np.uint8, copy=False), affine


def list_images(input_dir: str | os.PathLike | None = None, datalist: str | os.PathLike | None = None,
                data_list_key: str = "validation", base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Inference items ``[{"image": path}, ...]`` from a folder (``*.nii.gz``/``*.nii``, sorted) or a
    datalist JSON (``data_list_key``, paths relative to ``base_dir`` or the datalist's folder).
    Every file of the folder is listed (a non-image file then fails with a clear error)."""
    if (input_dir in (None, "")) == (datalist in (None, "")):
        raise ValueError("give exactly one of input_dir or datalist")
    if input_dir not in (None, ""):
        folder = Path(input_dir)
        if not folder.is_dir():
            raise InputError(folder, "input folder not found")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return [{"image": str(p)} for p in files]
    from monai.data import load_decathlon_datalist

    dl = Path(datalist)  # type: ignore[arg-type]
    if not dl.is_file():
        raise InputError(dl, "datalist not found")
    items = load_decathlon_datalist(str(dl), True, data_list_key, base_dir=str(base_dir or dl.parent))
    return [{"image": str(it["image"])} for it in items]


# ----------------------------------------------------------------------------------------------
# training-time ROI crop (matches the inference crop)
# ----------------------------------------------------------------------------------------------
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

    def __init__(self, keys: KeysCollection, source_keys: KeysCollection = "label", margin_mm: float = ROI_MARGIN_MM,
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


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
_DEEP_SUPERVISION_KEYS = ("deep_supervision_heads.", "super_head.")


def inference_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``network`` for the inference ``network_def`` (``deep_supervision: false``):
    DDP/DataParallel ``module`` unwrapped, DynUNet deep-supervision heads dropped (they are only
    used by the training loss, and TorchScript export fails with them)."""
    net = getattr(network, "module", network)
    return {k: v for k, v in net.state_dict().items() if not any(s in k for s in _DEEP_SUPERVISION_KEYS)}


class InferenceWeights:
    """``save_dict`` entry for MONAI ``CheckpointSaver``: saves :func:`inference_state_dict` (a plain
    state dict that the inference config's network loads strictly)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        return inference_state_dict(self.network)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        net = getattr(self.network, "module", self.network)
        net.load_state_dict(state, strict=False)
