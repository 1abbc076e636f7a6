import numpy as np
import pytest

from abdoseg.inference.batch import BatchReport, run_batch, shard
from abdoseg.io import InputError, load_nifti, save_nifti


def _items(tmp_path, n):
    items = []
    for i in range(n):
        p = tmp_path / "in" / f"C{i:02d}_0000.nii.gz"
        save_nifti(np.full((4, 5, 6), i, np.int16), np.eye(4), p)
        items.append({"image": str(p)})
    return items


def _segment(item):
    arr, aff, _ = load_nifti(item["image"])
    if arr.flat[0] == 2:
        raise InputError(item["image"], "synthetic failure")
    return (arr > 0).astype(np.uint8), aff


def test_shards_cover_every_item_once():
    items = list(range(11))
    got = sorted(x for r in range(3) for x in shard(items, r, 3))
    assert got == items
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_run_batch_resumes_continues_and_reports(tmp_path):
    items = _items(tmp_path, 4)
    out = tmp_path / "out"
    rep = run_batch(items, _segment, out, rank=0, world_size=1)
    assert rep.done == ["C00", "C01", "C03"]
    assert [f[0] for f in rep.failed] == ["C02"] and "synthetic failure" in rep.failed[0][2]
    assert sorted(p.name for p in out.iterdir()) == ["C00.nii.gz", "C01.nii.gz", "C03.nii.gz"]
    mask, _, _ = load_nifti(out / "C03.nii.gz")
    assert mask.dtype == np.uint8 and mask.min() == 1
    with pytest.raises(SystemExit):
        rep.raise_if_failed()
    rep2 = run_batch(items, _segment, out, rank=0, world_size=1)
    assert rep2.skipped == ["C00", "C01", "C03"] and rep2.done == []


def test_one_failure_report_for_every_batch():
    from abdoseg.io import exit_if_failed
    from abdoseg.label_fusion.pseudo_label import raise_if_failed as pseudo_raise_if_failed

    exit_if_failed([])  # nothing failed: returns
    with pytest.raises(SystemExit) as ei:
        exit_if_failed(["a.nii.gz: bad", "b.nii.gz: worse"], "problem(s)", prefix="tool: ")
    assert str(ei.value.code) == "tool: 2 problem(s):\n  a.nii.gz: bad\n  b.nii.gz: worse"
    # a batch's report lists each reason once (the reason already names the image)
    rep = BatchReport(done=["A"], failed=[("B", "/in/B_0000.nii.gz", "/in/B_0000.nii.gz: not a CT")])
    with pytest.raises(SystemExit) as ei:
        rep.raise_if_failed()
    assert str(ei.value.code) == "1 case(s) failed:\n  /in/B_0000.nii.gz: not a CT"
    BatchReport(done=["A"]).raise_if_failed()
    with pytest.raises(SystemExit) as ei:
        pseudo_raise_if_failed({"A": rep, "B": BatchReport(done=["B"])})
    assert str(ei.value.code) == "1 pseudo-label case(s) failed:\n  [A] /in/B_0000.nii.gz: not a CT"


def test_multi_gpu_samplers_cover_validation_once_and_pad_training():
    """multi_gpu_train.json (both bundles: one file): validation shards (even_divisible false) see
    every case exactly once across ranks; training (even_divisible true) pads the list with
    repeated cases up to a multiple of the world size, as the docs state."""
    import json
    from pathlib import Path

    from monai.data import DistributedSampler

    repo = Path(__file__).resolve().parents[1]
    overlay = json.loads((repo / "bundles" / "fine_organ_tumor" / "configs" / "multi_gpu_train.json").read_text())
    assert overlay == json.loads((repo / "bundles" / "coarse_roi" / "configs" / "multi_gpu_train.json").read_text())
    data = list(range(5))
    for part, world in (("validate#sampler", 2), ("validate#sampler", 3), ("train#sampler", 2), ("train#sampler", 3)):
        cfg = overlay[part]
        seen = []
        for rank in range(world):
            sampler = DistributedSampler(data, even_divisible=cfg["even_divisible"], shuffle=False,
                                         num_replicas=world, rank=rank)
            seen += list(sampler)
        if part.startswith("validate"):
            assert sorted(seen) == data, (part, world, seen)  # each case once
        else:
            assert sorted(set(seen)) == data and len(seen) == -(-len(data) // world) * world, (part, world, seen)
