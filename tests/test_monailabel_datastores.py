"""The MONAI Label app's datastores (monailabel_app/lib/datastores.py), in process, on small arrays:

* the local datastore refuses image ids, label ids and tags that leave the studies folder (``400``,
  nothing written or read outside, symbolic links included), unknown images (``404``) and labels
  that do not fit their image (``422`` naming the image and both shapes / affines, or the values);
* the DICOMweb datastore, against an in-memory DICOMweb server (QIDO/WADO/STOW as
  ``dicomweb_client`` answers them; the real Orthanc is not started here), stores a saved label as
  a DICOM SEG with segment number = FLARE23 id (a label with classes missing: no class shifts), reads
  a SEG back for training by segment label (also a dcmqi-style SEG numbered 1..N), and takes DICOM
  UIDs only as ids.
"""

from __future__ import annotations

import copy
import io
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi import HTTPException

from abdoseg.io import save_nifti
from abdoseg.labels import FOREGROUND_IDS, LABELS

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

from lib.datastores import AbdosegDICOMWebDatastore, AbdosegLocalDatastore  # noqa: E402

TRAVERSALS = ["../../escape", "../escape", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\x", "x\x00y", ""]
SHAPE = (12, 10, 6)
AFFINE = np.array([[-2.0, 0, 0, 20], [0, -2.0, 0, 15], [0, 0, 3.0, -8], [0, 0, 0, 1]])


def _files_outside(root: Path, studies: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if studies not in p.parents and p != studies}


def _status(exc_info) -> tuple[int, str]:
    return exc_info.value.status_code, str(exc_info.value.detail)


@pytest.fixture()
def local(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    save_nifti(np.zeros(SHAPE, np.int16), AFFINE, studies / "CASE_1.nii.gz")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.nii.gz").write_bytes((studies / "CASE_1.nii.gz").read_bytes())
    ds = AbdosegLocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    return ds, studies


def test_local_datastore_refuses_paths_outside(local, tmp_path):
    ds, studies = local
    label = tmp_path / "label.nii.gz"
    save_nifti(np.ones(SHAPE, np.uint8), AFFINE, label)
    before = _files_outside(tmp_path, studies)
    for bad in TRAVERSALS:
        calls = {
            "save_label tag": lambda: ds.save_label("CASE_1", str(label), bad, {}),
            "save_label image": lambda: ds.save_label(bad, str(label), "final", {}),
            "get_image_uri": lambda: ds.get_image_uri(bad),
            "get_image_info": lambda: ds.get_image_info(bad),
            "get_label_uri tag": lambda: ds.get_label_uri("CASE_1", bad),
            "get_label_uri id": lambda: ds.get_label_uri(bad, "final"),
            "add_image": lambda: ds.add_image(bad or "..", str(label), {}),
            "remove_label": lambda: ds.remove_label("CASE_1", bad),
            "remove_image": lambda: ds.remove_image(bad),
            "update_label_info": lambda: ds.update_label_info("CASE_1", bad, {"x": 1}),
        }
        for what, call in calls.items():
            if bad == "" and what == "save_label tag":
                continue  # no tag = "final", as the endpoint does
            with pytest.raises(HTTPException) as e:
                call()
            code, msg = _status(e)
            assert code == 400, (what, bad, code, msg)
            assert "refused" in msg and str(studies) in msg, (what, msg)
    # a tag that is a symbolic link out of the folder: refused too, nothing written through it
    (studies / "labels").mkdir(exist_ok=True)
    os.symlink(tmp_path / "outside", studies / "labels" / "linked")
    with pytest.raises(HTTPException) as e:
        ds.save_label("CASE_1", str(label), "linked", {})
    assert _status(e)[0] == 400 and "outside the datastore" in _status(e)[1]
    assert _files_outside(tmp_path, studies) == before
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret.nii.gz"]
    # unknown image: 404
    with pytest.raises(HTTPException) as e:
        ds.save_label("NO_SUCH", str(label), "final", {})
    assert _status(e)[0] == 404 and "'NO_SUCH' not found" in _status(e)[1]
    assert ds.get_image_uri("NO_SUCH") == ""
    # a good label is stored where it belongs
    assert ds.save_label("CASE_1", str(label), "final", {}) == "CASE_1"
    assert Path(ds.get_label_uri("CASE_1", "final")) == (studies / "labels" / "final" / "CASE_1.nii.gz").resolve()


def test_local_datastore_refuses_labels_that_do_not_fit(local, tmp_path):
    ds, studies = local
    cases = {
        "shape": (np.ones((12, 10, 5), np.uint8), AFFINE, r"label for image 'CASE_1' \(tag 'final'\): shape "
                                                         r"\(12, 10, 5\) does not match the image CASE_1.nii.gz "
                                                         r"shape \(12, 10, 6\)"),
        "affine": (np.ones(SHAPE, np.uint8), AFFINE @ np.diag([1.0, 1.0, 1.5, 1.0]),
                   r"label for image 'CASE_1'.*affine .* does not match the image CASE_1.nii.gz affine"),
        "values": (np.full(SHAPE, 15, np.uint8), AFFINE, r"label values \[15\] are not FLARE23 ids 0-14"),
    }
    for name, (arr, aff, pattern) in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        save_nifti(arr, aff, path)
        with pytest.raises(HTTPException) as e:
            ds.save_label("CASE_1", str(path), "final", {})
        code, msg = _status(e)
        assert code == 422 and re.search(pattern, msg), (name, msg)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(HTTPException) as e:
        ds.save_label("CASE_1", str(tmp_path / "junk.nii.gz"), "final", {})
    assert _status(e)[0] == 422 and "not a readable image file" in _status(e)[1]
    assert not (studies / "labels" / "final").exists() or not any((studies / "labels" / "final").iterdir())


# --------------------------------------------------------------------------------------------------
# DICOMweb


class MemoryDICOMweb:
    """A DICOMweb server in memory, answering the ``dicomweb_client.DICOMwebClient`` calls the
    MONAI Label DICOMweb datastore makes (search_for_series, retrieve_series(_metadata), store)."""

    base_url = "http://memory.invalid/dicom-web"

    def __init__(self, datasets):
        self.instances = [copy.deepcopy(d) for d in datasets]
        self.stored = []

    def _series(self):
        out = {}
        for d in self.instances:
            out.setdefault(str(d.SeriesInstanceUID), []).append(d)
        return out

    def search_for_series(self, search_filters=None, **_):
        res = []
        for uid, items in self._series().items():
            d = items[0]
            if any(str(d.get(k, "")) != str(v) for k, v in (search_filters or {}).items()):
                continue
            q = pydicom.Dataset()
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "StudyDate", "StudyTime", "PatientID"):
                if kw in d:
                    setattr(q, kw, d.get(kw))
            res.append(q.to_json_dict())
        return res

    def retrieve_series(self, study, series, **_):
        return [copy.deepcopy(d) for d in self._series()[series] if str(d.StudyInstanceUID) == study]

    def retrieve_series_metadata(self, study, series, **_):
        return [pydicom.Dataset({t: e for t, e in d.items() if t != 0x7FE00010}).to_json_dict()
                for d in self._series()[series]]

    def store_instances(self, datasets, **_):
        for d in datasets:
            d = pydicom.dcmread(io.BytesIO(_to_bytes(d)))  # as it travels: written and parsed
            self.instances.append(d)
            self.stored.append(d)
        return pydicom.Dataset()


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


@pytest.fixture()
def dicomweb(tmp_path):
    from test_dicom_seg import _ct_series

    from abdoseg.data.phantom import make_case

    shape, spacing = (24, 20, 10), (8.0, 8.0, 10.0)
    hu, _, affine = make_case(5, shape=shape, spacing_mm=spacing, axcodes="LPS")
    files = _ct_series(hu, affine, tmp_path / "ct")
    server = MemoryDICOMweb([pydicom.dcmread(f) for f in files])
    series = str(server.instances[0].SeriesInstanceUID)
    stores = []

    def make(cache: str):
        ds = AbdosegDICOMWebDatastore(server, {"Modality": "CT"}, cache_path=str(tmp_path / cache))
        stores.append(ds)
        return ds

    yield server, series, make, tmp_path
    for ds in stores:
        obs = getattr(ds, "_observer", None)
        if obs is not None:
            obs.stop()


def _sparse_label(shape) -> np.ndarray:
    """Only gallbladder (9), stomach (11), left kidney (13) and lesion (14): most classes missing."""
    m = np.zeros(shape, np.uint8)
    m[2:7, 3:8, 1:4] = 9
    m[10:20, 6:16, 3:8] = 11
    m[13:16, 9:12, 4:6] = 14
    m[3:8, 12:18, 6:9] = 13
    return m


def test_dicomweb_datastore_seg_keeps_flare23_ids(dicomweb):
    from abdoseg.dicom.seg import segment_class_ids

    server, series, make, tmp_path = dicomweb
    ds = make("cache")
    assert ds.list_images() == [series]
    image = nib.load(ds.get_image_uri(series))
    mask = _sparse_label(image.shape)
    save_nifti(mask, image.affine, tmp_path / "corrected.nii.gz")
    # a label_info listing classes in another order (as a viewer sends it) must not rename segments
    info = {"label_info": [{"name": "liver"}, {"name": "right_kidney"}]}
    ds.save_label(series, str(tmp_path / "corrected.nii.gz"), "final", info)
    assert len(server.stored) == 1
    seg = server.stored[0]
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == \
        [(i, LABELS[i]) for i in FOREGROUND_IDS]
    framed = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
              for f in seg.PerFrameFunctionalGroupsSequence}
    assert framed == {9, 11, 13, 14}  # frames only for the classes present, numbered by FLARE23 id
    assert segment_class_ids(seg) == {i: i for i in FOREGROUND_IDS}
    # a second app (fresh cache) reads the SEG from the server for training: the same class values
    ds2 = make("cache2")
    items = ds2.datalist()
    assert len(items) == 1 and Path(items[0]["image"]).name == f"{series}.nii.gz"
    back = nib.load(items[0]["label"])
    assert np.array_equal(np.asarray(back.dataobj), mask)
    assert np.allclose(back.affine, image.affine)


def test_dicomweb_datastore_reads_positional_seg_by_label(dicomweb):
    """A SEG numbered 1..N by another tool (dcmqi / stock MONAI Label): trained with the right ids."""
    from test_dicom_seg import _positional_seg

    server, series, make, tmp_path = dicomweb
    ds = make("cache")
    image = nib.load(ds.get_image_uri(series))
    mask = _sparse_label(image.shape)
    sources = [d for d in server.instances if str(d.SeriesInstanceUID) == series]
    sources.sort(key=lambda d: int(d.InstanceNumber))
    seg = _positional_seg(mask, image.affine, sources, [
        (9, "Gallbladder", ("28231008", "Gallbladder"), None),
        (11, "Stomach", ("69695003", "Stomach"), None),
        (13, "Left Kidney", ("64033007", "Kidney"), ("7771000", "Left")),
        (14, "Lesion", ("52988006", "Lesion"), None),
    ])
    server.store_instances([seg])
    items = make("cache2").datalist()
    assert np.array_equal(np.asarray(nib.load(items[0]["label"]).dataobj), mask)


def test_dicomweb_datastore_takes_uids_only(dicomweb):
    server, series, make, tmp_path = dicomweb
    ds = make("cache")
    root = Path(ds._datastore_path).resolve()
    label = tmp_path / "l.nii.gz"
    save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), label)
    before = _files_outside(tmp_path, root)
    for bad in [*TRAVERSALS, "1.2.3/../../4", "SMALL_0001"]:
        calls = [lambda: ds.get_image_uri(bad), lambda: ds.save_label(bad, str(label), "final", {}),
                 lambda: ds.get_label_uri(bad, "final", series)]
        if bad and bad != "SMALL_0001":  # a tag is any plain name ("" = final)
            calls.append(lambda: ds.save_label(series, str(label), bad, {}))
        for call in calls:
            with pytest.raises(HTTPException) as e:
                call()
            assert _status(e)[0] == 400, (bad, _status(e))
    assert _files_outside(tmp_path, root) == before
    with pytest.raises(HTTPException) as e:
        ds.save_label("1.2.3.4", str(label), "final", {})
    assert _status(e)[0] == 404
    with pytest.raises(HTTPException) as e:  # wrong grid: 422 naming it, nothing sent to the server
        ds.save_label(series, str(label), "final", {})
    assert _status(e)[0] == 422 and "shape (2, 2, 2) does not match" in _status(e)[1]
    assert server.stored == []


def test_app_uses_these_datastores_without_dcmqi(tmp_path, monkeypatch):
    """MyApp's datastore for a studies folder and for a DICOMweb URL are the guarded ones, and the
    DICOMweb one is made without downloading dcmqi (no network: any download attempt fails the test)."""
    import importlib.util

    import monailabel.interfaces.app as ml_app
    from monailabel.config import settings

    def no_download(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    monkeypatch.setattr(ml_app, "download_and_extract", no_download)
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("abdoseg_monailabel_main", APP / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    app = main.MyApp.__new__(main.MyApp)  # only the datastore part of __init__
    app.app_dir = str(tmp_path / "app")
    app.studies = "http://127.0.0.1:9/dicom-web/"
    ds = app.init_datastore()
    try:
        assert isinstance(ds, AbdosegDICOMWebDatastore) and ds.name() == "http://127.0.0.1:9/dicom-web"
        assert not (tmp_path / "app" / "bin").exists()  # where MONAI Label would put dcmqi's tools
    finally:
        ds._observer.stop()
    app.studies = str(tmp_path / "studies")
    local = app.init_datastore()
    assert isinstance(local, AbdosegLocalDatastore)
    if getattr(local, "_observer", None) is not None:
        local._observer.stop()


def test_dicomweb_datastore_trains_on_the_newest_seg(dicomweb):
    """A label corrected and saved twice: two SEGs reference the image; training reads the newer one
    (ContentDate/ContentTime), whatever order the server lists them in; a SEG deleted from the
    server takes its cached label with it."""
    from abdoseg.dicom.seg import mask_to_dicom_seg

    server, series, make, tmp_path = dicomweb
    ds = make("cache")
    image = nib.load(ds.get_image_uri(series))
    sources = sorted((d for d in server.instances if str(d.SeriesInstanceUID) == series),
                     key=lambda d: int(d.InstanceNumber))
    old, new = _sparse_label(image.shape), _sparse_label(image.shape)
    new[new == 9] = 0  # the second correction removed the gallbladder
    segs = []
    for mask, time_of_day in ((new, "120000"), (old, "090000")):  # the newer listed first
        seg = mask_to_dicom_seg(mask, image.affine, sources)
        seg.ContentDate, seg.ContentTime = "20261204", time_of_day
        segs.append(seg)
    server.store_instances(segs)
    items = make("cache2").datalist()
    assert len(items) == 1 and np.array_equal(np.asarray(nib.load(items[0]["label"]).dataobj), new)
    ds3 = make("cache3")
    assert len(ds3.datalist()) == 1
    server.instances = [d for d in server.instances if d.Modality != "SEG"]
    assert ds3.datalist() == []
