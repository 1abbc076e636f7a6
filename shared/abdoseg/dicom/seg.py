"""DICOM SEG output: a FLARE23 label mask (NIfTI voxel grid) -> a DICOM Segmentation object that
references the CT series it was computed from (highdicom).

:func:`mask_to_dicom_seg` is a pure function (mask + affine + the source slices' pydicom datasets ->
a :class:`highdicom.seg.Segmentation`); :func:`write_dicom_seg` writes it atomically
(:func:`abdoseg.io.atomic_path`). ``abdoseg segment --dicom_seg`` uses both for DICOM series inputs.

The SEG is a BINARY segmentation with one segment per FLARE23 foreground class and **segment number
= FLARE23 id** (1 liver ... 14 lesion, label :data:`abdoseg.labels.LABELS`), all 14 segments always
described (classes absent from the mask have no frames), SNOMED CT property codes (left/right
organs as kidney / adrenal gland with a laterality modifier, the lesion as a morphologically abnormal
structure). The laterality modifier (SNOMED CT 24028007 "Right" / 7771000 "Left", DICOM CID 244)
sits inside the segment's Segmented Property Type Code Sequence item, where the IOD defines it
(``dciodvfy`` warns when it is put on the segment itself). Frame ``i`` of segment ``s`` lies on
source slice ``i`` (same ImagePositionPatient, orientation and pixel spacing;
``ReferencedSOPInstanceUID`` in its derivation sequence), so any DICOM viewer overlays it on the
series.

Geometry is taken from the DICOM headers, not assumed: every source pixel's LPS position is mapped
through the mask's RAS affine to a mask voxel, which must be a voxel centre (within
:data:`GRID_TOL_VOXELS`) inside the mask; a mask on another grid (resampled, cropped, another
series) is an :class:`abdoseg.io.InputError`, never a shifted SEG.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from abdoseg.io import InputError, atomic_path
from abdoseg.labels import FOREGROUND_IDS, LABELS, LESION_ID

#: ITK/DICOM world is LPS, NIfTI world is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: A source pixel may lie this far (in mask voxels) from a mask voxel centre: DICOM positions are
#: often written with 1-3 decimals, so the grid is not exact.
GRID_TOL_VOXELS = 0.25

# SNOMED CT codes (value, meaning) of the FLARE23 classes (DICOM CID 7150/7151 style); left/right organs
# as the organ plus a laterality modifier (CID 244, pydicom's ``codes.cid244.Right`` / ``.Left``).
_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_ABNORMAL_STRUCTURE = ("49755003", "Morphologically Abnormal Structure")
_RIGHT, _LEFT = ("24028007", "Right"), ("7771000", "Left")
_KIDNEY, _ADRENAL = ("64033007", "Kidney"), ("23451007", "Adrenal gland")
SEGMENT_CODES: dict[int, tuple[tuple[str, str], tuple[str, str], tuple[str, str] | None]] = {
    # id: (category, type, type modifier)
    1: (_ANATOMICAL_STRUCTURE, ("10200004", "Liver"), None),
    2: (_ANATOMICAL_STRUCTURE, _KIDNEY, _RIGHT),
    3: (_ANATOMICAL_STRUCTURE, ("78961009", "Spleen"), None),
    4: (_ANATOMICAL_STRUCTURE, ("15776009", "Pancreas"), None),
    5: (_ANATOMICAL_STRUCTURE, ("15825003", "Aorta"), None),
    6: (_ANATOMICAL_STRUCTURE, ("64131007", "Inferior vena cava"), None),
    7: (_ANATOMICAL_STRUCTURE, _ADRENAL, _RIGHT),
    8: (_ANATOMICAL_STRUCTURE, _ADRENAL, _LEFT),
    9: (_ANATOMICAL_STRUCTURE, ("28231008", "Gallbladder"), None),
    10: (_ANATOMICAL_STRUCTURE, ("32849002", "Esophagus"), None),
    11: (_ANATOMICAL_STRUCTURE, ("69695003", "Stomach"), None),
    12: (_ANATOMICAL_STRUCTURE, ("38848004", "Duodenum"), None),
    13: (_ANATOMICAL_STRUCTURE, _KIDNEY, _LEFT),
    LESION_ID: (_ABNORMAL_STRUCTURE, ("52988006", "Lesion"), None),
}
#: Recommended display colours (RGB) per FLARE23 id, written as CIELab as DICOM asks.
SEGMENT_RGB: dict[int, tuple[int, int, int]] = {
    1: (221, 130, 101), 2: (185, 102, 83), 3: (157, 108, 162), 4: (249, 180, 111), 5: (224, 97, 76),
    6: (0, 151, 206), 7: (244, 214, 49), 8: (230, 220, 70), 9: (139, 150, 98), 10: (211, 171, 143),
    11: (216, 132, 105), 12: (255, 253, 229), 13: (185, 102, 83), 14: (255, 0, 0),
}


class _NumpyWithFloatAlias(types.ModuleType):
    """``numpy`` plus the ``float_`` alias NumPy 2 removed (= ``numpy.float64``), for highdicom 0.22."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def import_highdicom() -> Any:
    """``import highdicom``, usable with NumPy 2.

    The project stays on pydicom 2 (MONAI Label 0.8.5 imports pydicom-seg, which fails on pydicom 3),
    and highdicom 0.22 is the last release for pydicom 2; its ``seg.sop`` module still names
    ``np.float_`` (removed in NumPy 2). That one module gets a numpy view with the alias; NumPy
    itself and every other module are left alone. Newer highdicom (pydicom 3) needs nothing."""
    import highdicom
    import highdicom.seg.sop as sop

    if not hasattr(np, "float_") and not hasattr(sop.np, "float_"):
        sop.np = _NumpyWithFloatAlias("numpy")
    return highdicom


def _code(value_meaning: tuple[str, str]):
    import_highdicom()
    from highdicom.sr import CodedConcept

    value, meaning = value_meaning
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def segment_descriptions(algorithm_name: str = "abdoseg fine_organ_tumor cascade",
                         algorithm_version: str | None = None) -> list[Any]:
    """The 14 :class:`highdicom.seg.SegmentDescription` items (segment number = FLARE23 id)."""
    from pydicom.sr.codedict import codes

    hd = import_highdicom()

    if algorithm_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            algorithm_version = version("abdoseg")
        except PackageNotFoundError:
            algorithm_version = "unknown"
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, version=algorithm_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for sid in FOREGROUND_IDS:
        category, prop_type, modifier = SEGMENT_CODES[sid]
        desc = hd.seg.SegmentDescription(
            segment_number=sid, segment_label=LABELS[sid], segmented_property_category=_code(category),
            segmented_property_type=_code(prop_type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        if modifier is not None:  # inside the property type's code item (Table C.8.20-4), not on the segment
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_code(modifier)]
        lab = hd.color.CIELabColor(*_rgb_to_lab(SEGMENT_RGB[sid]))
        desc.RecommendedDisplayCIELabValue = list(lab.value)
        out.append(desc)
    return out


def _rgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0-255) -> CIE L*a*b* (D65), clipped to highdicom's ranges."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))


def _slice_geometry(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, row direction, column direction, PixelSpacing (row, col)) of a slice."""
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(where, f"DICOM slice {ds.get('SOPInstanceUID', '?')} without a usable position, "
                                f"orientation or pixel spacing ({exc}); no DICOM SEG can reference it") from exc
    if ipp.shape != (3,) or iop.shape != (6,) or ps.shape != (2,) or not np.all(np.isfinite([*ipp, *iop, *ps])):
        raise InputError(where, f"DICOM slice {ds.get('SOPInstanceUID', '?')}: invalid ImagePositionPatient, "
                                "ImageOrientationPatient or PixelSpacing; no DICOM SEG can reference it")
    return ipp, iop[:3], iop[3:], ps


def mask_frames(mask: np.ndarray, affine: np.ndarray, source_datasets: Sequence[Any],
                where: str = "DICOM SEG") -> np.ndarray:
    """``(n_slices, Rows, Columns)`` uint8: the mask sampled at every pixel of every source slice
    (in the order given). Raises :class:`InputError` when a source pixel is not a voxel centre of
    the mask grid or lies outside it."""
    mask = np.asarray(mask)
    affine = np.asarray(affine, dtype=np.float64)
    if mask.ndim != 3:
        raise InputError(where, f"the mask must be 3D, got shape {mask.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(where, "the mask's affine is not a valid 4x4 voxel -> RAS matrix")
    ras_to_vox = np.linalg.inv(affine) @ LPS_TO_RAS  # LPS mm -> mask voxel
    frames = np.zeros((len(source_datasets), int(source_datasets[0].Rows), int(source_datasets[0].Columns)),
                      dtype=np.uint8)
    for i, ds in enumerate(source_datasets):
        rows, cols = int(ds.Rows), int(ds.Columns)
        if (rows, cols) != frames.shape[1:]:
            raise InputError(where, f"source slices of different sizes ({rows}x{cols} vs {frames.shape[1]}x"
                                    f"{frames.shape[2]}); no single DICOM SEG can cover them")
        ipp, row_dir, col_dir, ps = _slice_geometry(ds, where)
        v0 = ras_to_vox[:3, :3] @ ipp + ras_to_vox[:3, 3]
        d_col = ras_to_vox[:3, :3] @ (row_dir * ps[1])  # one step along a row = next column
        d_row = ras_to_vox[:3, :3] @ (col_dir * ps[0])  # next row
        r = np.arange(rows, dtype=np.float64)[:, None, None]
        c = np.arange(cols, dtype=np.float64)[None, :, None]
        vox = v0 + r * d_row + c * d_col  # (rows, cols, 3)
        idx = np.rint(vox)
        off = float(np.abs(vox - idx).max())
        if off > GRID_TOL_VOXELS:
            raise InputError(where, f"the mask's grid does not match DICOM slice {ds.get('SOPInstanceUID', '?')}: "
                                    f"its pixels lie up to {off:.2f} voxels off the mask's voxel centres "
                                    "(was the mask resampled, or is it from another series?)")
        idx = idx.astype(np.int64)
        if (idx < 0).any() or (idx >= np.asarray(mask.shape)).any():
            raise InputError(where, f"DICOM slice {ds.get('SOPInstanceUID', '?')} lies (partly) outside the mask "
                                    f"(shape {mask.shape}); the mask does not cover the series")
        frames[i] = mask[idx[..., 0], idx[..., 1], idx[..., 2]]
    return frames


#: Type 2 patient/study attributes the SEG copies from its source: present-but-empty when the source lacks them.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _header_copy(ds: Any) -> Any:
    """A copy of a slice's header (no pixel data) with missing Type 2 attributes present and empty
    (as DICOM defines them for unknown values); the caller's dataset is left untouched."""
    from pydicom.dataset import Dataset

    out = Dataset()  # its own element dict (``Dataset(ds)`` would share ``ds``'s)
    out.update({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010})  # no PixelData
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for keyword in _TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def mask_to_dicom_seg(mask: np.ndarray, affine: np.ndarray, source_datasets: Sequence[Any], *,
                      series_description: str = "abdoseg FLARE23 organs + lesion",
                      series_number: int | None = None, series_instance_uid: str | None = None,
                      sop_instance_uid: str | None = None, where: str = "DICOM SEG") -> Any:
    """A DICOM SEG (:class:`highdicom.seg.Segmentation`, a pydicom Dataset) of the FLARE23 label
    mask ``mask`` (X, Y, Z; ids 0-14; ``affine`` voxel -> RAS mm) on the single-frame CT slices
    ``source_datasets`` (pydicom datasets of one series, pixel data not needed). Segment number =
    FLARE23 id, label = :data:`abdoseg.labels.LABELS`. ``where`` names the input in errors.

    Patient and study attributes are copied from the source (missing Type 2 ones written empty).
    Raises :class:`InputError` for label values outside 0-14, no or multi-frame source slices,
    slices of several series or without FrameOfReferenceUID, or a mask whose grid does not match
    the slices.
    """
    hd = import_highdicom()

    if not source_datasets:
        raise InputError(where, "no source DICOM slices; a DICOM SEG must reference its CT series")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in source_datasets):
        raise InputError(where, "multi-frame (enhanced) DICOM source: DICOM SEG output supports single-frame "
                                "CT series only")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in source_datasets}
    if len(series) > 1:
        raise InputError(where, f"source slices from {len(series)} series; a DICOM SEG references one series")
    missing_for = [ds for ds in source_datasets if not str(ds.get("FrameOfReferenceUID", "") or "")]
    if missing_for:
        raise InputError(where, f"DICOM slice {missing_for[0].get('SOPInstanceUID', '?')} has no FrameOfReferenceUID "
                                "(required for CT); a DICOM SEG without it cannot be placed on the series")
    mask = np.asarray(mask)
    if mask.dtype.kind not in "iub":
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.round(mask)):
            raise InputError(where, "the mask has non-integer values; expected FLARE23 ids 0-14")
    if mask.size and (mask.min() < 0 or mask.max() > max(FOREGROUND_IDS)):
        raise InputError(where, f"label values {int(mask.min())}..{int(mask.max())} outside the FLARE23 ids "
                                f"0-{max(FOREGROUND_IDS)}")
    frames = mask_frames(mask.astype(np.uint8), affine, source_datasets, where)
    source_datasets = [_header_copy(ds) for ds in source_datasets]
    src = source_datasets[0]
    if series_number is None:
        try:
            series_number = int(src.get("SeriesNumber", 0) or 0) + 1000
        except (TypeError, ValueError):
            series_number = 1000
    from importlib.metadata import PackageNotFoundError, version

    try:
        software = version("abdoseg")
    except PackageNotFoundError:
        software = "unknown"
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm_version=software),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="abdoseg",
        manufacturer_model_name="fine_organ_tumor cascade",
        software_versions=software,
        device_serial_number="0",
        content_description="FLARE23 organs + lesion; segment number = FLARE23 id",
        content_label="ABDOSEG",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description[:64]
    return seg


def write_dicom_seg(seg: Any, path: str | os.PathLike) -> Path:
    """Write the SEG dataset to ``path`` atomically (hidden temporary name, renamed when complete)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp), write_like_original=False)
    return path


def read_source_datasets(files: Sequence[str | os.PathLike]) -> list[Any]:
    """pydicom headers (no pixel data) of the source slices, in the given order."""
    import pydicom

    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]


def series_seg(mask_file: str | os.PathLike, series_folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """``abdoseg segment --dicom_seg``: the NIfTI mask ``mask_file`` of the DICOM series in
    ``series_folder`` -> DICOM SEG ``out_file`` (atomic). The series goes through the same checks
    as for segmentation (:func:`abdoseg.dicom.series.check_dicom_series`: a missing slice, uneven or
    duplicate positions, ... are errors naming the series), and the SEG references exactly the
    slices the mask was computed from."""
    from abdoseg.io import load_nifti
    from abdoseg.dicom.series import check_dicom_series

    files = check_dicom_series(series_folder)
    if not files:
        raise InputError(series_folder, "no readable DICOM series in this folder; no DICOM SEG written")
    mask, affine, _ = load_nifti(mask_file)
    seg = mask_to_dicom_seg(np.asarray(mask), affine, read_source_datasets(files), where=str(series_folder))
    return write_dicom_seg(seg, out_file)


# --------------------------------------------------------------------------------------------------
# Reading: a DICOM SEG -> FLARE23 label mask, classes by segment label or property code.


def _norm_label(text: str) -> str:
    return "_".join(str(text).strip().lower().replace("-", " ").replace("_", " ").split())


#: normalized FLARE23 name -> id ("Right Kidney", "right-kidney", "right_kidney" all match 2)
_LABEL_TO_ID: dict[str, int] = {_norm_label(LABELS[i]): i for i in FOREGROUND_IDS}
#: (property type code value, laterality modifier code value or None) -> FLARE23 id
_CODE_TO_ID: dict[tuple[str, str | None], int] = {
    (t[0], m[0] if m else None): sid for sid, (_, t, m) in SEGMENT_CODES.items()}


def _first(seq_owner: Any, keyword: str, fallback: Any = None) -> Any:
    """First item of sequence ``keyword`` of ``seq_owner``, else of ``fallback`` (shared groups)."""
    for owner in (seq_owner, fallback):
        seq = owner.get(keyword) if owner is not None else None
        if seq:
            return seq[0]
    return None


def segment_class_ids(seg: Any, where: str = "DICOM SEG") -> dict[int, int]:
    """``{SegmentNumber: FLARE23 id}`` of a DICOM SEG dataset, **never by position**: a segment is
    matched by its SegmentLabel (a FLARE23 name, case, space, hyphen and underscore insensitive),
    else by its SegmentedPropertyTypeCodeSequence (plus the laterality modifier for kidneys and
    adrenal glands, as :data:`SEGMENT_CODES`). A segment matching no class, a label and code naming
    different classes, or two segments naming the same class raise :class:`InputError` naming the
    segment: a label whose classes cannot be told apart must not train the wrong ones."""
    out: dict[int, int] = {}
    for item in seg.get("SegmentSequence", []) or []:
        number = int(item.SegmentNumber)
        label = str(item.get("SegmentLabel", "") or "")
        by_label = _LABEL_TO_ID.get(_norm_label(label))
        by_code = None
        ptype = _first(item, "SegmentedPropertyTypeCodeSequence")
        if ptype is not None:
            # the modifier's place is the type code item; older SEGs (ours too) and some tools put it on the segment
            mod = _first(ptype, "SegmentedPropertyTypeModifierCodeSequence", fallback=item)
            key = (str(ptype.get("CodeValue", "")), str(mod.get("CodeValue", "")) if mod is not None else None)
            by_code = _CODE_TO_ID.get(key)
        if by_label is not None and by_code is not None and by_label != by_code:
            raise InputError(where, f"segment {number} is labelled {label!r} (FLARE23 {by_label}) but coded as "
                                    f"{LABELS[by_code]!r} (FLARE23 {by_code}); which class it is cannot be told")
        cid = by_label if by_label is not None else by_code
        if cid is None:
            code = f"{ptype.get('CodeValue', '?')} {ptype.get('CodeMeaning', '')!r}" if ptype is not None else "none"
            raise InputError(where, f"segment {number} ({label!r}, property type code {code}) is not a FLARE23 class; "
                                    f"expected a segment label among {[LABELS[i] for i in FOREGROUND_IDS]} "
                                    "or their SNOMED CT codes")
        if cid in out.values():
            other = next(n for n, c in out.items() if c == cid)
            raise InputError(where, f"segments {other} and {number} are both {LABELS[cid]!r}")
        out[number] = cid
    if not out:
        raise InputError(where, "a DICOM SEG without segments (no SegmentSequence)")
    return out


def _frame_geometry(seg: Any, i: int, shared: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    per = seg.PerFrameFunctionalGroupsSequence[i] if "PerFrameFunctionalGroupsSequence" in seg else None
    pos = _first(per, "PlanePositionSequence", shared)
    ori = _first(per, "PlaneOrientationSequence", shared)
    pix = _first(per, "PixelMeasuresSequence", shared)
    if pos is None or ori is None or pix is None:
        raise InputError(where, f"frame {i + 1} of the DICOM SEG has no plane position, orientation or pixel "
                                "spacing; it cannot be placed on the image")
    return _slice_geometry(types.SimpleNamespace(ImagePositionPatient=pos.ImagePositionPatient,
                                                 ImageOrientationPatient=ori.ImageOrientationPatient,
                                                 PixelSpacing=pix.PixelSpacing,
                                                 get=lambda k, d=None: f"frame {i + 1}"), where)


def dicom_seg_to_label(seg: Any, affine: np.ndarray, shape: Sequence[int], where: str = "DICOM SEG") -> np.ndarray:
    """The FLARE23 label mask (uint8, ``shape``; ``affine`` voxel -> RAS mm, the image's grid) of
    the DICOM SEG dataset ``seg`` (BINARY or FRACTIONAL, thresholded at one half). Classes come
    from :func:`segment_class_ids` (label or code, never position): segment numbers and the order
    or presence of other segments do not matter, a class with no frames stays 0. Where segments
    overlap the higher FLARE23 id wins (the lesion over its organ, as in FLARE23 labels).

    Every frame pixel is mapped through its plane position/orientation and pixel spacing to the
    image grid; a frame off the grid's voxel centres (another series, a resampled image) or
    outside it raises :class:`InputError`."""
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise InputError(where, f"the reference image must be 3D, got shape {shape}")
    classes = segment_class_ids(seg, where)
    rows, cols = int(seg.Rows), int(seg.Columns)
    n_frames = int(seg.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(seg.pixel_array).reshape(n_frames, rows, cols)
    if str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        on_all = pixels >= max(int(seg.get("MaximumFractionalValue", 255) or 255), 1) / 2.0
    else:
        on_all = pixels > 0
    shared = _first(seg, "SharedFunctionalGroupsSequence")
    ras_to_vox = np.linalg.inv(affine) @ LPS_TO_RAS
    out = np.zeros(shape, dtype=np.uint8)
    for i in range(n_frames):
        per = seg.PerFrameFunctionalGroupsSequence[i] if "PerFrameFunctionalGroupsSequence" in seg else None
        ident = _first(per, "SegmentIdentificationSequence", shared)
        if ident is None:
            raise InputError(where, f"frame {i + 1} of the DICOM SEG names no segment")
        number = int(ident.ReferencedSegmentNumber)
        if number not in classes:
            raise InputError(where, f"frame {i + 1} refers to segment {number}, which the SegmentSequence lacks")
        ipp, row_dir, col_dir, ps = _frame_geometry(seg, i, shared, where)
        r, c = np.nonzero(on_all[i])
        if r.size == 0:
            continue
        lps = ipp[None] + r[:, None] * (col_dir * ps[0])[None] + c[:, None] * (row_dir * ps[1])[None]
        vox = lps @ ras_to_vox[:3, :3].T + ras_to_vox[:3, 3]
        idx = np.rint(vox)
        off = float(np.abs(vox - idx).max())
        if off > GRID_TOL_VOXELS:
            raise InputError(where, f"frame {i + 1} (segment {number}) lies up to {off:.2f} voxels off the image's "
                                    "voxel centres: the SEG is not on this image's grid (another series?)")
        idx = idx.astype(np.int64)
        if (idx < 0).any() or (idx >= np.asarray(shape)).any():
            raise InputError(where, f"frame {i + 1} (segment {number}) lies (partly) outside the image (shape {shape})")
        cid = classes[number]
        tgt = (idx[:, 0], idx[:, 1], idx[:, 2])
        out[tgt] = np.maximum(out[tgt], cid)
    return out


def read_dicom_seg(seg_file: str | os.PathLike, reference_image: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(label, affine)``: the DICOM SEG file ``seg_file`` as a FLARE23 mask on the grid of the
    NIfTI image ``reference_image`` (:func:`dicom_seg_to_label`). Errors name the SEG file."""
    import nibabel as nib
    import pydicom

    try:
        seg = pydicom.dcmread(str(seg_file))
    except Exception as exc:
        raise InputError(seg_file, f"not a readable DICOM file ({exc})") from exc
    if str(seg.get("Modality", "")) != "SEG":
        raise InputError(seg_file, f"not a DICOM SEG (Modality {seg.get('Modality', 'missing')!r})")
    try:
        img = nib.load(str(reference_image))
    except Exception as exc:
        raise InputError(reference_image, f"not a readable NIfTI image ({exc})") from exc
    if len(img.shape) < 3:
        raise InputError(reference_image, f"not a 3D image (shape {img.shape})")
    return dicom_seg_to_label(seg, img.affine, img.shape[:3], where=str(seg_file)), np.asarray(img.affine)


__all__ = ["series_seg", "mask_to_dicom_seg", "dicom_seg_to_label", "read_dicom_seg", "segment_class_ids", "import_highdicom", "mask_frames", "write_dicom_seg",
           "read_source_datasets", "segment_descriptions", "SEGMENT_CODES", "GRID_TOL_VOXELS"]
