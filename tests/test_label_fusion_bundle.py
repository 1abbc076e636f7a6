"""label_fusion bundle: fusion workflow (seed003 / seed004) on tiny hand-made NIfTIs, bad-input
skips, uncertainty selection, new datalist and CSV/JSON report; configs run through monai.bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from abdoseg.io import save_json, save_nifti
from abdoseg.label_fusion.workflow import fuse_datalist, geometry_problems, select_and_write

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "label_fusion"
SHAPE = (2, 2, 2)
AFF = np.diag([0.8, 0.8, 2.5, 1.0])


def _vol(values, shape=SHAPE) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8).reshape(shape)


# voxel order = C order of SHAPE; see the expected results in the tests
C1 = {"partial": [1, 2, 0, 0, 0, 14, 0, 0], "A": [1, 1, 2, 3, 0, 0, 5, 0], "B": [1, 2, 2, 4, 6, 0, 5, 0],
      "s1": [1, 3, 3, 13, 14, 2, 0, 2], "s2": [0] * 8, "s3": [0] * 8}
U1 = {"A": [1, 1, 3, 0, 0, 0, 0, 0], "B": [1, 3, 4, 0, 0, 0, 0, 0],
      "s1": [1, 3, 0, 14, 14, 0, 0, 2], "s2": [0, 0, 0, 14, 0, 14, 0, 0], "s3": [0, 0, 0, 0, 14, 14, 0, 0]}
F_SHAPE = (4, 4, 1)
F1_LABEL = list(range(14)) + [0, 0]  # all 13 organs annotated


def make_dataset(root: Path) -> Path:
    """Dataset root with labeled C1, fully labeled F1, unlabeled U1, bad cases BS (pseudo_B shape)
    and BA (label affine); teacher pseudo labels under root/pseudo/{s1,s2,s3}; returns datalist."""
    def image(name, shape=SHAPE, aff=AFF):
        save_nifti(np.full(shape, 40, np.int16), aff, root / "imagesTr" / f"{name}_0000.nii.gz")

    def write(folder, name, values, shape=SHAPE, aff=AFF):
        save_nifti(_vol(values, shape), aff, root / folder / f"{name}.nii.gz")

    training, unlabeled = [], []
    for cid, d, shape in (("C1", C1, SHAPE), ("BS", C1, SHAPE), ("BA", C1, SHAPE)):
        image(cid)
        aff_label = AFF.copy()
        if cid == "BA":
            aff_label[0, 3] = 1.0  # label shifted by 1 mm
        write("labelsTr", cid, d["partial"], aff=aff_label)
        write("pseudo_A", cid, d["A"])
        if cid == "BS":
            write("pseudo_B", cid, d["B"] + [0] * 4, shape=(2, 2, 3))
        else:
            write("pseudo_B", cid, d["B"])
        for s in ("s1", "s2", "s3"):
            write(f"pseudo/{s}", cid, d[s])
        training.append({"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                         "annotated_classes": [1, 2, 14], "group": "partial_organs+tumor",
                         "pseudo_A": f"pseudo_A/{cid}.nii.gz", "pseudo_B": f"pseudo_B/{cid}.nii.gz"})
    image("F1", F_SHAPE)
    for folder in ("labelsTr", "pseudo_A", "pseudo_B", "pseudo/s1", "pseudo/s2", "pseudo/s3"):
        write(folder, "F1", F1_LABEL, F_SHAPE)
    training.append({"image": "imagesTr/F1_0000.nii.gz", "label": "labelsTr/F1.nii.gz",
                     "annotated_classes": list(range(1, 14)), "group": "all_organs",
                     "pseudo_A": "pseudo_A/F1.nii.gz", "pseudo_B": "pseudo_B/F1.nii.gz"})
    save_nifti(np.full(SHAPE, 40, np.int16), AFF, root / "unlabeledTr" / "U1_0000.nii.gz")
    write("pseudo_A", "U1", U1["A"])
    write("pseudo_B", "U1", U1["B"])
    for s in ("s1", "s2", "s3"):
        write(f"pseudo/{s}", "U1", U1[s])
    unlabeled.append({"image": "unlabeledTr/U1_0000.nii.gz", "pseudo_A": "pseudo_A/U1.nii.gz",
                      "pseudo_B": "pseudo_B/U1.nii.gz"})
    datalist = {"training": training, "training_all_organs": [training[-1]], "unlabeled": unlabeled,
                "validation": [{"image": "imagesVal/V1_0000.nii.gz", "label": "labelsVal/V1.nii.gz"}]}
    return save_json(datalist, root / "datalist.json")


def _read(path) -> list[int]:
    return np.asarray(nib.load(str(path)).dataobj).reshape(-1).tolist()


def test_seed003_fusion_exact(tmp_path):
    dl = make_dataset(tmp_path / "data")
    out = tmp_path / "fused"
    rows = {r["case_id"]: r for r in fuse_datalist(dl, out, "seed003", tmp_path / "data" / "pseudo",
                                                     ["s1", "s2", "s3"])}
    assert set(rows) == {"C1", "BS", "BA", "F1", "U1"}
    # labeled: union of A/B, conflicts voted with the partial label, partial lesion on top
    assert _read(out / "C1.nii.gz") == [1, 2, 2, 0, 6, 14, 5, 0]
    c1 = rows["C1"]
    assert c1["rule"] == "seed003_labeled" and c1["status"] == "fused" and c1["changed_voxels"] == 3
    assert c1["classes"]["background"] == {"id": 0, "before": 5, "after": 2, "gained": 0, "lost": 3}
    assert c1["classes"]["right_kidney"]["gained"] == 1 and c1["classes"]["inferior_vena_cava"]["gained"] == 1
    assert c1["classes"]["aorta"]["gained"] == 1 and c1["classes"]["lesion"]["gained"] == 0
    # unlabeled: S1 referee, lesion = 2-of-3 vote of S1..S3; before = all background
    assert _read(out / "U1.nii.gz") == [1, 3, 0, 14, 14, 14, 0, 0]
    assert rows["U1"]["rule"] == "seed003_unlabeled" and rows["U1"]["changed_voxels"] == 5
    assert rows["U1"]["classes"]["lesion"]["gained"] == 3
    img = nib.load(str(out / "U1.nii.gz"))
    assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, AFF)
    report = json.loads((out / "fuse_report.json").read_text())
    assert report["rule"] == "seed003" and len(report["cases"]) == 5


def test_bad_input_is_reported_and_skipped_never_fused(tmp_path):
    dl = make_dataset(tmp_path / "data")
    out = tmp_path / "fused"
    rows = {r["case_id"]: r for r in fuse_datalist(dl, out, "seed003", tmp_path / "data" / "pseudo", ["s1"])}
    bs, ba = rows["BS"], rows["BA"]
    assert bs["status"] == ba["status"] == "skipped"
    assert "pseudo_B/BS.nii.gz" in bs["reason"] and "shape (2, 2, 3)" in bs["reason"] and "BS_0000.nii.gz" in bs["reason"]
    assert "labelsTr/BA.nii.gz" in ba["reason"] and "affine" in ba["reason"]
    assert not (out / "BS.nii.gz").exists() and not (out / "BA.nii.gz").exists()
    # the header check alone
    data = tmp_path / "data"
    assert geometry_problems(data / "imagesTr/C1_0000.nii.gz", {"label": data / "labelsTr/C1.nii.gz"}) == []
    missing = geometry_problems(data / "imagesTr/C1_0000.nii.gz", {"pseudo_A": data / "nope.nii.gz"})
    assert missing == [f"{data / 'nope.nii.gz'}: pseudo_A file not found"]


def test_seed004_supplement_and_unlabeled_skip(tmp_path):
    dl = make_dataset(tmp_path / "data")
    out = tmp_path / "fused"
    rows = {r["case_id"]: r for r in fuse_datalist(dl, out, "seed004", tmp_path / "data" / "pseudo", ["s1"])}
    # background voxels take the teacher's non-annotated organs; annotated 2 and lesion untouched
    assert _read(out / "C1.nii.gz") == [1, 2, 3, 13, 0, 14, 0, 0]
    assert rows["C1"]["rule"] == "seed004_weak_label" and rows["C1"]["changed_voxels"] == 2
    assert rows["U1"]["status"] == "skipped" and "does not use unlabeled" in rows["U1"]["reason"]
    rows = {r["case_id"]: r for r in fuse_datalist(dl, tmp_path / "f2", "seed004", tmp_path / "data" / "pseudo",
                                                     ["s1"], seed004_unlabeled="teacher_organs")}
    assert _read(tmp_path / "f2" / "U1.nii.gz") == [1, 3, 0, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="unknown rule"):
        fuse_datalist(dl, out, "majority")


def _history(root: Path) -> list[Path]:
    r1, r2 = root / "r1", root / "r2"
    save_nifti(_vol([1, 2, 2, 0, 0, 0, 0, 0]), AFF, r1 / "C1.nii.gz")
    save_nifti(_vol([1, 2, 2, 0, 0, 0, 0, 0]), AFF, r2 / "C1.nii.gz")  # stable: 0 / 3
    save_nifti(_vol([1, 1, 0, 0, 0, 0, 0, 0]), AFF, r1 / "U1.nii.gz")
    save_nifti(_vol([1, 1, 2, 0, 0, 0, 0, 0]), AFF, r2 / "U1.nii.gz")  # 1 changed / 3 foreground
    save_nifti(_vol([0] * 16, F_SHAPE), AFF, r1 / "F1.nii.gz")
    save_nifti(_vol(F1_LABEL, F_SHAPE), AFF, r2 / "F1.nii.gz")  # 13 / 13 = 1.0
    return [r1, r2]


def test_selection_datalist_and_report(tmp_path):
    data = tmp_path / "data"
    dl = make_dataset(data)
    work = tmp_path / "work"
    fuse_datalist(dl, work / "fused", "seed003", data / "pseudo", ["s1", "s2", "s3"])
    rep = select_and_write(work / "fused", dl, work / "datalist.json", work / "report.json",
                           history_dirs=_history(tmp_path / "hist"), threshold=0.2)
    cases = {r["case_id"]: r for r in rep["cases"]}
    assert cases["C1"]["uncertainty"] == 0.0 and cases["C1"]["selected"]
    assert cases["U1"]["uncertainty"] == pytest.approx(1 / 3) and not cases["U1"]["selected"]
    assert cases["F1"]["uncertainty"] == 1.0 and cases["F1"]["selected"]  # fully labeled: always kept
    assert not cases["BS"]["selected"] and not cases["BA"]["selected"]
    assert rep["counts"] == {"cases": 5, "fused": 3, "skipped": 2, "selected": 2, "rejected": 3}

    new = json.loads((work / "datalist.json").read_text())
    assert [Path(i["label"]).name for i in new["training"]] == ["C1.nii.gz", "F1.nii.gz"]
    c1 = new["training"][0]
    assert c1["image"] == "imagesTr/C1_0000.nii.gz" and c1["annotated_classes"] == list(range(1, 15))
    assert c1["pseudo_A"] == "pseudo_A/C1.nii.gz" and c1["group"] == "partial_organs+tumor"
    assert (data / c1["label"]).resolve() == (work / "fused" / "C1.nii.gz").resolve()
    assert [Path(i["label"]).name for i in new["training_all_organs"]] == ["F1.nii.gz"]
    # seed 002's tumor model: the fused cases whose label holds a lesion
    assert new["training_with_lesion"] == [i for i in new["training"] if i["group"].endswith("+tumor")]
    assert [Path(i["label"]).name for i in new["training_with_lesion"]] == ["C1.nii.gz"]
    assert new["unlabeled"] == [{"image": "unlabeledTr/U1_0000.nii.gz", "pseudo_A": "pseudo_A/U1.nii.gz",
                                 "pseudo_B": "pseudo_B/U1.nii.gz"}]
    assert new["validation"] == [{"image": "imagesVal/V1_0000.nii.gz", "label": "labelsVal/V1.nii.gz"}]
    # the fine bundle reads it with MONAI's loader
    from monai.data import load_decathlon_datalist
    items = load_decathlon_datalist(str(work / "datalist.json"), True, "training", base_dir=str(data))
    assert Path(items[0]["label"]) == (work / "fused" / "C1.nii.gz").resolve()

    with open(work / "report.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert rows["C1"]["rule"] == "seed003_labeled" and rows["C1"]["selected"] == "1"
    assert rows["C1"]["uncertainty"] == "0" and rows["C1"]["changed_voxels"] == "3"
    assert rows["C1"]["background_lost"] == "3" and rows["C1"]["aorta_gained"] == "1"
    assert rows["U1"]["uncertainty"] == "0.333333" and rows["U1"]["selected"] == "0"
    assert rows["U1"]["lesion_gained"] == "3"
    assert rows["BS"]["status"] == "skipped" and rows["BS"]["selected"] == "0" and "pseudo_B/BS" in rows["BS"]["reason"]


def test_bundle_configs_run_with_monai_bundle(tmp_path):
    from monai.bundle import run

    data = tmp_path / "data"
    dl = make_dataset(data)
    work = tmp_path / "work"
    common = {"meta_file": str(BUNDLE / "configs/metadata.json"), "logging_file": str(BUNDLE / "configs/logging.conf"),
              "bundle_root": str(work), "dataset_dir": str(data), "datalist": str(dl)}
    run(config_file=str(BUNDLE / "configs/fuse.json"), rule="seed004", pseudo_dir=str(data / "pseudo"),
        teacher_names=["s1"], **common)
    assert _read(work / "fused" / "C1.nii.gz") == [1, 2, 3, 13, 0, 14, 0, 0]
    run(config_file=str(BUNDLE / "configs/select.json"), **common)
    new = json.loads((work / "fused_datalist.json").read_text())
    # seed004 never reads pseudo_B, so BS (bad pseudo_B) is fused; BA (bad label) is not
    assert sorted(Path(i["label"]).name for i in new["training"]) == ["BS.nii.gz", "C1.nii.gz", "F1.nii.gz"]
    rep = json.loads((work / "report.json").read_text())
    assert rep["rule"] == "seed004" and rep["counts"]["selected"] == 3
    assert (work / "report.csv").is_file()


def test_metadata_is_valid_against_schema():
    import jsonschema

    from shared_files import MONAI_SCHEMA, require

    schema = json.loads(require(MONAI_SCHEMA, "the MONAI bundle metadata schema").read_text())
    meta = json.loads((BUNDLE / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]["abdoseg"] == "0.1.0"
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 15
    jsonschema.validate(meta, schema)


# ----------------------------------------------------------------- the bundle's own teacher
FINE = BUNDLE.parent / "fine_organ_tumor"


def test_the_teacher_is_the_fine_cascade_stored_once():
    """label_fusion's teacher is the fine bundle's cascade itself, not a copy: its
    configs/inference.json and its weights are links to the fine bundle's (and coarse_roi's) files,
    so one edit of the fine inference.json changes both bundles."""
    for rel, target in (("configs/inference.json", FINE / "configs" / "inference.json"),
                        ("models/model.pt", FINE / "models" / "model.pt"),
                        ("models/coarse_model.pt", BUNDLE.parent / "coarse_roi" / "models" / "model.pt")):
        own = BUNDLE / rel
        assert own.is_symlink() and own.resolve() == target.resolve(), rel
    assert (FINE / "models" / "coarse_model.pt").resolve() == (BUNDLE.parent / "coarse_roi" / "models" / "model.pt").resolve()
    pseudo = json.loads((BUNDLE / "configs" / "pseudo_label.json").read_text())
    assert pseudo["teacher_bundle"] == "@bundle_root"  # a downloaded zip pseudo-labels with its own teacher


def _small_ct(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (28, 24, 14)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((x - 14) / 12) ** 2 + ((y - 12) / 10) ** 2 <= 1
    hu = np.where(body, 30.0, -1000.0)
    hu[body & (((x - 9) / 4) ** 2 + ((y - 11) / 4) ** 2 + ((z - 7) / 3) ** 2 <= 1)] = 130
    hu = (hu + rng.normal(0, 10, shape)).astype(np.int16)
    save_nifti(hu, np.array([[-4.0, 0, 0, 60], [0, -4.0, 0, 50], [0, 0, 5.0, -30], [0, 0, 0, 1]]), path)


def _bundle_with_teacher(dst: Path) -> Path:
    """Copy of the bundle with freshly initialised teacher weights (plain state dicts)."""
    import shutil

    import torch
    from monai.bundle import ConfigParser

    b = dst / "label_fusion"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("*.pt", "eval", "pseudo", "fused", "__pycache__"))
    parser = ConfigParser()
    parser.read_config(str(b / "configs" / "inference.json"))
    for net_id, name, seed in (("network_def", "model.pt", 0), ("coarse_network_def", "coarse_model.pt", 1)):
        torch.manual_seed(seed)
        torch.save(parser.get_parsed_content(net_id).state_dict(), b / "models" / name)
    return b


def test_pseudo_label_json_pseudo_labels_a_datalist_with_its_own_teacher(tmp_path):
    """`monai.bundle run --config_file configs/pseudo_label.json` writes pseudo/model/<case>.nii.gz
    for the training and unlabeled cases, equal to the bundle's teacher (segmenter_from_bundle); a
    teacher setting given on the command line (``teacher_overrides``) reaches the teacher."""
    from monai.bundle import run

    from abdoseg.inference.segmenter import segmenter_from_bundle

    b = _bundle_with_teacher(tmp_path)
    data = tmp_path / "data"
    _small_ct(data / "imagesTr" / "L1_0000.nii.gz", 0)
    _small_ct(data / "unlabeledTr" / "U1_0000.nii.gz", 1)
    dl = save_json({"training": [{"image": "imagesTr/L1_0000.nii.gz", "label": "imagesTr/L1_0000.nii.gz"}],
                    "unlabeled": [{"image": "unlabeledTr/U1_0000.nii.gz"}]}, data / "datalist.json")
    spacing = [4.0, 4.0, 5.0]
    run(config_file=str(b / "configs/pseudo_label.json"), meta_file=str(b / "configs/metadata.json"),
        logging_file=str(b / "configs/logging.conf"), bundle_root=str(b), dataset_dir=str(data), datalist=str(dl),
        teacher_overrides={"fine_spacing_mm": spacing})
    out = b / "pseudo" / "model"
    assert sorted(p.name for p in out.iterdir()) == ["L1.nii.gz", "U1.nii.gz"]
    teacher = segmenter_from_bundle(b, device="cpu", overrides={"fine_spacing_mm": spacing})
    default = segmenter_from_bundle(b, device="cpu")
    image = str(data / "unlabeledTr" / "U1_0000.nii.gz")
    want, affine = teacher({"image": image})
    got = nib.load(str(out / "U1.nii.gz"))
    assert np.array_equal(np.asarray(got.dataobj), want) and np.allclose(got.affine, affine)
    assert got.get_data_dtype() == np.uint8
    assert not np.array_equal(default({"image": image})[0], want)  # the override mattered
    # fuse.json reads them under its default teacher name
    assert json.loads((BUNDLE / "configs/fuse.json").read_text())["teacher_names"] == [out.name]


def test_pack_carries_the_teacher(tmp_path):
    import zipfile

    from abdoseg.bundle.pack import pack

    b = _bundle_with_teacher(tmp_path / "src")
    meta = json.loads((BUNDLE / "configs/metadata.json").read_text())
    z = Path(pack(str(b), out_dir=str(tmp_path / "dist")))
    assert z.name == f"label_fusion_v{meta['version']}.zip"
    names = set(zipfile.ZipFile(z).namelist())
    with zipfile.ZipFile(z) as zf:  # the links are inlined: the zip stands alone
        assert zf.read("label_fusion/configs/inference.json") == (FINE / "configs" / "inference.json").read_bytes()
    for rel in ("configs/inference.json", "configs/fuse.json", "configs/select.json", "configs/pseudo_label.json",
                "configs/metadata.json", "models/model.pt", "models/coarse_model.pt", "LICENSE", "docs/README.md"):
        assert f"label_fusion/{rel}" in names, rel
