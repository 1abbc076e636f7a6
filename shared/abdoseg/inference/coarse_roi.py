"""The coarse stage of the cascade as one MONAI transform: find the abdomen, crop to it.

:class:`CoarseRoiCropd` runs on the oriented CT (after ``Orientationd``) inside the fine bundle's
``preprocessing``:

1. the coarse bundle's preprocessing (``Spacingd`` to 6 mm, ``ScaleIntensityRanged``) on a
   metadata-free view of the CT (no copy; the CT itself is untouched),
2. the coarse network through a MONAI inferer (``SlidingWindowInferer``, as in the coarse bundle),
3. foreground = argmax > 0; ROI = bounding box of its largest component + ``margin_mm``, mapped to
   the CT's voxel grid (:func:`abdoseg.inference.roi.coarse_box_to_original`, the same function the coarse
   bundle's ``CoarseRoiBoxd`` uses),
4. MONAI ``Crop`` of the CT to that box (traced, so ``Invertd`` pastes the mask back).

No foreground -> the whole volume, with an :class:`~abdoseg.inference.roi.EmptyRoiWarning` naming the file.
``enabled=False`` (the single-stage baseline) crops nothing but still records the (empty) crop,
so the transform trace has the same shape either way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Crop, InvertibleTransform, MapTransform

from abdoseg.networks.checkpoints import load_weights
from abdoseg.inference.roi import EmptyRoiWarning, RoiBox, coarse_box_to_original

__all__ = ["CoarseRoiCropd"]


class CoarseRoiCropd(MapTransform, InvertibleTransform):
    """Crop ``keys`` to the abdominal ROI found by the coarse network on ``keys[0]``.

    Args:
        keys: channel-first (1, X, Y, Z) MetaTensors on the same grid; the first is the CT in HU.
        network: the coarse network (``coarse_network_def``).
        checkpoint: its state dict file, loaded strictly when the transform is built (one clear
            error naming the file if it does not fit; a file that does not exist yet is loaded at
            first use); ``None`` keeps the network's weights.
        preprocessing: the coarse bundle's intensity/spacing chain as dictionary transforms on
            key ``"image"`` (e.g. ``Spacingd`` + ``ScaleIntensityRanged``).
        inferer: MONAI inferer for the coarse network (e.g. ``SlidingWindowInferer``).
        margin_mm: margin around the foreground box (mm, per side).
        min_component_fraction: also keep components at least this fraction of the largest.
        device: device of the coarse network; default: the network's.
        enabled: ``False`` -> no coarse network run, no crop (single-stage baseline).
        roi_key: if given, ``data[roi_key]`` receives the box JSON (:meth:`RoiBox.to_json`, voxel
            indices of the oriented CT).
    """

    def __init__(self, keys: KeysCollection, network: torch.nn.Module | None, checkpoint: str | os.PathLike | None,
                 preprocessing: Callable[[dict], dict], inferer: Inferer, margin_mm: float | Sequence[float] = 20.0,
                 min_component_fraction: float | None = None, device: str | torch.device | None = None,
                 enabled: bool = True, roi_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.network = network
        self.checkpoint = None if checkpoint in (None, "") else str(checkpoint)
        self._loaded = network is None or self.checkpoint is None
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.margin_mm = margin_mm
        self.min_component_fraction = min_component_fraction
        self.device = None if device is None else torch.device(device)
        self.enabled = bool(enabled) and network is not None
        self.roi_key = roi_key
        self.cropper = Crop()
        if not self._loaded and os.path.isfile(self.checkpoint):  # type: ignore[arg-type]
            self._network()  # a checkpoint that does not fit fails here, at build time, not once per CT

    def _network(self) -> tuple[torch.nn.Module, torch.device]:
        assert self.network is not None
        if not self._loaded:
            load_weights(self.network, self.checkpoint, what="coarse network (coarse_network_def)")  # type: ignore[arg-type]
            self._loaded = True
        device = self.device or next(self.network.parameters()).device
        return self.network.to(device).eval(), device

    def coarse_input(self, image: MetaTensor) -> MetaTensor:
        """Step 1: the coarse bundle's preprocessing of a metadata-free view of ``image`` (no copy)."""
        view = MetaTensor(image.as_tensor(), affine=image.affine.clone(),
                          meta={"filename_or_obj": image.meta.get("filename_or_obj", "")})
        return self.preprocessing({"image": view})["image"]

    def coarse_mask(self, coarse: MetaTensor) -> np.ndarray:
        """Step 2: foreground (x, y, z) bool on the coarse grid (argmax > 0, or sigmoid > 0.5)."""
        network, device = self._network()
        with torch.no_grad():
            logits = self.inferer(coarse.as_tensor()[None].to(device), network)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        logits = logits[0]
        fg = torch.sigmoid(logits[0]) > 0.5 if logits.shape[0] == 1 else logits.argmax(0) > 0
        return fg.cpu().numpy()

    def box_from_mask(self, mask: np.ndarray, coarse_affine: Any, image: MetaTensor) -> RoiBox:
        """Step 3: largest component + ``margin_mm`` on the coarse grid, mapped to ``image``'s grid."""
        shape = tuple(int(s) for s in image.shape[1:])
        src = image.meta.get("filename_or_obj", "<input>")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyRoiWarning)
            box, _ = coarse_box_to_original(mask, np.asarray(coarse_affine, dtype=np.float64),
                                            np.asarray(image.affine.cpu(), dtype=np.float64), shape,
                                            self.margin_mm, self.min_component_fraction)
        for w in caught:
            warnings.warn(f"{src}: coarse network found no foreground; segmenting the whole volume ({w.message})",
                          EmptyRoiWarning, stacklevel=3)
        return box

    def roi_box(self, image: MetaTensor) -> RoiBox:
        """Steps 1-3: the ROI on ``image``'s voxel grid (the whole volume when disabled)."""
        if not self.enabled:
            return RoiBox.whole(tuple(int(s) for s in image.shape[1:]))
        coarse = self.coarse_input(image)
        return self.box_from_mask(self.coarse_mask(coarse), coarse.affine.cpu(), image)

    def crop(self, data: Mapping[Hashable, Any], box: RoiBox) -> dict:
        """Step 4: MONAI ``Crop`` of every key to ``box`` (traced for the inverse)."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            d[key] = self.cropper(d[key], box.slices)
        if self.roi_key is not None:
            d[self.roi_key] = box.to_json()
        return d

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        keys = list(self.key_iterator(dict(data)))
        if not keys:
            return dict(data)
        image = data[keys[0]]
        if not isinstance(image, MetaTensor) or image.ndim != 4:
            raise TypeError("CoarseRoiCropd needs a channel-first (1, X, Y, Z) MetaTensor with its affine")
        return self.crop(data, self.roi_box(image))

    def inverse(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d
