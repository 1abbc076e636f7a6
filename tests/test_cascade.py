"""CascadeInferer geometry, ROI and fallback behaviour with threshold stand-in networks."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from abdoseg.cascade import (CascadeInferer, CascadeSegmenter, EnsembleCascadeInferer, ValidateCTd, from_ras,
                             resample_scores_to_labels, to_ras)
from abdoseg.io import InputError, save_nifti
from abdoseg.roi import EmptyRoiWarning

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


def _run(hu: np.ndarray, affine: np.ndarray, **kw) -> np.ndarray:
    inferer = CascadeInferer(CoarseNet(kw.pop("empty", False)), margin_mm=10.0, **kw)
    x = MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None, None], affine=torch.as_tensor(affine))
    out = inferer(x, ThresholdNet())
    assert isinstance(out, MetaTensor)
    assert tuple(out.shape) == (1, 1, *hu.shape)
    assert np.allclose(np.asarray(out.affine), affine)
    return out[0, 0].numpy()


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAI", "ASR"])
def test_orientation_roundtrip_exact(codes):
    """Fine spacing = RAS-ordered input spacing: no interpolation, output must equal thresholding."""
    spacing = (0.8, 1.2, 2.5)
    hu = phantom()
    affine = _affine(spacing, codes)
    ras_spacing = [0.0] * 3
    for i, c in enumerate(codes):
        ras_spacing["RLAPSI".index(c) // 2] = spacing[i]
    out = _run(hu, affine, fine_spacing_mm=ras_spacing, roi_size=(64, 64, 64))
    np.testing.assert_array_equal(out, expected_labels(hu))


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_resampled_fine_stage_overlays_input(codes):
    """Fine grid differs from the input grid: labels still land on the right voxels. Here the
    lesion is the brightest class so that interpolated edges against air stay liver."""
    hu = np.full((56, 48, 24), -1000, np.int16)
    hu[8:40, 6:36, 3:20] = 100
    hu[12:24, 10:20, 6:13] = 300
    exp = np.zeros(hu.shape, np.uint8)
    exp[hu == 100] = 1
    exp[hu == 300] = 14
    affine = _affine((0.7, 0.9, 2.0), codes)
    inferer = CascadeInferer(CoarseNet(), margin_mm=10.0, fine_spacing_mm=(1.4, 1.5, 2.5), roi_size=(64, 64, 64))
    x = MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None, None], affine=torch.as_tensor(affine))
    out = inferer(x, ThresholdNet(bands=((150.0, 1e9, 14), (40.0, 150.0, 1))))[0, 0].numpy()
    for c in (1, 14):
        inter = np.logical_and(out == c, exp == c).sum()
        dice = 2 * inter / ((out == c).sum() + (exp == c).sum())
        assert dice > 0.9, (c, dice)


def test_sliding_window_matches_single_pass():
    hu = phantom()
    affine = _affine((1.0, 1.0, 2.5), "RAS")
    single = _run(hu, affine, fine_spacing_mm=(1.0, 1.0, 2.5), roi_size=(64, 64, 64))
    sw = _run(hu, affine, fine_spacing_mm=(1.0, 1.0, 2.5), roi_size=(16, 16, 8), sw_overlap=0.5)
    np.testing.assert_array_equal(single, sw)


def test_roi_excludes_distant_small_object():
    """Only the largest coarse component (+ margin) is segmented; a far small blob stays background."""
    hu = phantom((64, 40, 20))
    hu[56:60, 30:34, 14:18] = 200  # small bright blob far from the main block
    affine = _affine((1.0, 1.0, 2.5), "RAS")
    inferer = CascadeInferer(CoarseNet(), margin_mm=4.0, fine_spacing_mm=(1.0, 1.0, 2.5), roi_size=(64, 64, 64))
    x = MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None, None], affine=torch.as_tensor(affine))
    out = inferer(x, ThresholdNet())[0, 0].numpy()
    assert (out[56:60, 30:34, 14:18] == 0).all()
    np.testing.assert_array_equal(out[:40], expected_labels(hu)[:40])
    (x0, x1), _, _ = inferer.last_roi["ras_slices"]
    assert x0 <= 8 and 30 <= x1 < 56


def test_coarse_empty_falls_back_to_whole_volume():
    hu = phantom((64, 40, 20))
    hu[56:60, 30:34, 14:18] = 200
    with pytest.warns(EmptyRoiWarning):
        out = _run(hu, _affine((1.0, 1.0, 2.5), "RAS"), empty=True, fine_spacing_mm=(1.0, 1.0, 2.5),
                   roi_size=(64, 64, 64))
    np.testing.assert_array_equal(out, expected_labels(hu))


def test_probs_mode_and_ensemble_merge():
    hu = phantom()
    affine = _affine((1.0, 1.0, 2.5), "RAS")
    x = MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None, None], affine=torch.as_tensor(affine))
    probs = CascadeInferer(CoarseNet(), mode="probs", fine_spacing_mm=(1.0, 1.0, 2.5), roi_size=(64, 64, 64))(
        x, ThresholdNet())
    assert tuple(probs.shape) == (1, 15, *hu.shape)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs[0].argmax(0).numpy(), expected_labels(hu))

    # organ model: everything > 40 HU is liver; tumor models: 40..150 HU is lesion (and > 150 spleen,
    # which the rule ignores). CFS merge -> liver from the organ model, lesion from the tumor models.
    organ = ThresholdNet(bands=((40.0, 1e9, 1),))
    tumor = ThresholdNet(bands=((150.0, 1e9, 3), (40.0, 150.0, 14)))
    ens = EnsembleCascadeInferer(
        CoarseNet(), members=[{"network": None}, {"network": tumor}, {"network": tumor}],
        rules=[{"members": [0], "classes": list(range(1, 14))}, {"members": [1, 2], "classes": [14]}],
        fine_spacing_mm=(1.0, 1.0, 2.5), roi_size=(64, 64, 64))
    out = ens(x, organ)[0, 0].numpy()
    np.testing.assert_array_equal(out, expected_labels(hu))


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
    assert len(torch.unique(want)) >= 3  # several regions, so boundaries are exercised
    assert (got.long() == want).float().mean() > 0.9999


def test_to_from_ras_inverse():
    t = torch.arange(3 * 4 * 5).reshape(1, 3, 4, 5)
    for codes in ("LPS", "ASR", "ILP"):
        from nibabel.orientations import io_orientation

        ornt = io_orientation(_affine((1, 2, 3), codes))
        np.testing.assert_array_equal(from_ras(to_ras(t, ornt), ornt).numpy(), t.numpy())


# ------------------------------------------------------------------------------------------------
# segment function (what run_batch calls) and bad input
# ------------------------------------------------------------------------------------------------
def _segmenter(margin_mm=10.0):
    pre = Compose([LoadImaged("image", image_only=True, reader="NibabelReader"), EnsureChannelFirstd("image"),
                   ValidateCTd("image")])
    inferer = CascadeInferer(CoarseNet(), margin_mm=margin_mm, fine_spacing_mm=(0.8, 1.2, 2.5), roi_size=(64, 64, 64))
    return CascadeSegmenter(pre, inferer, ThresholdNet())


def test_segmenter_keeps_file_geometry(tmp_path):
    hu = phantom()
    aff = _affine((0.8, 1.2, 2.5), "LPS")
    aff[:3, :3] = aff[:3, :3] @ np.array([[1, 0, 0], [0, 0.9998, -0.02], [0, 0.02, 0.9998]])  # slight oblique
    path = tmp_path / "CASE_0000.nii.gz"
    save_nifti(hu, aff, path)
    mask, affine = _segmenter()({"image": str(path)})
    assert mask.dtype == np.uint8 and mask.shape == hu.shape
    np.testing.assert_allclose(affine, nib.load(str(path)).affine)
    np.testing.assert_array_equal(mask, expected_labels(hu))


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


def test_bad_inputs_raise_input_error_naming_file(tmp_path):
    seg = _segmenter()
    for name, (path, msg) in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as ei:
            seg({"image": str(path)})
        assert str(path) in str(ei.value), name
        assert msg in str(ei.value), (name, str(ei.value))


def test_batch_continues_and_reports_bad_inputs(tmp_path):
    from abdoseg.batch import run_batch

    bad = _bad_files(tmp_path / "in")
    good = tmp_path / "in" / "good_0000.nii.gz"
    save_nifti(phantom(), _affine((0.8, 1.2, 2.5), "RAS"), good)
    items = [{"image": str(p)} for p, _ in bad.values()] + [{"image": str(good)}]
    report = run_batch(items, _segmenter(), tmp_path / "out", rank=0, world_size=1)
    assert report.done == ["good"]
    assert sorted(c for c, _, _ in report.failed) == sorted(p.name[: -len("_0000.nii.gz")] for p, _ in bad.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]  # no partial output
    with pytest.raises(SystemExit):
        report.raise_if_failed()


def test_training_roi_crop_matches_margin_in_mm():
    from abdoseg.cascade import RandForegroundRoiCropd

    lab = np.zeros((40, 40, 20), np.uint8)
    lab[10:20, 12:22, 8:12] = 1
    aff = torch.diag(torch.tensor([1.0, 2.0, 4.0, 1.0]))
    img = MetaTensor(torch.arange(40 * 40 * 20, dtype=torch.float32).reshape(1, 40, 40, 20), affine=aff)
    d = {"image": img, "label": MetaTensor(torch.as_tensor(lab)[None], affine=aff)}
    out = RandForegroundRoiCropd(["image", "label"], "label", margin_mm=8.0, jitter_mm=0.0)(d)
    # 8 mm = 8 / 2 / 2 voxels along x / y / z; clipped at the volume border
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
