"""The README's main job, end to end with a tiny budget: every step runs, the report is written,
and a second call resumes (skips every finished step)."""

import json

import pytest

from abdoseg.demo import demo


@pytest.mark.slow
def test_demo_end_to_end_tiny_budget_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    report = demo(out_dir=str(out), n_labeled=5, n_unlabeled=1, n_val=2, coarse_epochs=1,
                  teacher_epochs=1, fine_epochs=1)
    text = (out / "report.md").read_text()
    assert report == str(out / "report.md")
    assert "organs (mean of 13 class means)" in text and "## Best and worst case" in text
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["per_class"]["1"]["n_cases"] == 2 and 0.0 <= summary["organ_dsc"] <= 1.0
    for name in ("overlay_best.png", "overlay_worst.png", "evaluation/per_class.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    preds = sorted(p.name for p in (out / "predictions").iterdir())
    assert preds == ["PHANTOM_0007.nii.gz", "PHANTOM_0008.nii.gz"]
    # the trained bundle copy is complete and self-consistent
    fine = out / "bundles" / "fine_organ_tumor"
    assert (fine / "models" / "model.pt").is_file() and (fine / "models" / "coarse_model.pt").is_file()
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
