"""abdoseg export: both bundles' networks (fresh seeded weights in tmp copies) -> TorchScript + ONNX
through MONAI's ckpt_export / onnx_export, reloaded and compared with the eager networks; dynamic
spatial axes; nothing written when a check fails; the ORT-backed cascade (the same inference config)
gives the torch cascade's mask, differing only at near-tied voxels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from abdoseg.bundle.export import OnnxNetwork, bundle_networks, export, onnx_cascade, torch_cascade
from abdoseg.io import InputError
from abdoseg.data.phantom import make_case

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"coarse_roi": REPO / "bundles" / "coarse_roi", "fine_organ_tumor": REPO / "bundles" / "fine_organ_tumor"}
ATOL = 1e-4


def parsed_net(bundle: Path, net_id: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content(net_id, instantiate=True)


def bundle_copy(name: str, dst: Path, seed: int = 0) -> Path:
    """Copy of a bundle with freshly initialised (seeded) plain state dicts for every network."""
    b = dst / name
    shutil.copytree(BUNDLES[name], b, ignore=shutil.ignore_patterns("*.pt", "*.ts", "*.onnx", "eval", "__pycache__"))
    (b / "models").mkdir(exist_ok=True)
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    for net_id, fname in (("network_def", "model.pt"), ("coarse_network_def", "coarse_model.pt")):
        if net_id in cfg:
            torch.manual_seed(seed)
            torch.save(parsed_net(b, net_id).state_dict(), str(b / "models" / fname))
    return b


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Both bundles exported once (in-process runner; the CLI runner is tested separately)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in BUNDLES:
        b = bundle_copy(name, root)
        out[name] = (b, export(str(b), runner="inprocess"))
    return out


def _eager(bundle: Path, net_id: str, ckpt: str) -> torch.nn.Module:
    net = parsed_net(bundle, net_id)
    net.load_state_dict(torch.load(str(bundle / "models" / ckpt), weights_only=True))
    return net.eval()


@pytest.mark.parametrize("name", list(BUNDLES))
def test_export_files_reload_and_match_torch(exported, name):
    bundle, report = exported[name]
    models = bundle / "models"
    nets = [("network_def", "model")]
    if name == "fine_organ_tumor":
        nets.append(("coarse_network_def", "coarse_model"))
    assert sorted(report["networks"]) == sorted(n for n, _ in nets)
    assert json.loads((models / "export.json").read_text())["networks"].keys() == report["networks"].keys()
    assert not list(models.glob(".export-*")), "temporary export folder left behind"
    # a shape not used during export: proves the dynamic spatial axes of the ONNX model / the trace
    x = torch.rand((1, 1, 32, 48, 16), generator=torch.Generator().manual_seed(5))
    for net_id, stem in nets:
        for fmt in ("torchscript", "onnx"):
            checks = report["networks"][net_id]["files"][fmt]["checks"]
            assert len(checks) == 2 and all(c["max_abs_diff"] <= ATOL for c in checks)
        eager = _eager(bundle, net_id, f"{stem}.pt")
        with torch.no_grad():
            ref = eager(x)
        assert ref.shape[1] == report["networks"][net_id]["out_channels"]

        extra = {"metadata.json": "", "inference.json": ""}
        ts = torch.jit.load(str(models / f"{stem}.ts"), _extra_files=extra)
        assert json.loads(extra["metadata.json"])["version"]  # bundle metadata embedded by ckpt_export
        assert net_id in json.loads(extra["inference.json"])
        with torch.no_grad(), torch.jit.optimized_execution(False):
            ts_out = ts(x)
        assert float((ts_out - ref).abs().max()) <= ATOL

        model = onnx.load(str(models / f"{stem}.onnx"))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == report["opset"] == 17
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert model.graph.input[0].name == "image" and model.graph.output[0].name == "pred"
        assert [bool(d.dim_param) for d in dims] == [True, False, True, True, True]  # batch + XYZ dynamic
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["abdoseg.divisor"]) == [16, 16, 16]
        sess = ort.InferenceSession(str(models / f"{stem}.onnx"), providers=["CPUExecutionProvider"])
        ort_out = sess.run(None, {"image": x.numpy()})[0]
        assert ort_out.shape == tuple(ref.shape)
        assert float(np.abs(ort_out - ref.numpy()).max()) <= ATOL


def test_failed_check_writes_nothing(tmp_path):
    b = bundle_copy("coarse_roi", tmp_path)
    out = tmp_path / "exported"
    # ONNX Runtime's logits differ from torch's by ~1e-5: an absurd tolerance must fail the check
    with pytest.raises(RuntimeError, match="max \\|onnx - torch\\|"):
        export(str(b), out_dir=str(out), formats="onnx", atol=1e-12, runner="inprocess")
    assert out.is_dir() and list(out.iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="bundle folder not found"):
        bundle_networks(tmp_path / "nope")
    b = bundle_copy("fine_organ_tumor", tmp_path)
    (b / "models" / "coarse_model.pt").unlink()
    with pytest.raises(InputError, match="coarse_model.pt: checkpoint of coarse_network_def not found"):
        export(str(b), runner="inprocess")
    torch.save({}, str(b / "models" / "coarse_model.pt"))
    meta_path = b / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["coarse_data_format"]["outputs"]["pred"]["num_channels"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="coarse_data_format.outputs.pred.num_channels is 3 but coarse_network_def"):
        bundle_networks(b)
    with pytest.raises(ValueError, match="formats"):
        export(str(b), formats="tensorrt")
    with pytest.raises(InputError, match="ONNX model not found"):
        OnnxNetwork(tmp_path / "missing.onnx")


class Recorder(torch.nn.Module):
    """Passes calls to ``net`` and keeps a copy of every input (the cascade's fine-net inputs)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.strides = net.strides
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.net(x)


def test_onnx_cascade_matches_torch_cascade(exported, tmp_path):
    from abdoseg.io import save_nifti

    bundle, _ = exported["fine_organ_tumor"]
    img, _, affine = make_case(0, "small", shape=(64, 64, 16), spacing_mm=(6.0, 6.0, 8.0))
    path = tmp_path / "CASE_0000.nii.gz"
    save_nifti(img, affine, path)
    # small fine grid keeps the test fast; float32 on both sides (bfloat16 autocast is a separate setting)
    overrides = {"fine_spacing_mm": [4.0, 4.0, 4.0], "autocast_dtype": None}
    t_seg = torch_cascade(bundle, overrides=overrides)
    o_seg = onnx_cascade(bundle, overrides=overrides)
    rec = Recorder(t_seg.network)
    t_seg.network = rec
    from abdoseg.cli import quiet_library_noise
    from abdoseg.inference.ct_checks import ImplausibleCTWarning

    with warnings.catch_warnings(), torch.no_grad():
        quiet_library_noise()  # MONAI's per-run notices only; a warning of this package is an error
        warnings.simplefilter("error", ImplausibleCTWarning)
        t_mask, t_aff = t_seg({"image": str(path)})
        o_mask, o_aff = o_seg({"image": str(path)})
        # the ORT coarse net gives the same ROI (the crop recorded in the preprocessing trace)
        crops = [[o for o in seg.preprocessing({"image": str(path)})["image"].applied_operations
                  if o["class"] == "Crop"][0]["extra_info"]["cropped"] for seg in (t_seg, o_seg)]
    assert crops[0] == crops[1]
    assert t_mask.shape == o_mask.shape == (64, 64, 16) and o_mask.dtype == np.uint8
    np.testing.assert_allclose(t_aff, o_aff)
    n_diff = int((t_mask != o_mask).sum())
    # Fresh random weights give nearly tied logits, so the ~1e-5 ORT/torch logit differences may flip
    # a few argmaxes; they must stay a tiny fraction of the volume ...
    assert n_diff <= 0.002 * t_mask.size, n_diff
    # ... and on the fine grid every flip must sit where torch's top-2 margin is within the logit error
    # (the fine net runs on windows of its training patch: check every window it saw).
    assert len(rec.inputs) >= 1
    for x in rec.inputs:
        with torch.no_grad():
            t_logits = rec.net(x)
            o_logits = o_seg.network(x)
        err = float((t_logits - o_logits).abs().max())
        # ORT reduces InstanceNormalization's mean/variance with plain float32 sums; torch's sums are
        # ~100x closer to a float64 reference (~1e-3 vs ~1e-5 on large inputs).
        assert err <= 1e-2, err
        top2 = t_logits.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1])
        flipped = t_logits.argmax(1) != o_logits.argmax(1)
        assert bool((margin[flipped] <= 2 * err).all())


@pytest.mark.slow
def test_cli_runs_monai_bundle_verbs(tmp_path):
    b = bundle_copy("coarse_roi", tmp_path)
    out = tmp_path / "out"
    exe = [sys.executable, "-m", "abdoseg.cli", "export"]
    proc = subprocess.run(exe + ["--bundle_dir", str(b), "--out_dir", str(out), "--formats", "torchscript,onnx"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export.json").read_text())
    assert report["runner"] == "cli"
    files = report["networks"]["network_def"]["files"]
    assert files["onnx"]["command"].startswith("-m monai.bundle onnx_export network_def")
    assert files["torchscript"]["command"].startswith("-m monai.bundle ckpt_export network_def")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "model.ts"]
    assert all(c["max_abs_diff"] <= ATOL for f in files.values() for c in f["checks"])
    bad = subprocess.run(exe + ["--bundle_dir", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "bundle folder not found" in bad.stderr


def _documented_onnx_command() -> list[str]:
    """The one command of the fine bundle README's "ONNX export" subsection (so the doc cannot drift)."""
    import shlex

    text = (BUNDLES["fine_organ_tumor"] / "docs" / "README.md").read_text(encoding="utf-8")
    block = text.split("### ONNX export", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.strip().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


@pytest.mark.slow
def test_bundle_cli_onnx_export_as_documented(tmp_path):
    """``python -m monai.bundle onnx_export`` exactly as the bundle README gives it: named input/output,
    batch and X/Y/Z dynamic, same numbers as PyTorch on another batch size and shape."""
    b = bundle_copy("fine_organ_tumor", tmp_path)
    cmd = _documented_onnx_command()
    assert cmd[:4] == ["python", "-m", "monai.bundle", "onnx_export"]
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=b, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    model = onnx.load(str(b / "models" / "model.onnx"))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("image", "pred")
    for value in (inp, out):
        dims = value.type.tensor_type.shape.dim
        assert [bool(dims[i].dim_param) for i in range(5)] == [True, False, True, True, True], dims
    net = parsed_net(b, "network_def")
    net.load_state_dict(torch.load(b / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.rand(2, 1, 48, 32, 64, generator=torch.Generator().manual_seed(0))  # not the 1x32^3 trace shape
    with torch.no_grad():
        expected = net(x).numpy()
    got = ort.InferenceSession(str(b / "models" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["pred"], {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (2, 15, 48, 32, 64)
    assert float(np.abs(got - expected).max()) <= ATOL
