"""Seed system presets (``configs/presets/seed00X.json``): each overlay, merged after a bundle's own
config with MONAI's list of config files, builds the paper's network, passes MONAI's
verify_net_in_out and TorchScript export, trains one epoch and segments a CT through the bundle's
own configs (CPU-sized overrides: the paper's sizes are kept in the files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor

from abdoseg.bundle.config import config_files
from abdoseg.io import save_nifti
# the hand-made tiny CT of the fine bundle tests and their checks (overrides that exist, validation
# that ran, masks on the CT's grid)
from test_fine_bundle import (_case, assert_mask_on_input_grid, assert_trained_and_validated, checked_overrides,
                              config_workflow)

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")

ROOT = Path(__file__).resolve().parents[1]
FINE = ROOT / "bundles" / "fine_organ_tumor"
COARSE = ROOT / "bundles" / "coarse_roi"
FUSION = ROOT / "bundles" / "label_fusion"

SMALL_DOUBLING = {"network_def#base_channels": 4, "network_def#max_channels": 16}
#: CPU-sized overrides per fine preset (what the docs give as "CPU override", smaller still)
FINE_SMALL: dict[str, dict] = {
    "seed000": {"fine_input_size": [32, 32, 32], "network_def#channels": [4, 8, 8, 16, 16],
                "coarse_input_size": [32, 32, 32], "coarse_network_def#channels": [4, 4, 8, 8, 8]},
    "seed001": {"fine_spacing_mm": [2.0, 2.0, 3.0], "patch_size": [32, 32, 16], "network_def#channels": 8,
                "coarse_spacing_mm": [6.0, 6.0, 6.0], "coarse_roi_size": [32, 32, 16],
                "coarse_network_def#channels": 4},
    "seed002": {"fine_spacing_mm": [2.0, 2.0, 3.0], "patch_size": [32, 32, 16], **SMALL_DOUBLING},
    "seed003": {"fine_spacing_mm": [2.0, 2.0, 3.0], "patch_size": [32, 32, 16], **SMALL_DOUBLING},
    "seed003_teacher": {"fine_spacing_mm": [2.0, 2.0, 3.0], "patch_size": [32, 32, 16], **SMALL_DOUBLING,
                        "checkpoint_epochs": [0, 0, 0]},
    "seed004": {"fine_input_size": [32, 32, 32], "network_def#channels": [4, 8, 8, 16, 16],
                "coarse_input_size": [32, 32, 32], "coarse_network_def#base_channels": 4,
                "coarse_network_def#max_channels": 8},
}
COARSE_SMALL: dict[str, dict] = {
    "seed000": {"input_size": [32, 32, 32], "network_def#channels": [4, 4, 8, 8, 8]},
    "seed001": {"coarse_spacing_mm": [6.0, 6.0, 6.0], "patch_size": [32, 32, 16], "network_def#channels": 4},
    "seed004": {"input_size": [32, 32, 32], "network_def#base_channels": 4, "network_def#max_channels": 8},
}


def _configs(bundle: Path, config: str, preset: str) -> list[str]:
    """``config`` (``train.json`` = the training workflow: inference.json, then train.json) + the preset."""
    workflow = {"train.json": "training", "inference.json": "inference"}.get(config)
    if workflow is None:
        return [str(bundle / "configs" / config), str(bundle / "configs" / "presets" / f"{preset}.json")]
    return config_files(bundle, workflow, preset)


def _parser(bundle: Path, config: str, preset: str, overrides: dict | None = None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(_configs(bundle, config, preset))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update(checked_overrides(_configs(bundle, config, preset), overrides or {}))
    return parser


def test_every_bundle_preset_file_exists_and_is_documented():
    docs = (FINE / "docs" / "README.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for seed in ("seed000", "seed001", "seed002", "seed003", "seed004"):
        assert (FINE / "configs" / "presets" / f"{seed}.json").is_file()
        assert f"configs/presets/{seed}.json" in docs
        assert seed in readme
    assert sorted(p.stem for p in (FINE / "configs" / "presets").glob("*.json")) == sorted(FINE_SMALL)
    assert sorted(p.stem for p in (COARSE / "configs" / "presets").glob("*.json")) == sorted(COARSE_SMALL)
    for p in [*FINE.glob("configs/presets/*.json"), *COARSE.glob("configs/presets/*.json"),
              *FUSION.glob("configs/presets/*.json")]:
        about = json.loads(p.read_text(encoding="utf-8"))["preset"]
        assert about["system"].startswith("seed 00") and about["cpu_override"], p


@pytest.mark.parametrize("preset", sorted(FINE_SMALL))
def test_fine_preset_network_verifies_and_scripts(preset):
    """The paper-sized inference network of each preset: MONAI verify_net_in_out (the metadata's
    32*n input) and TorchScript give the same logits."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(FINE / "configs" / "metadata.json"),
                      config_file=_configs(FINE, "inference.json", preset), device="cpu", n=1,
                      **{k: v for k, v in FINE_SMALL[preset].items() if k.startswith("network_def#")})
    net = _parser(FINE, "inference.json", preset, FINE_SMALL[preset]).get_parsed_content("network_def").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-4)
        assert net(x).shape == (1, 15, 32, 32, 32)


def test_paper_settings_are_in_the_preset_files():
    """The overlays carry the papers' values (the CPU sizes live only in the docs and these tests)."""
    p = {s: _parser(FINE, "inference.json", s) for s in ("seed000", "seed001", "seed002", "seed003", "seed004")}
    assert p["seed000"].get_parsed_content("fine_input_size") == [160, 160, 160]
    assert p["seed000"].get_parsed_content("network_def").channels == [16, 32, 64, 128, 256]
    assert p["seed000"].get_parsed_content("coarse_network_def").channels == [8, 16, 32, 64, 128]
    # seed 000 designs MSFF for the fine stage; its coarse stage is the plain residual U-Net
    assert p["seed000"].get_parsed_content("network_def").msff_enabled
    assert not p["seed000"].get_parsed_content("coarse_network_def").msff_enabled
    assert not _parser(COARSE, "inference.json", "seed000").get_parsed_content("network_def").msff_enabled
    assert p["seed000"].get_parsed_content("hu_window") == [-500.0, 500.0]
    assert p["seed001"].get_parsed_content("fine_spacing_mm") == [0.8, 0.8, 2.5]
    assert p["seed001"].get_parsed_content("coarse_spacing_mm") == [1.2, 1.2, 4.0]
    assert p["seed001"].get_parsed_content("network_def").channels == 32
    assert p["seed002"].get_parsed_content("organ_component_rule") == "near_liver"
    assert p["seed002"].get_parsed_content("sw_mode") == "constant"
    swift = p["seed003"].get_parsed_content("network_def")
    n_params = sum(v.numel() for v in swift.parameters())
    assert list(swift.filters) == [24, 48, 96, 192] and 2.5e6 < n_params < 3.5e6  # paper: 3.15 M
    assert p["seed003"].get_parsed_content("patch_size") == [192, 128, 32]
    assert p["seed004"].get_parsed_content("fine_input_size") == [192, 192, 192]
    # seed 001 keeps nnU-Net's final checkpoint (one validation, after the last epoch) and slides
    # its window with step size 1 (no overlap), no TTA; seed 003's nnU-Nets keep the final one too
    for seed in ("seed001", "seed003"):
        t = _parser(FINE, "train.json", seed)
        assert t.get_parsed_content("val_interval") == t.get_parsed_content("max_epochs") in (1000, 1500)
    assert p["seed001"].get_parsed_content("sw_overlap") == 0.0 and p["seed001"].get_parsed_content("mirror_axes") == []
    # seed 002 keeps the best validated weights, validating every 50 epochs
    assert _parser(FINE, "train.json", "seed002").get_parsed_content("val_interval") == 50
    train = _parser(FINE, "train.json", "seed004")
    assert train.get_parsed_content("batch_size") == 2  # Table 3: batch 2 (one 192^3 crop per case)
    # "most of the settings have not been modified": the fine stage warms up 50 epochs like the coarse one
    assert train["lr_scheduler"]["warmup_steps"].startswith("$min(@lr_warmup_epochs")
    assert train.get_parsed_content("lr_warmup_epochs") == 50 and train.get_parsed_content("max_epochs") == 300
    assert type(train.get_parsed_content("optimizer")).__name__ == "AdamW"
    assert type(train.get_parsed_content("lr_scheduler")).__name__ == "WarmupCosineSchedule"
    assert type(_parser(FINE, "train.json", "seed000").get_parsed_content("loss")).__name__ == "SigmoidDiceBCELoss"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    items = []
    for i in range(2):
        hu, lab = _case(rng)
        cid = f"T_{i:04d}"
        save_nifti(hu, aff, root / "imagesTr" / f"{cid}_0000.nii.gz")
        save_nifti(lab, aff, root / "labelsTr" / f"{cid}.nii.gz")
        items.append({"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                      "annotated_classes": [1, 3, 14]})
    hu, lab = _case(rng)
    save_nifti(hu, aff, root / "imagesVal" / "V_0000.nii.gz")
    save_nifti(lab, aff, root / "labelsVal" / "V.nii.gz")
    val = [{"image": "imagesVal/V_0000.nii.gz", "label": "labelsVal/V.nii.gz"}]
    (root / "datalist.json").write_text(json.dumps({"training": items, "training_with_lesion": items,
                                                    "training_all_organs": items, "validation": val}))
    return root


def _run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    workflow.run()
    workflow.finalize()


@pytest.mark.parametrize("preset", sorted(FINE_SMALL))
def test_fine_preset_trains_one_epoch_and_segments(preset, dataset, tmp_path):
    small = FINE_SMALL[preset]
    models = tmp_path / "models"
    _run(config_workflow(_configs(FINE, "train.json", preset), str(FINE / "configs" / "metadata.json"), "train",
                         logging_file=str(FINE / "configs" / "logging.conf"),
                         bundle_root=str(FINE), ckpt_dir=str(models), dataset_dir=str(dataset), max_epochs=1,
                         val_interval=1, cache_rate=0.0, cache_dir="", device="cpu", **small))
    assert_trained_and_validated(models, epochs=1)
    state = torch.load(str(models / "model.pt"), map_location="cpu", weights_only=True)
    infer = _parser(FINE, "inference.json", preset, small)
    infer.get_parsed_content("network_def").load_state_dict(state)  # strict: training saved the inference net
    if preset == "seed003_teacher":  # S1, S2, S3 for seed 003's lesion vote, each a plain inference state dict
        for name in ("S1.pt", "S2.pt", "S3.pt"):
            sd = torch.load(str(models / name), map_location="cpu", weights_only=True)
            infer.get_parsed_content("network_def").load_state_dict(sd)
    torch.save(infer.get_parsed_content("coarse_network_def").state_dict(), models / "coarse_model.pt")
    extra = {}
    if preset == "seed002":  # the CFS ensemble: organ model = model.pt, two tumor checkpoints
        for k in (1, 2):
            shutil.copy(models / "model.pt", models / f"tumor_{k}.pt")
            extra[f"inferer#members#{k}#checkpoint"] = str(models / f"tumor_{k}.pt")
    inp, out = tmp_path / "in", tmp_path / "out"
    hu, _ = _case(np.random.default_rng(5))
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    save_nifti(hu, lps, inp / "A_0000.nii.gz")
    _run(config_workflow(_configs(FINE, "inference.json", preset), str(FINE / "configs" / "metadata.json"), "infer",
                         logging_file=str(FINE / "configs" / "logging.conf"),
                         bundle_root=str(FINE), input_dir=str(inp), output_dir=str(out), device="cpu",
                         model_path=str(models / "model.pt"), coarse_checkpoint=str(models / "coarse_model.pt"),
                         **small, **extra))
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz"]
    assert_mask_on_input_grid(out / "A.nii.gz", hu.shape, lps)


@pytest.mark.parametrize("preset", sorted(COARSE_SMALL))
def test_coarse_preset_trains_and_matches_the_fine_presets_coarse_stage(preset, dataset, tmp_path):
    """The coarse bundle's preset trains one epoch, and the fine preset of the same seed runs the same
    coarse network on the same grid and intensities (equal tensors from both chains)."""
    small = COARSE_SMALL[preset]
    _run(config_workflow(_configs(COARSE, "train.json", preset), str(COARSE / "configs" / "metadata.json"), "train",
                         logging_file=str(COARSE / "configs" / "logging.conf"),
                         bundle_root=str(COARSE), ckpt_dir=str(tmp_path), dataset_dir=str(dataset), max_epochs=1,
                         val_interval=1, cache_rate=0.0, cache_dir="", device="cpu", **small))
    assert_trained_and_validated(tmp_path, epochs=1)
    state = torch.load(str(tmp_path / "model.pt"), map_location="cpu", weights_only=True)

    coarse = _parser(COARSE, "inference.json", preset, small)
    fine_small = {k.replace("network_def#", "coarse_network_def#").replace("input_size", "coarse_input_size"): v for k, v in small.items() if k != "patch_size"}
    fine = _parser(FINE, "inference.json", preset, fine_small)
    fine.get_parsed_content("coarse_network_def").load_state_dict(state)  # strict: same architecture
    coarse.get_parsed_content("network_def").load_state_dict(state)
    hu, _ = _case(np.random.default_rng(3))
    image = MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None], affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    from monai.transforms import Compose

    a = Compose(coarse.get_parsed_content("resampling") + coarse.get_parsed_content("intensity_normalization"))
    b = fine.get_parsed_content("coarse_preprocessing")
    xa, xb = a({"image": image.clone()})["image"], b({"image": image.clone()})["image"]
    assert xa.shape == xb.shape
    torch.testing.assert_close(xa.as_tensor(), xb.as_tensor())
    torch.testing.assert_close(xa.affine, xb.affine)


def test_spacing_to_sized_gives_the_size_and_inverts_through_scores_to_labels():
    """Seed 000/004's fixed-size input: exactly the requested voxels, first/last voxel centres kept, and
    ScoresToLabelsd maps fine-grid scores back to the CT's own grid."""
    from abdoseg.inference.resample import ScoresToLabelsd
    from abdoseg.data.transforms import SpacingToSized
    from monai.transforms import Compose, Orientationd

    aff = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    lab = np.zeros((60, 50, 21), np.float32)
    lab[10:40, 12:30, 5:15] = 1
    pre = Compose([Orientationd("image", "RAS"),
                   SpacingToSized(["image"], [16, 16, 8], mode="bilinear", dtype=torch.float32)])
    data = pre({"image": MetaTensor(torch.as_tensor(lab)[None], affine=torch.as_tensor(aff))})
    x = data["image"]
    assert tuple(x.shape[1:]) == (16, 16, 8)
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:2, :2] = -np.eye(2)  # Orientationd flips X and Y of an LPS affine
    first = (x.affine.numpy() @ np.array([0, 0, 0, 1.0]))[:3]
    corner_in = aff @ np.array([59, 49, 0, 1.0])  # the RAS first voxel is the LPS last one along X and Y
    np.testing.assert_allclose(first, corner_in[:3], atol=1e-6)
    scores = torch.cat([1 - x, x]) * 10  # background / foreground "logits"
    out = ScoresToLabelsd("pred", transform=pre)({"image": x, "pred": scores})["pred"]
    assert tuple(out.shape) == (1, 60, 50, 21)
    dice = 2 * (out[0].numpy() * lab).sum() / (out[0].numpy().sum() + lab.sum())
    assert dice > 0.9


def test_mirror_axes_average_the_flipped_passes():
    from abdoseg.inference.sliding_window import FitSlidingWindowInferer

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    tta = FitSlidingWindowInferer([16, 16, 16], mirror_axes=[0, 2])
    assert tta.flip_combinations() == [(), (2,), (4,), (2, 4)]
    with torch.no_grad():
        expect = sum(torch.flip(net(torch.flip(x, d)), d) if d else net(x) for d in tta.flip_combinations()) / 4
        torch.testing.assert_close(tta(x, net), expect)
        plain = FitSlidingWindowInferer([16, 16, 16])(x, net)
        torch.testing.assert_close(plain, net(x))
        assert not torch.allclose(plain, expect)
    with pytest.raises(ValueError, match="mirror_axes"):
        FitSlidingWindowInferer([16, 16, 16], mirror_axes=[3])


FLIPS = ("RandFlipd", "monai.transforms.RandFlipd", "RandAxisFlipd", "monai.transforms.RandAxisFlipd")


def _flipped_axes(train: ConfigParser) -> set[int]:
    """Spatial axes that ``train#augmentation`` mirrors (image and label together)."""
    axes: set[int] = set()
    for t in train["train"]["augmentation"]:
        if t["_target_"] in FLIPS:
            a = t.get("spatial_axis")
            axes |= {0, 1, 2} if a is None or "Axis" in t["_target_"] else set([a] if isinstance(a, int) else a)
    return axes


@pytest.mark.parametrize("preset", sorted(FINE_SMALL))
def test_a_preset_mirrors_at_inference_only_on_axes_it_trains_flipped(preset):
    """Mirroring TTA averages the network's logits over flipped copies of the CT, which is only
    valid for a network that saw flipped training patches. No preset can add a flip (one file
    serves train.json and inference.json, and inference.json has no ``train`` section to append
    to), and the bundle's train.json has none, so no preset mirrors: seed 003's teacher runs
    without the paper's TTA, a documented deviation."""
    axes = set(_parser(FINE, "inference.json", preset).get_parsed_content("mirror_axes"))
    assert axes <= _flipped_axes(_parser(FINE, "train.json", preset)), (preset, axes)
    assert _flipped_axes(_parser(FINE, "train.json", preset)) == set()
    # the label_fusion seed003 preset pseudo-labels with the teacher preset (S1-S3, no TTA)
    lf = _parser(FUSION, "pseudo_label.json", "seed003", {"bundle_root": str(FUSION)})
    assert [Path(c).name for c in lf.get_parsed_content("teacher_config")] == ["inference.json", "seed003_teacher.json"]


def test_seed003_teacher_saves_s1_s2_s3_at_the_papers_epochs(tmp_path):
    """Seed 003: S1, S2, S3 are the Fine nnU-Net "saved after 1000, 950, and 900 epochs"."""
    from ignite.engine import Engine

    from abdoseg.training.handlers import EpochCheckpointSaver

    train = _parser(FINE, "train.json", "seed003_teacher")
    spec = next(h for h in train["train"]["handlers"] if h["_target_"] == "abdoseg.training.handlers.EpochCheckpointSaver")
    assert spec["epochs"] == "@checkpoint_epochs" and spec["filenames"] == "@checkpoint_filenames"
    max_epochs = train.get_parsed_content("max_epochs")
    saver = EpochCheckpointSaver(tmp_path, train.get_parsed_content("checkpoint_epochs"), torch.nn.Conv3d(1, 1, 1),
                                 filenames=train.get_parsed_content("checkpoint_filenames"))
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=max_epochs)
    assert max_epochs == 1000 and saver.saved == {"S1.pt": 1000, "S2.pt": 950, "S3.pt": 900}


def _lrs(parser: ConfigParser, epochs: int) -> list[float]:
    """The learning rate of each epoch 1..epochs under the config's ``lr_scheduler`` (stepped per epoch)."""
    sched = parser.get_parsed_content("lr_scheduler")
    out = []
    for _ in range(epochs):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_coarse_presets_run_their_papers_lr_schedules():
    """The coarse bundle steps ``lr_scheduler`` once per epoch (``LrScheduleHandler``); the default
    recipe keeps a constant rate, each preset its paper's schedule (seed 000: halved every 20
    epochs; seed 001: halved every 200; seed 004: 50 of 500 epochs warm-up, then cosine)."""
    base = ConfigParser()
    base.read_config(config_files(COARSE, "training"))
    handlers = base["train"]["handlers"]
    assert handlers[0] == {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False}
    base.update(checked_overrides(config_files(COARSE, "training"), {"device": "cpu"}))
    assert set(_lrs(base, 30)) == {base.get_parsed_content("learning_rate")}
    p000 = _parser(COARSE, "train.json", "seed000", {"device": "cpu", **COARSE_SMALL["seed000"]})
    assert p000.get_parsed_content("batch_size") * p000.get_parsed_content("num_samples") == 1  # Table 2: batch 1
    s000 = _lrs(p000, 41)
    assert s000[0] == s000[19] == 1e-4 and s000[20] == pytest.approx(5e-5) and s000[40] == pytest.approx(2.5e-5)
    s001 = _lrs(_parser(COARSE, "train.json", "seed001", {"device": "cpu", **COARSE_SMALL["seed001"]}), 401)
    assert s001[199] == 0.01 and s001[200] == pytest.approx(0.005) and s001[400] == pytest.approx(0.0025)
    p001 = _parser(COARSE, "train.json", "seed001")
    assert p001.get_parsed_content("batch_size") * p001.get_parsed_content("num_samples") == 2  # Table 2: batch 2
    p004 = _parser(COARSE, "train.json", "seed004", {"device": "cpu", **COARSE_SMALL["seed004"]})
    assert p004.get_parsed_content("max_epochs") == 500
    s004 = _lrs(p004, 500)
    assert s004[0] < s004[25] < s004[49] and s004[50] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(s004[50:], s004[51:])) and s004[-1] < 1e-4


def test_seed004_coarse_student_trains_on_the_supplemented_set(tmp_path):
    """Seed 004's coarse model is retrained on every supplemented case (label_fusion's fused
    datalist, key ``training``), not only on the fully labelled ones the default coarse recipe uses."""
    items = [{"image": f"i{k}.nii.gz", "label": f"l{k}.nii.gz"} for k in range(3)]
    (tmp_path / "fused_datalist.json").write_text(json.dumps({"training": items, "training_all_organs": items[:1],
                                                              "validation": []}))
    over = {"dataset_dir": str(tmp_path), "datalist": str(tmp_path / "fused_datalist.json")}
    assert len(_parser(COARSE, "train.json", "seed004", over).get_parsed_content("train_data")) == 3
    for seed in ("seed000", "seed001"):  # trained once on the fully labelled cases (seed 001: "only fully labeled data")
        assert len(_parser(COARSE, "train.json", seed, over).get_parsed_content("train_data")) == 1


def test_seed002_tumor_models_train_on_the_real_tumor_annotated_cases(tmp_path):
    """Seed 002's TSM trains on Group 4 of its Dataset 1: the cases with real tumor annotations, their
    unannotated organs filled by the organ model (CSM); the OSM set holds every case. The
    label_fusion seed002 preset builds that Dataset 1 (rule seed004, unlabeled scans get the
    teacher's organs): a lesion the teacher predicts on an unlabeled scan never makes it a tumor
    case, whereas seed 003's lesion vote would."""
    from test_label_fusion_bundle import make_dataset

    from abdoseg.label_fusion.workflow import fuse_datalist, select_and_write

    dl = make_dataset(tmp_path / "data")
    p = _parser(FUSION, "fuse.json", "seed002")
    assert p.get_parsed_content("rule") == "seed004" and p.get_parsed_content("seed004_unlabeled") == "teacher_organs"

    def fused_sets(rule, unlabeled, teachers):
        out = tmp_path / rule
        fuse_datalist(dl, out / "fused", rule, tmp_path / "data" / "pseudo", teachers, tmp_path / "data",
                      seed004_unlabeled=unlabeled)
        select_and_write(out / "fused", dl, out / "datalist.json", out / "report.json", dataset_dir=tmp_path / "data")
        new = json.loads((out / "datalist.json").read_text())
        return {k: sorted(Path(i["label"]).stem.split(".")[0] for i in new[k]) for k in ("training", "training_with_lesion")}

    seed002 = fused_sets(p.get_parsed_content("rule"), p.get_parsed_content("seed004_unlabeled"), ["s1"])
    # C1 and BS (a copy of C1; its bad pseudo_B is not read by this rule): real lesion annotations
    assert seed002 == {"training": ["BS", "C1", "F1", "U1"], "training_with_lesion": ["BS", "C1"]}
    seed003 = fused_sets("seed003", "skip", ["s1", "s2", "s3"])
    assert seed003["training_with_lesion"] == ["C1", "U1"]  # U1's lesion is the S1-S3 vote


def test_label_fusion_presets_set_the_rules():
    for seed, rule in (("seed001", "seed001"), ("seed002", "seed004"), ("seed003", "seed003"), ("seed004", "seed004")):
        assert _parser(FUSION, "fuse.json", seed).get_parsed_content("rule") == rule
    p = _parser(FUSION, "pseudo_label.json", "seed003", {"bundle_root": "/b"})
    assert {k: Path(v).name for k, v in p.get_parsed_content("checkpoints").items()} == \
        {"S1": "S1.pt", "S2": "S2.pt", "S3": "S3.pt"}
    assert _parser(FUSION, "fuse.json", "seed003").get_parsed_content("teacher_names") == ["S1", "S2", "S3"]
    # seed 001 selects "based on a pre-defined uncertainty score threshold" (value not given): 0.05
    assert _parser(FUSION, "select.json", "seed001").get_parsed_content("threshold") == 0.05


def test_key_metric_channels_select_the_lesion():
    from abdoseg.training.handlers import from_engine_channels

    pred = torch.zeros(15, 4, 4, 4)
    label = torch.zeros(15, 4, 4, 4)
    select = from_engine_channels(["pred", "label"], [0, 14])
    p, lab = select([{"pred": pred, "label": label}])
    assert p[0].shape == (2, 4, 4, 4) and lab[0].shape == (2, 4, 4, 4)
    assert from_engine_channels(["pred", "label"], None)([{"pred": pred, "label": label}])[0][0].shape[0] == 15


def test_segment_preset_option_merges_the_overlay_and_names_a_missing_one():
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.io import InputError
    from abdoseg.segment import bundle_weight_files, preset_configs

    configs = preset_configs(FINE, "seed002")
    assert configs == ["configs/inference.json", "configs/presets/seed002.json"]
    parser = load_bundle_config(FINE, configs)
    # the ensemble's tumor checkpoints are found as weights the preset needs (checked before any case runs)
    names = {p.name for p in bundle_weight_files(FINE, parser, configs)}
    assert {"model.pt", "coarse_model.pt", "tumor_1.pt", "tumor_2.pt"} <= names
    with pytest.raises(InputError, match="no such preset; this bundle has: seed000, seed001"):
        preset_configs(FINE, "seed009")


def test_class_intensity_shift_moves_each_class_by_one_offset_and_leaves_background():
    from abdoseg.data.transforms import RandClassIntensityShiftd

    lab = torch.zeros(1, 6, 6, 6)
    lab[0, :3] = 1
    lab[0, 3:, :3] = 13
    img = MetaTensor(torch.rand(1, 6, 6, 6))
    t = RandClassIntensityShiftd("image", prob=1.0, class_prob=1.0, max_shift=0.2)
    t.set_random_state(3)
    out = t({"image": img.clone(), "label": lab})["image"]
    diff = (out - img).as_tensor()[0]
    for c in (1, 13):
        vals = diff[lab[0] == c]
        assert torch.allclose(vals, vals[0].expand_as(vals)) and 0 < abs(float(vals[0])) <= 0.2
    assert torch.all(diff[lab[0] == 0] == 0) and isinstance(out, MetaTensor)
    off = RandClassIntensityShiftd("image", prob=0.0)
    assert torch.equal(off({"image": img, "label": lab})["image"], img)  # the bundle default (prob 0) is a no-op


STATUSES = ("as the paper", "deviation: ", "**missing**: ")


def test_docs_preset_tables_give_every_row_a_status_and_count_them():
    """The fine docs read each paper row by row: every row of a seed table says *as the paper*,
    *deviation: <reason>* or *missing: <reason>*, and each table's count line is those rows'
    count (so "every deviation is documented" is checked, not claimed)."""
    import re

    docs = (FINE / "docs" / "README.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Seed system presets"):docs.index("## Resolution / speed defaults")]
    tables = [t for t in section.split("\n### ") if t.startswith("seed 00")]
    assert [t[:8] for t in tables] == ["seed 000", "seed 001", "seed 002", "seed 003", "seed 004"]
    for table in tables:
        counts = {s: 0 for s in STATUSES}
        rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| setting")
                and "**CPU override**" not in r]
        assert len(rows) >= 10, table[:8]
        for row in rows:
            status = row.rstrip().rstrip("|").rsplit(" | ", 1)[-1].strip()
            kind = next((s for s in STATUSES if status.startswith(s)), None)
            assert kind is not None, (table[:8], row[:60])
            if kind != "as the paper":
                assert len(status) > len(kind) + 10, (table[:8], row[:60])  # the reason is given
            counts[kind] += 1
        line = re.search(r"\*\*Seed (\d{3}) count: as the paper (\d+) · deviation, documented (\d+) · missing (\d+)\.\*\*",
                         table)
        assert line and "seed " + line.group(1) == table[:8], table[:8]
        assert [int(g) for g in line.groups()[1:]] == list(counts.values()), table[:8]
