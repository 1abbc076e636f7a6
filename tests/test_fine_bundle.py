"""fine_organ_tumor bundle end to end on tiny hand-made CTs: 1-epoch training (partial and full
label modes) through ConfigWorkflow, then inference through run_batch with a bad input mixed in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from abdoseg.bundle.config import config_files
from abdoseg.io import save_nifti

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "fine_organ_tumor"
#: the label ids a fine mask may hold: the output channels of the bundle's metadata
LABEL_IDS = {int(k) for k in json.loads((BUNDLE / "configs" / "metadata.json").read_text())
             ["network_data_format"]["outputs"]["pred"]["channel_def"]}
SMALL_NET = {"channels": 8, "kernel_size": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "deep_supr_num": 1}


def _case(rng: np.random.Generator, shape=(40, 36, 20)):
    """Body ellipse (fat 20 HU... water) with a bright 'liver' (class 1), 'spleen' (3), a 'lesion' (14)."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = ((x - 20) / 17) ** 2 + ((y - 18) / 15) ** 2 <= 1
    hu[body] = 0
    lab = np.zeros(shape, np.uint8)
    liver = body & (((x - 13) / 6) ** 2 + ((y - 16) / 6) ** 2 + ((z - 10) / 6) ** 2 <= 1)
    spleen = body & (((x - 28) / 4) ** 2 + ((y - 20) / 4) ** 2 + ((z - 10) / 4) ** 2 <= 1)
    lesion = liver & (((x - 12) / 2.5) ** 2 + ((y - 15) / 2.5) ** 2 + ((z - 10) / 2.5) ** 2 <= 1)
    hu[liver], lab[liver] = 120, 1
    hu[spleen], lab[spleen] = 200, 3
    hu[lesion], lab[lesion] = 40, 14
    hu += rng.normal(0, 10, shape)
    return hu.astype(np.int16), lab


def checked_overrides(config_file: str | list[str], overrides: dict) -> dict:
    """``overrides``, after checking that each id already exists in ``config_file`` (a list is
    merged in order) and that the parsed config then gives the override's value. MONAI's
    ``ConfigParser.update`` and ``ConfigWorkflow`` silently *add* an id that does not exist, so a
    misspelt override would change nothing and the test would still pass."""
    parser = ConfigParser()
    parser.read_config(config_file)
    missing = [k for k in overrides if k not in parser]
    assert not missing, f"override ids not in {config_file}: {missing}"
    parser.update(overrides)
    for k, v in overrides.items():
        assert parser.get_parsed_content(k) == v, (k, v)
    return overrides


def config_workflow(config_file: str | list[str], meta_file: str, workflow_type: str,
                    logging_file: str | None = None, **overrides) -> ConfigWorkflow:
    """MONAI's ``ConfigWorkflow`` whose overrides are :func:`checked_overrides`."""
    kw = {"logging_file": logging_file} if logging_file is not None else {}
    wf = ConfigWorkflow(config_file=config_file, meta_file=meta_file, workflow_type=workflow_type,
                        **kw, **checked_overrides(config_file, overrides))
    for k, v in overrides.items():
        assert wf.parser[k] == v, k
    return wf


def assert_trained_and_validated(ckpt_dir: str | Path, epochs: int, iterations: int | None = None) -> dict:
    """The training's ``train_stats.json`` (TrainStatsWriter): it finished ``epochs`` epochs
    (``iterations`` steps) with a finite loss each epoch, and validation ran: the evaluator holds a
    finite ``val_mean_dice`` in [0, 1] and a best epoch (NaN is written as null, so it fails)."""
    stats = json.loads((Path(ckpt_dir) / "train_stats.json").read_text())
    assert stats["status"] == "DONE" and stats["epoch"] == stats["total_epochs"] == epochs, stats
    if iterations is not None:
        assert stats["iteration"] == iterations, stats
    assert len(stats["loss_per_epoch"]) == epochs, stats
    assert all(isinstance(x, float) and math.isfinite(x) for x in stats["loss_per_epoch"]), stats
    dice = stats["eval"]["metrics"].get("val_mean_dice")
    assert isinstance(dice, float) and math.isfinite(dice) and 0.0 <= dice <= 1.0, stats["eval"]
    assert stats["eval"]["key_metric_name"] == "val_mean_dice" and 1 <= stats["best_metric_epoch"] <= epochs, stats
    return stats


def assert_mask_on_input_grid(mask_path: str | Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """A written fine mask: uint8 on the CT's own grid (shape and affine), only label ids the bundle
    defines. Returns the mask."""
    img = nib.load(str(mask_path))
    assert img.shape == tuple(shape) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    mask = np.asarray(img.dataobj)
    labels = {int(v) for v in np.unique(mask)}
    assert labels <= LABEL_IDS, sorted(labels - LABEL_IDS)
    return mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    items, val = [], []
    for i in range(3):
        hu, lab = _case(rng)
        cid = f"T_{i:04d}"
        save_nifti(hu, aff, root / "imagesTr" / f"{cid}_0000.nii.gz")
        partial = np.where(lab == 3, 0, lab).astype(np.uint8) if i == 0 else lab  # case 0: spleen unannotated
        save_nifti(partial, aff, root / "labelsTr" / f"{cid}.nii.gz")
        save_nifti(np.where(lab == 14, 1, lab).astype(np.uint8), aff, root / "pseudo_A" / f"{cid}.nii.gz")
        items.append({"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                      "pseudo_A": f"pseudo_A/{cid}.nii.gz", "annotated_classes": [1, 14] if i == 0 else [1, 3, 14]})
    hu, lab = _case(rng)
    save_nifti(hu, aff, root / "imagesVal" / "V_0000_0000.nii.gz")
    save_nifti(lab, aff, root / "labelsVal" / "V_0000.nii.gz")
    val.append({"image": "imagesVal/V_0000_0000.nii.gz", "label": "labelsVal/V_0000.nii.gz"})
    (root / "datalist.json").write_text(json.dumps({"training": items, "validation": val}))
    return root


def _train(dataset: Path, out: Path, label_mode: str) -> Path:
    wf = config_workflow(
        config_files(BUNDLE, "training"), str(BUNDLE / "configs" / "metadata.json"), "train",
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE), ckpt_dir=str(out), dataset_dir=str(dataset), label_mode=label_mode,
        max_epochs=1, val_interval=1, patch_size=[32, 32, 16],
        fine_spacing_mm=[2.0, 2.0, 3.0], num_samples=1, cache_rate=0.0, device="cpu",
        **{f"network_def#{k}": v for k, v in SMALL_NET.items()},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return out


@pytest.fixture(scope="module")
def partial_models(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory.mktemp("models"), "partial")


@pytest.mark.parametrize("label_mode", ["partial", "full"])
def test_one_epoch_training_writes_plain_state_dict(dataset, partial_models, tmp_path, label_mode):
    out = partial_models if label_mode == "partial" else _train(dataset, tmp_path / "models", label_mode)
    assert_trained_and_validated(out, epochs=1, iterations=3)  # 3 cases, batch 1, then one validation
    sd = torch.load(str(out / "model.pt"), map_location="cpu", weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update(checked_overrides(str(BUNDLE / "configs" / "inference.json"),
                                    {f"network_def#{k}": v for k, v in SMALL_NET.items()}))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(sd)  # the inference network_def loads what training saved


def test_inference_workflow_writes_masks_on_input_grid(partial_models, tmp_path):
    from abdoseg.networks import PocketUNet

    models = partial_models
    # a coarse net with the inference config's architecture (random weights): ROI may be anything,
    # geometry must still be exact
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    coarse = parser.get_parsed_content("coarse_network_def")
    assert isinstance(coarse, PocketUNet)
    torch.save(coarse.state_dict(), models / "coarse_model.pt")

    inp = tmp_path / "in"
    inp.mkdir()
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    hu, _ = _case(np.random.default_rng(5))
    save_nifti(hu, lps, inp / "A_0000.nii.gz")
    save_nifti(hu[:, :, :1], lps, inp / "B_0000.nii.gz")  # one slice: bad input
    out = tmp_path / "out"
    wf = config_workflow(
        str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "metadata.json"), "infer",
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE), input_dir=str(inp), output_dir=str(out), device="cpu",
        model_path=str(models / "model.pt"), coarse_checkpoint=str(models / "coarse_model.pt"),
        fine_spacing_mm=[2.0, 2.0, 3.0], patch_size=[32, 32, 16],
        **{f"network_def#{k}": v for k, v in SMALL_NET.items()},
    )
    wf.initialize()
    wf.run()  # the bad case does not stop the batch ...
    with pytest.raises(SystemExit) as ei:  # ... it is listed, and the run exits non-zero, at the end
        wf.finalize()
    assert "B_0000.nii.gz" in str(ei.value) and "fewer than 4 voxels" in str(ei.value)
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz"]
    assert_mask_on_input_grid(out / "A.nii.gz", hu.shape, lps)


@pytest.mark.parametrize("single_stage", [False, True])
def test_single_stage_switch_drops_only_the_coarse_network(single_stage):
    """``--single_stage true`` is the documented baseline: same fine network, grid and intensities,
    no ROI crop (the coarse transform stays in the chain but crops nothing)."""
    from abdoseg.inference.coarse_roi import CoarseRoiCropd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update(checked_overrides(str(BUNDLE / "configs" / "inference.json"),
                                    {"single_stage": single_stage, "device": "cpu", "coarse_checkpoint": None}))  # random coarse weights
    pre = parser.get_parsed_content("preprocessing")
    coarse = [t for t in pre.transforms if isinstance(t, CoarseRoiCropd)]
    assert len(coarse) == 1 and coarse[0].enabled == (not single_stage)
    spacing = [t for t in pre.transforms if type(t).__name__ == "Spacingd"][0]
    assert tuple(spacing.spacing_transform.pixdim) == tuple(parser.get_parsed_content("fine_spacing_mm"))
