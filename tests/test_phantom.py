"""Synthetic phantom: determinism, layout, anatomy in world space, HU, partial and pseudo labels."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from abdoseg.io import InputError, load_nifti
from abdoseg.labels import LESION_ID, ORGAN_IDS
from abdoseg.data.phantom import generate, make_case, plan_case
from abdoseg.data.phantom.anatomy import PHASE_HU
from abdoseg.data.phantom.annotations import (dice, mean_organ_dice, partial_label, pseudo_label_a,
                                         pseudo_label_b, sample_annotation)

SMALL = dict(shape=(64, 64, 30), spacing_mm=(6.0, 6.0, 9.0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    generate(str(root), preset="small", seed=7, n_labeled=5, n_unlabeled=1, n_val=2)
    return root, json.loads((root / "dataset.json").read_text())


def _world_centroid(lab, affine, cls):
    idx = np.argwhere(lab == cls)
    return nib.affines.apply_affine(affine, idx.mean(axis=0))


def test_make_case_is_deterministic_and_seed_dependent():
    a = make_case(3, "small", axcodes="LPS", **SMALL)
    b = make_case(3, "small", axcodes="LPS", **SMALL)
    c = make_case(4, "small", axcodes="LPS", **SMALL)
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[0].shape == (64, 64, 30)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    np.testing.assert_array_equal(a[2], b[2])
    assert (a[0] != c[0]).mean() > 0.1


def test_case_does_not_depend_on_dataset_size(dataset, tmp_path):
    root, _ = dataset
    generate(str(tmp_path), preset="small", seed=7, n_labeled=1, n_unlabeled=0, n_val=0)
    a = load_nifti(root / "imagesTr/PHANTOM_0001_0000.nii.gz")[0]
    b = load_nifti(tmp_path / "imagesTr/PHANTOM_0001_0000.nii.gz")[0]
    assert a.tobytes() == b.tobytes()


def test_layout_and_dataset_json(dataset):
    root, ds = dataset
    assert ds["labels"]["0"] == "background" and ds["labels"]["14"] == "lesion" and len(ds["labels"]) == 15
    assert ds["generator"]["seed"] == 7 and ds["generator"]["preset"] == "small"
    splits = [c["split"] for c in ds["cases"].values()]
    assert splits == ["train_labeled"] * 5 + ["unlabeled"] + ["validation"] * 2
    assert list(ds["cases"])[0] == "PHANTOM_0001"
    for cid, meta in ds["cases"].items():
        files = {"train_labeled": ["imagesTr/{}_0000", "labelsTr/{}", "pseudo_A/{}", "pseudo_B/{}",
                                   "groundtruth/labelsTr/{}"],
                 "unlabeled": ["unlabeledTr/{}_0000", "pseudo_A/{}", "pseudo_B/{}", "groundtruth/unlabeledTr/{}"],
                 "validation": ["imagesVal/{}_0000", "labelsVal/{}"]}[meta["split"]]
        for f in files:
            arr, aff, hdr = load_nifti(root / (f.format(cid) + ".nii.gz"))
            assert list(arr.shape) == meta["shape"]
            assert "".join(nib.aff2axcodes(aff)) == meta["axcodes"]
            np.testing.assert_allclose(hdr.get_zooms()[:3], meta["spacing_mm"], rtol=1e-4)
            assert arr.dtype == (np.int16 if f.endswith("_0000") else np.uint8)
        img = load_nifti(root / (files[0].format(cid) + ".nii.gz"))[0]
        assert img.min() >= -1024 and (img == -1000).mean() > 0.05  # air outside the body
        assert 20 <= meta["shape"][2] <= 60 if meta["axcodes"][2] in "SI" else True
    # the first labeled cases are fully annotated (coarse ROI net and teacher need them)
    assert sum(c["annotated_classes"] == list(range(1, 15)) for c in ds["cases"].values()
               if c["split"] == "train_labeled") >= 4
    assert not list(root.rglob("*.tmp"))


def test_resume_skips_existing_and_refuses_other_settings(dataset):
    root, ds = dataset
    f = root / "imagesTr/PHANTOM_0002_0000.nii.gz"
    before = f.stat().st_mtime_ns
    generate(str(root), preset="small", seed=7, n_labeled=5, n_unlabeled=1, n_val=2)
    assert f.stat().st_mtime_ns == before
    assert json.loads((root / "dataset.json").read_text()) == ds
    with pytest.raises(InputError, match="other settings"):
        generate(str(root), preset="small", seed=8, n_labeled=1, n_unlabeled=0, n_val=0)
    with pytest.raises(InputError, match="unknown phantom preset"):
        generate(str(root), preset="huge")


def test_full_truth_has_every_organ_with_plausible_volumes_and_hu(dataset):
    root, ds = dataset
    ranges_ml = {1: (1000, 2600), 2: (80, 260), 3: (100, 400), 4: (25, 120), 5: (20, 250), 6: (20, 250),
                 7: (0.3, 15), 8: (0.3, 15), 9: (8, 90), 10: (2, 40), 11: (100, 1000), 12: (40, 200),
                 13: (80, 260)}
    hu_keys = {1: "liver", 3: "spleen", 5: "aorta"}
    for cid, meta in ds["cases"].items():
        sub = {"train_labeled": "groundtruth/labelsTr", "unlabeled": "groundtruth/unlabeledTr",
               "validation": "labelsVal"}[meta["split"]]
        lab, _, hdr = load_nifti(root / f"{sub}/{cid}.nii.gz")
        img = load_nifti(root / f"{'imagesVal' if meta['split'] == 'validation' else ('imagesTr' if meta['split'] == 'train_labeled' else 'unlabeledTr')}/{cid}_0000.nii.gz")[0]
        ml = np.prod(hdr.get_zooms()[:3]) / 1000.0
        for c, (lo, hi) in ranges_ml.items():
            vol = (lab == c).sum() * ml
            assert lo <= vol <= hi, (cid, c, vol)
        for c, key in hu_keys.items():
            core = ndimage.binary_erosion(lab == c)
            lo, hi = PHASE_HU[meta["phase"]][key]
            assert lo - 15 <= img[core].mean() <= hi + 15, (cid, key, img[core].mean(), meta["phase"])
        for c in (2, 13):  # kidneys: cortex/medulla between the phase's medulla and cortex ranges
            core = ndimage.binary_erosion(lab == c)
            if core.sum() > 20:
                lo, hi = PHASE_HU[meta["phase"]]["kmedulla"][0], PHASE_HU[meta["phase"]]["kcortex"][1]
                assert lo - 20 <= img[core].mean() <= hi + 20, (cid, c, img[core].mean(), meta["phase"])
        fat = img[(lab == 0) & (img > -200) & (img < -50)]
        assert fat.size > 100


def test_anatomy_is_right_in_world_space_for_every_orientation():
    cents = {}
    for ax in ("RAS", "LPS", "LAS", "RPI", "PLS"):
        img, lab, aff = make_case(11, "small", axcodes=ax, **SMALL)
        assert "".join(nib.aff2axcodes(aff)) == ax
        cents[ax] = {c: _world_centroid(lab, aff, c) for c in (1, 2, 3, 5, 6, 13)}
        canon = nib.as_closest_canonical(nib.Nifti1Image(img, aff))
        if ax == "RAS":
            ref = np.asarray(canon.dataobj)
        np.testing.assert_array_equal(np.asarray(canon.dataobj), ref)
    for ax, c in cents.items():
        np.testing.assert_allclose(c[1], cents["RAS"][1], atol=1e-3)
        # RAS world frame: +x is the patient's right
        assert c[1][0] > c[3][0] + 80, ax           # liver right of spleen
        assert c[2][0] > 30 + c[13][0], ax          # right kidney right of left kidney
        assert c[6][0] > c[5][0], ax                # IVC right of aorta
        assert c[1][2] > c[2][2], ax                # liver above right kidney (superior = +z)


def test_dataset_has_orientation_variety_and_lesions():
    axes = {plan_case(0, i, "small").axcodes for i in range(20)}
    assert len(axes) >= 3
    lesions = [len(plan_case(0, i, "small").anatomy.lesions) for i in range(20)]
    assert max(lesions) <= 4 and sum(n > 0 for n in lesions) >= 8


def test_partial_labels_are_subsets_of_truth(dataset):
    root, ds = dataset
    for cid, meta in ds["cases"].items():
        if meta["split"] != "train_labeled":
            continue
        part = load_nifti(root / f"labelsTr/{cid}.nii.gz")[0]
        full = load_nifti(root / f"groundtruth/labelsTr/{cid}.nii.gz")[0]
        ann = meta["annotated_classes"]
        assert set(np.unique(part)) <= set(ann) | {0}
        keep = np.isin(full, ann)
        np.testing.assert_array_equal(part[keep], full[keep])
        assert not part[~keep].any()


def test_pseudo_labels_differ_realistically(dataset):
    root, ds = dataset
    for cid, meta in ds["cases"].items():
        if meta["split"] == "validation":
            continue
        sub = "labelsTr" if meta["split"] == "train_labeled" else "unlabeledTr"
        truth = load_nifti(root / f"groundtruth/{sub}/{cid}.nii.gz")[0]
        a = load_nifti(root / f"pseudo_A/{cid}.nii.gz")[0]
        b = load_nifti(root / f"pseudo_B/{cid}.nii.gz")[0]
        assert LESION_ID not in np.unique(a) and LESION_ID not in np.unique(b)
        organs = truth.copy()
        organs[organs == LESION_ID] = 0
        for x, y in ((a, organs), (b, organs), (a, b)):
            assert 0.75 <= mean_organ_dice(x, y) <= 0.99, (cid, mean_organ_dice(x, y))
        assert (a != b).any() and (a != organs).any()


def test_partial_label_and_dice_on_handmade_arrays():
    full = np.array([[0, 1, 1], [14, 2, 13]], np.uint8)
    np.testing.assert_array_equal(partial_label(full, [1, 14]), [[0, 1, 1], [14, 0, 0]])
    assert dice(full, full, 5) == 1.0
    assert dice(np.array([1, 1, 0]), np.array([1, 0, 0]), 1) == pytest.approx(2 / 3)


def test_pseudo_label_functions_keep_organs_and_change_boundaries():
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[5:25, 5:25, 3:17] = 1
    lab[28:36, 10:30, 5:15] = 3
    a = pseudo_label_a(lab, (1.0, 1.0, 2.0), np.random.default_rng(0))
    b = pseudo_label_b(lab, (1.0, 1.0, 2.0), np.random.default_rng(0))
    for p in (a, b):
        assert set(np.unique(p)) <= {0, 1, 3, 4, 11, 12}
        assert 0.8 < dice(p, lab, 1) < 1.0
    assert (b[5, 5, 3] == 0)  # smoothing rounds off the box corner


def test_annotation_mix_matches_flare23_proportions():
    rng = np.random.default_rng(0)
    draws = [sample_annotation(rng, 10, False) for _ in range(4000)]
    kinds = np.array([d["kind"] for d in draws])
    tumor = np.mean([LESION_ID in d["classes"] for d in draws])
    assert abs((kinds == "all").mean() - 0.10) < 0.02
    assert abs((kinds == "single").mean() - 0.40) < 0.03
    assert abs(tumor - 0.68) < 0.04
    assert all(sample_annotation(rng, i, False)["kind"] == "all" for i in range(4))
    assert all(set(d["classes"]) <= set(ORGAN_IDS) | {LESION_ID} for d in draws)


def test_slices_override_and_full_preset_geometry():
    plan = plan_case(0, 0, "full", slices=554)
    assert plan.grid.shape == (512, 512, 554)
    assert 0.8 <= plan.grid.spacing_mm[2] <= 5.0 and 0.6 <= plan.grid.spacing_mm[0] <= 1.0
    img, lab, aff = make_case(0, "small", slices=23, axcodes="RAS")
    assert img.shape[2] == 23 and lab.shape == img.shape
