"""FLARE23 label map (the challenge's official ids: 1-13 organs, 14 lesion) and per-class
evaluation constants of its evaluation script ``FLARE23_DSC_NSD_Eval.py``."""

from __future__ import annotations

LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "right_kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "right_adrenal_gland",
    8: "left_adrenal_gland",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left_kidney",
    14: "lesion",
}
NUM_CLASSES: int = 15  # background + 13 organs + lesion
ORGAN_IDS: tuple[int, ...] = tuple(range(1, 14))
LESION_ID: int = 14
FOREGROUND_IDS: tuple[int, ...] = tuple(range(1, 15))

# Normalized surface Dice tolerance per class, in mm (FLARE23_DSC_NSD_Eval.py).
NSD_TOLERANCE_MM: dict[int, float] = {
    1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0,
    8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0, 14: 2.0,
}
# Tubular classes scored only on the z-slices where the ground truth has them ([z_min, z_max)).
Z_RANGE_CLASSES: tuple[int, ...] = (5, 6, 10)


def class_name(index: int) -> str:
    """Name of a FLARE23 class index, e.g. ``class_name(14) == "lesion"``."""
    return LABELS[int(index)]
