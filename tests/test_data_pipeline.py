"""Disk-cached training data (abdoseg.data.cache, both bundles' train#dataset / validate#dataset):
cache hits equal recomputes, corrupt entries are rebuilt, keys follow file contents and transforms,
writes are atomic, cache_dir "" keeps the RAM CacheDataset."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandSpatialCropd, Transform

from abdoseg.data.cache import DiskCacheDataset, cached_dataset
from abdoseg.bundle.config import config_files
from abdoseg.io import save_nifti

REPO = Path(__file__).resolve().parents[1]


def _write_case(root: Path, i: int, shape=(24, 20, 10)) -> dict:
    rng = np.random.default_rng(i)
    hu = rng.integers(-1000, 400, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[6:14, 5:12, 2:8] = 1
    lab[15:19, 12:16, 3:6] = 3
    aff = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS: Orientationd really flips
    save_nifti(hu, aff, root / "imagesTr" / f"C_{i:04d}_0000.nii.gz")
    save_nifti(lab, aff, root / "labelsTr" / f"C_{i:04d}.nii.gz")
    save_nifti(lab, aff, root / "pseudo_A" / f"C_{i:04d}.nii.gz")
    return {"image": f"imagesTr/C_{i:04d}_0000.nii.gz", "label": f"labelsTr/C_{i:04d}.nii.gz",
            "pseudo_A": f"pseudo_A/C_{i:04d}.nii.gz", "annotated_classes": [1, 3]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    items = [_write_case(root, i) for i in range(2)]
    val = [{"image": items[1]["image"], "label": items[1]["label"]}]
    (root / "datalist.json").write_text(json.dumps({"training": items, "training_all_organs": items,
                                                    "validation": val}))
    return root


def _chain() -> Compose:
    keys = ["image", "label"]
    return Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
                    RandSpatialCropd(keys, roi_size=(8, 8, 4), random_size=False)])


def _items(root: Path) -> list[dict]:
    return [{"image": str(root / "imagesTr" / f"C_{i:04d}_0000.nii.gz"), "label": str(root / "labelsTr" / f"C_{i:04d}.nii.gz")}
            for i in range(2)]


class _Counting(DiskCacheDataset):
    computed = 0

    def _pre_transform(self, item):
        type(self).computed += 1
        return super()._pre_transform(item)


def _assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]), k
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].as_tensor() if isinstance(a[k], MetaTensor) else a[k],
                                                            b[k].as_tensor() if isinstance(b[k], MetaTensor) else b[k]), k
            if isinstance(a[k], MetaTensor):
                assert torch.equal(a[k].affine, b[k].affine), k
        elif isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys(), k
        else:
            assert a[k] == b[k], k


def test_cache_hit_equals_recompute_and_skips_the_transforms(dataset, tmp_path):
    items = _items(dataset)
    ds = _Counting(items, _chain(), cache_dir=tmp_path / "c")
    _Counting.computed = 0
    first = ds._cachecheck(items[0])
    assert _Counting.computed == 1 and len(list((tmp_path / "c").glob("*.pt"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a MetaTensor entry loads under weights_only, no "corrupt" detour
        again = ds._cachecheck(items[0])
    assert _Counting.computed == 1
    _assert_same(first, again)
    assert isinstance(again["image"], MetaTensor) and again["image"].affine[0, 0] == 2.0  # RAS, spacing kept
    sample = ds[0]
    assert sample["image"].shape == (1, 8, 8, 4)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_entry_is_rebuilt_not_trusted(dataset, tmp_path, damage):
    items = _items(dataset)
    ds = _Counting(items, _chain(), cache_dir=tmp_path / "c")
    good = ds._cachecheck(items[0])
    path = ds.cache_path(items[0])
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00not a torch file" * 50}[damage])
    _Counting.computed = 0
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        rebuilt = ds._cachecheck(items[0])
    assert _Counting.computed == 1
    _assert_same(good, rebuilt)
    assert path.read_bytes() == data  # rewritten whole
    ds._cachecheck(items[0])
    assert _Counting.computed == 1  # and trusted again


def test_key_follows_file_contents_and_transforms(dataset, tmp_path):
    items = _items(dataset)
    ds = DiskCacheDataset(items, _chain(), cache_dir=tmp_path / "c")
    key = ds.cache_path(items[1])
    assert key != ds.cache_path(items[0])
    assert DiskCacheDataset(items, _chain(), cache_dir=tmp_path / "c").cache_path(items[1]) == key  # stable
    label = Path(items[1]["label"])
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a label corrected in place
    try:
        assert ds.cache_path(items[1]) != key
    finally:
        os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    other = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                     Orientationd(["image", "label"], axcodes="LPS")])
    assert DiskCacheDataset(items, other, cache_dir=tmp_path / "c").cache_path(items[1]) != key


def test_stale_partial_of_a_killed_writer_is_removed(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    dead = cache / ".abc.pt.00000000-999999999-1.partial.pt"  # another host's, untouched for long
    dead.write_bytes(b"x")
    os.utime(dead, (1, 1))
    DiskCacheDataset([], _chain(), cache_dir=cache)
    assert not dead.exists()


def test_empty_cache_dir_keeps_the_ram_cache(dataset, tmp_path):
    items = _items(dataset)
    for off in ("", None):
        ds = cached_dataset(items, _chain(), cache_dir=off, cache_rate=1.0, progress=False)
        assert isinstance(ds, CacheDataset) and not isinstance(ds, DiskCacheDataset)
    assert isinstance(cached_dataset(items, _chain(), cache_dir=tmp_path / "c"), DiskCacheDataset)


@pytest.mark.parametrize("bundle", ["fine_organ_tumor", "coarse_roi"])
@pytest.mark.parametrize("part", ["train", "validate"])
def test_bundle_datasets_cache_on_disk_by_default(dataset, tmp_path, bundle, part):
    parser = ConfigParser()
    parser.read_config(config_files(REPO / "bundles" / bundle, "training"))
    parser.update({"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(dataset),
                   "datalist": str(dataset / "datalist.json"), "patch_size": [16, 16, 8]})
    ds = parser.get_parsed_content(f"{part}#dataset")
    assert isinstance(ds, DiskCacheDataset) and ds.cache_dir == tmp_path / "bundle" / "cache"
    item = ds.data[0]
    computed = ds._cachecheck(item)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ds._cachecheck(item)
    _assert_same(computed, loaded)
    assert len(list(ds.cache_dir.glob("*.pt"))) == 1
    sample = ds[0]  # the random rest of the chain runs on the cached prefix
    sample = sample[0] if isinstance(sample, list) else sample
    assert sample["image"].ndim == 4

    parser["cache_dir"] = ""
    assert type(parser.get_parsed_content(f"{part}#dataset", lazy=False)) is CacheDataset


# --------------------------------------------------------------------------------------------------
# RAM: the disk cache keeps items on disk, not in the dataset (issue 23: "nothing measures memory").

ITEM_MB = 4
N_ITEMS = 16


class _MakeVolume(Transform):
    """A deterministic MONAI transform (cached whole: both caches stop at the first random or
    non-``Transform`` callable): ``{"case": i}`` -> a ``ITEM_MB`` MB float32 volume, the stand-in of a
    decoded, resampled CT. numpy arrays, whose memory ``tracemalloc`` traces."""

    def __call__(self, item: dict) -> dict:
        n = ITEM_MB * 2**20 // 4
        return {"case": item["case"], "image": np.full(n, float(item["case"]), np.float32)}


def _arrays_held(root) -> int:
    """Bytes of the numpy arrays and torch tensors reachable from ``root`` through its attributes and
    containers (modules, classes and functions not followed)."""
    import gc
    import types

    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)
    seen, todo, total = set(), [root], 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        else:
            todo.extend(gc.get_referents(obj))
    return total


def _traced(fn) -> tuple[int, int]:
    """(retained, peak) bytes that ``tracemalloc`` traces while ``fn()`` runs."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - base, peak - base


def _read(ds, n: int) -> None:
    """Read items 0..n-1 of ``ds``, one at a time (each checked, then dropped)."""
    for i in range(n):
        item = ds[i]
        assert item["case"] == i and item["image"].nbytes == ITEM_MB * 2**20 and item["image"][0] == i
        del item


def test_disk_cache_keeps_items_on_disk_not_in_ram(tmp_path):
    """After warm-up, reading 16 items of 4 MB one at a time from a DiskCacheDataset retains
    nothing, and its peak does not grow with the count: 16 reads peak as high as 2 reads (about 5
    items: ``torch.load`` holds the file's bytes and the pickle while it builds the array), far
    below the 64 MB of all items; the dataset object holds no item arrays. The same items in MONAI's
    CacheDataset (``cache_dir`` "", the RAM cache) are all held, which both measures see: so they
    would see a disk cache that kept its items."""
    from abdoseg.data.cache import warm_cache

    item_bytes = ITEM_MB * 2**20
    data = [{"case": i} for i in range(N_ITEMS)]
    disk = cached_dataset(data, Compose([_MakeVolume()]), cache_dir=tmp_path / "cache")
    assert isinstance(disk, DiskCacheDataset)
    assert warm_cache(disk) == N_ITEMS and len(list((tmp_path / "cache").glob("*.pt"))) == N_ITEMS
    _, peak_two = _traced(lambda: _read(disk, 2))
    retained, peak = _traced(lambda: _read(disk, N_ITEMS))
    mb = 2**20
    assert retained < item_bytes / 4, f"the disk cache kept {retained / mb:.1f} MB after reading {N_ITEMS} items"
    assert peak <= peak_two + item_bytes / 4, \
        f"peak grows with the items read: {peak_two / mb:.1f} MB for 2, {peak / mb:.1f} MB for {N_ITEMS}"
    assert peak < N_ITEMS * item_bytes / 2, f"reading {N_ITEMS} items peaked at {peak / mb:.1f} MB"
    assert _arrays_held(disk) < item_bytes / 4, "the DiskCacheDataset object holds item arrays"

    ram: list = []
    retained, _ = _traced(lambda: ram.append(cached_dataset(data, Compose([_MakeVolume()]), cache_dir="",
                                                            cache_rate=1.0, progress=False)))
    assert isinstance(ram[0], CacheDataset) and not isinstance(ram[0], DiskCacheDataset)
    assert retained >= N_ITEMS * item_bytes and _arrays_held(ram[0]) >= N_ITEMS * item_bytes
