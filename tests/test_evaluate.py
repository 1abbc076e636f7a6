"""``abdoseg evaluate`` end to end on small synthetic NIfTI cases."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from abdoseg.evaluation.evaluate import evaluate
from abdoseg.io import InputError, save_nifti
from abdoseg.labels import FOREGROUND_IDS, ORGAN_IDS
from abdoseg.evaluation.metrics import evaluate_case

SPACING = (1.5, 1.2, 3.0)
AFFINE = np.diag([*SPACING, 1.0])
OUTPUTS = {"metrics_per_case.csv", "lesions_per_case.csv", "summary.json", "summary.md", "per_class.png"}


def _case(rng: np.random.Generator, shape=(24, 22, 10)) -> tuple[np.ndarray, np.ndarray]:
    """GT with boxes for most classes; prediction = GT with each box shifted by 0-2 voxels."""
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for c in FOREGROUND_IDS:
        if rng.random() < 0.2:
            continue
        lo = rng.integers(0, [s - 4 for s in shape])
        size = rng.integers(2, 6, 3)
        sl = tuple(slice(int(a), int(a + b)) for a, b in zip(lo, size))
        gt[sl] = c
        shift = rng.integers(0, 3, 3)
        sl2 = tuple(slice(int(a + d), int(a + b + d)) for a, b, d in zip(lo, size, shift))
        if rng.random() < 0.9:
            pred[sl2] = c
    return gt, pred


def _write_cases(root: Path, n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        case = f"CASE_{i:03d}"
        gt, pred = _case(rng)
        save_nifti(gt, AFFINE, root / "gt" / f"{case}.nii.gz")
        save_nifti(pred, AFFINE, root / "pred" / f"{case}.nii.gz")
        cases[case] = (gt, pred)
    return cases


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_evaluate_end_to_end(tmp_path: Path, capsys):
    cases = _write_cases(tmp_path)
    before = (_digest(tmp_path / "gt"), _digest(tmp_path / "pred"))
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"), workers=2)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no temporary files left
    assert (_digest(tmp_path / "gt"), _digest(tmp_path / "pred")) == before  # inputs untouched

    rows = _read_csv(out / "metrics_per_case.csv")
    assert len(rows) == 3 * 14
    assert list(rows[0]) == ["case", "class", "name", "dsc", "nsd"]
    for case, (gt, pred) in cases.items():
        expected = evaluate_case(gt, pred, SPACING)
        got = {int(r["class"]): (float(r["dsc"]), float(r["nsd"])) for r in rows if r["case"] == case}
        assert set(got) == set(FOREGROUND_IDS)
        for c, (dsc, nsd) in expected.items():
            assert got[c] == (round(dsc, 4), round(nsd, 4))
    assert any(0 < float(r["dsc"]) < 1 for r in rows)  # non-trivial cases

    for c in FOREGROUND_IDS:
        vals = [r for r in rows if int(r["class"]) == c]
        entry = summary["per_class"][str(c)]
        assert entry["n_cases"] == 3
        assert entry["dsc"] == pytest.approx(round(np.mean([float(r["dsc"]) for r in vals]), 4), abs=1e-12)
        assert entry["nsd"] == pytest.approx(round(np.mean([float(r["nsd"]) for r in vals]), 4), abs=1e-12)
    organ_dsc = np.mean([summary["per_class"][str(c)]["dsc"] for c in ORGAN_IDS])
    assert summary["organ_dsc"] == pytest.approx(round(organ_dsc, 4), abs=1e-12)
    assert summary["organ_classes"] == list(ORGAN_IDS)
    assert summary["lesion_dsc"] == summary["per_class"]["14"]["dsc"]
    assert summary["n_cases"] == 3 and summary["missing_predictions"] == []

    assert json.loads((out / "summary.json").read_text())["organ_nsd"] == summary["organ_nsd"]
    md = (out / "summary.md").read_text()
    assert f"{summary['organ_dsc']:.4f}" in md and "| 14 | lesion |" in md
    assert (out / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{summary['organ_dsc']:.4f}" in capsys.readouterr().out  # table printed

    # one worker gives the same numbers
    again = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out1"), workers=1)
    assert again["per_class"] == summary["per_class"]


def test_threshold_changes_nsd(tmp_path: Path):
    gt = np.zeros((40, 3, 3), np.uint8)
    pred = np.zeros((40, 3, 3), np.uint8)
    gt[0:20, 1, 1] = 1
    pred[17:37, 1, 1] = 1  # DSC 0.15
    save_nifti(gt, np.eye(4), tmp_path / "gt" / "A.nii.gz")
    save_nifti(pred, np.eye(4), tmp_path / "pred" / "A.nii.gz")
    s2 = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "o2"), workers=1, classes=[1])
    s1 = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "o1"), workers=1, classes=[1],
                  nsd_dsc_threshold=0.1)
    assert s2["per_class"]["1"]["dsc"] == s1["per_class"]["1"]["dsc"] == 0.15
    assert s2["per_class"]["1"]["nsd"] == 0.0 and s1["per_class"]["1"]["nsd"] > 0.0
    assert s1["nsd_dsc_threshold"] == 0.1


def test_shape_mismatch_names_both_files(tmp_path: Path):
    _write_cases(tmp_path, n=2)
    bad = tmp_path / "pred" / "CASE_001.nii.gz"
    save_nifti(np.zeros((24, 22, 9), np.uint8), AFFINE, bad)
    with pytest.raises(InputError) as err:
        evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"), workers=1)
    msg = str(err.value)
    assert str(bad) in msg and str(tmp_path / "gt" / "CASE_001.nii.gz") in msg
    assert "(24, 22, 9)" in msg and "(24, 22, 10)" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_prediction_scored_empty_and_reported(tmp_path: Path):
    cases = _write_cases(tmp_path, n=2)
    (tmp_path / "pred" / "CASE_000.nii.gz").unlink()
    save_nifti(np.zeros((4, 4, 4), np.uint8), AFFINE, tmp_path / "pred" / "EXTRA.nii.gz")
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"), workers=1)
    assert summary["missing_predictions"] == ["CASE_000"]
    assert summary["unmatched_predictions"] == ["EXTRA"]
    rows = [r for r in _read_csv(tmp_path / "out" / "metrics_per_case.csv") if r["case"] == "CASE_000"]
    gt = cases["CASE_000"][0]
    for r in rows:
        expected = "0.0000" if (gt == int(r["class"])).any() else "1.0000"
        assert r["dsc"] == expected and r["nsd"] == expected
    assert "CASE_000" in (tmp_path / "out" / "summary.md").read_text()


def test_class_subsets(tmp_path: Path):
    cases = _write_cases(tmp_path, n=2)
    s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "o1"), workers=1, classes="1,5,14")
    assert set(s["per_class"]) == {"1", "5", "14"} and s["organ_classes"] == [1, 5]
    assert s["organ_dsc"] == pytest.approx(round((s["per_class"]["1"]["dsc"] + s["per_class"]["5"]["dsc"]) / 2, 4))
    # per-case classes from a FLARE-style dataset.json
    ds = {"cases": {"CASE_000": {"annotated_classes": [1, 2]}, "CASE_001": {"annotated_classes": [2, 14]}}}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "o2"), workers=1,
                 classes=str(tmp_path / "dataset.json"))
    rows = _read_csv(tmp_path / "o2" / "metrics_per_case.csv")
    assert [(r["case"], r["class"]) for r in rows] == [("CASE_000", "1"), ("CASE_000", "2"),
                                                        ("CASE_001", "2"), ("CASE_001", "14")]
    assert s["per_class"]["2"]["n_cases"] == 2 and s["per_class"]["1"]["n_cases"] == 1
    assert s["lesion_dsc"] == round(evaluate_case(*cases["CASE_001"], SPACING, classes=[14])[14][0], 4)
    with pytest.raises(InputError, match="unknown class ids"):
        evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "o3"), workers=1, classes=[0, 3])


def test_cli_error_exit(tmp_path: Path, capsys):
    from abdoseg.cli import main

    _write_cases(tmp_path, n=1)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--pred_dir", str(tmp_path / "nope"), "--gt_dir", str(tmp_path / "gt"),
              "--out_dir", str(tmp_path / "out")])
    assert exc.value.code == 1
    assert "prediction folder not found" in capsys.readouterr().err


def test_corrupt_data_in_worker_names_the_file(tmp_path: Path):
    _write_cases(tmp_path, n=2)
    bad = tmp_path / "gt" / "CASE_001.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header readable, voxel data truncated
    with pytest.raises(InputError) as err:
        evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"), workers=2)
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_lesion_detection_counts_found_missed_and_false_positive_lesions():
    from abdoseg.evaluation.metrics import lesion_detection

    spacing = (2.0, 2.0, 2.5)  # 10 mm^3 per voxel: 1 mL = 100 voxels
    gt = np.zeros((40, 40, 20), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8, 2:6] = 14      # 144 voxels = 1.44 mL: half predicted -> found
    pred[2:8, 2:5, 2:6] = 14
    gt[20:26, 20:26, 2:6] = 14  # 1.44 mL: 4 of 144 voxels predicted (2.8 %) -> missed, not a FP
    pred[20:22, 20:22, 2:3] = 14
    gt[30:34, 30:34, 10:15] = 14  # 80 voxels = 0.8 mL: below 1 mL, ignored either way
    pred[30:34, 30:34, 10:15] = 14
    pred[10:13, 30:33, 15:18] = 14  # no ground-truth lesion there: false positive
    pred[35:37, 2:4, 17:19] = 14    # another false positive
    gt[2:8, 20:26, 10:14] = 1       # organs do not count
    pred[2:8, 20:26, 10:14] = 1
    d = lesion_detection(gt, pred, spacing)
    assert d["n_lesions"] == 2 and d["n_detected"] == 1 and d["n_small_lesions"] == 1
    assert d["n_false_positives"] == 2
    assert [x["volume_ml"] for x in d["lesions"]] == [1.44, 1.44]
    assert sorted(x["covered_fraction"] for x in d["lesions"]) == [round(4 / 144, 4), 0.5]
    # a lower volume threshold brings the small lesion in (found); no lesions, no predictions: zeros
    assert lesion_detection(gt, pred, spacing, min_volume_ml=0.5)["n_detected"] == 2
    empty = lesion_detection(np.zeros_like(gt), np.zeros_like(gt), spacing)
    assert empty == {"lesions": [], "n_lesions": 0, "n_detected": 0, "n_false_positives": 0, "n_small_lesions": 0}


def test_evaluate_reports_per_lesion_detection(tmp_path: Path):
    spacing = (2.0, 2.0, 2.5)
    affine = np.diag([*spacing, 1.0])
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    gt = np.zeros((40, 40, 20), np.uint8)
    gt[5:20, 5:20, 5:15] = 1
    found = gt.copy(); found[22:28, 22:28, 2:6] = 14
    missed = gt.copy(); missed[22:28, 22:28, 2:6] = 14
    save_nifti(found, affine, tmp_path / "gt" / "A.nii.gz")
    save_nifti(found, affine, tmp_path / "pred" / "A.nii.gz")          # lesion found
    save_nifti(missed, affine, tmp_path / "gt" / "B.nii.gz")
    fp = gt.copy(); fp[30:33, 30:33, 10:13] = 14
    save_nifti(fp, affine, tmp_path / "pred" / "B.nii.gz")             # lesion missed + 1 FP
    save_nifti(gt, affine, tmp_path / "gt" / "C.nii.gz")
    save_nifti(gt, affine, tmp_path / "pred" / "C.nii.gz")             # tumor-free, clean
    s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"), workers=1)
    det = s["lesion_detection"]
    assert det["n_lesions"] == 2 and det["n_detected"] == 1 and det["sensitivity"] == 0.5
    assert det["false_positives_per_case"] == round(1 / 3, 4) and det["n_cases_with_lesions"] == 2
    assert det["lesion_dsc_cases_with_lesions"] == 0.5  # A 1.0, B 0.0 (C, tumor-free, scores 1 and is left out)
    rows = _read_csv(tmp_path / "out" / "lesions_per_case.csv")
    assert [(r["case"], r["detected"], r["case_false_positives"]) for r in rows] == [("A", "1", "0"), ("B", "0", "1"), ("C", "", "0")]
    assert "1 / 2 found (sensitivity 0.50)" in (tmp_path / "out" / "summary.md").read_text()
    # scoring only organs: no lesion detection
    s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out2"), workers=1, classes="1")
    assert s["lesion_detection"] is None and not (tmp_path / "out2" / "lesions_per_case.csv").exists()
