"""DICOM series reading for ``abdoseg segment`` and ``abdoseg.dicom.seg``: check every slice
(:func:`check_dicom_series`), then read the series as a NIfTI-like ``(array (X, Y, Z), RAS affine)``
(:func:`read_dicom_series`).

Every file is first checked with pydicom: an unreadable or truncated slice, a gap, uneven or
duplicate positions, mixed orientations or sizes are errors naming the series and the slice, never
a volume with the wrong geometry; the checked slices are read with ITK (``ImageSeriesReader``,
rescale slope/intercept applied) and converted from ITK's LPS world to NIfTI's RAS (x and y negated).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from abdoseg.io import AbdosegWarning, InputError, link_problem, visible_entries

__all__ = ["LPS_TO_RAS", "MAX_NAMED_FILES", "dicom_series_files", "check_dicom_series", "read_dicom_series",
           "bad_files_problem", "series_name"]

#: ITK (DICOM) world is LPS, NIfTI world is RAS: the two differ by negating x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_series_files(folder: str | os.PathLike) -> list[list[str]]:
    """File lists of the DICOM series directly inside ``folder`` (GDCM sorting), largest first;
    ``[]`` when there is none."""
    import itk

    if not visible_entries(Path(folder)):
        return []
    names = itk.GDCMSeriesFileNames.New()
    names.SetGlobalWarningDisplay(False)  # "No Series were found" is reported by us, by file name
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    series = [list(names.GetFileNames(uid)) for uid in names.GetSeriesUIDs()]
    return sorted((s for s in series if s), key=len, reverse=True)


#: Files in a DICOM series folder that are not slices and are left alone (our own outputs, notes).
DICOM_FOLDER_IGNORED_SUFFIXES = (".nii", ".nii.gz", ".json", ".png", ".jpg", ".jpeg", ".txt", ".md", ".csv",
                                 ".xml", ".pdf", ".html", ".log", ".zip")
#: Slice positions may deviate this much from even spacing: max(absolute mm, fraction of the spacing).
SLICE_POSITION_TOL_MM = 0.01
SLICE_POSITION_TOL_FRACTION = 0.05


def _dicom_header(path: Path) -> Any:
    """The pydicom dataset of one file, fully read (a truncated file fails here); ``None`` for a
    DICOM object without pixel data (DICOMDIR, reports). Raises :class:`InputError` naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(str(path))
        except InvalidDicomError:  # no 128-byte preamble: accept only what is clearly an image slice
            ds = pydicom.dcmread(str(path), force=True)
            if "PixelData" not in ds or "ImagePositionPatient" not in ds:
                raise InputError(path, "not a DICOM file (unreadable slice?); remove it or fix the series") from None
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                               "the series cannot be read without it") from exc
    if "PixelData" not in ds:
        return None
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) \
            * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1)
        encapsulated = ds.file_meta.TransferSyntaxUID.is_compressed
    except Exception as exc:
        raise InputError(path, f"DICOM slice without a valid image description ({type(exc).__name__}: {exc})") from exc
    if not encapsulated and len(ds.PixelData) < expected:
        raise InputError(path, f"truncated DICOM slice: {len(ds.PixelData)} of {expected} bytes of pixel data")
    return ds


def _floats(ds: Any, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(path, f"DICOM slice without a valid {keyword} ({value!r}); the slice position is unknown")
    return out


def _written_precision_mm(value: Any) -> float:
    """Rounding step of a decimal string as the file wrote it ("-120.5" -> 0.1, "-120" -> 1)."""
    text = str(getattr(value, "original_string", None) or value).strip()
    if not text or "e" in text.lower():
        return 0.0
    return 10.0 ** -(len(text.split(".", 1)[1]) if "." in text else 0)


#: Problems that concern many files name this many of them, then the count of the others.
MAX_NAMED_FILES = 5


def bad_files_problem(errors: Sequence[InputError], folder: Path) -> str:
    """One line for the unreadable files of a DICOM series folder: the first's reason, then up to
    :data:`MAX_NAMED_FILES` file names and how many more there are."""
    first = errors[0].problem
    if len(errors) == 1:
        return f"{first} (in DICOM series folder {folder})"
    names = ", ".join(Path(e.path).name for e in errors[:MAX_NAMED_FILES])
    more = f" and {len(errors) - MAX_NAMED_FILES} more" if len(errors) > MAX_NAMED_FILES else ""
    return (f"{first} (in DICOM series folder {folder}); {len(errors)} files there are not readable DICOM slices: "
            f"{names}{more}; move them out of the series folder")


def series_name(ds: Any, n_files: int) -> str:
    """``series 3 'ABD 5mm' (UID 1.2.3..., 120 files)`` from a slice's header; absent tags left out."""
    parts = []
    if ds.get("SeriesNumber") not in (None, ""):
        parts.append(f"series {ds.get('SeriesNumber')}")
    if str(ds.get("SeriesDescription", "") or "").strip():
        parts.append(repr(str(ds.get("SeriesDescription")).strip()))
    uid = str(ds.get("SeriesInstanceUID", "") or "?")
    return " ".join(parts + [f"(UID {uid}, {n_files} files)"])


def check_dicom_series(folder: str | os.PathLike) -> list[str]:
    """Check every file of the DICOM series folder ``folder`` with pydicom and return the files of
    its largest series (SeriesInstanceUID) sorted along the slice normal, ready for ITK.

    Errors (:class:`InputError` naming the series folder and the slice): a file that is not
    readable DICOM or is truncated (other than ``DICOM_FOLDER_IGNORED_SUFFIXES``), a slice without
    position/orientation, slices of different size, orientation or pixel spacing, two slices at one
    position, a gap (missing slice) or uneven spacing, slices shifted in plane (gantry tilt); all
    unreadable files are found and the first :data:`MAX_NAMED_FILES` named. Several series in the
    folder: the largest is returned, with a warning naming the series used and the others.
    """
    folder = Path(folder)
    headers: dict[str, list[tuple[Path, Any]]] = {}
    bad: list[InputError] = []  # every unreadable file is found, the first few are named
    for path in visible_entries(folder):
        if path.is_dir() or path.name.lower().endswith(DICOM_FOLDER_IGNORED_SUFFIXES):
            continue
        problem = link_problem(path)
        if problem:
            bad.append(InputError(path, problem))
            continue
        try:
            ds = _dicom_header(path)
        except InputError as exc:
            bad.append(exc)
            continue
        if ds is not None:
            headers.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if bad:
        raise InputError(bad[0].path, bad_files_problem(bad, folder))
    if not headers:
        return []
    groups = sorted(headers.values(), key=len, reverse=True)
    if len(groups) > 1:
        others = "; ".join(series_name(g[0][1], len(g)) for g in groups[1:MAX_NAMED_FILES + 1])
        more = f" and {len(groups) - 1 - MAX_NAMED_FILES} more" if len(groups) - 1 > MAX_NAMED_FILES else ""
        warnings.warn(f"{folder}: {len(groups)} DICOM series found; segmenting the largest, "
                      f"{series_name(groups[0][0][1], len(groups[0]))}; not segmented: {others}{more} "
                      "(put each series in its own folder to segment it)", AbdosegWarning, stacklevel=3)
    slices = groups[0]
    first_path, first = slices[0]

    def err(problem: str) -> InputError:
        return InputError(folder, f"DICOM series {first.get('SeriesInstanceUID', '?')}: {problem}")

    if len(slices) == 1 or any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in slices):
        return [str(p) for p, _ in slices]
    iop0 = _floats(first, "ImageOrientationPatient", 6, first_path)
    size0 = (int(first.Rows), int(first.Columns))
    ps0 = _floats(first, "PixelSpacing", 2, first_path) if "PixelSpacing" in first else None
    positions = []
    precision = 0.0  # positions written with 1 decimal are up to 0.05 mm off: allow for it
    for path, ds in slices:
        iop = _floats(ds, "ImageOrientationPatient", 6, path)
        if np.abs(iop - iop0).max() > 1e-3:
            raise err(f"mixed orientations: slice {path.name} has ImageOrientationPatient "
                      f"{np.round(iop, 4).tolist()}, slice {first_path.name} {np.round(iop0, 4).tolist()}")
        size = (int(ds.Rows), int(ds.Columns))
        if size != size0:
            raise err(f"mixed slice sizes: slice {path.name} is {size[0]}x{size[1]}, slice {first_path.name} "
                      f"{size0[0]}x{size0[1]}")
        if ps0 is not None:
            ps = _floats(ds, "PixelSpacing", 2, path)
            if np.abs(ps - ps0).max() > 1e-3 * max(1.0, float(ps0.max())):
                raise err(f"mixed pixel spacing: slice {path.name} has {ps.tolist()} mm, slice {first_path.name} "
                          f"{ps0.tolist()} mm")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
        precision = max(precision, *(_written_precision_mm(v) for v in ds.ImagePositionPatient))
    normal = np.cross(iop0[:3], iop0[3:])
    if np.linalg.norm(normal) < 0.5:
        raise err(f"slice {first_path.name}: ImageOrientationPatient {iop0.tolist()} has parallel row and column axes")
    normal /= np.linalg.norm(normal)
    pos = np.asarray(positions)
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    names = [slices[i][0].name for i in order]
    depth, pos = depth[order], pos[order]
    steps = np.diff(depth)
    dup = np.nonzero(steps < SLICE_POSITION_TOL_MM)[0]
    if dup.size:
        i = int(dup[0])
        raise err(f"duplicate slice position: slices {names[i]} and {names[i + 1]} both lie at {depth[i]:.3f} mm "
                  "along the slice normal")
    spacing = float(np.median(steps))
    tol = max(SLICE_POSITION_TOL_MM, SLICE_POSITION_TOL_FRACTION * spacing, 1.01 * precision)
    off = np.nonzero(np.abs(steps - spacing) > tol)[0]
    if off.size:
        i = int(off[0])
        gap = float(steps[i])
        missing = round(gap / spacing) - 1
        why = (f"{missing} slice(s) missing or unreadable?" if missing >= 1 and abs(gap - (missing + 1) * spacing) <= tol
               else "uneven slice spacing")
        raise err(f"gap of {gap:.3f} mm between slices {names[i]} and {names[i + 1]} where the series spacing is "
                  f"{spacing:.3f} mm ({why}); {len(off)} uneven step(s) in {len(names)} slices")
    shift = np.diff(pos, axis=0) - steps[:, None] * normal[None, :]
    shear = np.linalg.norm(shift, axis=1)
    if shear.max() > tol:
        i = int(np.argmax(shear))
        raise err(f"slice {names[i + 1]} is shifted {shear[i]:.3f} mm in plane from slice {names[i]} "
                  "(gantry tilt or mixed stacks); resample the series first")
    return [str(slices[i][0]) for i in order]


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read the DICOM series in ``folder`` as ``(array (X, Y, Z), affine 4x4 voxel -> RAS mm)``,
    i.e. what nibabel would give for the same volume saved as NIfTI.

    Every file is checked first (:func:`check_dicom_series`): an unreadable or truncated slice, a
    missing slice, uneven or duplicate positions, mixed orientations or sizes are errors that name
    the series and the slice, never a volume with the wrong geometry. Values are the rescaled ones
    (HU for CT): int16 when they are all integers in range, else float32. Several series in one
    folder: the one with the most files is read (warning). Raises :class:`InputError` naming the
    folder when it holds no readable series.
    """
    import itk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "DICOM folder not found")
    files = check_dicom_series(folder)
    if not files:
        what = "empty folder" if not visible_entries(folder) else "no readable DICOM series in this folder"
        raise InputError(folder, f"{what} (expected the .dcm files of one CT series)")
    try:
        reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New()
        # positions were checked above (within their written precision); ITK's own
        # "non uniform sampling" note about rounded positions would only be noise
        reader.SetGlobalWarningDisplay(False)
        reader.SetImageIO(itk.GDCMImageIO.New())
        reader.SetFileNames(files)  # checked and sorted along the slice normal
        reader.Update()
        img = reader.GetOutput()
    except Exception as exc:  # ITK raises RuntimeError with a long C++ trace
        first = str(exc).strip().splitlines()
        raise InputError(folder, f"could not read the DICOM series ({first[-1] if first else type(exc).__name__})") from exc
    zyx = itk.array_from_image(img)  # ITK arrays are (Z, Y, X)
    array = np.ascontiguousarray(np.transpose(zyx, (2, 1, 0)))
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    affine = LPS_TO_RAS @ lps
    from abdoseg.inference.ct_checks import check_affine

    check_affine(affine, folder)
    if np.all(np.isfinite(array)) and np.all(array == np.round(array)) and array.size \
            and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
        array = array.astype(np.int16)
    return array, affine
