"""DICOM SEG output (abdoseg.dicom.seg, ``abdoseg segment --dicom_seg``): round trip through
highdicom/pydicom on small synthetic DICOM series (segment numbers = FLARE23 ids, labels, the
referenced series and slices, geometry against the NIfTI mask), bad input named clearly.

The series are written by tests/test_segment.py's helper (ITK, one file per slice: slice k is
``mask[:, :, k]`` with rows along y, SOPInstanceUID ``...<series>.<k+1>``), so the expected frame of
every slice is known without the writer's own geometry code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from abdoseg.dicom.seg import import_highdicom, mask_to_dicom_seg, read_source_datasets, write_dicom_seg
from abdoseg.io import InputError, save_nifti
from abdoseg.labels import FOREGROUND_IDS, LABELS
from abdoseg.dicom.series import check_dicom_series
from test_segment import SHAPE, SPACING_MM, _cli, _nonzero, _tiny_bundle, _write_dicom_series

FOR_UID = "1.2.826.0.1.3680043.2.1.77"


def _ct_series(hu: np.ndarray, affine: np.ndarray, folder: Path, series: int = 1) -> list[str]:
    """A DICOM CT series (as real scanners write it: with a FrameOfReferenceUID); its sorted files."""
    _write_dicom_series(hu, affine, folder, series=series)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(str(f))
        ds.FrameOfReferenceUID = FOR_UID
        ds.save_as(str(f))
    return check_dicom_series(folder)


def _slice_index(sop_uid: str) -> int:
    return int(str(sop_uid).rsplit(".", 1)[1]) - 1


def _check_seg(seg_file: Path, mask: np.ndarray, source_files: list[str]) -> None:
    """The SEG read back (pydicom + highdicom) is the FLARE23 mask on the source slices."""
    hd = import_highdicom()
    raw = pydicom.dcmread(str(seg_file))
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    assert raw.Modality == "SEG" and raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert raw.SegmentationType == "BINARY"
    assert raw.StudyInstanceUID == src[0].StudyInstanceUID and raw.FrameOfReferenceUID == FOR_UID
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in src}
    # segment number = FLARE23 id, label = FLARE23 name, all 14 described
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in raw.SegmentSequence] == \
        [(i, LABELS[i]) for i in FOREGROUND_IDS]
    assert raw.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # liver
    # right kidney: the laterality modifier inside the property type's code item (where the IOD has it)
    kidney = raw.SegmentSequence[1]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in kidney
    side = kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (side.CodeValue, side.CodingSchemeDesignator, side.CodeMeaning) == ("24028007", "SCT", "Right")
    # every frame: position = its source slice's, pixels = that slice of the mask for its segment
    by_uid = {d.SOPInstanceUID: d for d in src}
    seen: dict[int, set[int]] = {}
    frames = raw.pixel_array.reshape(-1, int(raw.Rows), int(raw.Columns))
    for frame, item in zip(frames, raw.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        sid = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)
        k = _slice_index(uid)
        assert np.array_equal(frame.astype(bool), mask[:, :, k].T == sid), (sid, k)
        seen.setdefault(sid, set()).add(k)
    for sid in FOREGROUND_IDS:  # no frame left out: each (segment, slice) holding voxels has one
        assert seen.get(sid, set()) == set(np.nonzero((mask == sid).any(axis=(0, 1)))[0].tolist()), sid
    # highdicom's own reader: one label map per source slice
    seg = hd.seg.segread(str(seg_file))
    uids = [d.SOPInstanceUID for d in src]
    labelmap = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    expected = np.stack([mask[:, :, _slice_index(u)].T for u in uids])
    assert labelmap.shape == expected.shape and np.array_equal(labelmap, expected)
    assert seg.get_segment_description(14).segment_label == "lesion"


@pytest.mark.parametrize("axcodes", ["LPS", "RAS"])
def test_mask_to_dicom_seg_round_trip(axcodes, tmp_path):
    from abdoseg.data.phantom import make_case

    hu, label, affine = make_case(3, shape=SHAPE, spacing_mm=SPACING_MM, axcodes=axcodes)
    assert set(np.unique(label)) >= {1, 2, 13}  # a labelled phantom: left/right organs present
    files = _ct_series(hu, affine, tmp_path / "ct")
    datasets = read_source_datasets(files)
    for ds in datasets:  # Type 2 attributes some exporters leave out: written empty in the SEG
        del ds.PatientSex, ds.StudyID
    seg = mask_to_dicom_seg(label, affine, datasets)
    assert seg.PatientSex == "" and seg.StudyID == ""
    assert "PatientSex" not in datasets[0]  # the caller's headers are not modified
    out = write_dicom_seg(seg, tmp_path / "out" / "case_seg.dcm")
    assert sorted(p.name for p in out.parent.iterdir()) == ["case_seg.dcm"]  # no temporary file left
    _check_seg(out, label, files)


DCIODVFY = shutil.which("dciodvfy")
#: what dciodvfy said about a modifier at segment level (issue 23: 16 warnings) or a laterality code
LATERALITY_WARNINGS = ("Modifier", "Laterality", "AnatomicRegion", "not present in standard DICOM IOD",
                       "Standard Extended SOP Class")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed: Debian package dicom3tools "
                                             "(scripts/setup.sh installs it; apt-get install dicom3tools)")
def test_seg_passes_dciodvfy_without_laterality_warnings(tmp_path):
    """David Clunie's DICOM validator on a SEG with left/right organs: no error, and no warning about
    the laterality modifiers of the kidneys and adrenal glands (each sits in its property type's code
    item: SNOMED CT 24028007 Right / 7771000 Left, CID 244). The SEG's coding still reads back by
    code alone (labels blanked), left and right apart."""
    from pydicom.sr.codedict import codes

    from abdoseg.data.phantom import make_case
    from abdoseg.dicom.seg import SEGMENT_CODES, segment_class_ids

    hu, label, affine = make_case(3, shape=SHAPE, spacing_mm=SPACING_MM, axcodes="LPS")
    assert {2, 13} <= set(np.unique(label))  # both kidneys have frames
    files = _ct_series(hu, affine, tmp_path / "ct")
    out = write_dicom_seg(mask_to_dicom_seg(label, affine, read_source_datasets(files)), tmp_path / "seg.dcm")
    res = subprocess.run([DCIODVFY, str(out)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert "Segmentation" in lines, lines  # it recognised the IOD (its name, on a line of its own)
    assert not [line for line in lines if line.startswith("Error")], lines
    warned = [line for line in lines if line.startswith("Warning") and any(w in line for w in LATERALITY_WARNINGS)]
    assert not warned, warned
    # the codes are the standard's laterality codes (pydicom's CID 244), on every paired organ
    sides = {"Right": codes.cid244.Right, "Left": codes.cid244.Left}
    raw = pydicom.dcmread(str(out))
    for item in raw.SegmentSequence:
        modifier = SEGMENT_CODES[int(item.SegmentNumber)][2]
        ptype = item.SegmentedPropertyTypeCodeSequence[0]
        assert "SegmentedPropertyTypeModifierCodeSequence" not in item
        item.SegmentLabel = "x"  # read back by code only
        if modifier is None:
            assert "SegmentedPropertyTypeModifierCodeSequence" not in ptype
            continue
        (side,) = ptype.SegmentedPropertyTypeModifierCodeSequence
        assert (side.CodeValue, side.CodingSchemeDesignator, side.CodeMeaning) == \
            (sides[modifier[1]].value, "SCT", sides[modifier[1]].meaning)
    assert segment_class_ids(raw) == {i: i for i in FOREGROUND_IDS}


def test_mask_to_dicom_seg_rejects_bad_input(tmp_path):
    from abdoseg.data.phantom import make_case

    hu, label, affine = make_case(1, shape=SHAPE, spacing_mm=SPACING_MM, axcodes="LPS")
    datasets = read_source_datasets(_ct_series(hu, affine, tmp_path / "ct"))
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel off: not the series' grid
    with pytest.raises(InputError, match="grid does not match"):
        mask_to_dicom_seg(label, shifted, datasets, where="case7")
    with pytest.raises(InputError, match="outside the mask"):
        mask_to_dicom_seg(label[:, :, 1:], affine, datasets)
    with pytest.raises(InputError, match="outside the FLARE23 ids"):
        mask_to_dicom_seg(np.where(label == 14, 15, label), affine, datasets)
    with pytest.raises(InputError, match="no source DICOM slices"):
        mask_to_dicom_seg(label, affine, [])
    _write_dicom_series(hu, affine, tmp_path / "noframe")  # written without FrameOfReferenceUID
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        mask_to_dicom_seg(label, affine, read_source_datasets(check_dicom_series(tmp_path / "noframe")))


def test_segment_cli_dicom_seg(tmp_path, capsys):
    from abdoseg.data.phantom import make_case

    bundle = _tiny_bundle(tmp_path / "bundle" / "fine_organ_tumor")
    hu, _, affine = make_case(0, shape=SHAPE, spacing_mm=SPACING_MM, axcodes="LPS")
    series = tmp_path / "patient_A"
    files = _ct_series(hu, affine, series)
    out = tmp_path / "out"
    args = ["--bundle_dir", str(bundle), "--device", "cpu"]
    code, msg = _cli(["segment", "-i", str(series), "-o", str(out), "--dicom_seg", *args], capsys)
    assert not _nonzero(code), msg
    assert sorted(p.name for p in out.iterdir()) == ["patient_A.nii.gz", "patient_A_seg.dcm"]
    nii = nib.load(str(out / "patient_A.nii.gz"))
    mask = np.asarray(nii.dataobj)
    assert len(np.unique(mask)) > 2  # several classes (seeded tiny network): a round trip with content
    assert np.allclose(nii.affine, affine, atol=1e-4)
    _check_seg(out / "patient_A_seg.dcm", mask, files)
    # NIfTI stays the default: no SEG without the flag
    code, _ = _cli(["segment", "-i", str(series), "-o", str(tmp_path / "plain"), *args], capsys)
    assert not _nonzero(code) and sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["patient_A.nii.gz"]
    # kept mask, SEG deleted -> the SEG alone is rewritten from the mask
    (out / "patient_A_seg.dcm").unlink()
    code, msg = _cli(["segment", "-i", str(series), "-o", str(out), "--dicom_seg", *args], capsys)
    assert not _nonzero(code) and "1 kept" in msg and (out / "patient_A_seg.dcm").is_file()
    # a slice gone from the series: the error names the series and the gap; no SEG written
    (out / "patient_A_seg.dcm").unlink()
    Path(files[10]).unlink()
    code, msg = _cli(["segment", "-i", str(series), "-o", str(out), "--dicom_seg", *args], capsys)
    assert _nonzero(code) and f"{series}:" in msg and "missing" in msg, msg
    assert not (out / "patient_A_seg.dcm").exists()
    # NIfTI input: a clear error before any work
    save_nifti(hu, affine, tmp_path / "nifti" / "B.nii.gz")
    code, msg = _cli(["segment", "-i", str(tmp_path / "nifti" / "B.nii.gz"), "-o", str(tmp_path / "o2"),
                      "--dicom_seg", *args], capsys)
    assert _nonzero(code) and "--dicom_seg needs a DICOM series" in msg and not (tmp_path / "o2").exists()
    # the series folder itself as output: refused (the SEG would join the series)
    code, msg = _cli(["segment", "-i", str(series), "-o", str(series), "--dicom_seg", *args], capsys)
    assert _nonzero(code) and "another folder than the DICOM series folder" in msg


# --------------------------------------------------------------------------------------------------
# Reading a SEG back for training: classes by segment label or code, never by position.

MISSING_CLASSES_IDS = (9, 11, 13, 14)  # gallbladder, stomach, left kidney, lesion: the rest absent


def _sparse_mask(shape=SHAPE) -> np.ndarray:
    """A label in which most classes are missing (ids 9, 11, 13, 14 only; 14 inside 11)."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:14, 5:15, 2:8] = 9
    mask[20:40, 10:30, 6:18] = 11
    mask[26:32, 16:22, 10:13] = 14
    mask[5:12, 25:35, 15:22] = 13
    return mask


def _positional_seg(mask: np.ndarray, affine: np.ndarray, datasets, descriptions):
    """A SEG as dcmqi / monailabel's nifti_to_dicom_seg write it: segments renumbered 1..N in the
    order given, empty classes dropped; ``descriptions`` = [(FLARE23 id, label, type code, modifier)]."""
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from abdoseg.dicom.seg import mask_frames

    hd = import_highdicom()
    frames = mask_frames(mask, affine, datasets)
    relabelled = np.zeros_like(frames)
    descs = []
    algo = hd.AlgorithmIdentificationSequence(name="other tool", version="1", family=codes.cid7162.ArtificialIntelligence)
    for number, (cid, label, code, modifier) in enumerate(descriptions, start=1):
        relabelled[frames == cid] = number
        d = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept(code[0], "SCT", code[1]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        if modifier:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = modifier[0], "SCT", modifier[1]
            d.SegmentedPropertyTypeModifierCodeSequence = [item]
        descs.append(d)
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=relabelled, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="0", omit_empty_frames=True)


@pytest.mark.parametrize("axcodes", ["LPS", "RAS"])
def test_label_with_missing_classes_round_trips(axcodes, tmp_path):
    """abdoseg's own SEG (segment number = FLARE23 id) read back: the same values, absent classes stay
    absent and nothing shifts; also through a file and a NIfTI reference image."""
    from abdoseg.dicom.seg import dicom_seg_to_label, read_dicom_seg, segment_class_ids
    from abdoseg.data.phantom import make_case

    hu, _, affine = make_case(2, shape=SHAPE, spacing_mm=SPACING_MM, axcodes=axcodes)
    files = _ct_series(hu, affine, tmp_path / "ct")
    mask = _sparse_mask()
    seg = mask_to_dicom_seg(mask, affine, read_source_datasets(files))
    assert segment_class_ids(seg) == {i: i for i in FOREGROUND_IDS}
    back = dicom_seg_to_label(seg, affine, mask.shape)
    assert back.dtype == np.uint8 and np.array_equal(back, mask)
    assert sorted(np.unique(back).tolist()) == [0, *MISSING_CLASSES_IDS]
    out = write_dicom_seg(seg, tmp_path / "seg.dcm")
    save_nifti(hu, affine, tmp_path / "ct.nii.gz")
    label, label_affine = read_dicom_seg(out, tmp_path / "ct.nii.gz")
    assert np.array_equal(label, mask) and np.allclose(label_affine, affine)


def test_positional_seg_read_by_label_and_code(tmp_path):
    """A SEG numbered 1..N (dcmqi style): segment 1 is gallbladder, 2 stomach, ... -- read by label,
    they are 9, 11, 13, 14 again (the stock reader made them 1, 2, 3, 4); a segment with a
    non-FLARE23 label is matched by its SNOMED code (kidney + left modifier = 13)."""
    from abdoseg.dicom.seg import dicom_seg_to_label, segment_class_ids
    from abdoseg.data.phantom import make_case

    hu, _, affine = make_case(4, shape=SHAPE, spacing_mm=SPACING_MM, axcodes="LPS")
    datasets = read_source_datasets(_ct_series(hu, affine, tmp_path / "ct"))
    mask = _sparse_mask()
    seg = _positional_seg(mask, affine, datasets, [
        (14, "Lesion", ("52988006", "Lesion"), None),  # listed first: order must not matter
        (9, "Gallbladder", ("28231008", "Gallbladder"), None),
        (13, "Segment_3", ("64033007", "Kidney"), ("7771000", "Left")),  # by code only
        (11, "stomach", ("69695003", "Stomach"), None),
    ])
    assert segment_class_ids(seg) == {1: 14, 2: 9, 3: 13, 4: 11}
    assert np.array_equal(dicom_seg_to_label(seg, affine, mask.shape), mask)


def test_seg_reader_refuses_what_it_cannot_tell(tmp_path):
    from abdoseg.dicom.seg import dicom_seg_to_label, read_dicom_seg
    from abdoseg.data.phantom import make_case

    hu, _, affine = make_case(4, shape=SHAPE, spacing_mm=SPACING_MM, axcodes="LPS")
    datasets = read_source_datasets(_ct_series(hu, affine, tmp_path / "ct"))
    mask = _sparse_mask()
    unknown = _positional_seg(mask, affine, datasets, [(9, "blob", ("12345", "Something"), None)])
    with pytest.raises(InputError, match=r"segment 1 \('blob'.*not a FLARE23 class"):
        dicom_seg_to_label(unknown, affine, mask.shape, where="x.dcm")
    kidney_no_side = _positional_seg(mask, affine, datasets, [(13, "Kidney", ("64033007", "Kidney"), None)])
    with pytest.raises(InputError, match="not a FLARE23 class"):
        dicom_seg_to_label(kidney_no_side, affine, mask.shape)
    conflict = _positional_seg(mask, affine, datasets, [(9, "liver", ("28231008", "Gallbladder"), None)])
    with pytest.raises(InputError, match="labelled 'liver'.*coded as 'gallbladder'"):
        dicom_seg_to_label(conflict, affine, mask.shape)
    seg = mask_to_dicom_seg(mask, affine, datasets)
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5
    with pytest.raises(InputError, match="voxels off"):
        dicom_seg_to_label(seg, shifted, mask.shape)
    with pytest.raises(InputError, match="outside the image"):
        dicom_seg_to_label(seg, affine, (SHAPE[0], SHAPE[1], SHAPE[2] - 4))
    save_nifti(hu, affine, tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="not a DICOM SEG"):
        read_dicom_seg(_ct_series(hu, affine, tmp_path / "ct2", series=2)[0], tmp_path / "ct.nii.gz")

