"""Dataset preparation: scan a FLARE23-style folder, validate every case, write the datalist.

``prepare`` reads a dataset root laid out like FLARE23 (or the phantom, interface 1 in the
project notes)::

    imagesTr/{id}_0000.nii.gz      labelsTr/{id}.nii.gz          (partial labels)
    unlabeledTr/{id}_0000.nii.gz   pseudo_A/{id}.nii.gz, pseudo_B/{id}.nii.gz
    imagesVal/{id}_0000.nii.gz     labelsVal/{id}.nii.gz         (full labels)

and writes (atomically) the datalist JSON read by the bundle configs with
``monai.data.load_decathlon_datalist(path, True, key, base_dir=<dataset root>)``, a Markdown
summary and a report JSON listing every rejected case with the file and the reason.

Images and pseudo labels get header-only checks (readable header, 3D, shape and affine equal
to the image's); labels are read in full (values must be integers in 0..14). One case is held in
memory per worker process.

It also turns per-structure binary mask folders (3D-IRCADb-01 ``masks_ircad/``) into a FLARE
label in memory (:func:`merge_structure_masks`) and loads the real test cases of
``data/real_ct`` (:func:`load_real_case_label`). Merged IRCAD labels must never be stored.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from abdoseg.geometry import AFFINE_TOL_MM, affine_difference_mm, affines_match
from abdoseg.io import (InputError, atomic_path, clash_reason, is_nifti, load_nifti, nifti_cases, nifti_stem, save_json,
                        visible_entries)
from abdoseg.labels import LABELS, LESION_ID, NUM_CLASSES, ORGAN_IDS


GROUPS: tuple[str, ...] = (
    "unlabeled",
    "empty",  # label file with no foreground at all (nothing annotated)
    "tumor_only",
    "partial_organs",
    "partial_organs+tumor",
    "all_organs",
    "all_organs+tumor",
)

# 3D-IRCADb-01 merge rule (data/real_ct/SOURCES.md): applied in this order, later wins.
# Patterns are fnmatch globs on the mask name without extension; "venacava" is the name some
# IRCAD patients use for their vena cava mask (labels.json: "venoussystem/venacava->6").
IRCAD_MAPPING: tuple[tuple[str, int], ...] = (
    ("artery", 5),
    ("venoussystem", 6),
    ("venacava", 6),
    ("liver", 1),
    ("rightkidney", 2),
    ("leftkidney", 13),
    ("spleen", 3),
    ("leftsurrenalgland", 8),
    ("livertumor*", 14),
    ("tumor", 14),
)

_CHUNK_VOXELS = 1 << 22  # label value checks run on 4M-voxel chunks to bound temporary memory


# --------------------------------------------------------------------------- pure label logic
def group_of(annotated_classes: Iterable[int]) -> str:
    """Group of a labeled case from the classes present in its (partial) label.

    No organ: ``tumor_only`` (lesion present) or ``empty``; all 13 organs: ``all_organs``; else
    ``partial_organs``; ``+tumor`` is appended when the lesion class (14) is present.
    """
    present = {int(c) for c in annotated_classes}
    organs = present & set(ORGAN_IDS)
    tumor = LESION_ID in present
    if not organs:
        return "tumor_only" if tumor else "empty"
    base = "all_organs" if len(organs) == len(ORGAN_IDS) else "partial_organs"
    return base + ("+tumor" if tumor else "")


def label_class_counts(label: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Voxel count per class 0..14 of a label array (any shape), or ``(None, reason)``.

    The reason says why the array is not a FLARE label: non-finite or non-integer values, or
    values outside 0..14 (the first few offending values are quoted).
    """
    flat = np.asarray(label).reshape(-1)
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    is_int = np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_
    if not is_int and not np.issubdtype(flat.dtype, np.floating):
        return None, f"label dtype {flat.dtype} is not numeric"
    for start in range(0, flat.size, _CHUNK_VOXELS):
        chunk = flat[start:start + _CHUNK_VOXELS]
        if not is_int:
            finite = np.isfinite(chunk)
            if not finite.all():
                return None, "label has non-finite values (NaN/inf)"
            frac = chunk != np.floor(chunk)
            if frac.any():
                bad = np.unique(chunk[frac])[:5]
                return None, f"label has non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)})"
        lo, hi = chunk.min(), chunk.max()
        if lo < 0 or hi > NUM_CLASSES - 1:
            bad = np.unique(chunk[(chunk < 0) | (chunk > NUM_CLASSES - 1)])[:5]
            return None, (f"label values outside 0..{NUM_CLASSES - 1} "
                          f"(e.g. {', '.join(f'{v:g}' for v in bad.astype(np.float64))})")
        counts += np.bincount(chunk.astype(np.intp), minlength=NUM_CLASSES)
    return counts, None


# --------------------------------------------------------------------------- per-case checks
@dataclass
class _Task:
    case_id: str
    split: str  # "train_labeled" | "unlabeled" | "validation"
    image: Path
    label: Path | None = None
    pseudo: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Result:
    case_id: str
    split: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    class_voxels: dict[int, int] | None = None


def _header(path: Path, what: str, res: _Result) -> nib.Nifti1Image | None:
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        res.problems.append((str(path), f"{what} file not found"))
    except Exception as exc:  # nibabel raises many types for corrupt input
        res.problems.append((str(path), f"unreadable {what} ({type(exc).__name__}: {exc})"))
    return None


def _same_grid(img: Any, ref: Any, path: Path, what: str, res: _Result) -> bool:
    if tuple(img.shape) != tuple(ref.shape):
        res.problems.append((str(path), f"{what} shape {list(img.shape)} != image shape {list(ref.shape)}"))
        return False
    diff = affine_difference_mm(img.affine, ref.affine)
    if diff > AFFINE_TOL_MM:
        res.problems.append((str(path), f"{what} affine differs from the image affine by {diff:.4g} mm "
                                        f"(tolerance {AFFINE_TOL_MM:g} mm)"))
        return False
    return True


def _check_case(task: _Task) -> _Result:
    """Validate one case; worker function of the pool (one case in memory at a time)."""
    res = _Result(task.case_id, task.split)
    img = _header(task.image, "image", res)
    if img is None:
        return res
    if len(img.shape) != 3:
        res.problems.append((str(task.image), f"image is not 3D (shape {list(img.shape)})"))
        return res
    res.shape = [int(s) for s in img.shape]
    res.spacing_mm = [round(float(z), 6) for z in img.header.get_zooms()[:3]]
    for key, path in task.pseudo.items():
        p = _header(path, f"pseudo label {key}", res)
        if p is not None:
            _same_grid(p, img, path, f"pseudo label {key}", res)
    if task.label is not None:
        lab = _header(task.label, "label", res)
        if lab is not None and _same_grid(lab, img, task.label, "label", res):
            try:
                arr = np.asanyarray(lab.dataobj)
            except Exception as exc:
                res.problems.append((str(task.label), f"unreadable label data ({type(exc).__name__}: {exc})"))
                return res
            counts, reason = label_class_counts(arr)
            del arr
            if reason is not None:
                res.problems.append((str(task.label), reason))
            else:
                res.class_voxels = {c: int(counts[c]) for c in range(1, NUM_CLASSES) if counts[c] > 0}
    return res


# --------------------------------------------------------------------------- folder scanning
def _pseudo_folders(pseudo: Sequence[str] | Mapping[str, str] | str | None) -> dict[str, str]:
    """Datalist key -> folder. A sequence of folder names gets keys pseudo_A, pseudo_B, ..."""
    if not pseudo:
        return {}
    if isinstance(pseudo, str):
        pseudo = [p for p in pseudo.split(",") if p]
    if isinstance(pseudo, Mapping):
        return {str(k): str(v) for k, v in pseudo.items()}
    return {f"pseudo_{chr(ord('A') + i)}": str(f) for i, f in enumerate(pseudo)}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _resolve_out(data_dir: Path, out: str | os.PathLike | None) -> Path:
    if out is None:
        return data_dir / "datalist.json"
    out_p = Path(out).expanduser().resolve()
    if out_p.is_dir() or str(out).endswith(("/", os.sep)):
        return out_p / "datalist.json"
    return out_p


# --------------------------------------------------------------------------- the command
def prepare(data_dir: str, out: str | None = None, strict: bool = False, workers: int = 2,
            images: str = "imagesTr", labels: str = "labelsTr", unlabeled: str | None = "unlabeledTr",
            pseudo: Sequence[str] | Mapping[str, str] | None = ("pseudo_A", "pseudo_B"),
            val_images: str | None = "imagesVal", val_labels: str | None = "labelsVal",
            dataset_json: bool = True, quiet: bool = False) -> str:
    """Scan a FLARE23-style dataset root, validate every case and write the datalist JSON.

    Args:
        data_dir: dataset root; all datalist paths are relative to it.
        out: datalist JSON path (default ``<data_dir>/datalist.json``; an existing folder gets
            ``datalist.json`` inside). The summary (``<stem>_summary.md``) and report
            (``<stem>_report.json``) are written next to it. Nothing else is written.
        strict: raise :class:`InputError` (CLI: exit 1) on the first problem; nothing is written.
            Otherwise bad cases are left out, listed under ``problems`` and the rest is written.
        workers: processes checking cases (``<= 1``: in this process).
        images, labels: labeled training images / partial labels folders.
        unlabeled: unlabeled images folder (``None`` or absent: none).
        pseudo: pseudo-label folders: a sequence (datalist keys pseudo_A, pseudo_B, ... in order)
            or a mapping {datalist key: folder}. An absent folder drops its key (noted in the
            summary); a present folder must hold a file for every training case.
        val_images, val_labels: validation images / full labels folders (``None``/absent: none).
        dataset_json: when ``<data_dir>/dataset.json`` declares ``cases[id].annotated_classes``
            (the phantom does), use those as a case's annotated classes (they may list a class
            that is annotated but absent, e.g. lesion in a tumor-free case); a label holding an
            undeclared class is then a problem. Otherwise (real FLARE23) the annotated classes
            are the classes present in the label.
        quiet: do not print the summary.

    Images and pseudo labels get header-only checks (truncated image data is not detected);
    labels are read in full. Groups (:data:`GROUPS`) follow the annotated classes.

    Returns:
        The datalist path (str).
    """
    t0 = time.perf_counter()
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    out_path = _resolve_out(root, out)
    pseudo_map = _pseudo_folders(pseudo)
    notes: list[str] = []
    problems: list[dict[str, str]] = []

    def problem(case_id: str, split: str, file: str, reason: str) -> None:
        if strict:
            raise InputError(file, f"{reason} (case {case_id})")
        problems.append({"case": case_id, "split": split, "file": file, "reason": reason})

    present_pseudo: dict[str, Path] = {}
    for key, folder in pseudo_map.items():
        if (root / folder).is_dir():
            present_pseudo[key] = root / folder
        else:
            notes.append(f"pseudo-label folder '{folder}' not found: key '{key}' omitted")
    pseudo_scan = {key: nifti_cases(p) for key, p in present_pseudo.items()}
    pseudo_files = {key: files for key, (files, _) in pseudo_scan.items()}
    pseudo_clashes = {key: clashes for key, (_, clashes) in pseudo_scan.items()}
    declared = _declared_annotations(root) if dataset_json else {}
    if declared:
        notes.append(f"annotated classes of {len(declared)} cases taken from dataset.json")

    tasks: list[_Task] = []
    seen: dict[str, str] = {}  # case id -> images folder it was first found in

    def add_images(img_folder: str | None, lab_folder: str | None, split: str) -> None:
        if not img_folder:
            return
        img_dir = root / img_folder
        if not img_dir.is_dir():
            notes.append(f"folder '{img_folder}' not found: no {split} cases")
            return
        imgs, img_clashes = nifti_cases(img_dir)
        labs, lab_clashes = nifti_cases(root / lab_folder) if lab_folder else ({}, {})
        for cid, lab in labs.items():
            if cid not in imgs:
                problem(cid, split, str(lab), f"label without image (no {img_folder}/{cid}_0000.nii.gz)")
        for cid, img in imgs.items():
            if cid in seen:
                problem(cid, split, str(img), f"case id already used in {seen[cid]}")
                continue
            seen[cid] = img_folder
            clash = img_clashes.get(cid) or lab_clashes.get(cid) or next(
                (c[cid] for c in pseudo_clashes.values() if cid in c and split != "validation"), None)
            if clash:  # which file is the image (or label) of this case is ambiguous: never guess
                problem(cid, split, str(clash[-1]), clash_reason(cid, clash))
                continue
            task = _Task(cid, split, img)
            if lab_folder is not None:
                if cid not in labs:
                    problem(cid, split, str(img), f"image without label (no {lab_folder}/{cid}.nii.gz)")
                    continue
                task.label = labs[cid]
            if split != "validation":
                missing = [k for k in present_pseudo if cid not in pseudo_files[k]]
                if missing:
                    for k in missing:
                        problem(cid, split, str(img), f"no pseudo label {k} ({pseudo_map[k]}/{cid}.nii.gz)")
                    continue
                task.pseudo = {k: pseudo_files[k][cid] for k in present_pseudo}
            tasks.append(task)

    add_images(images, labels, "train_labeled")
    add_images(unlabeled, None, "unlabeled")
    if val_images and (root / val_images).is_dir() and not (val_labels and (root / val_labels).is_dir()):
        notes.append(f"validation labels folder '{val_labels}' not found: validation images skipped")
    elif val_images:
        add_images(val_images, val_labels, "validation")
    if not tasks and not problems:
        raise InputError(root, f"no cases found (looked for NIfTI files in '{images}', '{unlabeled}', "
                               f"'{val_images}')")

    results = _run_checks(tasks, workers, strict)

    datalist: dict[str, list[dict[str, Any]]] = {"training": [], "training_all_organs": [], "training_with_lesion": [],
                                                 "unlabeled": [], "validation": []}
    cases: dict[str, dict[str, Any]] = {}
    for task, res in zip(tasks, results):
        for file, reason in res.problems:
            problem(res.case_id, res.split, file, reason)
        if res.problems:
            continue
        info: dict[str, Any] = {"split": res.split, "shape": res.shape, "spacing_mm": res.spacing_mm}
        item: dict[str, Any] = {"image": _rel(task.image, root)}
        if res.split == "unlabeled":
            info["group"] = "unlabeled"
            item.update({k: _rel(p, root) for k, p in task.pseudo.items()})
            datalist["unlabeled"].append(item)
        else:
            assert task.label is not None and res.class_voxels is not None
            present = sorted(res.class_voxels)
            annotated = present
            if res.split != "validation" and res.case_id in declared:
                annotated = declared[res.case_id]
                undeclared = sorted(set(present) - set(annotated))
                if undeclared:
                    problem(res.case_id, res.split, str(task.label),
                            f"label holds classes {undeclared} not declared annotated in dataset.json")
                    continue
                info["annotation_source"] = "dataset.json"
            info["annotated_classes"] = annotated
            info["present_classes"] = present
            info["class_voxels"] = {str(c): n for c, n in res.class_voxels.items()}
            item["label"] = _rel(task.label, root)
            if res.split == "validation":
                datalist["validation"].append(item)
            else:
                group = group_of(annotated)
                info["group"] = group
                item.update({"annotated_classes": annotated, "group": group})
                item.update({k: _rel(p, root) for k, p in task.pseudo.items()})
                datalist["training"].append(item)
                if group.startswith("all_organs"):
                    datalist["training_all_organs"].append(item)
                if LESION_ID in annotated:
                    datalist["training_with_lesion"].append(item)
        cases[res.case_id] = info

    group_counts = {g: 0 for g in GROUPS}
    class_counts = {c: 0 for c in range(1, NUM_CLASSES)}
    for item in datalist["training"]:
        group_counts[item["group"]] += 1
        for c in item["annotated_classes"]:
            class_counts[c] += 1
    group_counts["unlabeled"] = len(datalist["unlabeled"])
    report = {
        "data_dir": str(root),
        "datalist": str(out_path),
        "folders": {"images": images, "labels": labels, "unlabeled": unlabeled,
                    "pseudo": {k: pseudo_map[k] for k in present_pseudo},
                    "val_images": val_images, "val_labels": val_labels},
        "counts": {k: len(v) for k, v in datalist.items()},
        "groups": group_counts,
        "class_annotation_counts": {str(c): n for c, n in class_counts.items()},
        "problems": problems,
        "notes": notes,
        "cases": cases,
    }
    summary = _summary_markdown(report)
    summary_path = out_path.with_name(out_path.stem + "_summary.md")
    report_path = out_path.with_name(out_path.stem + "_report.json")
    save_json(datalist, out_path)
    save_json(report, report_path)
    with atomic_path(summary_path) as tmp:
        tmp.write_text(summary)
    if not quiet:
        print(summary)
        print(f"prepare: {len(tasks)} cases checked in {time.perf_counter() - t0:.1f} s; "
              f"wrote {out_path}, {summary_path.name}, {report_path.name}", file=sys.stderr)
        if problems:
            print(f"prepare: {len(problems)} problem(s): those cases are left out (see {report_path})",
                  file=sys.stderr)
    return str(out_path)


def _declared_annotations(root: Path) -> dict[str, list[int]]:
    """{case id: annotated class ids 1..14} declared in ``root/dataset.json`` (phantom style)."""
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    cases = meta.get("cases") if isinstance(meta, dict) else None
    out: dict[str, list[int]] = {}
    if not isinstance(cases, dict):
        return out
    for cid, c in cases.items():
        if isinstance(c, dict) and isinstance(c.get("annotated_classes"), list):
            try:
                ids = sorted({int(x) for x in c["annotated_classes"]})
            except (TypeError, ValueError) as exc:
                raise InputError(path, f"case {cid}: annotated_classes not integers") from exc
            if any(not 1 <= x <= NUM_CLASSES - 1 for x in ids):
                raise InputError(path, f"case {cid}: annotated_classes outside 1..{NUM_CLASSES - 1}")
            out[str(cid)] = ids
    return out


def _run_checks(tasks: list[_Task], workers: int, strict: bool) -> list[_Result]:
    """Check the cases in order (``imap``: deterministic order, one case per worker at a time)."""
    from tqdm import tqdm

    results: list[_Result] = []
    bar = dict(total=len(tasks), desc="prepare", unit="case", disable=None, file=sys.stderr)
    if workers <= 1 or len(tasks) <= 1:
        it: Iterable[_Result] = map(_check_case, tasks)
        for res in tqdm(it, **bar):
            results.append(res)
            if strict and res.problems:
                break
        return results
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(processes=min(workers, len(tasks))) as pool:
        for res in tqdm(pool.imap(_check_case, tasks, chunksize=1), **bar):
            results.append(res)
            if strict and res.problems:
                break  # leaving the with-block terminates the pool
    return results


def _summary_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Dataset summary: {report['data_dir']}", "",
             "| split | cases |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in report["counts"].items()]
    lines += ["", "| group | cases |", "|---|---|"]
    lines += [f"| {g} | {n} |" for g, n in report["groups"].items()]
    lines += ["", "| class | name | labeled training cases annotating it |", "|---|---|---|"]
    lines += [f"| {c} | {LABELS[int(c)]} | {n} |" for c, n in report["class_annotation_counts"].items()]
    lines += ["", f"## Problems ({len(report['problems'])}; these cases are left out)", ""]
    if report["problems"]:
        lines += ["| case | split | file | reason |", "|---|---|---|---|"]
        lines += [f"| {p['case']} | {p['split']} | {Path(p['file']).name} | {p['reason'].replace('|', '/')} |"
                  for p in report["problems"]]
    else:
        lines.append("none")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- structure masks
def merge_structure_masks(mask_dir: str | os.PathLike,
                          mapping: Sequence[tuple[str, int]] | Mapping[str, int] = IRCAD_MAPPING,
                          ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Merge per-structure binary masks into one FLARE label, in memory (never written).

    Args:
        mask_dir: folder of ``<structure>.nii.gz`` binary masks on one grid (nonzero = inside).
        mapping: ordered (glob pattern on the structure name, FLARE class id); applied in order,
            later wins; masks matching several patterns are written once per match; masks
            matching no pattern are ignored. Default: the IRCAD rule :data:`IRCAD_MAPPING`.

    Returns:
        ``(label, affine, annotated_classes)``: label uint8 (i, j, k) in the masks' voxel order,
        the 4x4 affine (mm), and the sorted class ids present in the merged label.

    Raises:
        InputError: missing folder, no mask matching the mapping, unreadable mask, masks of
        different shapes/affines, or a class id outside 1..14.
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise InputError(mask_dir, "mask folder not found")
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    files = [p for p in visible_entries(mask_dir) if p.is_file() and is_nifti(p)]
    plan: list[tuple[Path, int]] = []
    for pattern, cls in pairs:
        if not 1 <= int(cls) <= NUM_CLASSES - 1:
            raise InputError(mask_dir, f"mapping class {cls} for '{pattern}' outside 1..{NUM_CLASSES - 1}")
        plan += [(p, int(cls)) for p in files if fnmatch.fnmatchcase(nifti_stem(p), pattern)]
    if not plan:
        raise InputError(mask_dir, f"no mask matches the mapping ({', '.join(p for p, _ in pairs)})")
    label: np.ndarray | None = None
    affine: np.ndarray | None = None
    for path, cls in plan:
        mask, aff, _ = load_nifti(path)
        if mask.ndim != 3:
            raise InputError(path, f"mask is not 3D (shape {list(mask.shape)})")
        if label is None:
            label = np.zeros(mask.shape, dtype=np.uint8)
            affine = aff
        elif mask.shape != label.shape:
            raise InputError(path, f"mask shape {list(mask.shape)} != {list(label.shape)} of {plan[0][0].name}")
        elif not affines_match(aff, affine):
            raise InputError(path, f"mask affine differs from that of {plan[0][0].name}")
        label[mask != 0] = cls
        del mask
    assert label is not None and affine is not None
    present = np.flatnonzero(np.bincount(label.reshape(-1), minlength=NUM_CLASSES)[1:]) + 1
    return label, affine, [int(c) for c in present]


def load_real_case_label(case_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """FLARE label of a ``data/real_ct`` case, in memory: ``(label uint8, affine, annotated)``.

    ``labels.json`` with a ``label_file`` (e.g. totalseg_example_sm): that label (already in
    FLARE order) is read. Without one (IRCAD cases): ``masks_ircad/`` is merged with
    :data:`IRCAD_MAPPING`. ``annotated`` comes from ``labels.json`` ``present_classes`` (mapped to
    ids through its ``mapping``); a label holding a class not listed there raises InputError.
    """
    case_dir = Path(case_dir)
    meta_path = case_dir / "labels.json"
    if not meta_path.is_file():
        raise InputError(meta_path, "file not found")
    try:
        meta = json.loads(meta_path.read_text())
        name_to_id = {str(n): int(i) for i, n in meta["mapping"].items()}
        annotated = sorted(name_to_id[n] for n in meta["present_classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(meta_path, f"not a valid labels.json ({type(exc).__name__}: {exc})") from exc
    if meta.get("label_file"):
        label_path = case_dir / meta["label_file"]
        arr, affine, _ = load_nifti(label_path)
        counts, reason = label_class_counts(arr)
        if reason is not None:
            raise InputError(label_path, reason)
        label = arr.astype(np.uint8)
        present = [int(c) for c in np.flatnonzero(counts[1:]) + 1]
    else:
        label_path = case_dir / "masks_ircad"
        label, affine, present = merge_structure_masks(label_path, IRCAD_MAPPING)
    extra = sorted(set(present) - set(annotated))
    if extra:
        raise InputError(label_path, f"label holds classes {extra} not listed as present in {meta_path.name}")
    return label, affine, annotated
