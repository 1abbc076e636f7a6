"""MONAI dictionary transforms for partial-label training."""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .labels import NUM_CLASSES

__all__ = ["AnnotatedClassesd", "annotated_mask"]


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
    :class:`abdoseg.losses.MarginalExclusionLoss` takes.

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
