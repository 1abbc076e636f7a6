"""Networks: :class:`PocketUNet` (constant-width MONAI DynUNet) and complexity helpers."""

from abdoseg.networks.pocket_unet import (
    DEFAULT_KERNEL_SIZE,
    DEFAULT_STRIDES,
    PocketUNet,
    count_flops,
    count_parameters,
    doubling_unet,
    model_complexity,
)

__all__ = [
    "PocketUNet",
    "doubling_unet",
    "count_parameters",
    "count_flops",
    "model_complexity",
    "DEFAULT_KERNEL_SIZE",
    "DEFAULT_STRIDES",
]
