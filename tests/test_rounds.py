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
from abdoseg.rounds import finished_rounds, rounds

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

    assert COMMANDS["rounds"][0] == "abdoseg.rounds:rounds"
    with pytest.raises(InputError, match="datalist not found"):
        rounds(str(tmp_path), str(tmp_path / "w"), trainer=standin_trainer, teacher=standin_teacher)
    with pytest.raises(ValueError, match="unknown rule"):
        rounds(str(tmp_path), str(tmp_path / "w"), rule="vote")
