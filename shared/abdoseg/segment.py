"""``abdoseg segment -i <CT> -o <mask>``: the trained cascade on a NIfTI file, a folder of NIfTI files
or a DICOM series folder, for users who do not want to touch MONAI configs.

The cascade is built from the fine bundle's ``configs/inference.json`` with MONAI's
``ConfigParser`` from exactly the ids MONAI Label uses (``network_def``, ``preprocessing``,
``inferer``, ``postprocessing``) plus the bundle's weights (``models/model.pt`` and the
checkpoints the config refers to, e.g. ``models/coarse_model.pt``), and run over the cases with
:func:`abdoseg.inference.batch.run_batch` (resume: existing masks are kept unless ``--force``; per-case
failures are reported at the end; every file is written atomically).

Inputs:
- ``ct.nii.gz`` -> one case; ``-o mask.nii.gz`` (a file) or ``-o folder`` (``folder/<case>.nii.gz``).
- a folder with ``*.nii.gz``/``*.nii`` files -> one case per file (``X_0000.nii.gz`` -> case ``X``);
  sub-folders are read as DICOM series (one case each, named after the sub-folder); converter
  sidecars beside a NIfTI of the same name (dcm2niix's ``ct.json``) are skipped; any other file
  is reported as a failure.
- a folder that holds a DICOM series (and no NIfTI files) -> one case named after the folder.
  Every file is first checked with pydicom (:func:`abdoseg.dicom.series.check_dicom_series`: an unreadable or
  truncated slice, a gap, uneven or duplicate positions, mixed orientations or sizes are errors
  naming the series and the slice, never a volume with the wrong geometry); the checked slices
  are read with ITK (``ImageSeriesReader``, rescale slope/intercept applied), converted from ITK's
  LPS world to NIfTI's RAS (x and y negated), and the mask is written as NIfTI with that affine,
  so it overlays the series exactly.
- hidden and temporary files are never cases, nor is the output folder when it lies inside the
  input folder; a symbolic link loop or dangling link is one failed case.

DICOM series cases with ``--dicom_seg``: also ``<case>_seg.dcm``, a DICOM SEG referencing the
series (:mod:`abdoseg.dicom.seg`; segment number = FLARE23 id). NIfTI stays the default output.

Per case, optional: ``<case>_statistics.json`` (:func:`abdoseg.evaluation.statistics.label_statistics`:
organ volumes in mL, mean HU, lesion count and per-lesion volumes) and ``<case>_preview.png``
(:func:`abdoseg.evaluation.viz.overlay_png`).
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

from abdoseg.bundle.config import BUNDLES_DIR
from abdoseg.dicom.series import MAX_NAMED_FILES, dicom_series_files, read_dicom_series
from abdoseg.io import (InputError, case_id_from_image, ensure_writable_dir, exit_if_failed, is_nifti, link_problem,
                        load_nifti, nifti_stem, save_json, save_nifti, visible_entries, voxel_spacing_mm)

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = BUNDLES_DIR / "fine_organ_tumor"
def _resolve(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symbolic link loop (Python raises RuntimeError/OSError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


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
    problem = link_problem(src) if src.is_symlink() else None
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
        problem = link_problem(p) if p.is_symlink() else None
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
    from abdoseg.bundle.pack import referenced_model_files

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
            f"\"['{bundle_dir}/configs/inference.json','{bundle_dir}/configs/train.json']\" --bundle_root {bundle_dir} "
            "--dataset_dir <FLARE-style folder>` "
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
    from abdoseg.bundle.config import load_bundle_config

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
    from abdoseg.inference.segmenter import segmenter_from_bundle  # MONAI and the networks: only once needed

    return segmenter_from_bundle(bundle, device=dev, config=configs)


class _CaseRunner:
    """``item -> (mask, affine)`` for :func:`abdoseg.inference.batch.run_batch`, with DICOM folders converted
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
    from abdoseg.evaluation.statistics import label_statistics

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
        from abdoseg.evaluation.viz import overlay_png

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
    from abdoseg.dicom.seg import series_seg

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

    from abdoseg.inference.batch import run_batch

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
