"""CT preprocessing constants and MONAI transform builders shared by the coarse and fine bundles.

Intensity: clip HU to :data:`HU_WINDOW` = [-325, 325] (seed 004's window; it spans fat to
contrast-enhanced vessels and organs) and scale linearly to [0, 1]. No per-dataset z-score: the
window is fixed so that a bundle needs no dataset statistics.

Coarse (ROI) network input: the CT reoriented to RAS and resampled to
:data:`COARSE_SPACING_MM` = 6 mm isotropic (see ``bundles/coarse_roi/docs/README.md`` for the
measurements behind the choice: at 4 mm the 16-channel coarse net took 8.0 s of CPU time on a
512x512x300 CT at 0.8x0.8x2.5 mm, at 6 mm 0.84 s). That CT becomes 69x69x126 voxels. The ROI box margin defaults to :data:`ROI_MARGIN_MM` = 20 mm (seed 002).

Array order is NIfTI voxel order (X, Y, Z); spacings are (X, Y, Z) in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: HU clip window (low, high) applied before scaling to :data:`INTENSITY_RANGE`.
HU_WINDOW: tuple[float, float] = (-325.0, 325.0)
#: Network input range after the window.
INTENSITY_RANGE: tuple[float, float] = (0.0, 1.0)
#: Orientation every network sees.
AXCODES: str = "RAS"
#: Coarse ROI net: resampling target (X, Y, Z) in mm.
COARSE_SPACING_MM: tuple[float, float, float] = (6.0, 6.0, 6.0)
#: Coarse ROI net: sliding-window size (voxels at COARSE_SPACING_MM: 480 x 480 x 576 mm).
COARSE_ROI_SIZE: tuple[int, int, int] = (80, 80, 96)
#: Coarse ROI net: every spatial size must be a multiple of this (4 stride-2 levels).
COARSE_DIVISOR: int = 16
#: Coarse ROI net: training patch (voxels at COARSE_SPACING_MM: 288 mm cube).
COARSE_PATCH_SIZE: tuple[int, int, int] = (48, 48, 48)
#: Coarse ROI net: PocketUNet arguments (2 classes: background, any foreground class 1..14).
COARSE_NETWORK_KWARGS: dict = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": 8,
    "kernel_size": [[3, 3, 3]] * 5, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
    "deep_supervision": False, "res_block": False,
}
#: Margin (mm) added around the coarse foreground box.
ROI_MARGIN_MM: float = 20.0


def window_hu(array: Any, hu_window: Sequence[float] = HU_WINDOW) -> Any:
    """Clip a HU array (numpy or torch) to ``hu_window`` and scale to [0, 1] (float32)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    try:
        import torch

        if isinstance(array, torch.Tensor):
            return ((array.float().clamp(lo, hi) - lo) / (hi - lo)).float()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    import numpy as np

    return ((np.clip(np.asarray(array, dtype=np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def intensity_transform(keys: str | Sequence[str] = "image", hu_window: Sequence[float] = HU_WINDOW):
    """MONAI ``ScaleIntensityRanged`` implementing :func:`window_hu`."""
    from monai.transforms import ScaleIntensityRanged

    return ScaleIntensityRanged(
        keys=keys, a_min=float(hu_window[0]), a_max=float(hu_window[1]),
        b_min=INTENSITY_RANGE[0], b_max=INTENSITY_RANGE[1], clip=True,
    )


def coarse_transforms(image_key: str = "image", label_key: str | None = None, load: bool = True,
                      spacing_mm: Sequence[float] = COARSE_SPACING_MM) -> list:
    """Deterministic coarse-net preprocessing as a list of MONAI dictionary transforms:
    (LoadImaged), EnsureChannelFirstd, Orientationd(RAS), Spacingd(spacing_mm; bilinear image,
    nearest label), window, and, for a label, foreground-as-one (label > 0 -> 1).

    The same steps are written out in ``bundles/coarse_roi/configs/*.json``; a test checks both
    give the same tensors.
    """
    from monai.transforms import (AsDiscreted, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd,
                                  Spacingd)

    keys = [image_key] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    out: list = []
    if load:
        out.append(LoadImaged(keys=keys, image_only=False))
    out += [
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=AXCODES),
        Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing_mm), mode=modes),
        intensity_transform(image_key),
    ]
    if label_key:
        out.append(AsDiscreted(keys=label_key, threshold=0.5))
    out.append(EnsureTyped(keys=keys))
    return out
