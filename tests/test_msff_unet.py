"""Seed 000's MSFFUNet: shapes, exact parameter counts, 1x1x1 skip convs in encoder and decoder,
MSFF wiring (cross-level inputs, residual), TorchScript, MONAI verify_net_in_out."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from abdoseg.networks import msff_unet
from abdoseg.networks import (
    SEED000_COARSE_CHANNELS,
    SEED000_FINE_CHANNELS,
    MSFFBlock,
    MSFFUNet,
    ProjectionResBlock,
    count_parameters,
)

TINY = dict(out_channels=3, channels=(4, 8, 16))


def test_output_shape_3d_2d_and_odd_sizes():
    torch.manual_seed(0)
    net = MSFFUNet(**TINY).eval()
    assert net.divisor == 4
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 12, 8)).shape == (2, 3, 16, 12, 8)
        assert net(torch.randn(1, 1, 9, 13, 6)).shape == (1, 3, 9, 13, 6)  # not divisible by 4
        net2d = MSFFUNet(spatial_dims=2, **TINY).eval()
        assert net2d(torch.randn(1, 1, 16, 12)).shape == (1, 3, 16, 12)


def _res_block_params(cin: int, cout: int) -> int:
    # conv3 (no bias) + IN affine, conv3 + IN, 1x1x1 skip conv + IN
    return 27 * cin * cout + 2 * cout + 27 * cout * cout + 2 * cout + cin * cout + 2 * cout


def test_projection_res_block_parameter_formula_and_skip_conv():
    blk = ProjectionResBlock(3, 5, 7, stride=2)
    assert count_parameters(blk) == _res_block_params(5, 7)
    assert tuple(blk.skip.conv.kernel_size) == (1, 1, 1) and tuple(blk.skip.conv.stride) == (2, 2, 2)
    assert blk(torch.randn(1, 5, 8, 8, 6)).shape == (1, 7, 4, 4, 3)


@pytest.mark.parametrize("channels,out,msff,expected", [
    (SEED000_COARSE_CHANNELS, 15, True, 3_098_016),
    (SEED000_COARSE_CHANNELS, 2, True, 3_097_899),
    (SEED000_FINE_CHANNELS, 15, True, 12_381_469),
    (SEED000_FINE_CHANNELS, 15, False, 10_539_407),
])
def test_parameter_counts_reported_in_docstring(channels, out, msff, expected):
    net = MSFFUNet(in_channels=1, out_channels=out, channels=channels, msff=msff)
    assert count_parameters(net) == expected
    assert f"{expected:,}" in msff_unet.__doc__  # the table in the module docstring is current


def test_plain_variant_parameters_are_encoder_plus_decoder_formula():
    c = list(SEED000_COARSE_CHANNELS)
    enc = sum(_res_block_params(cin, cout) + _res_block_params(cout, cout) for cin, cout in zip([1] + c[:-1], c))
    dec = sum(8 * c[i + 1] * c[i] + c[i] + _res_block_params(2 * c[i], c[i]) for i in range(len(c) - 1))
    head = c[0] * 15 + 15
    assert count_parameters(MSFFUNet(channels=c, msff=False)) == enc + dec + head


def test_every_residual_block_has_a_1x1x1_skip_conv_in_encoder_and_decoder():
    net = MSFFUNet(**TINY)
    enc = [m for m in net.encoder.modules() if isinstance(m, ProjectionResBlock)]
    dec = [m for m in net.decoder.modules() if isinstance(m, ProjectionResBlock)]
    assert len(enc) == 2 * 3 and len(dec) == 1 * 2  # paper: two per encoder level, one per decoder level
    assert all(tuple(b.skip.conv.kernel_size) == (1, 1, 1) for b in enc + dec)
    deeper = MSFFUNet(**TINY, encoder_blocks=3, decoder_blocks=2)
    assert sum(isinstance(m, ProjectionResBlock) for m in deeper.decoder.modules()) == 4


def test_msff_fuses_neighbouring_levels():
    net = MSFFUNet(channels=(4, 8, 16, 32), out_channels=2)
    assert net.fusion_ranges == [(0, 2), (0, 3), (1, 4)]
    assert [len(f.project) for f in net.fusers] == [2, 3, 3]
    assert MSFFUNet(channels=(4, 8, 16, 32), out_channels=2, fusion_span=9).fusion_ranges == [(0, 4)] * 3
    assert len(MSFFUNet(**TINY, msff=False).fusers) == 0


def test_msff_block_uses_every_level_and_is_residual():
    torch.manual_seed(0)
    blk = MSFFBlock(3, [4, 8, 16], center=1)
    feats = [torch.randn(1, 4, 8, 8, 8, requires_grad=True), torch.randn(1, 8, 4, 4, 4, requires_grad=True),
             torch.randn(1, 16, 2, 2, 2, requires_grad=True)]
    out = blk(feats)
    assert out.shape == (1, 8, 4, 4, 4)
    out.square().sum().backward()
    assert all(float(f.grad.abs().sum()) > 0 for f in feats)  # finer, same and coarser level all contribute
    # pixel attention shut (sigmoid(-100) ~ 0): the block returns its centre feature unchanged
    with torch.no_grad():
        last = blk.pixel_attention[-2]
        last.weight.zero_()
        last.bias.fill_(-100.0)
        torch.testing.assert_close(blk([f.detach() for f in feats]), feats[1].detach(), atol=1e-30, rtol=0)


def test_msff_changes_the_skip_while_plain_net_does_not():
    """The coarser level reaches the finest skip only through MSFF: with the decoder's up path cut
    (bottleneck zeroed via the transposed conv), changing level 1 still changes the output."""
    torch.manual_seed(0)
    for msff in (True, False):
        net = MSFFUNet(channels=(4, 8), out_channels=2, msff=msff).eval()
        with torch.no_grad():
            net.decoder[0].up.weight.zero_()
            net.decoder[0].up.bias.zero_()
            x = torch.randn(1, 1, 8, 8, 8)
            base = net(x)
            net.encoder[1][1].conv2.conv.weight.add_(1.0)  # perturb the level-1 feature only
            changed = not torch.allclose(net(x), base)
        assert changed is msff


def test_torchscript_matches_eager(tmp_path):
    torch.manual_seed(0)
    net = MSFFUNet(**TINY).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
        path = tmp_path / "msff.ts"
        scripted.save(str(path))
        torch.testing.assert_close(torch.jit.load(str(path))(x), net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(MSFFUNet(**TINY, msff=False))


def test_monai_verify_net_in_out(tmp_path):
    """MONAI's bundle check on a config whose network_def is the coarse-width MSFFUNet:
    1x1x32x32x32 in -> 1x15x32x32x32 out."""
    from monai.bundle import verify_net_in_out

    config = {"network_def": {"_target_": "abdoseg.networks.MSFFUNet", "in_channels": 1, "out_channels": 15,
                              "channels": list(SEED000_COARSE_CHANNELS)}}
    io = {"type": "image", "format": "hounsfield", "num_channels": 1, "spatial_shape": [32, 32, 32],
          "dtype": "float32", "value_range": [], "is_patch_data": True}
    meta = {"network_data_format": {"inputs": {"image": io},
                                    "outputs": {"pred": {**io, "format": "segmentation", "num_channels": 15}}}}
    (tmp_path / "inference.json").write_text(json.dumps(config))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(net_id="network_def", meta_file=str(tmp_path / "metadata.json"),
                      config_file=str(tmp_path / "inference.json"), device="cpu")
