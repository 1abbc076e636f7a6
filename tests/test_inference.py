"""The fine bundle's inference chain, built from its own ``configs/inference.json`` with threshold
stand-in networks: geometry, ROI, fallback, ensemble, score resampling, bad input, and the parity
of the training-validation and inference preprocessing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from abdoseg.inference.resample import resample_scores_to_labels, spacing_axis_maps
from abdoseg.inference.segmenter import BundleSegmenter
from abdoseg.inference.sliding_window import EnsembleInferer, FitSlidingWindowInferer, fit_window
from abdoseg.bundle.config import config_files
from abdoseg.io import InputError, save_nifti
from abdoseg.inference.roi import EmptyRoiWarning

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")


FINE = Path(__file__).resolve().parents[1] / "bundles" / "fine_organ_tumor"
HU_WIN = (-325.0, 325.0)


def _hu_of(x: torch.Tensor) -> torch.Tensor:
    return x * (HU_WIN[1] - HU_WIN[0]) + HU_WIN[0]


class ThresholdNet(torch.nn.Module):
    """Stand-in fine net: HU > 150 -> liver (1); 40 < HU <= 150 -> lesion (14); else background.
    Works on windowed input in [0, 1]; logits are one-hot * 10."""

    def __init__(self, num_classes: int = 15, bands=((150.0, 1e9, 1), (40.0, 150.0, 14))):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.num_classes = num_classes
        self.bands = bands
        self.strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]  # divisor 4, as a 3-level U-Net
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        hu = _hu_of(x[:, 0])
        lab = torch.zeros_like(hu, dtype=torch.long)
        for lo, hi, c in self.bands:
            lab[(hu > lo) & (hu <= hi)] = c
        out = torch.nn.functional.one_hot(lab, self.num_classes).permute(0, 4, 1, 2, 3).float() * 10.0
        return out + self.w * 0


class CoarseNet(torch.nn.Module):
    """Stand-in coarse net: 2 channels, foreground where HU > 0 (or nothing if ``empty``)."""

    def __init__(self, empty: bool = False):
        super().__init__()
        self.empty = empty
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (_hu_of(x) > 0).float() * (0.0 if self.empty else 1.0)
        return torch.cat([1 - fg, fg], 1) * 5.0


def expected_labels(hu: np.ndarray) -> np.ndarray:
    out = np.zeros(hu.shape, np.uint8)
    out[hu > 150] = 1
    out[(hu > 40) & (hu <= 150)] = 14
    return out


def phantom(shape=(48, 40, 20)) -> np.ndarray:
    """Asymmetric blocks in air: a 'liver' block (200 HU) with a 'lesion' (100 HU) inside."""
    hu = np.full(shape, -1000, np.int16)
    hu[8:30, 6:26, 3:15] = 200
    hu[10:16, 8:12, 5:9] = 100
    return hu


def _affine(spacing, codes: str) -> np.ndarray:
    """Affine for axis codes like 'RAS', 'LPS', 'ASR' (voxel axis i points along codes[i])."""
    dirs = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    a = np.zeros((4, 4))
    for i, c in enumerate(codes):
        ax, sgn = dirs[c]
        a[ax, i] = sgn * spacing[i]
    a[:3, 3] = (-100.0, 50.0, 12.5)
    a[3, 3] = 1
    return a


def bundle_parser(coarse=None, fine=None, **overrides) -> ConfigParser:
    """The fine bundle's inference.json with stand-in networks (no checkpoints) and overrides."""
    parser = ConfigParser()
    parser.read_config(str(FINE / "configs" / "inference.json"))
    parser["bundle_root"] = str(FINE)
    parser["device"] = "$torch.device('cpu')"
    parser["coarse_network_def"] = coarse if coarse is not None else CoarseNet()
    parser["coarse_checkpoint"] = None
    parser["network_def"] = fine if fine is not None else ThresholdNet()
    parser["autocast_dtype"] = None  # float32: the stand-in nets threshold exact HU values
    # these tests place objects on exact voxel grids: the crop to the body (every voxel counts as
    # body here, no margin: the whole volume) is the subject of test_fov_invariance.py
    parser["body_hu_threshold"] = -1e9
    parser["body_margin_mm"] = [0.0, 0.0, 0.0]
    for k, v in overrides.items():
        parser[k] = v
    return parser


def bundle_segmenter(**kw) -> BundleSegmenter:
    parser = bundle_parser(**kw)
    post = parser.get_parsed_content("postprocessing")
    from monai.transforms import Compose, SaveImaged

    post = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
    return BundleSegmenter(parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer"),
                           parser.get_parsed_content("network_def"), post)


def _segment(tmp_path: Path, hu: np.ndarray, affine: np.ndarray, **kw) -> np.ndarray:
    path = tmp_path / "CASE_0000.nii.gz"
    save_nifti(hu, affine, path)
    mask, aff = bundle_segmenter(**kw)({"image": str(path)})
    assert mask.dtype == np.uint8 and mask.shape == hu.shape
    np.testing.assert_allclose(aff, nib.load(str(path)).affine)
    return mask


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAI", "ASR"])
def test_orientation_roundtrip_exact(codes, tmp_path):
    """Fine spacing = RAS-ordered input spacing: Spacingd is the identity, so the mask must equal
    the thresholding exactly, whatever the file's axis order and directions."""
    spacing = (0.8, 1.2, 2.5)
    hu = phantom()
    ras_spacing = [0.0] * 3
    for i, c in enumerate(codes):
        ras_spacing["RLAPSI".index(c) // 2] = spacing[i]
    out = _segment(tmp_path, hu, _affine(spacing, codes), fine_spacing_mm=ras_spacing, margin_mm=10.0)
    np.testing.assert_array_equal(out, expected_labels(hu))


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_resampled_fine_stage_overlays_input(codes, tmp_path):
    """Fine grid differs from the input grid: labels still land on the right voxels (the lesion is
    the brightest class here, so that interpolated edges against air stay liver). Thresholding a
    resampled block moves its edges by up to a fine voxel depending on the sampling phase (and the
    one-hot stand-in scores tie exactly at half-way samples), so the check is Dice > 0.85 and the
    centre of mass within 1.5 input voxels; the exact grid is checked against MONAI below."""
    hu = np.full((56, 48, 24), -1000, np.int16)
    hu[8:40, 6:36, 3:20] = 100
    hu[12:24, 10:20, 6:13] = 300
    exp = np.zeros(hu.shape, np.uint8)
    exp[hu == 100] = 1
    exp[hu == 300] = 14
    out = _segment(tmp_path, hu, _affine((0.7, 0.9, 2.0), codes), fine_spacing_mm=[1.4, 1.5, 2.5], margin_mm=10.0,
                   fine=ThresholdNet(bands=((150.0, 1e9, 14), (40.0, 150.0, 1))))
    from scipy.ndimage import center_of_mass

    for c in (1, 14):
        dice = 2 * np.logical_and(out == c, exp == c).sum() / ((out == c).sum() + (exp == c).sum())
        assert dice > 0.85, (c, dice)
        shift = np.subtract(center_of_mass(out == c), center_of_mass(exp == c))
        assert np.abs(shift).max() < 1.5, (c, shift)  # edge quantisation: <= 1 fine voxel = 2 input voxels, one side


def test_sliding_window_matches_single_pass(tmp_path):
    hu = phantom()
    aff = _affine((1.0, 1.0, 2.5), "RAS")
    net = ThresholdNet()
    single = _segment(tmp_path, hu, aff, fine=net, fine_spacing_mm=[1.0, 1.0, 2.5])
    assert len(net.calls) == 1
    net = ThresholdNet()
    sw = _segment(tmp_path, hu, aff, fine=net, fine_spacing_mm=[1.0, 1.0, 2.5], patch_size=[16, 16, 8], sw_overlap=0.5)
    assert len(net.calls) > 8 and all(c == (16, 16, 8) for c in net.calls)
    np.testing.assert_array_equal(single, sw)


def test_fitted_window_is_never_larger_than_needed():
    assert fit_window(90, 192, 16, 0.25) == 96          # fits: one pass over itself
    assert fit_window(200, 192, 16, 0.25) == 128        # 2 windows of 128, not 2 of 192
    assert fit_window(16, 128, 16, 0.25) == 16
    inf = FitSlidingWindowInferer(roi_size=(192, 192, 128))
    assert inf.window_for((90, 70, 20), CoarseNet()) == (96, 80, 32)  # no strides: divisor 16
    assert inf.window_for((10, 10, 10), CoarseNet()) == (32, 16, 16)  # 1x1x1 bottleneck avoided
    assert inf.window_for((90, 70, 21), ThresholdNet()) == (92, 72, 24)  # divisor 4


def _crop_of(tmp_path: Path, hu: np.ndarray, **kw) -> list[int]:
    """Voxels the coarse stage cut off (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi) of an RAS CT."""
    path = tmp_path / "ROI_0000.nii.gz"
    save_nifti(hu, _affine((1.0, 1.0, 2.5), "RAS"), path)
    d = bundle_parser(fine_spacing_mm=[1.0, 1.0, 2.5], **kw).get_parsed_content("preprocessing")({"image": str(path)})
    return [int(v) for v in [o for o in d["image"].applied_operations if o["class"] == "Crop"][0]["extra_info"]["cropped"]]


def far_blob_phantom() -> np.ndarray:
    hu = phantom((64, 40, 20))
    hu[56:60, 30:34, 14:18] = 200  # small bright blob far from the main block
    return hu


def test_roi_excludes_distant_small_object(tmp_path):
    """Only the largest coarse component (+ margin) is segmented; a far small blob stays background."""
    hu = far_blob_phantom()
    x_lo, x_hi, y_lo, y_hi, z_lo, z_hi = _crop_of(tmp_path, hu, margin_mm=4.0)
    assert 0 < x_lo <= 8 - 4 and 64 - x_hi <= 30 + 6 + 4 and 64 - x_hi < 56  # block 8..30 (+ 6 mm coarse voxels)
    out = _segment(tmp_path, hu, _affine((1.0, 1.0, 2.5), "RAS"), fine_spacing_mm=[1.0, 1.0, 2.5], margin_mm=4.0)
    assert (out[56:60, 30:34, 14:18] == 0).all()
    np.testing.assert_array_equal(out[:40], expected_labels(hu)[:40])


def test_coarse_empty_falls_back_to_whole_volume_with_warning_naming_file(tmp_path):
    with pytest.warns(EmptyRoiWarning, match="ROI_0000.nii.gz"):
        assert _crop_of(tmp_path, far_blob_phantom(), coarse=CoarseNet(empty=True)) == [0] * 6


def test_single_stage_switch_crops_nothing(tmp_path):
    net = CoarseNet()
    assert _crop_of(tmp_path, far_blob_phantom(), margin_mm=4.0, single_stage=True, coarse=net) == [0] * 6
    assert _crop_of(tmp_path, far_blob_phantom(), margin_mm=4.0, coarse=net) != [0] * 6


def test_ensemble_members_through_the_bundle_config_never_share_weights(tmp_path):
    """Issue 11 regression: a config pointing members at ``@network_def`` gets the bundle's own
    module object; loading a member checkpoint must not overwrite the organ model, and repeated
    calls on the same input must give the same mask."""
    from abdoseg.networks import PocketUNet

    kw = dict(spatial_dims=3, in_channels=1, out_channels=15, channels=4, kernel_size=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * 2, deep_supervision=False)
    torch.manual_seed(0)
    organ, tumor = PocketUNet(**kw), PocketUNet(**kw)
    torch.save(tumor.state_dict(), tmp_path / "tumor.pt")
    parser = bundle_parser(fine=organ, fine_spacing_mm=[2.0, 2.0, 2.5])
    parser["inferer"] = {"_target_": "abdoseg.inference.sliding_window.EnsembleInferer",
                         "inferer": {"_target_": "abdoseg.inference.sliding_window.FitSlidingWindowInferer",
                                     "roi_size": [64, 64, 64]},
                         "members": [{"network": None},
                                     {"network": "@network_def", "checkpoint": str(tmp_path / "tumor.pt")},
                                     {"network": "@network_def", "checkpoint": str(tmp_path / "tumor.pt")}],
                         "rules": [{"members": [0], "classes": list(range(1, 14))},
                                   {"members": [1, 2], "classes": [14]}]}
    organ_before = {k: v.clone() for k, v in organ.state_dict().items()}
    ens = parser.get_parsed_content("inferer")
    assert isinstance(ens, EnsembleInferer)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        a = ens(x, organ)
        b = ens(x, organ)
    torch.testing.assert_close(a, b)
    for k, v in organ.state_dict().items():  # the organ model kept its own weights
        torch.testing.assert_close(v, organ_before[k])
    member = ens.members[1]["network"]
    assert member is not organ and member is not ens.members[2]["network"]
    torch.testing.assert_close(member.state_dict()["input_block.conv1.conv.weight"],
                               tumor.state_dict()["input_block.conv1.conv.weight"])


def test_ensemble_merge_rules():
    x = MetaTensor(torch.as_tensor(phantom(), dtype=torch.float32)[None, None])
    x = (x - HU_WIN[0]) / (HU_WIN[1] - HU_WIN[0])
    # organ model: everything > 40 HU is liver; tumor models: 40..150 HU is lesion (and > 150 spleen,
    # which the rule ignores). CFS merge -> liver from the organ model, lesion from the tumor models.
    organ = ThresholdNet(bands=((40.0, 1e9, 1),))
    tumor = ThresholdNet(bands=((150.0, 1e9, 3), (40.0, 150.0, 14)))
    ens = EnsembleInferer(FitSlidingWindowInferer((64, 64, 64)),
                          members=[{"network": None}, {"network": tumor}, {"network": tumor}],
                          rules=[{"members": [0], "classes": list(range(1, 14))}, {"members": [1, 2], "classes": [14]}])
    with torch.no_grad():
        probs = ens(x.clamp(0, 1), organ)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs[0].argmax(0).numpy(), expected_labels(phantom()))


def test_resample_scores_to_labels_matches_trilinear():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, 6, 9, generator=g)
    want = torch.nn.functional.interpolate(scores[None], size=(13, 11, 20), mode="trilinear",
                                           align_corners=False)[0].argmax(0)
    got = resample_scores_to_labels(scores, (13, 11, 20), slab_elements=5 * 13 * 11 * 3)
    assert (got.long() == want).float().mean() > 0.999  # float rounding may flip exact ties only


def test_resample_scores_to_labels_smooth_scores_uses_agreement_shortcut_exactly():
    """Smooth scores (large one-label regions, thin boundaries) as a trained net gives: the labels
    equal F.interpolate + argmax, including where only one Z source plane changes label."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(1, 6, 4, 4, 3, generator=g)
    scores = torch.nn.functional.interpolate(coarse, size=(20, 18, 9), mode="trilinear", align_corners=False)[0] * 4
    out_shape = (47, 41, 26)
    want = torch.nn.functional.interpolate(scores[None], size=out_shape, mode="trilinear",
                                           align_corners=False)[0].argmax(0)
    got = resample_scores_to_labels(scores, out_shape, slab_elements=6 * 47 * 41 * 4)
    assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape
    assert len(torch.unique(want)) >= 3
    assert (got.long() == want).float().mean() > 0.9999


def test_scores_go_back_exactly_where_monai_spacing_took_them():
    """The inverse of ``Spacingd`` for scores uses MONAI's own grid: resampling smooth scores from
    the fine grid back with MONAI ``SpatialResample`` (bilinear) + argmax gives the same labels."""
    from monai.transforms import Spacing

    crop_aff = torch.as_tensor(_affine((0.7, 0.9, 2.0), "RAS"), dtype=torch.float64)
    crop = MetaTensor(torch.zeros(1, 57, 43, 23), affine=crop_aff)
    fine = Spacing(pixdim=(2.0, 2.0, 3.0))(crop)
    g = torch.Generator().manual_seed(2)
    coarse = torch.randn(1, 5, 4, 4, 3, generator=g)
    scores = torch.nn.functional.interpolate(coarse, size=tuple(fine.shape[1:]), mode="trilinear")[0] * 4
    maps = spacing_axis_maps(np.asarray(fine.affine), np.asarray(crop_aff))
    got = resample_scores_to_labels(scores, (57, 43, 23), maps)
    ref = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(scores, affine=fine.affine), dst_affine=crop_aff, spatial_size=(57, 43, 23))
    want = ref.argmax(0)
    assert (got.long() == want).float().mean() > 0.999
    # the old half-voxel-offset mapping (F.interpolate, align_corners=False) disagrees far more often
    old = resample_scores_to_labels(scores, (57, 43, 23))
    assert (old.long() != want).sum() > 10 * max(1, int((got.long() != want).sum()))


# ------------------------------------------------------------------------------------------------
# training and inference see the same tensors
# ------------------------------------------------------------------------------------------------
def _train_parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(FINE, "training"))
    parser["bundle_root"] = str(FINE)
    return parser


def test_train_and_inference_share_one_fine_preprocessing_definition():
    """One definition: train.json does not restate inference.json's network, grid or
    preprocessing; training merges inference.json first and uses its chain."""
    train = json.loads((FINE / "configs" / "train.json").read_text())
    infer = json.loads((FINE / "configs" / "inference.json").read_text())
    shared = ("fine_transforms", "fine_resampling", "intensity_normalization", "fine_spacing_mm", "hu_window",
              "margin_mm", "num_classes", "patch_size", "network_def", "network", "device")
    assert not set(shared) & set(train)
    assert set(shared) <= set(infer)
    assert "@fine_transforms" in train["validate"]["preprocessing"]["transforms"]
    assert "@fine_transforms" in train["train"]["preprocessing"]["transforms"]
    assert "@fine_transforms" in infer["preprocessing"]["transforms"]
    # the fine network runs on windows of its training patch (instance norm sees the same extent)
    assert infer["inferer"]["roi_size"] == "@patch_size" and train["validate"]["inferer"]["roi_size"] == "@patch_size"


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_validation_chain_and_inference_chain_give_equal_tensors(codes, tmp_path):
    """The same CT (int16 on disk, oblique-free LPS/RAS) through train.json's validation
    preprocessing (label covering the whole volume, so the label-box crop keeps everything) and
    through inference.json's preprocessing (single stage: no coarse crop): equal tensors and grids."""
    hu = phantom((50, 44, 18)).astype(np.int16)
    hu[20:30, 20:30, 5:10] = 37
    aff = _affine((0.8, 0.9, 2.5), codes)
    img_path, lab_path = tmp_path / "CASE_0000.nii.gz", tmp_path / "CASE.nii.gz"
    save_nifti(hu, aff, img_path)
    save_nifti(np.ones(hu.shape, np.uint8), aff, lab_path)
    val = _train_parser().get_parsed_content("validate#preprocessing")({"image": str(img_path), "label": str(lab_path)})
    inf = bundle_parser(single_stage=True).get_parsed_content("preprocessing")({"image": str(img_path)})
    a, b = val["image"], inf["image"]
    assert a.shape == b.shape and a.shape[1:] != hu.shape  # really resampled to 2x2x3 mm
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-6)
    torch.testing.assert_close(a.as_tensor().float(), b.as_tensor().float(), rtol=0, atol=1e-6)


def test_inference_crop_equals_validation_crop_on_the_same_box(tmp_path):
    """With the same ROI box, the fine stage of both configs sees identical tensors: the crop is
    taken on the oriented original grid and Spacingd starts from the crop's first voxel in both."""
    from monai.transforms import Crop

    hu = phantom((50, 44, 18))
    aff = _affine((0.8, 0.9, 2.5), "LPS")
    img_path = tmp_path / "CASE_0000.nii.gz"
    save_nifti(hu, aff, img_path)
    lab = np.zeros(hu.shape, np.uint8)
    lab[8:30, 6:26, 3:15] = 1
    lab_path = tmp_path / "CASE.nii.gz"
    save_nifti(lab, aff, lab_path)
    val = _train_parser().get_parsed_content("validate#preprocessing")({"image": str(img_path), "label": str(lab_path)})
    cropped = [o for o in val["image"].applied_operations if o["class"] == "SpatialCrop"][0]["extra_info"]["cropped"]
    parser = bundle_parser(single_stage=True)
    pre = parser.get_parsed_content("preprocessing")
    oriented = {"image": str(img_path)}
    for t in pre.transforms[:4]:  # load, channel, checks, orientation
        oriented = t(oriented)
    shape = oriented["image"].shape[1:]
    box = tuple(slice(cropped[2 * i], shape[i] - cropped[2 * i + 1]) for i in range(3))
    x = {"image": Crop()(oriented["image"], box)}
    for t in parser.get_parsed_content("fine_transforms"):
        x = t(x)
    torch.testing.assert_close(x["image"].as_tensor().float(), val["image"].as_tensor().float(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x["image"].affine), np.asarray(val["image"].affine), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# files, bad input, batch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rotated", "sheared"])
def test_segmenter_keeps_file_geometry_of_oblique_scan(kind, tmp_path):
    """A rotated scan (orthogonal directions) keeps the separable score resampling; a sheared one
    (gantry tilt) falls back to MONAI's full resampling. Both come back on the file's grid."""
    hu = phantom()
    aff = _affine((0.8, 1.2, 2.5), "LPS")
    c, s = np.cos(0.02), np.sin(0.02)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    aff[:3, :3] = rot @ aff[:3, :3] if kind == "rotated" else aff[:3, :3] @ rot
    out = _segment(tmp_path, hu, aff, fine_spacing_mm=[0.8, 1.2, 2.5], margin_mm=10.0)
    agree = (out == expected_labels(hu)).mean()
    assert agree == 1.0 if kind == "rotated" else agree > 0.99


def _bad_files(tmp_path):
    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    good = phantom()
    cases = {
        "2d": (good[:, :, 0], "3D"),
        "4d": (np.stack([good, good], -1), "3D"),
        "oneslice": (good[:, :, 5:6], "fewer than"),
        "nonct": ((good.astype(np.float32) + 1000) / 1200, "Hounsfield"),
        "unscaled": (good.astype(np.int32) + 1024, "Hounsfield"),
        "nan": (np.where(good > 150, np.nan, good).astype(np.float32), "NaN"),
    }
    out = {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, (arr, msg) in cases.items():
        p = tmp_path / f"{name}_0000.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), str(p))
        out[name] = (p, msg)
    p = tmp_path / "text_0000.nii.gz"
    p.write_text("not an image")
    out["text"] = (p, "could not be read")
    return out


def _library_noise_off_our_warnings_errors() -> None:
    """Inside ``warnings.catch_warnings()``: the library notices the CLI silences are off, and a
    warning of this package is an error (a bad file must be refused, not warned about)."""
    from abdoseg.cli import quiet_library_noise
    from abdoseg.inference.ct_checks import ImplausibleCTWarning
    from abdoseg.inference.roi import EmptyRoiWarning

    quiet_library_noise()
    for category in (ImplausibleCTWarning, EmptyRoiWarning):
        warnings.simplefilter("error", category)


def test_bad_inputs_raise_input_error_naming_file(tmp_path):
    seg = bundle_segmenter()
    for name, (path, msg) in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as ei, warnings.catch_warnings():
            _library_noise_off_our_warnings_errors()
            seg({"image": str(path)})
        assert str(path) in str(ei.value), name
        assert msg in str(ei.value), (name, str(ei.value))


def test_batch_continues_and_reports_bad_inputs(tmp_path):
    from abdoseg.inference.batch import run_batch

    bad = _bad_files(tmp_path / "in")
    good = tmp_path / "in" / "good_0000.nii.gz"
    save_nifti(phantom(), _affine((0.8, 1.2, 2.5), "RAS"), good)
    items = [{"image": str(p)} for p, _ in bad.values()] + [{"image": str(good)}]
    from abdoseg.cli import quiet_library_noise
    from abdoseg.inference.ct_checks import ImplausibleCTWarning

    with warnings.catch_warnings(), pytest.warns(ImplausibleCTWarning) as rec:
        quiet_library_noise()
        report = run_batch(items, bundle_segmenter(), tmp_path / "out", rank=0, world_size=1)
    # the small test volume is the one warning of this package: its 38 mm field of view
    ours = [str(w.message) for w in rec if w.category.__module__.startswith("abdoseg")]
    assert len(ours) == 1 and ours[0].startswith(f"{good}: unusual for an abdominal CT: field of view"), ours
    assert report.done == ["good"]
    assert sorted(c for c, _, _ in report.failed) == sorted(p.name[: -len("_0000.nii.gz")] for p, _ in bad.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    with pytest.raises(SystemExit):
        report.raise_if_failed()


def test_inference_config_has_monai_standard_workflow_properties(tmp_path):
    from monai.bundle import create_workflow

    wf = create_workflow(workflow_type="inference", config_file=str(FINE / "configs" / "inference.json"),
                         meta_file=str(FINE / "configs" / "metadata.json"), bundle_root=str(FINE),
                         input_dir=str(tmp_path))
    assert wf.check_properties() in (None, [])


def test_training_roi_crop_matches_margin_in_mm():
    from abdoseg.data.transforms import RandForegroundRoiCropd

    lab = np.zeros((40, 40, 20), np.uint8)
    lab[10:20, 12:22, 8:12] = 1
    aff = torch.diag(torch.tensor([1.0, 2.0, 4.0, 1.0]))
    img = MetaTensor(torch.arange(40 * 40 * 20, dtype=torch.float32).reshape(1, 40, 40, 20), affine=aff)
    d = {"image": img, "label": MetaTensor(torch.as_tensor(lab)[None], affine=aff)}
    out = RandForegroundRoiCropd(["image", "label"], "label", margin_mm=8.0, jitter_mm=0.0)(d)
    assert tuple(out["image"].shape[1:]) == (10 + 16, 10 + 8, 4 + 4)
    assert out["image"][0, 0, 0, 0].item() == img[0, 2, 8, 6].item()
    assert torch.equal(out["label"][0] > 0, torch.as_tensor(lab[2:28, 8:26, 6:14] > 0))
    np.testing.assert_allclose(np.asarray(out["image"].affine)[:3, 3], [2.0, 16.0, 24.0])
    t = RandForegroundRoiCropd(["image", "label"], "label", margin_mm=8.0, jitter_mm=4.0)
    sizes = set()
    for seed in range(8):
        t.set_random_state(seed)
        o = t(d)["image"].shape[1:]
        assert 10 + 2 * 4 <= o[0] <= 10 + 2 * 12 and 4 + 2 * 1 <= o[2] <= 4 + 2 * 3
        sizes.add(tuple(o))
    assert len(sizes) > 1


def test_weights_of_another_architecture_fail_once_at_load_with_one_line(tmp_path):
    """Coarse weights that do not fit coarse_network_def: one InputError naming the file, raised
    when the chain is built (not once per CT, not hundreds of size-mismatch lines)."""
    from abdoseg.networks import PocketUNet

    other = PocketUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=4, kernel_size=[[3, 3, 3]] * 3,
                       strides=[[1, 1, 1]] + [[2, 2, 2]] * 2, deep_supervision=False)
    bad = tmp_path / "coarse_model.pt"
    torch.save(other.state_dict(), bad)
    parser = ConfigParser()
    parser.read_config(str(FINE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(FINE), "device": "$torch.device('cpu')", "coarse_checkpoint": str(bad)})
    with pytest.raises(Exception) as ei:
        parser.get_parsed_content("preprocessing")
    err = ei.value
    while not isinstance(err, InputError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, InputError), repr(ei.value)
    msg = str(err)
    assert str(bad) in msg and "coarse network" in msg and "another shape" in msg
    assert "\n" not in msg and len(msg) < 500


def test_autocast_inferer_trains_in_bfloat16_with_float32_scores():
    """The training inferer: forward under CPU bf16 autocast, float32 scores out, gradients reach
    every float32 weight, and the loss differs from the float32 forward only by bf16 rounding."""
    from monai.networks.nets import BasicUNet

    from abdoseg.inference.sliding_window import AutocastInferer

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4))
    x = torch.rand(2, 1, 32, 32, 32)
    ref = AutocastInferer(None)(x, net)
    out = AutocastInferer("bfloat16")(x, net)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 0 < (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()  # bf16 ran, and close
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(ValueError, match="autocast dtype"):
        AutocastInferer("float64")


def test_fine_training_config_uses_the_autocast_training_inferer():
    parser = ConfigParser()
    parser.read_config(config_files(FINE, "training"))
    parser["device"] = "$torch.device('cpu')"
    from abdoseg.inference.sliding_window import AutocastInferer, cpu_has_fast_bf16

    inferer = parser.get_parsed_content("train#inferer")
    assert isinstance(inferer, AutocastInferer)
    assert inferer.dtype == ("bfloat16" if cpu_has_fast_bf16() else None)
    assert parser.get_parsed_content("validate#inferer").autocast_dtype == inferer.dtype
