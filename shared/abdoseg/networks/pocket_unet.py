"""Pocket U-Net (seed 001): a U-Net whose every scale has the same number of channels.

Built on MONAI :class:`monai.networks.nets.DynUNet` with ``filters = [channels] * n_stages``:
the encoder/decoder blocks, anisotropic strides, instance norm, deep supervision heads and
the residual block (``res_block=True`` -> ``UnetResBlock``, whose skip path carries a 1x1x1
conv + norm whenever the block changes channels or stride, as in seed 000) are all MONAI's.

Also: :func:`count_parameters`, :func:`count_flops` and :func:`model_complexity` (FLOPs via
``torch.utils.flop_counter.FlopCounterMode``), used to compare the configurations the
project uses with seed 001's nets and with a standard doubling U-Net of the same depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet

__all__ = [
    "PocketUNet",
    "doubling_unet",
    "count_parameters",
    "count_flops",
    "model_complexity",
    "DEFAULT_KERNEL_SIZE",
    "DEFAULT_STRIDES",
]

#: Default depth: 5 stages, 3x3x3 kernels, isotropic stride 2 after the first stage.
DEFAULT_KERNEL_SIZE: list[list[int]] = [[3, 3, 3]] * 5
DEFAULT_STRIDES: list[list[int]] = [[1, 1, 1]] + [[2, 2, 2]] * 4


def _as_lists(seq: Sequence[Sequence[int] | int], spatial_dims: int, name: str) -> list[list[int]]:
    out: list[list[int]] = []
    for item in seq:
        if isinstance(item, int):
            out.append([int(item)] * spatial_dims)
        else:
            item = [int(v) for v in item]
            if len(item) != spatial_dims:
                raise ValueError(f"{name}: each entry needs {spatial_dims} values, got {item}")
            out.append(item)
    return out


class PocketUNet(DynUNet):
    """DynUNet with a constant channel count ``channels`` at every stage.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for CT).
        out_channels: output classes (logits).
        channels: feature channels at every stage (the "pocket" width).
        kernel_size: per stage kernel size, e.g. ``[[3,3,3]] * 5`` (n_stages entries).
        strides: per stage stride, first usually ``[1,1,1]``; anisotropic allowed, e.g.
            ``[2,2,1]`` (X, Y, Z order) to keep thick-slice z resolution.
        deep_supervision: training-mode forward returns ``(B, 1 + deep_supr_num, C, *spatial)``
            (DynUNet's stacked heads, upsampled to the input size); eval mode returns logits.
        deep_supr_num: number of extra supervision heads (clamped to ``n_stages - 2`` when
            deep supervision is off, so shallow nets accept the default).
        res_block: use MONAI ``UnetResBlock`` (residual, 1x1x1 conv on the skip path).
        dropout: optional dropout passed to DynUNet.

    Shapes: input ``(B, in_channels, X, Y, Z)``; every spatial size must be divisible by the
    product of the strides along that axis. Output logits ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 15,
        channels: int = 32,
        kernel_size: Sequence[Sequence[int] | int] | None = None,
        strides: Sequence[Sequence[int] | int] | None = None,
        deep_supervision: bool = False,
        deep_supr_num: int = 2,
        res_block: bool = False,
        dropout: float | None = None,
    ) -> None:
        kernel = _as_lists(kernel_size if kernel_size is not None else DEFAULT_KERNEL_SIZE, spatial_dims, "kernel_size")
        stride = _as_lists(strides if strides is not None else DEFAULT_STRIDES, spatial_dims, "strides")
        if len(kernel) != len(stride):
            raise ValueError(f"kernel_size has {len(kernel)} stages but strides has {len(stride)}")
        if len(kernel) < 3:
            raise ValueError(f"PocketUNet needs at least 3 stages (DynUNet), got {len(kernel)}")
        if int(channels) < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        n_up = len(kernel) - 1
        if not deep_supervision:
            deep_supr_num = max(1, min(int(deep_supr_num), n_up - 1))
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel,
            strides=stride,
            upsample_kernel_size=stride[1:],
            filters=[int(channels)] * len(kernel),
            dropout=dropout,
            norm_name=("INSTANCE", {"affine": True}),
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        self.channels = int(channels)
        self.n_stages = len(kernel)
        #: required divisor of each spatial input size (product of the strides per axis)
        self.divisor = [math.prod(s[d] for s in stride) for d in range(spatial_dims)]


def doubling_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 15,
    base_channels: int = 32,
    max_channels: int = 320,
    kernel_size: Sequence[Sequence[int] | int] | None = None,
    strides: Sequence[Sequence[int] | int] | None = None,
    res_block: bool = False,
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
) -> DynUNet:
    """The standard nnU-Net-style doubling U-Net (filters ``base_channels * 2**level`` capped at
    ``max_channels``: 32, 64, 128, 256, 320, 320...), for parameter/FLOP comparisons with
    :class:`PocketUNet` and as seed 003's Swift nnU-Net (24 base features, 4 stages) or seed
    004's 3D U-Net. ``deep_supervision``/``deep_supr_num`` as ``DynUNet`` (training output
    ``(B, 1 + deep_supr_num, C, *S)``; an inference config sets it False, the saved inference
    weights drop the extra heads)."""
    kernel = _as_lists(kernel_size if kernel_size is not None else DEFAULT_KERNEL_SIZE, spatial_dims, "kernel_size")
    stride = _as_lists(strides if strides is not None else DEFAULT_STRIDES, spatial_dims, "strides")
    filters = [min(base_channels * 2**i, max_channels) for i in range(len(kernel))]
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        strides=stride,
        upsample_kernel_size=stride[1:],
        filters=filters,
        norm_name=("INSTANCE", {"affine": True}),
        res_block=res_block,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def count_flops(model: torch.nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs of one eval-mode forward pass on a zero tensor of shape ``input_size``
    (``(B, C, X, Y, Z)``), counted by ``torch.utils.flop_counter.FlopCounterMode``
    (a multiply-add counts as 2 FLOPs; convolutions and matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(tuple(int(s) for s in input_size), dtype=param.dtype, device=param.device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_complexity(model: torch.nn.Module, input_size: Sequence[int]) -> dict[str, float]:
    """``{"params": int, "params_M": float, "flops": int, "gflops": float}`` for ``input_size``."""
    params = count_parameters(model)
    flops = count_flops(model, input_size)
    return {"params": params, "params_M": params / 1e6, "flops": flops, "gflops": flops / 1e9}
