"""FOV invariance (property): the committed cascade gives the same mask for a CT padded with air
(a larger reconstruction field of view, same spacing) or cropped to the body, on the voxels
the two share. The fine cascade crops the CT to the body before the coarse stage
(:class:`abdoseg.inference.body.CropToBodyd`: the box of the voxels above ``body_hu_threshold``,
inverted at the end), so the air of a wider field of view never reaches a network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FINE = REPO / "bundles" / "fine_organ_tumor"
#: a phantom of a seed no training used (as in test_committed_weights)
SEED, INDEX = 4242, 0
#: largest fraction of shared voxels whose label may differ: 0, the air outside the body's box is
#: cropped away before any network or resampling sees it (with a ``body_margin_mm`` > 0 the kept
#: air is the CT's own in one case and padding in the other, which resampling mixes at the skin:
#: 3.4e-5 of the voxels measured at 40 mm)
MAX_CHANGED_FRACTION = 0.0
MAX_CHANGED_FRACTION_CROPPED = 0.0


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    import nibabel as nib

    from abdoseg.data.phantom import make_case
    from abdoseg.inference.segmenter import segmenter_from_bundle

    tmp = tmp_path_factory.mktemp("fov")
    image, label, affine = make_case(SEED, preset="small", index=INDEX)
    image = image.astype(np.int16)
    segment = segmenter_from_bundle(FINE, device="cpu")

    def run(name: str, arr: np.ndarray, aff: np.ndarray) -> np.ndarray:
        path = tmp / f"{name}_0000.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), str(path))
        mask, out_affine = segment({"image": str(path)})
        np.testing.assert_allclose(out_affine, aff, atol=1e-4)
        return np.asarray(mask)

    base = run("base", image, affine)
    # padded with air: 48 voxels each side in-plane (a wider scan FOV, same spacing)
    pad = 48
    padded = np.full((image.shape[0] + 2 * pad, image.shape[1] + 2 * pad, image.shape[2]), -1024, np.int16)
    padded[pad:-pad, pad:-pad] = image
    pad_affine = affine.copy()
    pad_affine[:3, 3] -= affine[:3, :3] @ np.array([pad, pad, 0])
    # cropped to the body's bounding box (what a tight reconstruction would store)
    body = np.argwhere(image > -500)
    lo, hi = body.min(0), body.max(0) + 1
    crop_affine = affine.copy()
    crop_affine[:3, 3] += affine[:3, :3] @ lo
    return {"base": base, "label": label, "pad": pad, "lo": lo, "hi": hi,
            "padded": run("padded", padded, pad_affine),
            "cropped": run("cropped", np.ascontiguousarray(image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]), crop_affine)}


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a != b))


def test_padding_with_air_does_not_change_the_mask(cases):
    pad = cases["pad"]
    padded = cases["padded"]
    assert _changed(padded[pad:-pad, pad:-pad], cases["base"]) <= MAX_CHANGED_FRACTION
    ring = padded.copy()
    ring[pad:-pad, pad:-pad] = 0
    assert not ring.any(), "labels painted on the added air"
    assert (cases["base"] > 0).mean() > 0.05  # the case is segmented at all


def test_cropping_to_the_body_does_not_change_the_mask(cases):
    lo, hi = cases["lo"], cases["hi"]
    shared = cases["base"][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert _changed(cases["cropped"], shared) <= MAX_CHANGED_FRACTION_CROPPED
    outside = cases["base"].copy()
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 0
    assert not outside.any(), "labels outside the body's bounding box"


def _body_image(array: np.ndarray, affine: np.ndarray):
    import torch
    from monai.data import MetaTensor

    return {"image": MetaTensor(torch.as_tensor(array[None], dtype=torch.float32), affine=torch.as_tensor(affine))}


def test_crop_to_body_is_the_same_for_any_field_of_view():
    """CropToBodyd (pure, small arrays): the body box + margin_mm (per axis, in voxels of each
    image's spacing), padded with air where the image ends sooner; the same body stored in a
    wide or a tight field of view gives the same array on the same world grid, and the inverse
    restores the input grid."""
    from abdoseg.inference.body import CropToBodyd

    ct = np.full((60, 50, 20), -1000.0, np.float32)
    ct[20:40, 15:35, :] = 40.0  # the body runs through every slice, as in a scan
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    crop = CropToBodyd("image", margin_mm=[10.0, 10.0, 0.0])
    assert crop.margin_voxels(_body_image(ct, aff)["image"]) == [5, 5, 0]
    base = crop(_body_image(ct, aff))["image"]
    assert tuple(base.shape[1:]) == (30, 30, 20)
    wide = np.full((100, 90, 20), -1024.0, np.float32)
    wide[20:80, 20:70] = ct
    wide_aff = aff.copy()
    wide_aff[:3, 3] -= aff[:3, :3] @ np.array([20, 20, 0])
    tight = ct[18:42, 13:37]  # only 4 mm of air left on each side: padded back to 10 mm of air
    tight_aff = aff.copy()
    tight_aff[:3, 3] += aff[:3, :3] @ np.array([18, 13, 0])
    for array, affine in ((wide, wide_aff), (tight, tight_aff)):
        out = crop(_body_image(array, affine))["image"]
        np.testing.assert_allclose(np.asarray(out.affine), np.asarray(base.affine))
        window = lambda x: np.clip(np.asarray(x), -325, 325)  # the networks' HU window: air is one value
        np.testing.assert_array_equal(window(out), window(base))
    restored = crop.inverse(crop(_body_image(wide, wide_aff)))["image"]
    assert tuple(restored.shape[1:]) == wide.shape
    np.testing.assert_allclose(np.asarray(restored.affine), wide_aff)
    with pytest.raises(ValueError, match="margin_mm"):
        CropToBodyd("image", margin_mm=[1.0, 2.0])
