"""Seed 000's network: a residual U-Net with multi-scale feature fusion (MSFF) on the skips.

Seed 000 ("Combine synergetic approach with multi-scale feature fusion for Boosting Abdominal
Multi-Organ and Pan-Cancer Segmentation", FLARE23) uses one U-shaped network for both stages,
coarse with channels ``[8, 16, 32, 64, 128]`` and fine with ``[16, 32, 64, 128, 256]``, both on a
160x160x160 resized input. What its text fixes, and how it is built here:

* residual blocks whose skip path carries a 1x1x1 convolution (its Fig. 2):
  :class:`ProjectionResBlock` = ``Conv-IN-Drop-ReLU -> Conv-IN`` plus ``Conv1x1x1-IN`` on the
  skip, summed and passed through ReLU. Every residual block of the encoder *and* the decoder has
  the 1x1x1 skip conv (MONAI's ``UnetResBlock`` only adds it when channels or stride change);
* the "mixed conv block" is used twice per encoder level and once per decoder level;
* instance norm, Conv-IN-Drop-ReLU ordering (MONAI ``Convolution`` with ``adn_ordering="NDA"``),
  He-normal initialisation, a final 1x1x1 convolution; the output is *logits* -- the paper's
  sigmoid is applied by the loss (:class:`abdoseg.training.losses.SigmoidDiceBCELoss`) and the decoder
  (:func:`abdoseg.training.losses.sigmoid_logits_to_labels`), as usual in MONAI;
* MSFF: "a multi-scale feature fusion module that incorporates cross-layer connectivity", used
  "to enhance the important features in the encoding stage", citing UNet++ (nested cross-layer
  skips) and FFA-Net (feature attention). The paper's Fig. 1 holds the block's wiring; its text
  does not. :class:`MSFFBlock` is this project's reading of that text: the skip feature of
  level ``i`` is fused with the encoder features of the ``fusion_span`` neighbouring levels on
  each side (cross-layer), each resized to level ``i`` (finer levels by area averaging, coarser
  by trilinear interpolation) and projected by a 1x1x1 Conv-IN-ReLU to level ``i``'s width; the
  concatenation is mixed by a 3x3x3 Conv-IN-ReLU, weighted by FFA-Net's channel attention and
  pixel attention, and added to the original skip feature (residual, so an untrained block
  starts close to the plain U-Net). ``msff=False`` gives the plain residual U-Net (ablation).

Down-sampling: the first residual block of each encoder level below the top has stride 2 (its
1x1x1 skip conv too); up-sampling: 2x2x2 transposed conv, concatenation with the fused skip,
one decoder residual block. The paper does not say which down/up-sampling it uses.

Parameters (``in_channels=1``, defaults otherwise; checked exactly by ``tests/test_msff_unet.py``):

=============================  ============  =============  =====================
channels                       out_channels  MSFF (span 1)  parameters
=============================  ============  =============  =====================
``[8, 16, 32, 64, 128]``       15            yes            3,098,016 (3.10 M)
``[8, 16, 32, 64, 128]``       2             yes            3,097,899
``[16, 32, 64, 128, 256]``     15            yes            12,381,469 (12.38 M)
``[16, 32, 64, 128, 256]``     15            no             10,539,407
=============================  ============  =============  =====================

The paper reports 28.82 M (coarse) and 36.32 M (refine) parameters. Its counts are not
reproduced: with the stated widths a U-Net of this shape has 3.1 M / 12.4 M, and a coarse net
with half the fine net's widths everywhere cannot have 80 % of its parameters (convolution
weights scale with the square of the widths, so a quarter is expected, as here).
FLOPs (:func:`abdoseg.networks.count_flops`, convolutions only, multiply-add = 2) on
1x1x32x32x32: 1.96 GFLOP (coarse widths) and 7.81 GFLOP (fine widths), i.e. about 245 and
976 GFLOP on the paper's 1x1x160x160x160 input (x125). The paper reports 41.54 G and 48.14 G
without saying how it counts or at which resolution its first level runs; those are not matched.

Shapes: input ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``. Any
spatial size works (a decoder feature is resized to its skip when an odd size does not divide),
sizes divisible by ``2 ** (len(channels) - 1)`` (:attr:`MSFFUNet.divisor`) avoid that resize.
TorchScript: ``torch.jit.script(MSFFUNet(...))`` works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["MSFFUNet", "MSFFBlock", "ProjectionResBlock", "SEED000_COARSE_CHANNELS", "SEED000_FINE_CHANNELS"]

#: Seed 000's coarse and fine widths.
SEED000_COARSE_CHANNELS: tuple[int, ...] = (8, 16, 32, 64, 128)
SEED000_FINE_CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)

_NORM = ("INSTANCE", {"affine": True})


def _conv_norm_act(spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                   dropout: float = 0.0, act: bool = True) -> Convolution:
    """MONAI ``Convolution``: Conv -> IN -> (Dropout) -> (ReLU) (seed 000's Conv-IN-Drop-ReLU)."""
    return Convolution(spatial_dims, cin, cout, strides=stride, kernel_size=kernel, adn_ordering="NDA",
                       act="RELU" if act else None, norm=_NORM, dropout=dropout if dropout > 0 else None,
                       bias=False)


class ProjectionResBlock(nn.Module):
    """Residual block with a 1x1x1 convolution on the skip path (seed 000, Fig. 2).

    ``out = ReLU(IN(conv3(ReLU(Drop(IN(conv3(x)))))) + IN(conv1x1x1(x)))``; the first 3x3x3
    conv and the skip conv share ``stride``.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: feature channels.
        stride: stride of the block (2 = halve every spatial size).
        dropout: dropout probability after the first conv's norm (0 = none).

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *ceil(S / stride))``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(spatial_dims, in_channels, out_channels, 3, stride, dropout, act=True)
        self.conv2 = _conv_norm_act(spatial_dims, out_channels, out_channels, 3, 1, 0.0, act=False)
        self.skip = _conv_norm_act(spatial_dims, in_channels, out_channels, 1, stride, 0.0, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class MSFFBlock(nn.Module):
    """Multi-scale feature fusion of encoder features around one level (see module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: widths of the fused encoder levels, finest first (e.g. ``[16, 32, 64]``).
        center: index in ``in_channels`` of the level being enhanced (its width and size are the
            output's).
        reduction: channel-attention bottleneck ratio (FFA-Net uses 8; at least 1 channel).

    ``forward(feats)``: ``feats`` the encoder features of those levels (finest first), shapes
    ``(B, in_channels[j], *S_j)``; returns ``(B, in_channels[center], *S_center)`` =
    ``feats[center] + PA(CA(mix(concat(project_j(resize_j(feats[j]))))))``.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], center: int, reduction: int = 8) -> None:
        super().__init__()
        chans = [int(c) for c in in_channels]
        if not 0 <= center < len(chans):
            raise ValueError(f"center {center} outside the {len(chans)} fused levels")
        c = chans[center]
        self.center = int(center)
        self.upsample_mode = "trilinear" if spatial_dims == 3 else "bilinear"
        self.project = nn.ModuleList([_conv_norm_act(spatial_dims, cj, c, 1) for cj in chans])
        self.mix = _conv_norm_act(spatial_dims, c * len(chans), c, 3)
        conv = Conv[Conv.CONV, spatial_dims]
        pool = {3: nn.AdaptiveAvgPool3d, 2: nn.AdaptiveAvgPool2d}[spatial_dims]
        hidden = max(1, c // int(reduction))
        self.channel_attention = nn.Sequential(pool(1), conv(c, hidden, 1), nn.ReLU(inplace=True), conv(hidden, c, 1),
                                               nn.Sigmoid())
        self.pixel_attention = nn.Sequential(conv(c, hidden, 1), nn.ReLU(inplace=True), conv(hidden, 1, 1), nn.Sigmoid())

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        ref = feats[self.center]
        size = ref.shape[2:]
        parts: list[torch.Tensor] = []
        for j, proj in enumerate(self.project):
            f = feats[j]
            if f.shape[2:] != size:
                if j < self.center:  # finer level: average down to the level's grid
                    f = F.interpolate(f, size=size, mode="area")
                else:  # coarser level: interpolate up
                    f = F.interpolate(f, size=size, mode=self.upsample_mode, align_corners=False)
            parts.append(proj(f))
        y = self.mix(torch.cat(parts, dim=1))
        y = y * self.channel_attention(y)
        y = y * self.pixel_attention(y)
        return ref + y


class _DecoderStage(nn.Module):
    """Transposed-conv up-sampling, concatenation with the skip, ``n_blocks`` :class:`ProjectionResBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dropout: float, n_blocks: int = 1) -> None:
        super().__init__()
        self.up = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)
        blocks = [ProjectionResBlock(spatial_dims, 2 * out_channels, out_channels, 1, dropout)]
        blocks += [ProjectionResBlock(spatial_dims, out_channels, out_channels, 1, dropout) for _ in range(n_blocks - 1)]
        self.block = nn.Sequential(*blocks)
        self.upsample_mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:  # odd sizes: stride-2 convs rounded up
            x = F.interpolate(x, size=skip.shape[2:], mode=self.upsample_mode, align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class MSFFUNet(nn.Module):
    """Seed 000's residual U-Net with MSFF skip fusion (see module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for CT).
        out_channels: output channels (logits; 15 for FLARE23 with a background channel).
        channels: width of each level, finest first (seed 000: ``[8, 16, 32, 64, 128]`` coarse,
            ``[16, 32, 64, 128, 256]`` fine); at least 2 levels.
        encoder_blocks: residual blocks per encoder level (paper: 2).
        decoder_blocks: residual blocks per decoder level (paper: 1).
        msff: fuse the skips with :class:`MSFFBlock` (False: plain residual U-Net).
        fusion_span: neighbouring encoder levels fused on each side of a skip level (1: the
            levels just above and below; ``len(channels)`` or more: all levels).
        attention_reduction: channel-attention ratio of the MSFF blocks.
        dropout: dropout probability in the residual blocks (Conv-IN-Drop-ReLU).

    Shapes: ``(B, in_channels, X, Y, Z)`` -> ``(B, out_channels, X, Y, Z)`` logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 15,
        channels: Sequence[int] = SEED000_FINE_CHANNELS,
        encoder_blocks: int = 2,
        decoder_blocks: int = 1,
        msff: bool = True,
        fusion_span: int = 1,
        attention_reduction: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(chans) < 2 or min(chans) < 1:
            raise ValueError(f"channels needs at least 2 positive widths, got {list(channels)}")
        if encoder_blocks < 1 or decoder_blocks < 1:
            raise ValueError("encoder_blocks and decoder_blocks must be >= 1")
        if fusion_span < 0:
            raise ValueError(f"fusion_span must be >= 0, got {fusion_span}")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.channels = chans
        self.msff_enabled = bool(msff)
        #: spatial sizes divisible by this avoid the decoder's resize
        self.divisor = 2 ** (len(chans) - 1)

        encoder = []
        prev = self.in_channels
        for level, c in enumerate(chans):
            blocks = [ProjectionResBlock(spatial_dims, prev, c, 1 if level == 0 else 2, dropout)]
            blocks += [ProjectionResBlock(spatial_dims, c, c, 1, dropout) for _ in range(encoder_blocks - 1)]
            encoder.append(nn.Sequential(*blocks))
            prev = c
        self.encoder = nn.ModuleList(encoder)

        n_skips = len(chans) - 1
        #: (first, last + 1) encoder levels fused by each skip's MSFF block (fusion_span 0:
        #: the level alone, i.e. attention only)
        self.fusion_ranges = [
            (max(0, i - fusion_span), min(len(chans), i + fusion_span + 1)) for i in range(n_skips)]
        self._fusion_lo = [lo for lo, _ in self.fusion_ranges]
        self._fusion_hi = [hi for _, hi in self.fusion_ranges]
        # empty when msff=False: the skips are then the encoder features themselves
        self.fusers = nn.ModuleList([MSFFBlock(spatial_dims, chans[lo:hi], i - lo, attention_reduction)
                                     for i, (lo, hi) in enumerate(self.fusion_ranges)] if msff else [])

        # coarsest skip first
        self.decoder = nn.ModuleList([_DecoderStage(spatial_dims, chans[i + 1], chans[i], dropout, decoder_blocks)
                                      for i in reversed(range(n_skips))])
        self.head = Conv[Conv.CONV, spatial_dims](chans[0], self.out_channels, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (Kaiming, fan-out, ReLU) convolution weights, zero biases (seed 000: "he" normal)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features, finest first: ``[(B, channels[l], *S / 2**l) for each level l]``."""
        feats: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        skips = feats[:-1]
        for i, fuser in enumerate(self.fusers):
            skips[i] = fuser(feats[self._fusion_lo[i]:self._fusion_hi[i]])
        y = feats[-1]
        n = len(skips)
        for k, stage in enumerate(self.decoder):
            y = stage(y, skips[n - 1 - k])
        return self.head(y)
