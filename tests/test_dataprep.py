"""Tests of abdoseg.data.prepare: groups, datalist content, bad-input reporting, IRCAD mask merge."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from abdoseg.data.prepare import (
    IRCAD_MAPPING,
    group_of,
    label_class_counts,
    load_real_case_label,
    merge_structure_masks,
    prepare,
)
from abdoseg.io import InputError, save_nifti
from shared_files import REAL_CT, require

SHAPE = (6, 5, 4)
AFF = np.diag([1.5, 1.5, 2.5, 1.0])
AFF[:3, 3] = [-10.0, 5.0, 30.0]
REAL = REAL_CT

# labeled case id -> classes drawn in its label, and the group prepare must give it
GOOD_LABELED = {
    "C_all_t": (list(range(1, 15)), "all_organs+tumor"),
    "C_all": (list(range(1, 14)), "all_organs"),
    "C_part": ([1, 2, 13], "partial_organs"),
    "C_part_t": ([1, 14], "partial_organs+tumor"),
    "C_tum": ([14], "tumor_only"),
    "C_empty": ([], "empty"),
}
GOOD_UNLABELED = ["U_1", "U_2"]
GOOD_VAL = ["V_1"]


def _label(classes: list[int], shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    flat = lab.reshape(-1)
    for i, c in enumerate(classes):
        flat[2 * i: 2 * i + 2] = c
    return lab


def _image(shape=SHAPE) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 200 - 100).astype(np.int16)


def _write_good(root: Path) -> None:
    for cid, (classes, _) in GOOD_LABELED.items():
        save_nifti(_image(), AFF, root / "imagesTr" / f"{cid}_0000.nii.gz")
        save_nifti(_label(classes), AFF, root / "labelsTr" / f"{cid}.nii.gz")
    for cid in GOOD_UNLABELED:
        save_nifti(_image(), AFF, root / "unlabeledTr" / f"{cid}_0000.nii.gz")
    for cid in list(GOOD_LABELED) + GOOD_UNLABELED:
        for key in ("pseudo_A", "pseudo_B"):
            save_nifti(_label(list(range(1, 14))), AFF, root / key / f"{cid}.nii.gz")
    for cid in GOOD_VAL:
        save_nifti(_image(), AFF, root / "imagesVal" / f"{cid}_0000.nii.gz")
        save_nifti(_label(list(range(1, 15))), AFF, root / "labelsVal" / f"{cid}.nii.gz")


def _labeled_with_pseudo(root: Path, cid: str, image=None, label=None, img_aff=AFF, lab_aff=AFF) -> None:
    save_nifti(_image() if image is None else image, img_aff, root / "imagesTr" / f"{cid}_0000.nii.gz")
    if label is not None:
        save_nifti(label, lab_aff, root / "labelsTr" / f"{cid}.nii.gz")
    for key in ("pseudo_A", "pseudo_B"):
        save_nifti(_label([1]), AFF, root / key / f"{cid}.nii.gz")


def _shifted(dx_mm: float) -> np.ndarray:
    a = AFF.copy()
    a[0, 3] += dx_mm
    return a


def _bad_unreadable_label(root):
    _labeled_with_pseudo(root, "B_x")
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "labelsTr" / "B_x.nii.gz").write_bytes(b"garbage, not a nifti")
    return "B_x.nii.gz", "unreadable label"


def _bad_unreadable_image(root):
    _labeled_with_pseudo(root, "B_x", label=_label([1]))
    (root / "imagesTr" / "B_x_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    return "B_x_0000.nii.gz", "unreadable image"


def _bad_shape(root):
    _labeled_with_pseudo(root, "B_x", label=_label([1], shape=(6, 5, 3)))
    return "B_x.nii.gz", "label shape [6, 5, 3] != image shape [6, 5, 4]"


def _bad_affine(root):
    _labeled_with_pseudo(root, "B_x", label=_label([1]), lab_aff=_shifted(0.01))
    return "B_x.nii.gz", "label affine differs from the image affine by 0.01 mm"


def _bad_values(root):
    lab = _label([1, 15])
    _labeled_with_pseudo(root, "B_x", label=lab)
    return "B_x.nii.gz", "label values outside 0..14 (e.g. 15)"


def _bad_negative(root):
    lab = _label([1]).astype(np.int16)
    lab[0, 0, 3] = -1
    _labeled_with_pseudo(root, "B_x", label=lab)
    return "B_x.nii.gz", "label values outside 0..14 (e.g. -1)"


def _bad_non_integer(root):
    lab = _label([1, 2]).astype(np.float32)
    lab[0, 0, 3] = 1.5
    _labeled_with_pseudo(root, "B_x", label=lab)
    return "B_x.nii.gz", "non-integer values (e.g. 1.5)"


def _bad_4d(root):
    _labeled_with_pseudo(root, "B_x", image=np.zeros(SHAPE + (2,), np.int16), label=_label([1]))
    return "B_x_0000.nii.gz", "image is not 3D (shape [6, 5, 4, 2])"


def _bad_missing_label(root):
    _labeled_with_pseudo(root, "B_x")
    return "B_x_0000.nii.gz", "image without label"


def _bad_missing_image(root):
    save_nifti(_label([1]), AFF, root / "labelsTr" / "B_x.nii.gz")
    return "B_x.nii.gz", "label without image"


def _bad_pseudo_shape(root):
    _labeled_with_pseudo(root, "B_x", label=_label([1]))
    save_nifti(_label([1], shape=(5, 5, 4)), AFF, root / "pseudo_B" / "B_x.nii.gz")
    return "B_x.nii.gz", "pseudo label pseudo_B shape [5, 5, 4] != image shape"


def _bad_pseudo_affine_unlabeled(root):
    save_nifti(_image(), AFF, root / "unlabeledTr" / "B_x_0000.nii.gz")
    save_nifti(_label([1]), AFF, root / "pseudo_A" / "B_x.nii.gz")
    save_nifti(_label([1]), _shifted(0.5), root / "pseudo_B" / "B_x.nii.gz")
    return "B_x.nii.gz", "pseudo label pseudo_B affine differs from the image affine by 0.5 mm"


def _bad_pseudo_missing(root):
    _labeled_with_pseudo(root, "B_x", label=_label([1]))
    (root / "pseudo_A" / "B_x.nii.gz").unlink()
    return "B_x_0000.nii.gz", "no pseudo label pseudo_A"


def _bad_val_values(root):
    save_nifti(_image(), AFF, root / "imagesVal" / "B_x_0000.nii.gz")
    save_nifti(_label([1, 200]), AFF, root / "labelsVal" / "B_x.nii.gz")
    return "B_x.nii.gz", "label values outside 0..14 (e.g. 200)"


BAD_KINDS = {f.__name__[5:]: f for f in (
    _bad_unreadable_label, _bad_unreadable_image, _bad_shape, _bad_affine, _bad_values, _bad_negative,
    _bad_non_integer, _bad_4d, _bad_missing_label, _bad_missing_image, _bad_pseudo_shape,
    _bad_pseudo_affine_unlabeled, _bad_pseudo_missing, _bad_val_values)}


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- pure functions
def test_group_of():
    assert group_of([]) == "empty"
    assert group_of([14]) == "tumor_only"
    assert group_of([3]) == "partial_organs"
    assert group_of([3, 14]) == "partial_organs+tumor"
    assert group_of(range(1, 14)) == "all_organs"
    assert group_of(range(1, 15)) == "all_organs+tumor"
    assert group_of(range(2, 15)) == "partial_organs+tumor"


def test_label_class_counts():
    counts, reason = label_class_counts(np.array([[0, 0, 1], [14, 14, 14]], np.uint8))
    assert reason is None and counts.tolist() == [2, 1] + [0] * 12 + [3]
    counts, reason = label_class_counts(np.array([0.0, 2.0, 2.0], np.float32))  # integral floats are fine
    assert reason is None and counts[2] == 2
    assert label_class_counts(np.array([0, 16, 15, 16]))[1] == "label values outside 0..14 (e.g. 15, 16)"
    assert label_class_counts(np.array([0.0, np.nan]))[1] == "label has non-finite values (NaN/inf)"
    assert label_class_counts(np.array([0.25, 1.0]))[1] == "label has non-integer values (e.g. 0.25)"


# --------------------------------------------------------------------------- prepare
def test_prepare_groups_and_datalist(tmp_path):
    root = tmp_path / "ds"
    _write_good(root)
    before = _snapshot(root)
    out = prepare(str(root), workers=2, quiet=True)
    assert out == str(root / "datalist.json")
    after = _snapshot(root)
    assert set(after) - set(before) == {"datalist.json", "datalist_summary.md", "datalist_report.json"}
    assert all(after[k] == v for k, v in before.items())  # inputs untouched

    dl = json.loads((root / "datalist.json").read_text())
    assert set(dl) == {"training", "training_all_organs", "training_with_lesion", "unlabeled", "validation"}
    expect_training = [
        {"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
         "annotated_classes": classes, "group": group,
         "pseudo_A": f"pseudo_A/{cid}.nii.gz", "pseudo_B": f"pseudo_B/{cid}.nii.gz"}
        for cid, (classes, group) in sorted(GOOD_LABELED.items())]
    assert dl["training"] == expect_training
    assert [d["image"] for d in dl["training_all_organs"]] == ["imagesTr/C_all_0000.nii.gz",
                                                               "imagesTr/C_all_t_0000.nii.gz"]
    # seed 002's tumor model trains on the cases whose label holds a lesion
    assert dl["training_with_lesion"] == [d for d in expect_training if 14 in d["annotated_classes"]]
    assert dl["training_with_lesion"]
    assert dl["unlabeled"] == [{"image": f"unlabeledTr/{c}_0000.nii.gz", "pseudo_A": f"pseudo_A/{c}.nii.gz",
                                "pseudo_B": f"pseudo_B/{c}.nii.gz"} for c in GOOD_UNLABELED]
    assert dl["validation"] == [{"image": "imagesVal/V_1_0000.nii.gz", "label": "labelsVal/V_1.nii.gz"}]

    rep = json.loads((root / "datalist_report.json").read_text())
    assert rep["problems"] == []
    assert rep["groups"] == {"unlabeled": 2, "empty": 1, "tumor_only": 1, "partial_organs": 1,
                             "partial_organs+tumor": 1, "all_organs": 1, "all_organs+tumor": 1}
    cc = rep["class_annotation_counts"]
    assert cc["1"] == 4 and cc["2"] == 3 and cc["13"] == 3 and cc["3"] == 2 and cc["14"] == 3
    assert rep["cases"]["C_part"] == {"split": "train_labeled", "shape": [6, 5, 4], "spacing_mm": [1.5, 1.5, 2.5],
                                      "annotated_classes": [1, 2, 13], "present_classes": [1, 2, 13],
                                      "group": "partial_organs", "class_voxels": {"1": 2, "2": 2, "13": 2}}
    md = (root / "datalist_summary.md").read_text()
    assert "| partial_organs+tumor | 1 |" in md and "| 14 | lesion | 3 |" in md

    # same input -> byte-identical outputs, whether checked in a pool or in-process
    first = _snapshot(root)
    prepare(str(root), workers=1, quiet=True)
    assert _snapshot(root) == first

    # the datalist loads with MONAI; paths resolve against the dataset root
    from monai.data import load_decathlon_datalist
    items = load_decathlon_datalist(str(root / "datalist.json"), True, "training", base_dir=str(root))
    assert len(items) == 6
    assert all(Path(it[k]).is_file() for it in items for k in ("image", "label", "pseudo_A", "pseudo_B"))
    assert items[0]["annotated_classes"] == expect_training[0]["annotated_classes"]


def test_prepare_out_elsewhere_and_configurable_folders(tmp_path, capsys):
    root = tmp_path / "real_names"
    for cid, classes in (("F_1", [1, 14]), ("F_2", [14])):
        save_nifti(_image(), AFF, root / "imagesTr2200" / f"{cid}_0000.nii.gz")
        save_nifti(_label(classes), AFF, root / "labelsTr2200" / f"{cid}.nii.gz")
        save_nifti(_label([1, 2]), AFF, root / "aladdin5" / f"{cid}.nii.gz")
    save_nifti(_image(), AFF, root / "unlabelTr1800" / "F_9_0000.nii.gz")
    save_nifti(_label([1, 2]), AFF, root / "aladdin5" / "F_9.nii.gz")
    before = _snapshot(root)
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    out = prepare(str(root), out=str(out_dir), workers=1, images="imagesTr2200", labels="labelsTr2200",
                  unlabeled="unlabelTr1800", pseudo={"pseudo_A": "aladdin5", "pseudo_B": "blackbean"})
    assert _snapshot(root) == before  # nothing written into the dataset
    assert out == str(out_dir / "datalist.json")
    assert sorted(p.name for p in out_dir.iterdir()) == ["datalist.json", "datalist_report.json",
                                                         "datalist_summary.md"]
    dl = json.loads(Path(out).read_text())
    assert dl["training"][0] == {"image": "imagesTr2200/F_1_0000.nii.gz", "label": "labelsTr2200/F_1.nii.gz",
                                 "annotated_classes": [1, 14], "group": "partial_organs+tumor",
                                 "pseudo_A": "aladdin5/F_1.nii.gz"}
    assert dl["training"][1]["group"] == "tumor_only"
    assert dl["unlabeled"] == [{"image": "unlabelTr1800/F_9_0000.nii.gz", "pseudo_A": "aladdin5/F_9.nii.gz"}]
    assert dl["validation"] == [] and dl["training_all_organs"] == []
    rep = json.loads((out_dir / "datalist_report.json").read_text())
    assert "pseudo-label folder 'blackbean' not found: key 'pseudo_B' omitted" in rep["notes"]
    printed = capsys.readouterr().out
    assert "| tumor_only | 1 |" in printed and "| unlabeled | 1 |" in printed


def test_prepare_reports_every_bad_case_and_keeps_the_rest(tmp_path):
    root = tmp_path / "ds"
    _write_good(root)
    expected = {}
    for kind, make in BAD_KINDS.items():
        sub = tmp_path / f"tmp_{kind}"
        fname, reason = make(sub)  # build in its own folder, then move in under a unique case id
        cid = f"B_{kind}"
        for p in sorted(sub.rglob("*")):
            if p.is_file():
                dest = root / p.relative_to(sub).parent / p.name.replace("B_x", cid)
                dest.parent.mkdir(parents=True, exist_ok=True)
                p.rename(dest)
        expected[cid] = (fname.replace("B_x", cid), reason)
    # an affine difference within the 1e-3 mm tolerance is accepted
    _labeled_with_pseudo(root, "C_tol", label=_label([5]), lab_aff=_shifted(0.0005))
    before = _snapshot(root)
    prepare(str(root), workers=2, quiet=True)
    assert {k: v for k, v in _snapshot(root).items() if k in before} == before

    rep = json.loads((root / "datalist_report.json").read_text())
    got = {}
    for p in rep["problems"]:
        got.setdefault(p["case"], []).append((Path(p["file"]).name, p["reason"]))
    assert set(got) == set(expected)
    for cid, (fname, reason) in expected.items():
        assert len(got[cid]) == 1, got[cid]
        assert got[cid][0][0] == fname and reason in got[cid][0][1], (cid, got[cid])
    dl = json.loads((root / "datalist.json").read_text())
    ids = [Path(d["image"]).name[:-len("_0000.nii.gz")] for k in dl if k not in ("training_all_organs", "training_with_lesion")
           for d in dl[k]]
    assert sorted(ids) == sorted(list(GOOD_LABELED) + GOOD_UNLABELED + GOOD_VAL + ["C_tol"])
    md = (root / "datalist_summary.md").read_text()
    assert f"## Problems ({len(expected)}; these cases are left out)" in md
    assert "| B_shape | train_labeled | B_shape.nii.gz | label shape [6, 5, 3] != image shape [6, 5, 4] |" in md


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_prepare_strict_raises_and_writes_nothing(tmp_path, kind):
    root = tmp_path / "ds"
    save_nifti(_image(), AFF, root / "imagesTr" / "A_0000.nii.gz")
    save_nifti(_label([1]), AFF, root / "labelsTr" / "A.nii.gz")
    for key in ("pseudo_A", "pseudo_B"):
        save_nifti(_label([1]), AFF, root / key / "A.nii.gz")
    fname, reason = BAD_KINDS[kind](root)
    before = _snapshot(root)
    with pytest.raises(InputError) as err:
        prepare(str(root), strict=True, workers=1, quiet=True)
    assert Path(err.value.path).name == fname
    assert reason in err.value.problem and "(case B_x)" in err.value.problem
    assert _snapshot(root) == before


def test_prepare_uses_annotations_declared_in_dataset_json(tmp_path):
    root = tmp_path / "ds"
    _write_good(root)
    cases = {"C_part": {"split": "train_labeled", "annotated_classes": [1, 2, 13, 14]},  # tumor-free
             "C_tum": {"split": "train_labeled", "annotated_classes": [3]},  # label has 14: undeclared
             "U_1": {"split": "unlabeled", "annotated_classes": []}}
    (root / "dataset.json").write_text(json.dumps({"name": "x", "cases": cases}))
    prepare(str(root), workers=1, quiet=True)
    dl = json.loads((root / "datalist.json").read_text())
    by_id = {Path(d["label"]).name[:-7]: d for d in dl["training"]}
    assert by_id["C_part"]["annotated_classes"] == [1, 2, 13, 14]
    assert by_id["C_part"]["group"] == "partial_organs+tumor"
    assert by_id["C_all"]["annotated_classes"] == list(range(1, 14))  # not declared: present classes
    assert "C_tum" not in by_id
    rep = json.loads((root / "datalist_report.json").read_text())
    assert [(p["case"], p["reason"]) for p in rep["problems"]] == [
        ("C_tum", "label holds classes [14] not declared annotated in dataset.json")]
    assert rep["cases"]["C_part"]["present_classes"] == [1, 2, 13]
    assert rep["cases"]["C_part"]["annotation_source"] == "dataset.json"
    prepare(str(root), workers=1, quiet=True, dataset_json=False)
    dl = json.loads((root / "datalist.json").read_text())
    by_id = {Path(d["label"]).name[:-7]: d for d in dl["training"]}
    assert by_id["C_part"]["annotated_classes"] == [1, 2, 13] and by_id["C_tum"]["group"] == "tumor_only"
    (root / "dataset.json").write_text(json.dumps({"cases": {"C_all": {"annotated_classes": [0, 1]}}}))
    with pytest.raises(InputError, match=r"dataset.json: case C_all: annotated_classes outside 1..14"):
        prepare(str(root), workers=1, quiet=True)


def test_cli_strict_exit_code_and_missing_folder(tmp_path, capsys):
    from abdoseg.cli import main

    root = tmp_path / "ds"
    _write_good(root)
    _bad_affine(root)
    with pytest.raises(SystemExit) as ex:
        main(["prepare", str(root), "--strict", "--workers=1", "--quiet"])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "B_x.nii.gz: label affine differs" in err
    assert not (root / "datalist.json").exists()
    main(["prepare", str(root), "--workers=1", "--quiet"])  # non-strict: exit 0, bad case left out
    assert len(json.loads((root / "datalist.json").read_text())["training"]) == len(GOOD_LABELED)
    with pytest.raises(InputError, match="dataset folder not found"):
        prepare(str(tmp_path / "nope"))
    (tmp_path / "emptyds").mkdir()
    with pytest.raises(InputError, match="no cases found"):
        prepare(str(tmp_path / "emptyds"))


# --------------------------------------------------------------------------- structure masks
def test_merge_structure_masks_order_and_errors(tmp_path):
    shape = (4, 3, 2)
    names = {
        "artery": [(0, 0, 0), (1, 0, 0)],
        "venoussystem": [(1, 0, 0), (2, 0, 0)],
        "liver": [(2, 0, 0), (3, 0, 0), (0, 1, 0)],
        "leftsurrenalgland": [(0, 2, 1)],
        "livertumor01": [(3, 0, 0)],
        "livertumor02": [(0, 1, 1)],
        "portalvein": [(3, 2, 1)],  # not in the IRCAD rule: ignored
    }
    for name, vox in names.items():
        m = np.zeros(shape, np.uint8)
        for v in vox:
            m[v] = 255 if name == "liver" else 1  # any nonzero value is inside
        save_nifti(m, AFF, tmp_path / "m" / f"{name}.nii.gz")
    label, aff, present = merge_structure_masks(tmp_path / "m")
    want = np.zeros(shape, np.uint8)
    want[0, 0, 0] = 5
    want[1, 0, 0] = 6  # venoussystem after artery
    want[2, 0, 0] = 1  # liver after venoussystem
    want[3, 0, 0] = 14  # tumor after liver
    want[0, 1, 0] = 1
    want[0, 1, 1] = 14
    want[0, 2, 1] = 8
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, want)
    np.testing.assert_allclose(aff, AFF)
    assert present == [1, 5, 6, 8, 14]
    # generic mapping, its order decides: liver written last wins over tumor
    label2, _, present2 = merge_structure_masks(tmp_path / "m", {"livertumor*": 14, "liver": 1})
    assert label2[3, 0, 0] == 1 and present2 == [1, 14]
    with pytest.raises(InputError, match="no mask matches the mapping"):
        merge_structure_masks(tmp_path / "m", [("pancreas", 4)])
    with pytest.raises(InputError, match="outside 1..14"):
        merge_structure_masks(tmp_path / "m", [("liver", 15)])
    save_nifti(np.zeros((4, 3, 3), np.uint8), AFF, tmp_path / "m" / "spleen.nii.gz")
    with pytest.raises(InputError, match=r"spleen.nii.gz: mask shape \[4, 3, 3\] != \[4, 3, 2\]"):
        merge_structure_masks(tmp_path / "m")
    save_nifti(np.zeros(shape, np.uint8), _shifted(0.1), tmp_path / "m" / "spleen.nii.gz")
    with pytest.raises(InputError, match="spleen.nii.gz: mask affine differs"):
        merge_structure_masks(tmp_path / "m")
    with pytest.raises(InputError, match="mask folder not found"):
        merge_structure_masks(tmp_path / "nope")
    assert IRCAD_MAPPING[0] == ("artery", 5) and IRCAD_MAPPING[-1] == ("tumor", 14)


# --------------------------------------------------------------------------- real cases
REAL_CASES = ["ircadb01", "ircadb07", "ircadb17", "totalseg_example_sm"]


@pytest.mark.slow
def test_real_cases_merged_labels_and_prepare(tmp_path):
    """Merged IRCAD labels match labels.json; prepare on a FLARE-style folder of the real cases.

    One test (not a shared fixture) so that pytest-xdist merges the IRCAD masks only once. The
    merged labels live in memory and, for prepare, in tmp_path only (never in the repository).
    """
    require(REAL, "the real CT cases (data/real_ct)")
    import nibabel as nib

    root = tmp_path / "real"
    for d in ("imagesTr", "labelsTr", "unlabeledTr"):
        (root / d).mkdir(parents=True)
    for case in REAL_CASES:
        label, aff, annotated = load_real_case_label(REAL / case)
        meta = json.loads((REAL / case / "labels.json").read_text())
        name_to_id = {n: int(i) for i, n in meta["mapping"].items()}
        assert annotated == sorted(name_to_id[n] for n in meta["present_classes"]), case
        assert label.dtype == np.uint8 and list(label.shape) == meta["shape"], case
        img = nib.load(str(REAL / case / "image.nii.gz"))
        assert img.shape == label.shape
        np.testing.assert_allclose(img.affine, aff, atol=1e-3)
        counts = np.bincount(label.reshape(-1), minlength=15)
        assert {int(c): int(counts[c]) for c in np.flatnonzero(counts[1:]) + 1} == \
            {name_to_id[n]: v for n, v in meta["voxel_counts"].items()}, case
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(REAL / case / "image.nii.gz")
        save_nifti(label, aff, root / "labelsTr" / f"{case}.nii")  # uncompressed: fast to write
        del label
    (root / "unlabeledTr" / "totalfull_0000.nii.gz").symlink_to(REAL / "totalseg_example_sm" /
                                                               "image_full_unlabeled.nii.gz")
    t0 = time.perf_counter()
    prepare(str(root), workers=2, quiet=True)
    print(f"prepare on {len(REAL_CASES)} real labeled + 1 unlabeled cases: {time.perf_counter() - t0:.2f} s")
    rep = json.loads((root / "datalist_report.json").read_text())
    assert rep["problems"] == []
    dl = json.loads((root / "datalist.json").read_text())
    got = {Path(d["label"]).name[:-4]: (d["group"], d["annotated_classes"]) for d in dl["training"]}
    assert got == {
        "ircadb01": ("partial_organs+tumor", [1, 2, 3, 5, 6, 13, 14]),
        "ircadb07": ("partial_organs+tumor", [1, 2, 3, 5, 6, 8, 13, 14]),
        "ircadb17": ("partial_organs+tumor", [1, 5, 6, 14]),
        "totalseg_example_sm": ("partial_organs", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]),
    }
    assert dl["unlabeled"] == [{"image": "unlabeledTr/totalfull_0000.nii.gz"}]
    assert rep["cases"]["ircadb07"]["shape"] == [512, 512, 151]
    assert rep["cases"]["ircadb07"]["spacing_mm"] == pytest.approx([0.782, 0.782, 1.6], abs=1e-3)
    assert rep["cases"]["ircadb01"]["class_voxels"]["14"] == 214268


# --------------------------------------------------------------------------- phantom dataset
def test_prepare_on_phantom(tmp_path):
    import abdoseg.data.phantom as phantom
    root = tmp_path / "phantom"
    phantom.generate(str(root), preset="small", seed=0, n_labeled=6, n_unlabeled=1, n_val=1, slices=12)
    t0 = time.perf_counter()
    prepare(str(root), workers=2, quiet=True)
    print(f"prepare on a phantom of 8 cases: {time.perf_counter() - t0:.2f} s")
    ds = json.loads((root / "dataset.json").read_text())
    rep = json.loads((root / "datalist_report.json").read_text())
    dl = json.loads((root / "datalist.json").read_text())
    assert rep["problems"] == []
    splits = {cid: c["split"] for cid, c in ds["cases"].items()}
    assert len(dl["training"]) == sum(s == "train_labeled" for s in splits.values()) == 6
    assert len(dl["unlabeled"]) == sum(s == "unlabeled" for s in splits.values()) == 1
    assert len(dl["validation"]) == sum(s == "validation" for s in splits.values()) == 1
    for item in dl["training"]:
        cid = Path(item["label"]).name[: -len(".nii.gz")]
        declared = ds["cases"][cid]["annotated_classes"]
        assert item["annotated_classes"] == declared
        assert set(rep["cases"][cid]["present_classes"]) <= set(declared)
        assert item["group"] == group_of(declared)
        assert list(ds["cases"][cid]["shape"]) == rep["cases"][cid]["shape"]
        assert {"pseudo_A", "pseudo_B"} <= set(item) and (root / item["pseudo_B"]).is_file()
    assert rep["groups"]["all_organs+tumor"] == sum(
        ds["cases"][c]["annotated_classes"] == list(range(1, 15)) for c in splits if splits[c] == "train_labeled")
    assert len(dl["training_all_organs"]) == sum(d["group"].startswith("all_organs") for d in dl["training"])
