"""bundles/coarse_roi: metadata, network I/O, one short training epoch (single process and
2-process gloo torchrun), evaluation, inference outputs (coarse mask in CT geometry + ROI JSON),
TorchScript export, bad inputs (air only, 2 slices) and the plain-function path."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from abdoseg.bundle.config import config_files
from abdoseg.networks.checkpoints import load_weights
from abdoseg.inference.roi import EmptyRoiWarning, RoiBox
from shared_files import MONAI_SCHEMA, require
from test_fine_bundle import assert_trained_and_validated, checked_overrides, config_workflow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "coarse_roi"
CONFIGS = BUNDLE / "configs"
# tiny-data overrides: the real defaults are 64^3 patches and 80x80x96 windows at 6 mm
FINE_CONFIGS = REPO / "bundles" / "fine_organ_tumor" / "configs"
HU_WINDOW = (-325.0, 325.0)
TINY = {"patch_size": [32, 32, 32], "coarse_roi_size": [32, 32, 32], "num_samples": 1, "batch_size": 2,
        "max_epochs": 1, "val_interval": 1}


def _write(arr: np.ndarray, affine: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path))
    return str(path)


def tiny_case(seed: int, shape=(40, 36, 30), spacing=(5.0, 5.0, 6.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ct int16 HU, label uint8, affine): body ellipse (soft tissue) in air, three 'organs'."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.38 * shape[1])) ** 2 <= 1
    ct = np.where(body, -80.0, -1000.0) + rng.normal(0, 15, shape)
    label = np.zeros(shape, np.uint8)
    z0 = shape[2] // 2 + int(rng.integers(-3, 4))
    for cls, (dx, dy, r, hu) in zip((1, 3, 2), [(-6, 0, 6, 120), (7, 3, 4, 100), (5, -6, 3, 160)]):
        blob = ((x - cx - dx) ** 2 + (y - cy - dy) ** 2 + ((z - z0) * 1.2) ** 2) <= r ** 2
        label[blob] = cls
        ct[blob] = hu + rng.normal(0, 10, int(blob.sum()))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-100.0, -90.0, 50.0]
    return ct.astype(np.int16), label, affine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """FLARE-style mini dataset + datalist (interface 2) with 4 training and 2 validation cases."""
    root = tmp_path_factory.mktemp("coarse_data")
    items = {"training": [], "training_all_organs": [], "unlabeled": [], "validation": []}
    for i in range(6):
        ct, lab, aff = tiny_case(i)
        cid = f"TINY_{i:04d}"
        if i < 4:
            _write(ct, aff, root / "imagesTr" / f"{cid}_0000.nii.gz")
            _write(lab, aff, root / "labelsTr" / f"{cid}.nii.gz")
            item = {"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                    "annotated_classes": list(range(1, 14)), "group": "all_organs"}
            items["training"].append(item)
            items["training_all_organs"].append(item)
        else:
            _write(ct, aff, root / "imagesVal" / f"{cid}_0000.nii.gz")
            _write(lab, aff, root / "labelsVal" / f"{cid}.nii.gz")
            items["validation"].append({"image": f"imagesVal/{cid}_0000.nii.gz", "label": f"labelsVal/{cid}.nii.gz"})
    (root / "datalist.json").write_text(json.dumps(items))
    return root


def _bundle_copy(tmp: Path) -> Path:
    """Bundle copy (configs, docs, LICENSE) so that tests never write into the source tree."""
    import shutil

    dst = tmp / "coarse_roi"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval"))
    (dst / "models").mkdir()
    return dst


def _cli_overrides(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return out


def _parser(config: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    missing = [k for k in ("bundle_root", *overrides) if k not in parser]  # setting one would add it silently
    assert not missing, f"override ids not in {config}: {missing}"
    parser["bundle_root"] = str(config.parents[1])
    for k, v in overrides.items():
        parser[k] = v
    return parser


def coarse_network(model_path: Path | None = None) -> torch.nn.Module:
    """The coarse bundle's network_def (with weights when given), as its inference builds it."""
    net = _parser(CONFIGS / "inference.json").get_parsed_content("network_def")
    return (load_weights(net, model_path) if model_path is not None else net).eval()


def coarse_stage(network, **overrides):
    """The fine bundle's coarse stage (the loading transforms, the crop to the body, then
    CoarseRoiCropd, from its inference.json) with ``network``. The crop to the body keeps the
    whole volume here unless the caller overrides ``body_hu_threshold`` / ``body_margin_mm``:
    these tests check boxes on the CT's own grid (the crop is tested in test_fov_invariance)."""
    overrides = {"body_hu_threshold": -1e9, "body_margin_mm": [0.0, 0.0, 0.0], **overrides}  # see below
    parser = _parser(FINE_CONFIGS / "inference.json", coarse_network_def=network, coarse_checkpoint=None,
                     device="$torch.device('cpu')", **overrides)
    return parser.get_parsed_content("preprocessing").transforms[:6]


def test_training_takes_the_network_and_grid_from_inference_json():
    """One definition: train.json does not restate inference.json's network and grid; the
    training workflow (inference.json, then train.json) trains exactly what inference runs."""
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    shared = ("coarse_spacing_mm", "coarse_hu_window", "coarse_roi_size", "network_def", "resampling",
              "intensity_normalization")
    assert not set(shared) & set(train)
    from monai.bundle import ConfigParser

    merged = ConfigParser()
    merged.read_config(config_files(CONFIGS.parent, "training"))
    for key in shared:
        assert merged[key] == infer[key], key


def test_fine_bundle_coarse_stage_sees_what_the_coarse_bundle_sees(dataset):
    """One coarse stage: the fine bundle's CoarseRoiCropd runs the coarse bundle's preprocessing
    (same grid, same intensities) and its network/inferer settings."""
    item = {"image": str(dataset / "imagesVal" / "TINY_0004_0000.nii.gz")}
    a = _parser(CONFIGS / "inference.json").get_parsed_content("preprocessing")(dict(item))["image"]
    stage = coarse_stage(coarse_network(), body_hu_threshold=-500.0, body_margin_mm=[0.0, 0.0, 0.0])
    d = dict(item)
    for t in stage[:5]:  # load, channel first, checks, orientation, crop to the body
        d = t(d)
    b = stage[5].preprocessing({"image": d["image"]})["image"]
    torch.testing.assert_close(a.as_tensor(), b.as_tensor())
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine))
    assert a.shape[1:] == (28, 23, 30)  # the body (~165 x 135 mm of a 200 x 180 x 180 mm CT) at 6 mm
    fine = json.loads((FINE_CONFIGS / "inference.json").read_text())
    coarse = json.loads((CONFIGS / "inference.json").read_text())
    assert fine["coarse_network_def"] == coarse["network_def"]
    for key in ("coarse_spacing_mm", "coarse_hu_window", "coarse_roi_size", "margin_mm"):  # one name per setting
        assert fine[key] == coarse[key], key
    assert fine["coarse_inferer"]["_target_"] == coarse["inferer"]["_target_"]


def test_metadata_and_network_io():
    from monai.bundle import verify_metadata, verify_net_in_out

    schema = require(MONAI_SCHEMA, "the MONAI bundle metadata schema")
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]["abdoseg"] == "0.1.0"
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    logging_conf = (CONFIGS / "logging.conf").read_text()
    assert "class=StreamHandler" in logging_conf


@pytest.fixture(scope="module")
def trained_bundle(dataset, tmp_path_factory) -> Path:
    """One short training epoch with the monai.bundle CLI, single process, on CPU."""
    bundle = _bundle_copy(tmp_path_factory.mktemp("bundle"))
    overrides = checked_overrides(config_files(bundle, "training"),
                                  {"bundle_root": str(bundle), "dataset_dir": str(dataset), **TINY})
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--meta_file", str(bundle / "configs/metadata.json"),
           "--config_file", repr(config_files(bundle, "training")),
           "--logging_file", str(bundle / "configs/logging.conf"), *_cli_overrides(overrides)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = res.stdout + res.stderr
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # validation ran once (val_interval 1, one epoch) and logged a finite Dice
    dice = [float(v) for v in re.findall(r"val_mean_dice: (\S+)", log)]
    assert dice and all(math.isfinite(d) and 0.0 <= d <= 1.0 for d in dice), log[-3000:]
    assert_trained_and_validated(bundle / "models", epochs=1, iterations=2)  # 4 cases, batch 2
    return bundle


def test_training_writes_plain_state_dict(trained_bundle):
    state = torch.load(str(trained_bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    coarse_network(trained_bundle / "models" / "model.pt")  # keys fit the network


def test_evaluate_config(trained_bundle, dataset):
    wf = config_workflow([*config_files(trained_bundle, "training"), str(trained_bundle / "configs/evaluate.json")],
                         str(trained_bundle / "configs/metadata.json"), "eval",
                         bundle_root=str(trained_bundle), dataset_dir=str(dataset), **TINY)
    wf.initialize()
    wf.run()
    metrics = (trained_bundle / "eval" / "metrics.csv").read_text()
    values = re.findall(r"^val_mean_dice[,\t ]+(\S+)\s*$", metrics, flags=re.M)
    assert len(values) == 1 and 0.0 <= float(values[0]) <= 1.0, metrics  # NaN fails the comparison
    wf.finalize()


def test_inference_outputs_mask_in_ct_geometry_and_roi_json(trained_bundle, dataset, tmp_path):
    out = tmp_path / "pred"
    wf = config_workflow(str(trained_bundle / "configs/inference.json"),
                         str(trained_bundle / "configs/metadata.json"), "infer",
                         bundle_root=str(trained_bundle), dataset_dir=str(dataset), output_dir=str(out),
                         coarse_roi_size=[32, 32, 32])
    wf.initialize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyRoiWarning)  # a 1-epoch net may find nothing
        wf.run()
    wf.finalize()
    for cid in ("TINY_0004", "TINY_0005"):
        src = nib.load(str(dataset / "imagesVal" / f"{cid}_0000.nii.gz"))
        mask = nib.load(str(out / f"{cid}_coarse.nii.gz"))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        roi = json.loads((out / f"{cid}_roi.json").read_text())
        box = RoiBox.from_json(roi)
        assert box.shape == src.shape
        assert len(roi["world_min_mm"]) == 3 and roi["margin_mm"] == 20.0
        assert "coarse" in roi and roi["source"].endswith(f"{cid}_0000.nii.gz")


def test_ckpt_export_torchscript(trained_bundle, tmp_path):
    from monai.bundle import ckpt_export

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(trained_bundle / "models/model.pt"),
                meta_file=str(trained_bundle / "configs/metadata.json"),
                config_file=str(trained_bundle / "configs/inference.json"), bundle_root=str(trained_bundle))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts_net = torch.jit.load(str(ts))
    net = coarse_network(trained_bundle / "models/model.pt")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ts_net(x), net(x))


def test_torchrun_two_process_gloo(dataset, tmp_path):
    bundle = _bundle_copy(tmp_path)
    cfg = json.dumps(config_files(bundle, "training", multi_gpu=True))
    overrides = checked_overrides(config_files(bundle, "training", multi_gpu=True),
                                  {"bundle_root": str(bundle), "dataset_dir": str(dataset), **TINY})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training", "--config_file", cfg,
           "--meta_file", str(bundle / "configs/metadata.json"), *_cli_overrides(overrides)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(str(bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP wrapper not in the checkpoint


@pytest.mark.parametrize("kind", ["air_only", "two_slices"])
def test_bad_input_gives_whole_volume_roi_and_warning(kind, tmp_path):
    net = coarse_network()
    # a net that can only say "background": its last bias makes class 0 win everywhere
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.output_block.conv.conv.bias.copy_(torch.tensor([1.0, -1.0]))
    if kind == "air_only":
        ct = np.full((30, 30, 20), -1000, np.int16)
        ct[10:20, 10:20, 5:15] = 200  # passes the CT value-range check
    else:
        ct, _, _ = tiny_case(0)
        ct = ct[:, :, 14:18]
    path = _write(ct, np.diag([5.0, 5.0, 6.0, 1.0]), tmp_path / "BAD_0000.nii.gz")
    d = {"image": path}
    with pytest.warns(EmptyRoiWarning, match="BAD_0000"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unusual.*")
        for t in coarse_stage(net, coarse_roi_size=[32, 32, 32]):
            d = t(d)
    assert tuple(d["image"].shape[1:]) == ct.shape  # whole volume


def _constant_network(foreground: bool) -> torch.nn.Module:
    """The coarse network_def with weights that answer one class everywhere (its last bias decides)."""
    net = coarse_network()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.output_block.conv.conv.bias.copy_(torch.tensor([-1.0, 1.0] if foreground else [1.0, -1.0]))
    return net


@pytest.mark.parametrize("foreground", [False, True], ids=["finds_nothing", "finds_everything"])
def test_bundle_inference_on_two_slice_ct_never_crashes(foreground, tmp_path):
    """A 2-slice CT and an all-air CT through the bundle's inference, with a network whose answer is
    known: one that finds nothing gives an empty coarse mask, the whole volume and an
    EmptyRoiWarning naming each case; one that finds everything gives a full coarse mask and again
    the whole volume (every voxel is foreground), without the warning."""
    ct, _, aff = tiny_case(1)
    in_dir = tmp_path / "in"
    _write(ct[:, :, 10:12], aff, in_dir / "THIN_0000.nii.gz")
    _write(np.full((20, 20, 8), -1000, np.int16), aff, in_dir / "AIR_0000.nii.gz")
    bundle = _bundle_copy(tmp_path)
    torch.save(_constant_network(foreground).state_dict(), bundle / "models" / "model.pt")
    out = tmp_path / "out"
    wf = config_workflow(str(bundle / "configs/inference.json"), str(bundle / "configs/metadata.json"), "infer",
                         bundle_root=str(bundle), input_dir=str(in_dir), output_dir=str(out),
                         coarse_roi_size=[32, 32, 32])
    wf.initialize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmptyRoiWarning)
        wf.run()
    wf.finalize()
    empty = " ".join(str(w.message) for w in caught if issubclass(w.category, EmptyRoiWarning))
    for cid, shape in (("THIN", (40, 36, 2)), ("AIR", (20, 20, 8))):
        mask = nib.load(str(out / f"{cid}_coarse.nii.gz"))
        assert mask.shape == shape
        roi = json.loads((out / f"{cid}_roi.json").read_text())
        assert roi["shape"] == list(shape) and roi["is_whole_volume"], roi
        assert RoiBox.from_json(roi) == RoiBox.whole(shape)
        coarse_voxels = int(np.prod(roi["coarse"]["shape"]))
        assert roi["coarse_foreground_voxels"] == (coarse_voxels if foreground else 0), roi
        assert np.asarray(mask.dataobj).any() == foreground
        assert (cid in empty) == (not foreground), empty


def test_coarse_stage_box_contains_the_organs(dataset):
    img = str(dataset / "imagesVal" / "TINY_0004_0000.nii.gz")

    class Threshold(torch.nn.Module):  # marks the HU > 50 voxels as foreground: a known box
        def forward(self, x):
            fg = (x > (50 - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])).float()
            return torch.cat([1 - fg, fg], 1)

    stage = coarse_stage(Threshold(), margin_mm=0.0, coarse_roi_size=[32, 32, 32])
    stage[5].roi_key = "roi"
    d = {"image": img}
    for t in stage:
        d = t(d)
    box = RoiBox.from_json(d["roi"])
    assert not box.is_whole_volume and box.volume_fraction < 0.5
    # every voxel of the (largest) bright organ lies in the box (both RAS: the tiny cases are RAS)
    lab = np.asarray(nib.load(str(dataset / "labelsVal" / "TINY_0004.nii.gz")).dataobj)
    assert box.contains_fraction(lab == 1) == 1.0
