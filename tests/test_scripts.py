"""Every script kept in scripts/ runs on tiny data: each ``bench.py`` subcommand and the separate
scripts (``eval_accuracy.py``, ``experiment_label_modes.py``, ``measure_postprocess.py``), as a
user runs them (a child process), on small-preset phantoms of 20 slices, with the committed or
seeded random weights, tiny networks where the script takes overrides and the smallest budgets;
each test asserts on what the script wrote (files, numbers in range, table rows).
``bench.py gpu`` needs CUDA: on a CPU machine the test checks its clear exit message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
FINE = REPO / "bundles" / "fine_organ_tumor"
SUBCOMMANDS = ("cascade", "stages", "compare", "onnx", "coarse", "training", "data", "learning", "systems", "gpu")
#: a tiny fine network for the scripts that train (the data side / the mechanics are what is tested)
TINY_NET = {"network_def#channels": 8, "network_def#kernel_size": [[3, 3, 3]] * 3,
            "network_def#strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "network_def#deep_supr_num": 1,
            "patch_size": [32, 32, 16], "num_samples": 1, "fine_spacing_mm": [6.0, 6.0, 8.0]}


def run_script(args: list[str], cwd: Path, timeout: float = 240, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """``python <args>`` from ``cwd`` with one torch thread; fails showing the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in ok:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def bench(*args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run_script([SCRIPTS / "bench.py", *args], cwd, **kw)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """``abdoseg generate --preset small --slices 20`` (2 labelled, 1 validation) + ``abdoseg prepare``."""
    from abdoseg.data.phantom import generate
    from abdoseg.data.prepare import prepare

    data = tmp_path_factory.mktemp("phantoms") / "data"
    generate(str(data), preset="small", seed=0, n_labeled=2, n_unlabeled=0, n_val=1, slices=20)
    prepare(str(data))
    return data


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    """Held-out phantoms of another seed (imagesVal/ + labelsVal/, one case)."""
    from abdoseg.data.phantom import generate

    data = tmp_path_factory.mktemp("unseen") / "unseen7"
    generate(str(data), preset="small", seed=7, n_labeled=1, n_unlabeled=0, n_val=1, slices=20)
    return data


@pytest.fixture(scope="module")
def demo(tmp_path_factory, phantoms) -> Path:
    """What ``abdoseg demo --out_dir D`` leaves that ``learning`` and ``systems`` read: ``D/data``,
    the fused datalist ``D/rounds/round_1/datalist.json`` (here the prepared one) and the fine
    bundle copy with its coarse network."""
    d = tmp_path_factory.mktemp("demo")
    (d / "data").symlink_to(phantoms)
    (d / "rounds" / "round_1").mkdir(parents=True)
    shutil.copy2(phantoms / "datalist.json", d / "rounds" / "round_1" / "datalist.json")
    shutil.copytree(FINE, d / "bundles" / "fine_organ_tumor", ignore=shutil.ignore_patterns("model.pt", "eval"))
    return d


def test_bench_lists_every_subcommand_with_its_own_arguments(tmp_path):
    out = bench("--help", cwd=tmp_path).stdout
    assert all(f"    {name} " in out for name in SUBCOMMANDS)
    assert "--slices" in bench("cascade", "--help", cwd=tmp_path).stdout
    assert "--peer PEER" in bench("compare", "--help", cwd=tmp_path).stdout
    assert "--peer PEER" not in bench("stages", "--help", cwd=tmp_path).stdout
    proc = bench("nosuch", cwd=tmp_path, ok=(2,))
    assert "invalid choice: 'nosuch'" in proc.stderr


def test_cascade_and_single_stage_on_a_small_phantom(tmp_path):
    out = tmp_path / "bench"
    bench("cascade", "--preset", "small", "--slices", "20", "--threads", "1", "--out_dir", out, cwd=tmp_path)
    summary = json.loads((out / "bench_cascade.json").read_text())
    assert [(r["case"], r["pipeline"]) for r in summary["cases"]] == [("BENCH_small_020.nii.gz", "cascade"),
                                                                        ("BENCH_small_020.nii.gz", "single")]
    cascade, single = summary["cases"]
    assert cascade["roi"] == "coarse_model.pt" and cascade["fine_weights"] == "model.pt"
    assert single["roi"] == "single-stage" and cascade["device"] == "cpu"
    assert 0 < cascade["roi_volume_fraction"] < 1 and single["roi_volume_fraction"] == 1.0
    for pipe in ("cascade", "single"):
        s = summary[pipe]
        assert 0 < s["case_s"] < s["process_s"] and 100 < s["peak_rss_mb"] < 4000
        assert 0.0 <= s["lesion_dsc"] <= 1.0 and 0.0 <= s["organ_dsc"] <= 1.0
    assert summary["cascade"]["organ_dsc"] > 0.2  # the committed weights on a phantom
    assert summary["speedup_single_over_cascade_median"] > 0
    assert (out / "pred_cascade" / "BENCH_small_020.nii.gz").is_file()


def test_stages_table_of_one_ct(tmp_path):
    cases = _small_ct(tmp_path)
    bench("stages", "--ct", cases, "--random_weights", "--repeats", "1", "--out", tmp_path / "stages.json",
          cwd=tmp_path)
    rows = json.loads((tmp_path / "stages.json").read_text())
    stages = [r["stage"] for r in rows]
    assert stages[0].startswith("import") and "fine: network" in stages and stages[-1] == "write mask (gzip NIfTI)"
    assert "coarse: network (fitted sliding window)" in stages
    assert all(r["median_s"] >= 0 and r["peak_rss_mb"] > 50 for r in rows)


def test_compare_alternates_our_process_with_the_peers(tmp_path):
    """A stand-in peer bundle (a ``monai.bundle run`` config with the ids the command sets) keeps
    this test off the 105-class wholeBody network; the mechanics are the same."""
    peer = tmp_path / "peer"
    (peer / "configs").mkdir(parents=True)
    (peer / "configs" / "inference.json").write_text(json.dumps({
        "bundle_root": ".", "device": "cpu", "displayable_configs": {"highres": True}, "evaluator": {"amp": True},
        "run": ["$print('peer ran on', len(list(__import__('pathlib').Path('sampledata/imagesTs').iterdir())), 'CT')"]}))
    for name in ("metadata.json", "logging.conf"):
        shutil.copy2(FINE / "configs" / name, peer / "configs" / name)
    out = tmp_path / "compare.json"
    proc = bench("compare", "--ct", _small_ct(tmp_path), "--peer", peer, "--repeats", "1", "--threads", "1",
                 "--out", out, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert len(result["runs"]["abdoseg"]) == len(result["runs"]["wholeBody"]) == 1
    for k in ("abdoseg", "wholeBody"):
        assert result["median"][k]["wall_s"] > 0 and result["median"][k]["peak_rss_mb"] > 50
    assert result["ratio_wall"] > 0 and "| ratio wholeBody / abdoseg (wall) |" in proc.stdout


def test_onnx_against_torch_on_a_small_phantom(tmp_path):
    out = tmp_path / "onnx.json"
    bench("onnx", "--cases", "small", "--repeats", "1", "--threads", "1", "--atol", "1e-3", "--out", out,
          "--overrides", json.dumps({"fine_spacing_mm": [6, 6, 8]}), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["weights"] == "model.pt: bundle weights; coarse_model.pt: bundle weights"
    (row,) = result["cases"]
    assert row["case"] == "small" and row["torch_median_s"] > 0 and row["onnx_median_s"] > 0
    assert row["same_roi"] and row["diff_fraction"] < 0.01  # ORT (float32) vs torch (autocast): a few voxels


def test_coarse_roi_coverage_on_small_phantoms(tmp_path):
    out = tmp_path / "coarse.json"
    bench("coarse", "--preset", "small", "--slices", "20", "30", "--threads", "1", "--out", out, cwd=tmp_path,
          ok=(0, 1))  # 1: target missed (a finding, not a failure of the script)
    result = json.loads(out.read_text())
    assert [c["slices"] for c in result["cases"]] == [20, 30]
    s = result["summary"]
    assert s["n_cases"] == 2 and 0.0 <= s["coverage_min"] <= 1.0 and 0 < s["roi_volume_fraction_median"] <= 1.0
    assert s["coverage_min"] > 0.9  # the committed coarse network finds the abdomen


def test_training_step_float32_vs_bfloat16(tmp_path):
    out = tmp_path / "training.json"
    proc = bench("training", "--repeats", "2", "--overrides", json.dumps(TINY_NET), "--json", out, cwd=tmp_path)
    table = json.loads(out.read_text())
    assert [r["mode"] for r in table] == ["float32", "bfloat16"] and table[0]["ratio_to_first"] == 1.0
    assert all(r["median_s"] > 0 for r in table)
    assert "batch 1 x 1 x 32x32x16" in proc.stdout


def test_gpu_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the GPU path is a benchmark run, not a test")
    proc = bench("gpu", "--out_dir", tmp_path / "gpu", "--preset", "small", "--slices", "20", cwd=tmp_path, ok=(1,))
    assert "bench.py gpu: no CUDA device available" in proc.stderr and "nothing was run" in proc.stderr
    assert not (tmp_path / "gpu").exists()


def test_data_pipeline_disk_cache_and_ram_baseline(tmp_path):
    out = tmp_path / "data"
    proc = bench("data", "--sizes", "2", "--iterations", "2", "--ram_baseline", "2", "--workers", "1",
                 "--fill_threads", "1", "--out", out, cwd=tmp_path)
    result = json.loads((out / "bench_data_pipeline.json").read_text())
    disk, ram = result["rows"]
    assert disk["cache"] == "disk" and disk["filled"] == disk["cache_files"] >= 2 and disk["cache_mb"] > 0
    assert ram["cache"].startswith("RAM") and "fill_s" not in ram
    for r in (disk, ram):
        assert r["iterations"] == 2 and r["s_per_iteration"] > 0 and 0 <= r["data_wait_share"] <= 1
        assert 100 < r["train_peak_rss_mb"] < 8000
    assert "| 2 | disk |" in proc.stdout and "| 2 | RAM |" in proc.stdout
    assert not (out / "cache").exists()  # deleted at the end without --keep_cache


def test_learning_curves_of_a_tiny_recipe(tmp_path, demo, unseen):
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**TINY_NET, "num_workers": 0, "cache_rate": 0.0}))
    out = tmp_path / "learning"
    proc = bench("learning", "--demo_dir", demo, "--unseen", unseen, "--out_dir", out, "--budget_s", "6",
                 "--every_s", "3", "--seen", "1", "--recipe", f"tiny={overlay}", cwd=tmp_path)
    result = json.loads((out / "learning.json").read_text())["results"]
    run = result["tiny_s0"]
    assert run["recipe"] == "tiny" and run["n_unseen"] == 1 and len(run["points"]) >= 2
    for p in run["points"]:
        assert 0.0 <= p["organ_dsc"] <= 1.0 and 0.0 <= p["seen"]["organ_dsc"] <= 1.0
    assert run["throughput"]["iterations"] > 0 and run["throughput"]["voxels_per_s"] > 0
    md = (out / "learning.md").read_text()
    assert "| snapshot | tiny: s | tiny: DSC |" in md and "| tiny | 1 |" in md and md in proc.stdout
    assert (out / "learning_curve.png").stat().st_size > 1000


def test_systems_one_seed_system_end_to_end_with_its_own_label_procedure(tmp_path, demo, unseen):
    """Seed 004 from the raw phantoms: its teacher (the fine default recipe on the fully labelled
    case) supplements the partial labels (rule seed004), then its coarse and fine students train
    on that datalist with validation on, and segment the held-out phantom."""
    import nibabel as nib
    import numpy as np

    out = tmp_path / "systems"
    proc = bench("systems", "--demo_dir", demo, "--unseen", unseen, "--systems", "seed004", "--budget_s", "20",
                 "--coarse_budget_s", "3", "--max_epochs", "2", "--val_interval", "1", "--label_epochs", "1",
                 "--repeats", "0", "--out_dir", out, cwd=tmp_path)  # full-size timing: the cascade tests
    (row,) = json.loads((out / "systems.json").read_text())
    assert row["system"] == "seed004" and row["params_m"] > 0 and row["train_s"] > 0
    assert row["labels"] == "teacher supplement" and "rule seed004" in row["label_procedure"] and row["label_s"] > 0
    assert set(row["checkpoints"]) == {"coarse", "models"}
    assert all(0.0 <= row[k] <= 1.0 for k in ("organ_dsc", "organ_nsd", "lesion_dsc", "lesion_nsd"))
    assert row["fullsize_wall_s"] is None and not (out / "seed004" / "fullsize.json").exists()
    # the label step: the teacher trained on training_all_organs, every labelled case supplemented,
    # its annotated classes kept, no lesion from the teacher; nothing else in the student's datalist
    labels = out / "seed004" / "labels"
    assert (labels / "teacher" / "models" / "model.pt").is_file()
    fused = json.loads((labels / "datalist.json").read_text())
    source = {Path(i["image"]).name: i for i in json.loads((demo / "data" / "datalist.json").read_text())["training"]}
    assert sorted(Path(i["image"]).name for i in fused["training"]) == sorted(source)
    report = json.loads((labels / "fused" / "fuse_report.json").read_text())
    assert report["rule"] == "seed004" and {c["rule"] for c in report["cases"]} == {"seed004_weak_label"}
    for item in fused["training"]:
        lab = np.asarray(nib.load(str(demo / "data" / item["label"])).dataobj)
        assert (labels / "fused") in (demo / "data" / item["label"]).resolve().parents
        orig = source[Path(item["image"]).name]
        partial = np.asarray(nib.load(str(demo / "data" / orig["label"])).dataobj)
        for c in orig["annotated_classes"]:
            assert np.array_equal(lab == c, partial == c), c
        assert not np.any((lab == 14) & (partial != 14))
    # the students train on it (2 epochs, well inside the budget), validating after each
    # (val_interval 1 < max_epochs 2): the best checkpoint kept
    stats = json.loads((out / "seed004" / "bundles" / "fine_organ_tumor" / "models" / "train_stats.json").read_text())
    assert stats["total_epochs"] == 2 and stats["best_metric_epoch"] >= 1 and row["checkpoints"]["models"] == "best"
    table = (out / "systems.md").read_text()
    assert table.startswith("| system | labels: procedure (s, training cases) | network (params) |")
    assert f"| seed004 | teacher supplement (" in table and table in proc.stdout


def test_eval_accuracy_on_held_out_phantoms(tmp_path, unseen):
    out = tmp_path / "accuracy"
    proc = run_script([SCRIPTS / "eval_accuracy.py", "--bundle", FINE, "--phantoms", unseen, "--out_dir", out],
                      tmp_path)
    summary = json.loads((out / "summary.json").read_text())["phantoms"]
    assert 0.2 < summary["organ_dsc"] <= 1.0 and 0.0 <= summary["lesion_dsc"] <= 1.0
    assert (out / "phantoms_pred" / "PHANTOM_0002.nii.gz").is_file()
    assert "organ" in proc.stdout.lower()


def test_experiment_label_modes_one_arm(tmp_path):
    work = tmp_path / "label_modes"
    overrides = {**TINY_NET, "cache_rate": 0.0, "num_workers": 0}
    run_script([SCRIPTS / "experiment_label_modes.py", "--work_dir", work, "--n_labeled", "2", "--n_unlabeled", "0",
                "--n_val", "1", "--arms", "b", "--fine_epochs", "1",
                "--coarse_checkpoint", REPO / "bundles" / "coarse_roi" / "models" / "model.pt",
                "--train_overrides", json.dumps(overrides),
                "--infer_overrides", json.dumps({"fine_spacing_mm": [6.0, 6.0, 8.0], **{k: v for k, v in TINY_NET.items()
                                                                                      if k.startswith("network_def")}})],
               tmp_path)
    (row,) = json.loads((work / "results.json").read_text())
    assert row["arm"] == "b" and row["label_mode"] == "partial" and row["epochs"] == 1 and row["n_train"] == 2
    assert all(0.0 <= row[k] <= 1.0 for k in ("organ_dsc", "organ_nsd", "lesion_dsc", "lesion_nsd"))
    assert 0.5 < row["label_quality"]["organ_dsc"] <= 1.0  # the partial labels against the hidden truth
    assert "| b | partial-label loss (MarginalExclusionLoss) |" in (work / "results.md").read_text()


def test_measure_postprocess_on_pseudo_labels(tmp_path, phantoms):
    out = tmp_path / "pp"
    proc = run_script([SCRIPTS / "measure_postprocess.py", "--dataset_dir", phantoms, "--source", "pseudo_A",
                       "--out_dir", out, "--threads", "1"], tmp_path)
    result = json.loads((out / "postprocess_effect_pseudo_A.json").read_text())
    assert result["cases"] == 2 and result["source"] == "pseudo_A" and "none" in result["table"]
    for row in result["table"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("organ_dsc", "organ_nsd", "lesion_dsc", "lesion_nsd"))
    assert proc.stdout.splitlines()[1].startswith("none ")


def _small_ct(tmp_path: Path) -> Path:
    """One small-preset phantom CT (20 slices) as NIfTI, written once per test folder."""
    path = tmp_path / "ct" / "SMALL_0000.nii.gz"
    if not path.is_file():
        from abdoseg.data.phantom import make_case
        from abdoseg.io import save_nifti

        image, _, affine = make_case(0, "small", slices=20)
        save_nifti(image, affine, path)
    return path
