"""scripts/bench_learning.py without training: recipe parsing, the bundle overlays it writes
(recipe + learning-curve handlers, read back through MONAI's config merge), throughput figures
from curve points, the tables, and the clear exit when the demo folder is missing."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "scripts" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    from abdoseg.bundle_config import load_bundle_config

    bundle = tmp_path / "b"
    bench.prepare_bundle(REPO / "bundles" / "fine_organ_tumor", bundle, {"train_autocast_dtype": None}, 30, 10)
    assert not (bundle / "models" / "model.pt").exists()  # never starts from trained fine weights
    parser = load_bundle_config(bundle, ["configs/train.json", "configs/recipe.json", "configs/learning_curve.json"])
    assert parser.get_parsed_content("train_autocast_dtype") is None
    targets = [h["_target_"] for h in parser["train"]["handlers"]]
    assert targets[-2:] == ["abdoseg.handlers.LearningCurveRecorder", "abdoseg.handlers.TimeBudget"]
    assert "LrScheduleHandler" in targets  # appended, not replaced


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
    results = {"previous": {"points": slow, "throughput": bench.throughput(slow), "n_unseen": 8},
               "recipe": {"points": fast, "throughput": t, "n_unseen": 8}}
    args = argparse.Namespace(budget_s=250.0, every_s=100.0, max_epochs=0, unseen="runs/unseen7")
    md = bench.markdown(results, args)
    assert "| 2 |  |  | 250 | 0.500 / 0.450 |" in md  # the longer curve's last row
    assert "| recipe | 375 | 0.667 | 393,216 (1.50x) | 25 % | 1.80 | 0.500 / 0.450 | 0.000 | 1 / 4 | 0.50 |" in md
    assert "recipe: right_adrenal_gland 0.00" in md


def test_missing_demo_folder_exits_with_the_command_to_run(bench, tmp_path):
    with pytest.raises(SystemExit, match="run README command 1"):
        bench.main(["--demo_dir", str(tmp_path / "nothing"), "--unseen", str(tmp_path), "--out_dir", str(tmp_path / "o")])
