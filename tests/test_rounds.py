"""``abdoseg rounds``: round folders, DONE markers, restart from the last finished round, exact
uncertainty numbers -- with a stand-in trainer and teacher (the real ones are bundle configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from abdoseg.io import load_nifti, save_json, save_nifti
from abdoseg.label_fusion.rounds import finished_rounds, rounds

SHAPE = (4, 4, 2)
AFF = np.diag([1.5, 1.5, 3.0, 1.0])
CALLS: list[tuple[str, str]] = []


def standin_trainer(datalist: str, train_key: str, dataset_dir: str, models_dir: str) -> dict[str, str]:
    """'Trains' by counting its training cases: offset 0 for <= 2 cases, else 1. Fails once on
    demand (env ROUNDS_FAIL_IN = a models folder path fragment) to simulate a crash."""
    CALLS.append((Path(models_dir).parent.name, train_key))
    fail = os.environ.get("ROUNDS_FAIL_IN")
    if fail and fail in models_dir:
        os.environ.pop("ROUNDS_FAIL_IN")
        raise RuntimeError("simulated crash while training")
    n = len(json.loads(Path(datalist).read_text())[train_key])
    path = Path(models_dir) / "model.pt"
    torch.save({"offset": torch.tensor(0 if n <= 2 else 1)}, path)
    return {"model": str(path)}


def standin_teacher(checkpoint: str):
    offset = int(torch.load(checkpoint, weights_only=True)["offset"])

    def segment(item):
        arr, aff, _ = load_nifti(item["image"])
        return np.clip(arr // 100 + offset, 0, 13).astype(np.uint8), aff

    return segment


def _truth(i: int) -> np.ndarray:
    t = np.arange(32).reshape(SHAPE) % 14  # all 13 organs present; voxels with 13: 2
    return np.roll(t, i).astype(np.uint8)


def make_dataset(root: Path) -> Path:
    """2 fully labeled, 2 partially labeled (liver only), 2 unlabeled; image HU = truth*100 + 50."""
    training, unlabeled = [], []
    for i in range(6):
        t = _truth(i)
        cid = f"P{i}"
        folder = "imagesTr" if i < 4 else "unlabeledTr"
        save_nifti((t.astype(np.int16) * 100 + 50), AFF, root / folder / f"{cid}_0000.nii.gz")
        for pf in ("pseudo_A", "pseudo_B"):
            save_nifti(np.where(t == 14, 0, t).astype(np.uint8), AFF, root / pf / f"{cid}.nii.gz")
        item = {"image": f"{folder}/{cid}_0000.nii.gz", "pseudo_A": f"pseudo_A/{cid}.nii.gz",
                "pseudo_B": f"pseudo_B/{cid}.nii.gz"}
        if i < 4:
            full = i < 2
            label = t if full else np.where(t == 1, 1, 0).astype(np.uint8)
            save_nifti(label, AFF, root / "labelsTr" / f"{cid}.nii.gz")
            ann = list(range(1, 14)) if full else [1]
            item = {"image": item["image"], "label": f"labelsTr/{cid}.nii.gz", "annotated_classes": ann,
                    "group": "all_organs" if full else "partial_organs", **{k: item[k] for k in ("pseudo_A", "pseudo_B")}}
            training.append(item)
        else:
            unlabeled.append(item)
    return save_json({"training": training, "training_all_organs": training[:2], "unlabeled": unlabeled,
                      "validation": []}, root / "datalist.json")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rounds_restart_from_last_finished_round(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_dataset(data)
    work = tmp_path / "work"
    CALLS.clear()
    kw = dict(n_rounds=2, rule="seed003", trainer=standin_trainer, teacher=standin_teacher, threshold=0.5)
    monkeypatch.setenv("ROUNDS_FAIL_IN", "round_2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        rounds(str(data), str(work), **kw)
    assert finished_rounds(work) == [1]
    assert not (work / "round_2" / "DONE").exists()
    round1 = _snapshot(work / "round_1")
    assert {"DONE", "datalist.json", "report.json", "report.csv", "models/model.pt",
            "models/checkpoints.json", "fused/fuse_report.json", "pseudo/model/P5.nii.gz"} <= set(round1)

    CALLS.clear()
    summary = rounds(str(data), str(work), **kw)
    assert CALLS == [("round_2", "training"), ("final", "training")]  # round 1 not retrained
    assert _snapshot(work / "round_1") == round1  # nothing of round 1 rewritten
    assert finished_rounds(work) == [1, 2] and (work / "final" / "DONE").is_file()
    assert [r["round"] for r in summary["rounds"]] == [1, 2]

    # round 1: teacher trained on the 2 full cases (offset 0) -> pseudo labels = truth; no score yet
    r1 = json.loads((work / "round_1" / "report.json").read_text())
    assert r1["counts"] == {"cases": 6, "fused": 6, "skipped": 0, "selected": 6, "rejected": 0}
    assert all(c["uncertainty"] is None for c in r1["cases"])
    dl1 = json.loads((work / "round_1" / "datalist.json").read_text())
    assert len(dl1["training"]) == 6 and all(i["annotated_classes"] == list(range(1, 15)) for i in dl1["training"])
    fused, _, _ = load_nifti((data / dl1["training"][4]["label"]).resolve())
    assert np.array_equal(fused, _truth(4))  # unlabeled: A = B = S1 = truth
    # round 2: trained on 6 cases (offset 1): every voxel but the 2 clipped 13s changes ->
    # uncertainty = 30 changed / 32 foreground; 0.9375 >= 0.5 -> rejected unless fully labeled
    r2 = {c["case_id"]: c for c in json.loads((work / "round_2" / "report.json").read_text())["cases"]}
    assert {cid: c["uncertainty"] for cid, c in r2.items()} == {f"P{i}": 30 / 32 for i in range(6)}
    assert {cid for cid, c in r2.items() if c["selected"]} == {"P0", "P1"}
    dl2 = json.loads((work / "round_2" / "datalist.json").read_text())
    assert sorted(Path(i["label"]).name for i in dl2["training"]) == ["P0.nii.gz", "P1.nii.gz"]
    assert [Path(i["image"]).name for i in dl2["unlabeled"]] == ["P4_0000.nii.gz", "P5_0000.nii.gz"]

    # a third call does nothing but report
    CALLS.clear()
    rounds(str(data), str(work), **kw)
    assert CALLS == []


def test_rounds_cli_registered_and_bad_input(tmp_path):
    from abdoseg.cli import COMMANDS
    from abdoseg.io import InputError

    assert COMMANDS["rounds"][0] == "abdoseg.label_fusion.rounds:rounds"
    with pytest.raises(InputError, match="datalist not found"):
        rounds(str(tmp_path), str(tmp_path / "w"), trainer=standin_trainer, teacher=standin_teacher)
    with pytest.raises(ValueError, match="unknown rule"):
        rounds(str(tmp_path), str(tmp_path / "w"), rule="vote")


def lesion_teacher(checkpoint: str):
    """The stand-in teacher, plus a predicted lesion (14) at voxel (0, 0, 0)."""
    seg = standin_teacher(checkpoint)

    def segment(item):
        arr, aff = seg(item)
        arr[0, 0, 0] = 14
        return arr, aff

    return segment


def test_rounds_seed001_fills_from_prediction_and_selects_only_before_the_final_training(tmp_path):
    """Rule seed001 through the rounds dispatcher (stand-in trainer/teacher, no training):
    round 1 on the 2 full cases (offset 0), rounds 2-3 on all 6 (offset 1); the uncertainty
    selection is deferred in rounds 1-2 and applied in round 3 on the pseudo labels of 3 rounds:
    about mean(0.92, 0) = 0.46 >= 0.4 -> the 4 partial/unlabeled cases are rejected there only."""
    data = tmp_path / "data"
    make_dataset(data)
    work = tmp_path / "work"
    CALLS.clear()
    summary = rounds(str(data), str(work), n_rounds=3, rule="seed001", trainer=standin_trainer, teacher=lesion_teacher,
                     threshold=0.4)
    assert CALLS == [("round_1", "training_all_organs"), ("round_2", "training"), ("round_3", "training"),
                     ("final", "training")]
    assert [r["selection"] for r in summary["rounds"]] == ["deferred", "deferred", "applied"]

    def report(k):
        return {c["case_id"]: c for c in json.loads((work / f"round_{k}" / "report.json").read_text())["cases"]}

    def pseudo(i, offset):  # the lesion teacher's prediction of case i
        out = np.clip(_truth(i).astype(int) + offset, 0, 13)
        out[0, 0, 0] = 14
        return out

    # seed 001 eq. 1 by hand: round 2 changes every voxel but the clipped 13s and the lesion
    score2 = {f"P{i}": float((pseudo(i, 0) != pseudo(i, 1)).sum() / (pseudo(i, 1) > 0).sum()) for i in range(6)}
    assert all(29 / 32 <= v <= 30 / 32 for v in score2.values())
    r2, r3 = report(2), report(3)
    assert {c["rule"] for c in r2.values()} == {"seed001_labeled", "seed001_unlabeled"}
    # round 2: scores reported, nothing rejected although every score is >= 0.4
    assert {cid: c["uncertainty"] for cid, c in r2.items()} == pytest.approx(score2)
    assert all(c["selected"] for c in r2.values())
    assert len(json.loads((work / "round_2" / "datalist.json").read_text())["training"]) == 6
    # round 3: mean over the pairs (1, 2) and (2, 3) = score2 / 2 (> 0.4) -> rejected unless fully labeled
    assert {cid: c["uncertainty"] for cid, c in r3.items()} == pytest.approx({k: v / 2 for k, v in score2.items()})
    assert {cid for cid, c in r3.items() if c["selected"]} == {"P0", "P1"}
    final_dl = json.loads((work / "round_3" / "datalist.json").read_text())  # what the final training used
    assert sorted(Path(i["label"]).name for i in final_dl["training"]) == ["P0.nii.gz", "P1.nii.gz"]

    # round 2's labels: partial case P2 (liver annotated) keeps its liver, every other class
    # (lesion included) comes from round 2's prediction, predicted liver outside it is dropped
    truth = _truth(2)
    pred = pseudo(2, 1)
    want = np.where(truth == 1, 1, np.where(pred == 1, 0, pred))
    fused, _, _ = load_nifti(work / "round_2" / "fused" / "P2.nii.gz")
    np.testing.assert_array_equal(fused, want)
    assert fused[0, 0, 0] == 14
    fused_u, _, _ = load_nifti(work / "round_2" / "fused" / "P4.nii.gz")  # unlabeled: the prediction
    np.testing.assert_array_equal(fused_u, pseudo(4, 1))


def test_rounds_select_every_round_switch(tmp_path):
    """seed003 keeps its per-round selection by default; select_every_round=False defers it."""
    data = tmp_path / "data"
    make_dataset(data)
    kw = dict(n_rounds=2, trainer=standin_trainer, teacher=standin_teacher, threshold=0.5, final_train=False)
    s_default = rounds(str(data), str(tmp_path / "a"), rule="seed003", **kw)
    assert [r["selection"] for r in s_default["rounds"]] == ["applied", "applied"]
    s_deferred = rounds(str(data), str(tmp_path / "b"), rule="seed001", select_every_round=True, **kw)
    assert [r["selection"] for r in s_deferred["rounds"]] == ["applied", "applied"]
    s_001 = rounds(str(data), str(tmp_path / "c"), rule="seed001", **kw)
    assert [r["selection"] for r in s_001["rounds"]] == ["deferred", "applied"]


def test_round_1_of_another_rule_is_reused_by_seed001(tmp_path):
    """What scripts/experiment_label_modes.py arm e relies on: round 1's teacher (checkpoints.json)
    and pseudo labels copied from a seed003 run are reused, only the fusion is redone."""
    import shutil

    data = tmp_path / "data"
    make_dataset(data)
    kw = dict(trainer=standin_trainer, teacher=standin_teacher, final_train=False)
    rounds(str(data), str(tmp_path / "r003"), n_rounds=1, rule="seed003", **kw)
    src, dst = tmp_path / "r003" / "round_1", tmp_path / "r001" / "round_1"
    (dst / "models").mkdir(parents=True)
    shutil.copy2(src / "models" / "checkpoints.json", dst / "models" / "checkpoints.json")
    shutil.copytree(src / "pseudo", dst / "pseudo")
    CALLS.clear()
    rounds(str(data), str(tmp_path / "r001"), n_rounds=2, rule="seed001", **kw)
    assert CALLS == [("round_2", "training")]  # round 1 not retrained
    assert {c["rule"] for c in json.loads((dst / "report.json").read_text())["cases"]} == {"seed001_labeled",
                                                                                           "seed001_unlabeled"}


def test_rounds_train_and_pseudo_label_with_the_preset(tmp_path, monkeypatch):
    """Seed 001 as its paper runs it: ``--preset seed001 --n_rounds 3 --threshold 0.05
    --max_epochs None``. Every training (3 rounds + the final one) merges the fine bundle's
    train.json with presets/seed001.json and keeps the preset's own epochs and schedule (no CPU
    budget), the teacher merges inference.json with the same preset, and the selection rejects
    the unstable cases in round 3. ConfigWorkflow and the teacher are recorded stand-ins: what is
    checked is what they are given."""
    import monai.bundle

    from abdoseg.label_fusion import pseudo_label
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.label_fusion.rounds import DEFAULT_FINE_BUNDLE

    trainings: list[dict] = []
    teachers: list[list[str]] = []

    class RecordingWorkflow:
        def __init__(self, config_file, **kw):
            trainings.append({"config_file": config_file, **kw})
            self.kw = kw

        def initialize(self):
            pass

        def run(self):  # round 1 (2 full cases) -> offset 0, later rounds (6 cases) -> offset 1
            n = len(json.loads(Path(self.kw["datalist"]).read_text())[self.kw["train_key"]])
            torch.save({"offset": torch.tensor(0 if n <= 2 else 1)}, Path(self.kw["ckpt_dir"]) / "model.pt")

        def finalize(self):
            pass

    def recording_teacher(checkpoint, inference_config, **kw):
        teachers.append(list(inference_config))
        return standin_teacher(checkpoint)

    monkeypatch.setattr(monai.bundle, "ConfigWorkflow", RecordingWorkflow)
    monkeypatch.setattr(pseudo_label, "bundle_teacher", recording_teacher)
    data = tmp_path / "data"
    make_dataset(data)
    work = tmp_path / "work"
    summary = rounds(str(data), str(work), rule="seed001", preset="seed001", n_rounds=3, threshold=0.05,
                     max_epochs=None)

    fine = Path(DEFAULT_FINE_BUNDLE)
    want_train = [str(fine / "configs" / "inference.json"), str(fine / "configs" / "train.json"),
                  str(fine / "configs" / "presets" / "seed001.json")]
    assert [t["config_file"] for t in trainings] == [want_train] * 4
    assert [t["train_key"] for t in trainings] == ["training_all_organs", "training", "training", "training"]
    assert all("max_epochs" not in t and "batch_size" not in t and "num_samples" not in t for t in trainings)
    assert teachers == [[str(fine / "configs" / "inference.json"), str(fine / "configs" / "presets" / "seed001.json")]] * 3
    # what those configs run: the preset's 1000 epochs, halved every 200, at the paper's grid
    train = load_bundle_config(fine, want_train)
    assert train.get_parsed_content("max_epochs") == 1000
    assert train["lr_scheduler"]["step_size"] == 200 and train["lr_scheduler"]["gamma"] == 0.5
    assert train.get_parsed_content("fine_spacing_mm") == [0.8, 0.8, 2.5]
    # selection: deferred in rounds 1-2, applied with the threshold in round 3 (scores ~0.46 >= 0.05)
    assert [r["selection"] for r in summary["rounds"]] == ["deferred", "deferred", "applied"]
    assert [r["preset"] for r in summary["rounds"]] == ["seed001"] * 3
    r3 = json.loads((work / "round_3" / "report.json").read_text())
    assert r3["counts"]["rejected"] == 4 and r3["counts"]["selected"] == 2
    assert summary["final"] is not None


def test_rounds_name_a_missing_preset(tmp_path):
    from abdoseg.io import InputError

    data = tmp_path / "data"
    make_dataset(data)
    with pytest.raises(InputError, match="presets: seed000, seed001"):
        rounds(str(data), str(tmp_path / "w"), rule="seed001", preset="seed009", trainer=standin_trainer)
