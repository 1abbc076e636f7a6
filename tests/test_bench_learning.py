"""`scripts/bench.py learning` (scripts/benchmarks/learning.py) without training: recipe parsing, the bundle overlays it writes
(recipe + learning-curve handlers, read back through MONAI's config merge), throughput figures
from curve points, the tables, and the clear exit when the demo folder is missing."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("benchmarks.learning")


def _main(argv):
    return importlib.import_module("bench").main(argv)


def test_recipes_from_the_command_line(bench, tmp_path):
    assert set(bench.parse_recipes([])) == {"previous", "recipe", "workers1"}
    overlay = tmp_path / "lr.json"
    overlay.write_text(json.dumps({"learning_rate": 0.005}))
    assert bench.parse_recipes(["recipe=", f"lr={overlay}"]) == {"recipe": {}, "lr": {"learning_rate": 0.005}}
    with pytest.raises(SystemExit, match="cannot read a JSON object"):
        bench.parse_recipes([f"x={tmp_path / 'missing.json'}"])
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(SystemExit, match="must hold a JSON object"):
        bench.parse_recipes([f"x={tmp_path / 'list.json'}"])
    with pytest.raises(SystemExit, match="NAME=FILE.json"):
        bench.parse_recipes(["../x=a.json"])


def test_overlays_merge_into_the_fine_train_config(bench, tmp_path):
    from abdoseg.bundle.config import load_bundle_config

    bundle = tmp_path / "b"
    bench.prepare_bundle(REPO / "bundles" / "fine_organ_tumor", bundle, {"train_autocast_dtype": None}, 30, 10)
    assert not (bundle / "models" / "model.pt").exists()  # never starts from trained fine weights
    parser = load_bundle_config(bundle, ["configs/inference.json", "configs/train.json", "configs/recipe.json", "configs/learning_curve.json"])
    assert parser.get_parsed_content("train_autocast_dtype") is None
    targets = [h["_target_"] for h in parser["train"]["handlers"]]
    assert targets[-2:] == ["abdoseg.training.handlers.LearningCurveRecorder", "abdoseg.training.handlers.TimeBudget"]
    # the epoch-level schedule is replaced by one that decays over the 30 s budget
    assert targets[0] == "abdoseg.training.handlers.WallClockPolyLR" and "LrScheduleHandler" not in targets
    assert parser["train"]["handlers"][0]["budget_s"] == 30.0
    epochs = tmp_path / "e"
    bench.prepare_bundle(REPO / "bundles" / "fine_organ_tumor", epochs, {}, 30, 10, wallclock_lr=False)
    parser = load_bundle_config(epochs, ["configs/inference.json", "configs/train.json", "configs/recipe.json", "configs/learning_curve.json"])
    assert parser["train"]["handlers"][0]["_target_"] == "LrScheduleHandler"


def test_throughput_and_tables_from_curve_points(bench):
    def point(k, wall, it, dsc):
        return {"file": f"curve_{k}.pt", "wall_s": wall, "cpu_s": 1.8 * wall, "data_s": 0.25 * wall, "iteration": it,
                "epoch": it // 16, "samples": 2 * it, "voxels": 2 * it * 131072, "organ_dsc": dsc, "organ_nsd": dsc - 0.05,
                "lesion_dsc": 0.0, "per_class": {"1": dsc, "7": 0.0, "8": 0.0, "10": 0.1, "11": 0.5},
                "lesion_detection": {"n_detected": 1, "n_lesions": 4, "false_positives_per_case": 0.5}}

    fast = [point(0, 100.0, 150, 0.3), point(1, 200.0, 300, 0.45), point(2, 250.0, 375, 0.5)]
    slow = [point(0, 100.0, 100, 0.25), point(1, 200.0, 200, 0.4)]
    t = bench.throughput(fast)
    assert t["iterations"] == 375 and t["s_per_iteration_median"] == pytest.approx(0.667, abs=1e-3)
    assert t["voxels_per_s"] == round(2 * 375 * 131072 / 250) and t["data_fraction"] == 0.25
    seen = [dict(p, seen={"organ_dsc": p["organ_dsc"] + 0.2}) for p in fast]
    fast_s1 = [dict(p, organ_dsc=p["organ_dsc"] - 0.1, seen={"organ_dsc": p["organ_dsc"] + 0.1}) for p in fast]
    results = {"previous_s0": {"recipe": "previous", "seed": 0, "points": slow, "throughput": bench.throughput(slow), "n_unseen": 8},
               "recipe_s0": {"recipe": "recipe", "seed": 0, "points": seen, "throughput": t, "n_unseen": 8},
               "recipe_s1": {"recipe": "recipe", "seed": 1, "points": fast_s1, "throughput": t, "n_unseen": 8}}
    args = argparse.Namespace(budget_s=250.0, every_s=100.0, max_epochs=0, unseen="runs/unseen7", seeds=[0, 1],
                              lr_schedule="wallclock")
    md = bench.markdown(results, args)
    assert "| 2 |  |  | 250 | 0.450 / 0.650 |" in md  # the longer curve's last row: mean over 2 seeds, unseen / seen
    # final snapshot: unseen 0.5 and 0.4 -> 0.450 ± 0.071; seen 0.7 and 0.6
    assert "| recipe | 2 | 0.450 ± 0.071 | 0.450 ± 0.000 | 0.650 ± 0.071 | 0.000 ± 0.000 | 2 / 8 | 0.50 | 375 | 0.667 | 393,216 (1.50x) |" in md
    assert "| previous | 1 | 0.400 | 0.350 | - |" in md
    assert "recipe: right_adrenal_gland 0.00" in md


def test_wall_clock_schedule_decays_over_the_budget():
    import torch

    from abdoseg.training.handlers import WallClockPolyLR

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    sched = WallClockPolyLR(opt, budget_s=100.0, power=1.0, min_fraction=0.05)
    assert sched.factor(0) == 1.0 and sched.factor(50) == pytest.approx(0.5)
    assert sched.factor(99) == pytest.approx(0.05) and sched.factor(1000) == pytest.approx(0.05)
    sched.t0 = 0.0  # as if the trainer started at perf_counter() == 0, long ago: budget spent
    sched.iteration_started(None)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.05)
    with pytest.raises(ValueError, match="budget_s"):
        WallClockPolyLR(opt, budget_s=0)


def test_seen_set_links_training_phantoms_to_their_hidden_truth(bench, tmp_path):
    demo = tmp_path / "demo"
    (demo / "data" / "imagesTr").mkdir(parents=True)
    (demo / "data" / "groundtruth" / "labelsTr").mkdir(parents=True)
    for case in ("PHANTOM_0001", "PHANTOM_0002", "PHANTOM_0003"):
        (demo / "data" / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"img")
        (demo / "data" / "groundtruth" / "labelsTr" / f"{case}.nii.gz").write_bytes(b"gt")
    seen = bench.make_seen_set(demo, tmp_path / "out", 2)
    assert sorted(p.name for p in (seen / "imagesVal").iterdir()) == ["PHANTOM_0001_0000.nii.gz", "PHANTOM_0002_0000.nii.gz"]
    assert (seen / "labelsVal" / "PHANTOM_0002.nii.gz").read_bytes() == b"gt"
    (demo / "data" / "groundtruth" / "labelsTr" / "PHANTOM_0003.nii.gz").unlink()
    with pytest.raises(SystemExit, match="no hidden ground truth"):
        bench.make_seen_set(demo, tmp_path / "out2", 3)


def test_missing_demo_folder_exits_with_the_command_to_run(bench, tmp_path):
    with pytest.raises(SystemExit, match="run README command 1"):
        _main(["learning", "--demo_dir", str(tmp_path / "nothing"), "--unseen", str(tmp_path), "--out_dir", str(tmp_path / "o")])


def test_truth_recipe_trains_on_every_labelled_phantom_with_its_truth(bench, tmp_path):
    data = tmp_path / "phantoms"
    (data / "imagesTr").mkdir(parents=True)
    (data / "groundtruth" / "labelsTr").mkdir(parents=True)
    for case in ("PHANTOM_0001", "PHANTOM_0002", "PHANTOM_0003"):
        (data / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"img")
        (data / "groundtruth" / "labelsTr" / f"{case}.nii.gz").write_bytes(b"gt")
    overlay = bench.parse_recipes([f"more=@{data}"])["more"]
    assert overlay == {"dataset_dir": str(data.resolve()), "datalist": str(data.resolve() / "datalist_truth.json")}
    datalist = json.loads(Path(overlay["datalist"]).read_text())
    assert [t["label"] for t in datalist["training"]] == [f"groundtruth/labelsTr/PHANTOM_000{i}.nii.gz" for i in (1, 2, 3)]
    assert datalist["training"][0]["annotated_classes"] == list(range(1, 15))
    (data / "groundtruth" / "labelsTr" / "PHANTOM_0002.nii.gz").unlink()
    with pytest.raises(SystemExit, match="missing truth for \\['PHANTOM_0002'\\]"):
        bench.parse_recipes([f"more=@{data}"])
