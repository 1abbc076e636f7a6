"""Pseudo-labeling workflow of the label_fusion bundle: resume after a kill (byte-identical outputs),
two-rank sharding (every case exactly once), checkpoint specs, and the MONAI-bundle teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from abdoseg.io import InputError, load_nifti, save_json, save_nifti
from abdoseg.label_fusion.pseudo_label import bundle_teacher, checkpoint_map, datalist_items, pseudo_label

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "label_fusion"
PY = sys.executable


# ----------------------------------------------------------------- deterministic stand-in teacher
def standin_factory(checkpoint: str):
    """Teacher stand-in: label = clip(HU // 100 + offset, 0, 13) inside the body (HU > 0).

    ``offset`` comes from the checkpoint (a plain state dict). Env ``STANDIN_DELAY_S`` slows each
    case down; ``STANDIN_LOG`` (a folder) records the cases each rank segmented.
    """
    offset = int(torch.load(checkpoint, weights_only=True)["offset"])
    delay = float(os.environ.get("STANDIN_DELAY_S", "0"))
    log_dir = os.environ.get("STANDIN_LOG")

    def segment(item):
        time.sleep(delay)
        arr, aff, _ = load_nifti(item["image"])
        if log_dir:
            with open(Path(log_dir) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write(f"{Path(checkpoint).stem} {item['case_id']}\n")
        return (np.clip(arr // 100 + offset, 0, 13) * (arr > 0)).astype(np.uint8), aff

    return segment


def make_data(root: Path, n_labeled: int = 3, n_unlabeled: int = 3) -> Path:
    """Random int16 CTs (seeded per case), datalist with training + unlabeled; returns its path."""
    training, unlabeled = [], []
    for i in range(n_labeled + n_unlabeled):
        rng = np.random.default_rng(i)
        img = rng.integers(-400, 1400, size=(6, 5, 4)).astype(np.int16)
        aff = np.diag([0.8, 0.8, 2.5, 1.0])
        if i < n_labeled:
            cid = f"L{i:02d}"
            save_nifti(img, aff, root / "imagesTr" / f"{cid}_0000.nii.gz")
            save_nifti((img > 500).astype(np.uint8), aff, root / "labelsTr" / f"{cid}.nii.gz")
            training.append({"image": f"imagesTr/{cid}_0000.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                             "annotated_classes": [1], "group": "partial_organs"})
        else:
            cid = f"U{i:02d}"
            save_nifti(img, aff, root / "unlabeledTr" / f"{cid}_0000.nii.gz")
            unlabeled.append({"image": f"unlabeledTr/{cid}_0000.nii.gz"})
    return save_json({"training": training, "training_all_organs": [], "unlabeled": unlabeled,
                      "validation": []}, root / "datalist.json")


def make_checkpoints(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, offset in (("t1", 0), ("t2", 3)):
        torch.save({"offset": torch.tensor(offset)}, folder / f"{name}.pt")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.nii.gz"))
            if not p.name.startswith(".")}


def _bundle_cmd(data: Path, ckpts: Path, out: Path) -> list[str]:
    return ["-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs/pseudo_label.json"),
            "--meta_file", str(BUNDLE / "configs/metadata.json"),
            "--logging_file", str(BUNDLE / "configs/logging.conf"),
            "--bundle_root", str(out.parent), "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"),
            "--checkpoints", str(ckpts), "--output_dir", str(out),
            "--teacher_factory", "$__import__('test_pseudo_label').standin_factory"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# ----------------------------------------------------------------- tests
def test_datalist_items_and_checkpoint_specs(tmp_path):
    dl = make_data(tmp_path / "data", 2, 1)
    items = datalist_items(dl)
    assert [(i["case_id"], i["split"]) for i in items] == [("L00", "training"), ("L01", "training"), ("U02", "unlabeled")]
    assert Path(items[0]["image"]).is_absolute() and Path(items[0]["label"]).is_file()
    ck = make_checkpoints(tmp_path / "ck")
    assert checkpoint_map(ck) == {"t1": str(ck / "t1.pt"), "t2": str(ck / "t2.pt")}
    assert checkpoint_map(str(ck / "t2.pt")) == {"t2": str(ck / "t2.pt")}
    assert checkpoint_map({"S1": str(ck / "t1.pt")}) == {"S1": str(ck / "t1.pt")}
    with pytest.raises(InputError, match="missing.pt: checkpoint 'missing' not found"):
        checkpoint_map([str(ck / "missing.pt")])
    with pytest.raises(InputError, match="datalist file not found"):
        datalist_items(tmp_path / "nope.json")


@pytest.mark.slow
def test_killed_run_resumes_to_byte_identical_outputs(tmp_path, capfd):
    data = tmp_path / "data"
    make_data(data)
    ck = make_checkpoints(tmp_path / "ck")
    # reference: one uninterrupted run (in process)
    ref = tmp_path / "ref" / "pseudo"
    reps = pseudo_label(datalist_items(data / "datalist.json"), standin_factory, ck, ref, rank=0, world_size=1)
    assert {k: len(r.done) for k, r in reps.items()} == {"t1": 6, "t2": 6}
    # the bundle config in a subprocess, SIGKILLed as soon as its first output appears
    out = tmp_path / "run" / "pseudo"
    proc = subprocess.Popen([PY, *_bundle_cmd(data, ck, out)], env=_env(STANDIN_DELAY_S="0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "t1").glob("[!.]*.nii.gz")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no output within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = _files(out)
    assert 1 <= len(partial) < 12, partial.keys()
    assert all(partial[k] == (ref / k).read_bytes() for k in partial)  # no truncated file
    # restart (same config and overrides, in process to save a start-up) finishes the rest
    from monai.bundle import run

    args = _bundle_cmd(data, ck, out)[3:]
    run(**{args[i].lstrip("-"): args[i + 1] for i in range(0, len(args), 2)})
    assert f"{len(partial)} already present" in capfd.readouterr().err
    assert _files(out) == _files(ref)


@pytest.mark.slow
def test_two_ranks_cover_every_case_exactly_once(tmp_path):
    data = tmp_path / "data"
    make_data(data, 4, 3)
    ck = make_checkpoints(tmp_path / "ck")
    log = tmp_path / "log"
    log.mkdir()
    out = tmp_path / "run" / "pseudo"
    torchrun = Path(PY).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", *_bundle_cmd(data, ck, out)]
    res = subprocess.run(cmd, env=_env(STANDIN_LOG=str(log)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {r: (log / f"rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)}
    ids = [f"L{i:02d}" for i in range(4)] + [f"U{i:02d}" for i in range(4, 7)]
    for ckpt in ("t1", "t2"):
        per_rank = [sorted(line.split()[1] for line in lines[r] if line.startswith(ckpt + " ")) for r in (0, 1)]
        assert per_rank[0] and per_rank[1]  # both ranks worked
        assert sorted(per_rank[0] + per_rank[1]) == ids  # together: every case exactly once
        assert sorted(p.name for p in (out / ckpt).glob("*.nii.gz")) == [f"{c}.nii.gz" for c in ids]


def _tiny_teacher_bundle(folder: Path) -> tuple[Path, Path]:
    """A minimal inference config in the MONAI Label shape (network_def, preprocessing, inferer,
    postprocessing) around a small PocketUNet, and a seeded plain state dict."""
    from abdoseg.networks import PocketUNet

    cfg = {
        "device": "cpu",
        "network_def": {"_target_": "abdoseg.networks.PocketUNet", "channels": 4, "out_channels": 15,
                        "kernel_size": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "ensure_channel_first": True},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -325, "a_max": 325,
             "b_min": 0.0, "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [8, 8, 8], "sw_batch_size": 1},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    net = PocketUNet(channels=4, out_channels=15, kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    (folder / "models").mkdir()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder / "configs" / "inference.json", folder / "models" / "model.pt"


def test_bundle_teacher_runs_inference_config(tmp_path):
    from monai.inferers import SlidingWindowInferer

    from abdoseg.networks import PocketUNet

    data = tmp_path / "data"
    make_data(data, 1, 1)
    cfg, ckpt = _tiny_teacher_bundle(tmp_path / "teacher")
    items = datalist_items(data / "datalist.json")
    out = tmp_path / "pseudo"
    reps = pseudo_label(items, lambda c: bundle_teacher(c, str(cfg), bundle_root=str(cfg.parents[1])),
                        {"S1": str(ckpt)}, out, rank=0, world_size=1)
    assert reps["S1"].done == ["L00", "U01"] and not reps["S1"].failed
    got, aff, _ = load_nifti(out / "S1" / "U01.nii.gz")
    img, img_aff, _ = load_nifti(items[1]["image"])
    assert got.dtype == np.uint8 and got.shape == img.shape and np.allclose(aff, img_aff)
    # same computation by hand
    net = PocketUNet(channels=4, out_channels=15, kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.from_numpy(np.clip((img.astype(np.float32) + 325) / 650, 0, 1))[None, None]
    with torch.no_grad():
        want = SlidingWindowInferer([8, 8, 8], 1)(x, net.eval()).argmax(1)[0].numpy()
    assert np.array_equal(got, want.astype(np.uint8))
