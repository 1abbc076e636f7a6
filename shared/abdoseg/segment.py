"""``abdoseg segment -i <CT> -o <mask>``: the trained cascade on a NIfTI file, a folder of NIfTI files
or a DICOM series folder, for users who do not want to touch MONAI configs.

The cascade is built from the fine bundle's ``configs/inference.json`` with MONAI's
``ConfigParser`` from exactly the ids MONAI Label uses (``network_def``, ``preprocessing``,
``inferer``, ``postprocessing``) plus the bundle's weights (``models/model.pt`` and the
checkpoints the config refers to, e.g. ``models/coarse_model.pt``), and run over the cases with
:func:`abdoseg.batch.run_batch` (resume: existing masks are kept unless ``--force``; per-case
failures are reported at the end; every file is written atomically).

Inputs:
- ``ct.nii.gz`` -> one case; ``-o mask.nii.gz`` (a file) or ``-o folder`` (``folder/<case>.nii.gz``).
- a folder with ``*.nii.gz``/``*.nii`` files -> one case per file (``X_0000.nii.gz`` -> case ``X``);
  sub-folders are read as DICOM series (one case each, named after the sub-folder); converter
  sidecars beside a NIfTI of the same name (dcm2niix's ``ct.json``) are skipped; any other file
  is reported as a failure.
- a folder that holds a DICOM series (and no NIfTI files) -> one case named after the folder.
  Every file is first checked with pydicom (:func:`check_dicom_series`: an unreadable or
  truncated slice, a gap, uneven or duplicate positions, mixed orientations or sizes are errors
  naming the series and the slice, never a volume with the wrong geometry); the checked slices
  are read with ITK (``ImageSeriesReader``, rescale slope/intercept applied), converted from ITK's
  LPS world to NIfTI's RAS (x and y negated), and the mask is written as NIfTI with that affine,
  so it overlays the series exactly.
- hidden and temporary files are never cases, nor is the output folder when it lies inside the
  input folder; a symbolic link loop or dangling link is one failed case.

DICOM series cases with ``--dicom_seg``: also ``<case>_seg.dcm``, a DICOM SEG referencing the
series (:mod:`abdoseg.dicom_seg`; segment number = FLARE23 id). NIfTI stays the default output.

Per case, optional: ``<case>_statistics.json`` (:func:`abdoseg.statistics.label_statistics`:
organ volumes in mL, mean HU, lesion count and per-lesion volumes) and ``<case>_preview.png``
(:func:`abdoseg.viz.overlay_png`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from abdoseg.io import (InputError, case_id_from_image, ensure_writable_dir, exit_if_failed, is_nifti, load_nifti,
                        nifti_stem, save_json, save_nifti, visible_entries, voxel_spacing_mm)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO_ROOT / "bundles" / "fine_organ_tumor"
#: ITK (DICOM) world is LPS, NIfTI world is RAS: the two differ by negating x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _resolve(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symbolic link loop (Python raises RuntimeError/OSError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def _link_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened when it is a symbolic link loop or a dangling link, else ``None``."""
    import errno

    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself); remove or fix it"
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        return f"cannot be opened ({exc.strerror or exc})"
    return None


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
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
        problem = _link_problem(path)
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
                      "(put each series in its own folder to segment it)", stacklevel=3)
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


# ----------------------------------------------------------------------------------------------
# inputs and outputs
# ----------------------------------------------------------------------------------------------
#: Files that converters write beside a NIfTI of the same name (dcm2niix: ``ct.nii.gz`` + ``ct.json``
#: BIDS sidecar; ``.bval``/``.bvec`` for diffusion): metadata, never cases.
SIDECAR_SUFFIXES = (".json", ".bval", ".bvec")


def is_sidecar(path: Path, niftis: Sequence[Path]) -> bool:
    """True when ``path`` is a converter's sidecar (:data:`SIDECAR_SUFFIXES`) of one of ``niftis``
    (same name up to the extension, as dcm2niix writes them)."""
    name = path.name
    if not name.lower().endswith(SIDECAR_SUFFIXES) or not path.is_file():
        return False
    stem = name[: name.rfind(".")]
    return any(nifti_stem(n) == stem for n in niftis)


def find_cases(input_path: str | os.PathLike, exclude: Any = ()) -> list[dict[str, str]]:
    """Cases of ``input_path``: ``[{"case_id", "source", "kind": "nifti" | "dicom" | "unknown"}]``;
    a case that cannot be opened (symbolic link loop, dangling link) also has a ``"problem"``.

    Hidden and temporary files are never cases, and neither are the paths in ``exclude`` nor the
    folders that hold them (the output of ``segment -i in -o in/masks``). Raises
    :class:`InputError` when the input does not exist, holds nothing to segment, or two inputs
    would write the same ``<case>.nii.gz``.
    """
    src = Path(input_path)
    problem = _link_problem(src) if src.is_symlink() else None
    if problem:
        raise InputError(src, problem)
    if not src.exists():
        raise InputError(src, "input not found")
    if src.is_file():
        if not is_nifti(src):
            raise InputError(src, "not a NIfTI file (.nii/.nii.gz); for DICOM give the folder of the series")
        return [{"case_id": case_id_from_image(src), "source": str(src), "kind": "nifti"}]
    excluded = [r for r in (_resolve(Path(e)) for e in ([exclude] if isinstance(exclude, (str, os.PathLike))
                                                        else exclude)) if r is not None]

    def is_excluded(p: Path) -> bool:
        r = _resolve(p)
        return r is not None and any(r == e or r in e.parents for e in excluded)

    entries = [p for p in visible_entries(src) if not is_excluded(p)]
    niftis = [p for p in entries if p.is_file() and is_nifti(p)]
    entries = [p for p in entries if not is_sidecar(p, niftis)]
    if not niftis and dicom_series_files(src):
        return [{"case_id": src.resolve().name, "source": str(src), "kind": "dicom"}]
    if not entries:
        raise InputError(src, "empty folder: no NIfTI files (.nii/.nii.gz) and no DICOM series")
    cases = []
    for p in entries:
        problem = _link_problem(p) if p.is_symlink() else None
        if problem:
            cases.append({"case_id": p.name, "source": str(p), "kind": "unknown", "problem": problem})
        elif p.is_dir():
            cases.append({"case_id": p.name, "source": str(p), "kind": "dicom"})
        elif is_nifti(p):
            cases.append({"case_id": case_id_from_image(p), "source": str(p), "kind": "nifti"})
        else:
            cases.append({"case_id": p.name, "source": str(p), "kind": "unknown"})
    if not any(c["kind"] != "unknown" for c in cases):
        names = ", ".join(Path(c["source"]).name for c in cases[:MAX_NAMED_FILES])
        more = f" and {len(cases) - MAX_NAMED_FILES} more" if len(cases) > MAX_NAMED_FILES else ""
        raise InputError(src, f"no NIfTI files (.nii/.nii.gz) and no DICOM series in this folder; it holds "
                              f"{len(cases)} other file(s): {names}{more}")
    seen: dict[str, str] = {}
    for c in cases:
        if c["case_id"] in seen:
            raise InputError(src, f"{Path(seen[c['case_id']]).name} and {Path(c['source']).name} would both be "
                                  f"written as {c['case_id']}.nii.gz; rename one of them")
        seen[c["case_id"]] = c["source"]
    return cases


def output_layout(cases: list[dict[str, str]], input_path: str | os.PathLike,
                  output: str | os.PathLike) -> tuple[Path, list[dict[str, str]]]:
    """``(output folder, cases)``: ``output`` ending in ``.nii.gz`` names the mask of a single case
    (the case id becomes the file's stem); anything else is a folder of ``<case>.nii.gz``."""
    out = Path(output)
    if out.name.lower().endswith(".nii"):
        raise InputError(out, "masks are written compressed: name the output file *.nii.gz")
    if out.name.lower().endswith(".nii.gz"):
        if len(cases) != 1:
            raise InputError(out, f"{len(cases)} cases found in {input_path}: give an output folder, not a file")
        if out.exists() and out.is_dir():
            raise InputError(out, "is a folder; name the output file differently")
        case = dict(cases[0], case_id=out.name[: -len(".nii.gz")])
        out_dir = out.parent
        cases = [case]
    else:
        if out.exists() and not out.is_dir():
            raise InputError(out, "exists and is not a folder")
        out_dir = out
    src = Path(input_path)
    src_dir = src.resolve() if src.is_dir() else src.resolve().parent
    if src.is_dir() and out_dir.resolve() == src_dir and any(c["kind"] == "nifti" for c in cases):
        raise InputError(out_dir, "write the masks to another folder than the input folder")
    for c in cases:
        if _resolve(Path(c["source"])) == _resolve(out_dir / f"{c['case_id']}.nii.gz"):
            raise InputError(c["source"], "the mask would overwrite this input; choose another output")
    return out_dir, cases


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; ``"cuda"`` without a GPU is an error."""
    import torch

    device = str(device).lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device", f"{device} requested but no CUDA GPU is available (use --device cpu)")
        return device
    if device == "cpu":
        return device
    raise InputError("--device", f"unknown device {device!r}: use cpu, cuda or auto")


# ----------------------------------------------------------------------------------------------
# the cascade from the bundle
# ----------------------------------------------------------------------------------------------
def bundle_weight_files(bundle_dir: str | os.PathLike, parser: Any,
                        configs: Sequence[str] = ("configs/inference.json",)) -> list[Path]:
    """Checkpoints the bundle's inference config needs: ``model_path``, ``coarse_checkpoint`` (when
    the config has it) and every ``models/<file>`` its config files (``configs``, relative to the
    bundle) mention."""
    from abdoseg.package import referenced_model_files

    bundle_dir = Path(bundle_dir)
    files = [Path(parser.get_parsed_content("model_path"))]
    if "coarse_checkpoint" in parser:
        c = parser.get_parsed_content("coarse_checkpoint")
        if c not in (None, ""):
            files.append(Path(c))
    files += [bundle_dir / "models" / n for c in configs for n in referenced_model_files(bundle_dir / c)]
    unique: dict[str, Path] = {}
    for f in files:
        unique.setdefault(str(f.resolve()), f)
    return list(unique.values())


def missing_weights_message(bundle_dir: Path, missing: list[Path]) -> str:
    names = ", ".join(str(m) for m in missing)
    return (f"trained weights not found: {names}.\n"
            "  Get them in one of three ways:\n"
            "  1. train on the bundled phantoms end to end: `abdoseg demo --out_dir runs/demo`, then\n"
            "     `abdoseg segment ... --bundle_dir runs/demo/bundles/fine_organ_tumor`;\n"
            "  2. train on your data: `python -m monai.bundle run training --config_file "
            f"{bundle_dir}/configs/train.json --bundle_root {bundle_dir} --dataset_dir <FLARE-style folder>` "
            "(and copy bundles/coarse_roi/models/model.pt to models/coarse_model.pt);\n"
            "  3. download a packed bundle (`abdoseg pack` output): `python -m monai.bundle download --name "
            "fine_organ_tumor --url <url of fine_organ_tumor_v<version>.zip> --bundle_dir <dir>`, then "
            "`--bundle_dir <dir>/fine_organ_tumor`.")


def preset_configs(bundle_dir: str | os.PathLike, preset: str = "") -> list[str]:
    """Config files (relative to the bundle) of its inference with seed preset ``preset`` merged
    after ``configs/inference.json`` (``""``: the bundle's own config only)."""
    configs = ["configs/inference.json"]
    if preset:
        rel = f"configs/presets/{preset}.json"
        if not (Path(bundle_dir) / rel).is_file():
            found = sorted(p.stem for p in (Path(bundle_dir) / "configs" / "presets").glob("*.json"))
            raise InputError(Path(bundle_dir) / rel, f"no such preset; this bundle has: {', '.join(found) or 'none'}")
        configs.append(rel)
    return configs


def load_cascade(bundle_dir: str | os.PathLike = DEFAULT_BUNDLE, device: str = "auto", preset: str = ""):
    """The bundle's cascade (:func:`abdoseg.inference.segmenter.segmenter_from_bundle`) on
    ``device`` with its trained weights, seed preset ``preset`` merged when given. Raises
    :class:`InputError` when the bundle, the preset or the weights are missing or do not fit."""
    from abdoseg.bundle_config import load_bundle_config
    from abdoseg.inference.segmenter import segmenter_from_bundle

    bundle = Path(bundle_dir)
    config = bundle / "configs" / "inference.json"
    if not config.is_file():
        raise InputError(bundle, "not a bundle folder (configs/inference.json missing); pass --bundle_dir "
                                 "<path to fine_organ_tumor>")
    dev = resolve_device(device)
    configs = preset_configs(bundle, preset)
    missing = [f for f in bundle_weight_files(bundle, load_bundle_config(bundle, configs), configs) if not f.is_file()]
    if missing:
        raise InputError(bundle, missing_weights_message(bundle, missing))
    return segmenter_from_bundle(bundle, device=dev, config=configs)


class _CaseRunner:
    """``item -> (mask, affine)`` for :func:`abdoseg.batch.run_batch`, with DICOM folders converted
    to a temporary NIfTI first (kept for statistics/preview, deleted at the end)."""

    def __init__(self, segmenter: Any, tmp_dir: Path) -> None:
        self.segmenter = segmenter
        self.tmp_dir = tmp_dir
        self._nifti: dict[str, Path] = {}

    def image_file(self, case: dict[str, str]) -> Path:
        src = case["source"]
        if case["kind"] == "nifti":
            return Path(src)
        if case.get("problem"):
            raise InputError(src, case["problem"])
        if case["kind"] != "dicom":
            raise InputError(src, "not a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
        if src not in self._nifti:
            array, affine = read_dicom_series(src)
            path = self.tmp_dir / f"dicom_{len(self._nifti):05d}.nii.gz"
            save_nifti(array, affine, path)
            self._nifti[src] = path
        return self._nifti[src]

    def __call__(self, item: dict) -> tuple[np.ndarray, np.ndarray]:
        import nibabel as nib

        from abdoseg.inference.ct_checks import check_affine

        case = item["case"]
        image = self.image_file(case)
        if case["kind"] == "nifti":
            try:  # header only: a clear one-line reason before MONAI tries all its readers
                header = nib.load(str(image))
                header.shape
                affine = header.affine
            except Exception as exc:
                raise InputError(image, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
            check_affine(affine, image)  # a NaN or singular affine would end in the mask's header
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self.segmenter({"image": str(image)})
        except InputError as exc:
            lines = exc.problem.strip().splitlines()
            problem = lines[0] + (" ...)" if len(lines) > 1 and lines[0].count("(") > lines[0].count(")") else "")
            # DICOM: name the user's folder, not the temporary NIfTI
            raise InputError(case["source"] if case["kind"] == "dicom" else exc.path, problem) from exc
        finally:
            for w in caught:  # re-issued, naming the user's DICOM folder
                message = str(w.message).replace(str(image), case["source"])
                warnings.warn_explicit(message, w.category, w.filename, w.lineno)
        warn_organs_on_air(result[0], image, case["source"])
        return result


def warn_organs_on_air(mask: np.ndarray, image_file: str | os.PathLike, source: str) -> list[tuple[int, float, float]]:
    """Warn (:class:`~abdoseg.inference.ct_checks.ImplausibleCTWarning`, one line naming ``source``)
    about predicted classes whose mean CT value is air (:func:`~abdoseg.inference.ct_checks.air_painted_classes`):
    a small body in a large field of view, or values that are not HU. Returns what it found."""
    import nibabel as nib

    from abdoseg.inference.ct_checks import ImplausibleCTWarning, air_painted_classes
    from abdoseg.labels import LABELS

    if not np.any(mask):
        return []
    img = nib.load(str(image_file))
    data = np.asanyarray(img.dataobj)
    if data.size != np.asarray(mask).size:
        return []  # not on one grid: nothing to compare (the writer checks the grid)
    found = air_painted_classes(mask, data, img.header.get_zooms()[:3])
    if found:
        what = ", ".join(f"{LABELS.get(c, c)} {ml:g} mL at a mean of {hu:.0f} HU" for c, ml, hu in found)
        warnings.warn(f"{source}: organs predicted on air ({what}): the body may fill only a small part of a large "
                      "field of view, or the values are not Hounsfield units; check the mask (--preview) and crop "
                      "the CT to the body", ImplausibleCTWarning, stacklevel=2)
    return found


def write_extras(case_id: str, image_file: Path, mask_file: Path, out_dir: Path, statistics: bool,
                 preview: bool, source: str) -> list[Path]:
    """``<case>_statistics.json`` and/or ``<case>_preview.png`` from the written mask and its CT."""
    from abdoseg.geometry import affines_match
    from abdoseg.statistics import label_statistics

    image, affine, header = load_nifti(image_file)
    mask, mask_affine, _ = load_nifti(mask_file)
    if mask.shape != image.shape[: mask.ndim] or not affines_match(mask_affine, affine):
        raise InputError(mask_file, f"does not match its CT {source} (shape or affine); rerun with --force")
    image = np.asarray(image).reshape(mask.shape)
    written = []
    if statistics:
        stats = label_statistics(mask, image, voxel_spacing_mm(header))
        stats = {"case": case_id, "image": str(source), "mask": str(mask_file), **stats}
        target = out_dir / f"{case_id}_statistics.json"
        with _names_output(target, mask_file):
            written.append(save_json(stats, target))
    if preview:
        from abdoseg.viz import overlay_png

        target = out_dir / f"{case_id}_preview.png"
        with _names_output(target, mask_file):
            written.append(overlay_png(image, mask, affine, target, title=case_id))
    return written


@contextlib.contextmanager
def _names_output(target: Path, mask_file: Path) -> Iterator[None]:
    """An OSError while writing ``target`` (a full disk, a read-only file) becomes one
    :class:`InputError` naming ``target`` (not the input CT); the mask is already complete."""
    try:
        yield
    except OSError as exc:
        raise InputError(target, f"not written ({exc.strerror or type(exc).__name__}); the mask {mask_file.name} "
                                 "is complete, free space and rerun to add it") from exc


def _check_dicom_seg_request(cases: list[dict[str, str]], input_path: str, out_dir: Path) -> None:
    """``--dicom_seg`` needs DICOM series among the inputs, and the SEG must not land in a series
    folder (it would join that series on the next read)."""
    dicom = [c for c in cases if c["kind"] == "dicom"]
    if not dicom:
        raise InputError(input_path, "--dicom_seg needs a DICOM series as input (a DICOM SEG references the "
                                     "series' slices); NIfTI inputs get NIfTI masks only")
    for c in dicom:
        if _resolve(Path(c["source"])) == _resolve(out_dir):
            raise InputError(out_dir, "write the DICOM SEG to another folder than the DICOM series folder "
                                      "(it would be read as part of the series next time)")
    if len(dicom) < len(cases):
        print(f"--dicom_seg: {len(cases) - len(dicom)} NIfTI case(s) get NIfTI masks only (no DICOM slices to "
              "reference)", file=sys.stderr)


def _write_dicom_segs(cases: list[dict[str, str]], failed: set[str], done: list[str], out_dir: Path,
                      force: bool) -> list[str]:
    """``<case>_seg.dcm`` for every segmented DICOM case (new masks, or a missing SEG next to a kept
    mask); returns the failures (one line each, naming the series)."""
    from abdoseg.dicom_seg import series_seg

    problems = []
    for c in cases:
        cid = c["case_id"]
        target = out_dir / f"{cid}_seg.dcm"
        if c["kind"] != "dicom" or cid in failed or not (force or cid in done or not target.exists()):
            continue
        try:
            series_seg(out_dir / f"{cid}.nii.gz", c["source"], target)
        except Exception as exc:
            problems.append(str(exc) if isinstance(exc, InputError) else f"{c['source']}: DICOM SEG not written "
                                                                         f"({type(exc).__name__}: {exc})")
    return problems


def segment(input: str, output: str, bundle_dir: str = str(DEFAULT_BUNDLE), device: str = "auto",
            statistics: bool = False, preview: bool = False, force: bool = False, dicom_seg: bool = False,
            preset: str = "") -> None:
    """Segment 13 abdominal organs + lesions in CT scans with the trained cascade.

    Example: abdoseg segment -i ct.nii.gz -o ct_mask.nii.gz --statistics --preview
    Exit status 1 when any case failed; the failures are listed at the end, and a failed case
    leaves no file behind. Existing masks are kept (resume) unless --force.

    Args:
        input: (-i) a CT as NIfTI (.nii.gz/.nii), a folder of NIfTI files (sub-folders: DICOM
            series), or the folder of one DICOM series.
        output: (-o) a .nii.gz file (one case) or a folder, filled with <case>.nii.gz masks
            (uint8, FLARE23 ids 0..14, same grid as the CT).
        bundle_dir: the fine_organ_tumor bundle with its trained weights in models/.
        device: cpu, cuda or auto (cuda when available).
        preset: a seed system preset of the bundle (seed000 ... seed004, configs/presets/) merged
            after configs/inference.json; the weights in models/ must be that system's.
        statistics: also write <case>_statistics.json (organ volumes in mL and mean HU,
            lesion count and per-lesion volumes in mL).
        preview: also write <case>_preview.png (axial/coronal/sagittal overlay).
        force: recompute masks (and statistics/previews) that already exist.
        dicom_seg: for DICOM series inputs, also write <case>_seg.dcm: a DICOM SEG that
            references the series' slices (segment number = FLARE23 id, FLARE23 labels). The
            NIfTI mask is always written; NIfTI inputs get no SEG (no slices to reference).
    """
    from tqdm.auto import tqdm

    from abdoseg.batch import run_batch

    for flag, value in (("--input", input), ("--output", output)):
        if isinstance(value, bool) or value in (None, ""):  # fire's reading of a bare -i
            raise InputError(flag, "needs a path (for a file name starting with '-', write ./-x.nii.gz)")
    input, output = str(input), str(output)
    cases = find_cases(input, exclude=[output])  # the output may lie inside the input folder
    out_dir, cases = output_layout(cases, input, output)
    if dicom_seg:
        _check_dicom_seg_request(cases, input, out_dir)
    segmenter = load_cascade(bundle_dir, device, preset)
    ensure_writable_dir(out_dir)  # one clear error for a read-only folder, not one traceback per case
    with tempfile.TemporaryDirectory(prefix="abdoseg_segment_") as tmp:
        runner = _CaseRunner(segmenter, Path(tmp))
        items = [{"image": c["source"], "case_id": c["case_id"], "case": c} for c in cases]
        report = run_batch(items, runner, out_dir, overwrite=force, desc="segment", rank=0, world_size=1,
                           verbose=False)  # each failure is listed once, at the end
        failed = {cid for cid, _, _ in report.failed}
        extra_failures: list[str] = []
        if statistics or preview:
            todo = []
            for c in cases:
                cid = c["case_id"]
                if cid in failed:
                    continue
                want_stats = statistics and (force or cid in report.done or not (out_dir / f"{cid}_statistics.json").exists())
                want_png = preview and (force or cid in report.done or not (out_dir / f"{cid}_preview.png").exists())
                if want_stats or want_png:
                    todo.append((c, want_stats, want_png))
            for c, want_stats, want_png in tqdm(todo, desc="statistics/preview", unit="case", disable=None,
                                                file=sys.stderr):
                cid = c["case_id"]
                try:
                    write_extras(cid, runner.image_file(c), out_dir / f"{cid}.nii.gz", out_dir, want_stats,
                                 want_png, c["source"])
                except Exception as exc:
                    extra_failures.append(f"{c['source']}: {exc}" if not isinstance(exc, InputError) else str(exc))
        if dicom_seg:
            extra_failures += _write_dicom_segs(cases, failed, report.done, out_dir, force)
    n_ok = len(report.done) + len(report.skipped)
    print(f"masks in {out_dir}: {len(report.done)} new, {len(report.skipped)} kept from before"
          f"{' (use --force to recompute)' if report.skipped else ''}", file=sys.stderr)
    exit_if_failed([reason for _, _, reason in report.failed] + extra_failures,
                   f"problem(s) ({n_ok} of {len(cases)} case(s) segmented)", prefix="abdoseg segment: ")
