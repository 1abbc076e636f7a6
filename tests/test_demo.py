"""The README's main job, end to end with a tiny budget: every step runs, the report is written,
and a second call resumes (skips every finished step)."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from abdoseg.demo import demo
from abdoseg.labels import ORGAN_IDS
from test_fine_bundle import assert_mask_on_input_grid, assert_trained_and_validated


@pytest.mark.slow
def test_demo_end_to_end_tiny_budget_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    report = demo(out_dir=str(out), n_labeled=5, n_unlabeled=1, n_val=2, coarse_epochs=1,
                  teacher_epochs=1, fine_epochs=1)
    text = (out / "report.md").read_text()
    assert report == str(out / "report.md")
    assert "organs (mean of 13 class means)" in text and "## Best and worst case" in text
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["per_class"]["1"]["n_cases"] == 2
    # the summary is the per-case scores' means: organ DSC = mean over the 13 organs of each class's
    # mean over the 2 cases
    with open(out / "evaluation" / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    class_means = {c: np.mean([float(r["dsc"]) for r in rows if int(r["class"]) == c]) for c in ORGAN_IDS}
    assert all(sum(int(r["class"]) == c for r in rows) == 2 for c in ORGAN_IDS)
    assert summary["organ_dsc"] == pytest.approx(np.mean(list(class_means.values())), abs=2e-4)
    for c in ORGAN_IDS:
        assert summary["per_class"][str(c)]["dsc"] == pytest.approx(class_means[c], abs=1e-4), c
    for name in ("overlay_best.png", "overlay_worst.png", "evaluation/per_class.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    preds = sorted(p.name for p in (out / "predictions").iterdir())
    assert preds == ["PHANTOM_0007.nii.gz", "PHANTOM_0008.nii.gz"]
    for name in preds:  # each mask on its CT's grid; the liver DSC recomputed here is the one reported
        cid = name.split(".")[0]
        ct = nib.load(str(out / "data" / "imagesVal" / f"{cid}_0000.nii.gz"))
        pred = assert_mask_on_input_grid(out / "predictions" / name, ct.shape, ct.affine)
        truth = np.asarray(nib.load(str(out / "data" / "labelsVal" / name)).dataobj)
        liver, true_liver = pred == 1, truth == 1
        dsc = 2 * np.count_nonzero(liver & true_liver) / (np.count_nonzero(liver) + np.count_nonzero(true_liver))
        row = next(r for r in rows if r["case"] == cid and int(r["class"]) == 1)
        assert float(row["dsc"]) == pytest.approx(dsc, abs=1e-4), (cid, row, dsc)
    # the trained bundle copy is complete and self-consistent
    fine = out / "bundles" / "fine_organ_tumor"
    assert (fine / "models" / "model.pt").is_file() and (fine / "models" / "coarse_model.pt").is_file()
    # both trainings validated (val_interval = their epochs; the teacher skips validation by design)
    assert_trained_and_validated(out / "bundles" / "coarse_roi" / "models", epochs=1)
    assert_trained_and_validated(fine / "models", epochs=1)
    teacher = out / "bundles" / "label_fusion" / "models"
    assert (teacher / "model.pt").read_bytes() == (out / "rounds" / "round_1" / "models" / "model.pt").read_bytes()
    assert (teacher / "coarse_model.pt").read_bytes() == (fine / "models" / "coarse_model.pt").read_bytes()
    cfg = json.loads((fine / "configs" / "inference.json").read_text())
    assert cfg["fine_spacing_mm"] == [4.0, 4.0, 6.0]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"generate", "prepare", "train_coarse", "teacher_pseudo_label_fuse",
                            "train_fine", "segment", "evaluate"}
    capsys.readouterr()
    demo(out_dir=str(out), n_labeled=5, n_unlabeled=1, n_val=2, coarse_epochs=1, teacher_epochs=1, fine_epochs=1)
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 7
