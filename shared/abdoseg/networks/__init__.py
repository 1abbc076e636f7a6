"""Networks: :class:`PocketUNet` (constant-width MONAI DynUNet), :class:`MSFFUNet` (seed 000's
residual U-Net with multi-scale feature fusion) and complexity helpers."""

from abdoseg.networks.msff_unet import (
    SEED000_COARSE_CHANNELS,
    SEED000_FINE_CHANNELS,
    MSFFBlock,
    MSFFUNet,
    ProjectionResBlock,
)
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
    "MSFFUNet",
    "MSFFBlock",
    "ProjectionResBlock",
    "SEED000_COARSE_CHANNELS",
    "SEED000_FINE_CHANNELS",
    "doubling_unet",
    "count_parameters",
    "count_flops",
    "model_complexity",
    "DEFAULT_KERNEL_SIZE",
    "DEFAULT_STRIDES",
]
