"""PocketUNet (constant-width MONAI DynUNet): shapes, widths, residual skip, complexity counts,
TorchScript and ONNX export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetResBlock

from abdoseg.networks import PocketUNet, count_flops, count_parameters, doubling_unet, model_complexity

SMALL = dict(out_channels=3, channels=4, kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 1]])  # anisotropic: no z pooling at the last level


def _conv_out_channels(model: torch.nn.Module) -> set[int]:
    return {m.out_channels for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv3d) and not name.startswith(("output_block", "deep_supervision"))}


def test_constant_width_and_eval_shape():
    torch.manual_seed(0)
    net = PocketUNet(**SMALL).eval()
    assert net.filters == [4, 4, 4]
    assert _conv_out_channels(net) == {4}  # every hidden conv has the pocket width
    x = torch.randn(2, 1, 16, 12, 8)
    y = net(x)
    assert y.shape == (2, 3, 16, 12, 8)
    assert net.divisor == [4, 4, 2]


def test_default_interface_matches_spec():
    net = PocketUNet()  # interface 3 defaults: 15 classes, 32 channels, 5 stages
    assert net.out_channels == 15 and net.filters == [32] * 5 and net.n_stages == 5
    assert net.strides[0] == [1, 1, 1] and all(s == [2, 2, 2] for s in net.strides[1:])


def test_deep_supervision_training_output():
    net = PocketUNet(**{**SMALL, "kernel_size": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3},
                     deep_supervision=True, deep_supr_num=2)
    x = torch.randn(1, 1, 16, 16, 16)
    net.train()
    y = net(x)
    assert y.shape == (1, 3, 3, 16, 16, 16)  # (B, 1 + deep_supr_num, C, X, Y, Z)
    net.eval()
    assert net(x).shape == (1, 3, 16, 16, 16)


def test_shallow_net_accepts_default_deep_supr_num():
    net = PocketUNet(out_channels=2, channels=4, kernel_size=[3, 3, 3], strides=[1, 2, 2])
    assert net.eval()(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="at least 3 stages"):
        PocketUNet(kernel_size=[3, 3], strides=[1, 2])


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="stages"):
        PocketUNet(kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="3 values"):
        PocketUNet(kernel_size=[[3, 3]] * 2, strides=[[1, 1, 1]] * 2)


def test_res_block_has_1x1x1_skip_conv():
    net = PocketUNet(**SMALL, res_block=True)
    blocks = [m for m in net.modules() if isinstance(m, UnetResBlock)]
    assert blocks, "res_block=True must build UnetResBlocks"
    skip_convs = [b.conv3 for b in blocks if hasattr(b, "conv3")]
    assert skip_convs and all(tuple(c.conv.kernel_size) == (1, 1, 1) for c in skip_convs)
    plain = PocketUNet(**SMALL, res_block=False)
    assert not any(isinstance(m, UnetResBlock) for m in plain.modules())
    assert count_parameters(net) > count_parameters(plain)


def test_flop_counter_exact_on_single_conv():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: 2 * out(2) * in(1) * 27 taps * 64 output voxels
    assert count_flops(conv, (1, 1, 4, 4, 4)) == 2 * 2 * 1 * 27 * 64
    assert count_parameters(conv) == 2 * 27


def test_pocket_is_much_smaller_than_doubling_unet():
    kernel = [[3, 3, 3]] * 5
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    pocket = PocketUNet(out_channels=2, channels=32, kernel_size=kernel, strides=strides)
    double = doubling_unet(out_channels=2, kernel_size=kernel, strides=strides)
    assert double.filters == [32, 64, 128, 256, 320]
    p, d = count_parameters(pocket), count_parameters(double)
    assert p < d / 10
    cp = model_complexity(pocket, (1, 1, 32, 32, 32))
    cd = model_complexity(double, (1, 1, 32, 32, 32))
    assert cp["params"] == p and 0 < cp["flops"] < cd["flops"]


def test_torchscript_script_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = PocketUNet(**SMALL, res_block=True).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 16, 16, 8)
    torch.testing.assert_close(scripted(x), net(x))
    path = tmp_path / "net.ts"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), net(x))


def test_onnx_export_matches_onnxruntime(tmp_path):
    import onnxruntime as ort
    torch.manual_seed(0)
    net = PocketUNet(**SMALL).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():  # the legacy exporter's notices, each named (dynamo=False is deliberate)
        for message in (r"You are using the legacy TorchScript-based ONNX export",
                        r"The feature will be removed\. Please remove usage of this function",
                        r"ONNX export mode is set to TrainingMode\.EVAL, but operator 'instance_norm'",
                        r"Converting a tensor to a Python boolean might cause the trace to be incorrect"):
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["pred"], opset_version=17,
                          dynamo=False, dynamic_axes={"image": {0: "b", 2: "x", 3: "y", 4: "z"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 16, 16, 8), (1, 1, 8, 12, 4)]:  # a second size exercises the dynamic axes
        xi = torch.randn(*shape)
        got = sess.run(None, {"image": xi.numpy()})[0]
        with torch.no_grad():
            want = net(xi).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
