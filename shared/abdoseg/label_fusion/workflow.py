"""Label-fusion workflow over a datalist: fused label NIfTIs, uncertainty selection, new datalist.

Two steps, each a function called by a config of the ``label_fusion`` bundle:

1. :func:`fuse_datalist` (``configs/fuse.json``): for every case of the datalist apply the rule
   set chosen in the config and write ``<fused_dir>/<case_id>.nii.gz`` (uint8, the image's
   affine) plus ``<fused_dir>/fuse_report.json`` (one row per case).

   * ``"seed003"``: labeled cases -> :func:`abdoseg.label_fusion.rules.fuse_labeled` (partial label,
     pseudo_A, pseudo_B, annotated_classes); unlabeled cases ->
     :func:`abdoseg.label_fusion.rules.fuse_unlabeled` (S1 = first teacher checkpoint, pseudo_A, pseudo_B,
     lesion votes = all teacher checkpoints, e.g. S1, S2, S3).
   * ``"seed004"``: labeled cases -> :func:`abdoseg.label_fusion.rules.supplement_weak_label` (partial label,
     teacher = first checkpoint). Seed 004 does not use unlabeled cases: they are skipped
     unless ``seed004_unlabeled="teacher_organs"`` (the teacher's organs, no lesion).
   * ``"seed001"`` (the round rule of seed 001): labeled cases ->
     :func:`abdoseg.label_fusion.rules.fill_from_prediction` (partial label, prediction = first teacher
     checkpoint, annotated_classes: every unannotated class, lesion included, from the
     prediction); unlabeled cases -> the prediction itself (organs and lesion).

   "Voxels changed per class" compare the fused label with the case's existing annotation:
   the partial label for labeled cases, nothing (all background) for unlabeled cases.

2. :func:`select_and_write` (``configs/select.json``): uncertainty score per case between the
   teacher's pseudo labels of consecutive rounds (seed 001 eq. 1,
   :func:`abdoseg.label_fusion.uncertainty.uncertainty_score`), selection
   (:func:`abdoseg.label_fusion.uncertainty.select_cases`; ``defer_selection=True`` reports the scores but
   keeps every fused case, for the rounds before seed 001's single selection), then the new datalist (interface 2: ``training``
   items point at fused labels with ``annotated_classes`` = 1..14) and the report (JSON + CSV):
   per case the rule, voxels changed per class, uncertainty score, selected or rejected.

The bundle's teacher is the fine cascade itself: ``configs/inference.json`` is the
fine_organ_tumor bundle's file (a link in the repository, inlined by ``abdoseg pack``).

Bad input: a partial label or pseudo label whose header shape or affine differs from the
image's is never resampled or fused -- the case is skipped and the reason names the files
(header-level check with nibabel, affine tolerance :data:`abdoseg.geometry.AFFINE_TOL_MM`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from abdoseg.data.prepare import group_of
from abdoseg.geometry import AFFINE_TOL_MM, affine_difference_mm, affines_match
from abdoseg.label_fusion.rules import fill_from_prediction, fuse_labeled, fuse_unlabeled, fusion_report, supplement_weak_label
from abdoseg.io import InputError, atomic_path, save_json, save_nifti
from abdoseg.labels import FOREGROUND_IDS, LABELS, LESION_ID, ORGAN_IDS
from abdoseg.label_fusion.pseudo_label import DEFAULT_KEYS, datalist_items
from abdoseg.label_fusion.uncertainty import select_cases, uncertainty_score

logger = logging.getLogger(__name__)

RULE_SETS: tuple[str, ...] = ("seed001", "seed003", "seed004")
FUSE_REPORT_NAME = "fuse_report.json"
CSV_CLASS_IDS: tuple[int, ...] = tuple(range(0, 15))


# --------------------------------------------------------------------------- header checks
def geometry_problems(image: str | os.PathLike, others: Mapping[str, str | os.PathLike]) -> list[str]:
    """Header-level check of label files against their image (no voxel data read).

    Args:
        image: image path (reference grid).
        others: ``{role: path}`` (e.g. ``{"label": ..., "pseudo_A": ...}``).
    Returns:
        problems, each naming the file(s): missing/unreadable file, shape differing from the
        image's, affine differing by more than ``AFFINE_TOL_MM``. Empty list = all match.
    """
    problems: list[str] = []
    try:
        ref = nib.load(str(image))
    except FileNotFoundError:
        return [f"{image}: image file not found"]
    except Exception as exc:
        return [f"{image}: image is not a readable NIfTI ({type(exc).__name__}: {exc})"]
    ref_shape = tuple(int(s) for s in ref.shape)
    for role, path in others.items():
        if not Path(path).is_file():
            problems.append(f"{path}: {role} file not found")
            continue
        try:
            img = nib.load(str(path))
        except Exception as exc:
            problems.append(f"{path}: {role} is not a readable NIfTI ({type(exc).__name__}: {exc})")
            continue
        shape = tuple(int(s) for s in img.shape)
        if shape != ref_shape:
            problems.append(f"{path}: {role} shape {shape} differs from image {image} shape {ref_shape}")
        elif not affines_match(img.affine, ref.affine):
            diff = affine_difference_mm(img.affine, ref.affine)
            problems.append(f"{path}: {role} affine differs from image {image} affine "
                            f"(max entry difference {diff:.4g} mm > {AFFINE_TOL_MM} mm)")
    return problems


def _load_label(path: str | os.PathLike) -> np.ndarray:
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if not np.issubdtype(arr.dtype, np.integer):
        arr = np.rint(arr).astype(np.int16)
    return arr


def _teacher_path(pseudo_dir: str | os.PathLike, name: str, case_id: str) -> str:
    return str(Path(pseudo_dir) / name / f"{case_id}.nii.gz")


# --------------------------------------------------------------------------- per case
def fuse_case(item: Mapping[str, Any], rule: str, pseudo_dir: str | os.PathLike | None,
              teacher_names: Sequence[str], fused_path: str | os.PathLike,
              seed004_unlabeled: str = "skip") -> dict[str, Any]:
    """Fuse one case and write its label atomically; returns its report row.

    Args:
        item: datalist item with absolute paths, ``case_id`` and ``split`` ("training" =
            labeled, else unlabeled); labeled items have ``label`` and ``annotated_classes``.
        rule: ``"seed001"``, ``"seed003"`` or ``"seed004"`` (see module docstring).
        pseudo_dir: folder holding ``<name>/<case_id>.nii.gz`` per teacher checkpoint name.
        teacher_names: checkpoint names, first = S1 / the teacher.
        fused_path: output file.
        seed004_unlabeled: ``"skip"`` or ``"teacher_organs"``.
    Returns:
        row ``{"case_id", "split", "rule", "status" ("fused" | "skipped"), "reason",
        "image", "fused_label", "changed_voxels", "classes": fusion_report classes}``.
    """
    if rule not in RULE_SETS:
        raise ValueError(f"unknown rule set {rule!r}; choose one of {RULE_SETS}")
    cid = str(item["case_id"])
    labeled = "label" in item
    row: dict[str, Any] = {"case_id": cid, "split": item.get("split", "training" if labeled else "unlabeled"),
                           "labeled": labeled, "rule": "", "status": "skipped", "reason": "",
                           "image": str(item["image"]), "fused_label": None, "changed_voxels": None,
                           "classes": {}}
    teachers = [_teacher_path(pseudo_dir, n, cid) for n in teacher_names] if pseudo_dir else []
    files: dict[str, str] = {}
    if labeled:
        files["label"] = str(item["label"])
    if rule == "seed003":
        row["rule"] = "seed003_labeled" if labeled else "seed003_unlabeled"
        for key in ("pseudo_A", "pseudo_B"):
            if key not in item:
                row["reason"] = f"rule seed003 needs {key}, the datalist item has none"
                return row
            files[key] = str(item[key])
        if not labeled:
            if not teachers:
                row["reason"] = "rule seed003 on an unlabeled case needs teacher pseudo labels (S1)"
                return row
            files.update({f"teacher:{n}": p for n, p in zip(teacher_names, teachers)})
    elif rule == "seed001":
        row["rule"] = "seed001_labeled" if labeled else "seed001_unlabeled"
        if not teachers:
            row["reason"] = "rule seed001 needs the previous round's prediction (teacher pseudo labels)"
            return row
        files[f"teacher:{teacher_names[0]}"] = teachers[0]
    else:
        if not labeled and seed004_unlabeled == "skip":
            row["rule"] = "seed004"
            row["reason"] = "rule seed004 does not use unlabeled cases (seed004_unlabeled='skip')"
            return row
        row["rule"] = "seed004_weak_label" if labeled else "seed004_teacher_organs"
        if not teachers:
            row["reason"] = "rule seed004 needs teacher pseudo labels"
            return row
        files[f"teacher:{teacher_names[0]}"] = teachers[0]
    problems = geometry_problems(item["image"], files)
    if problems:
        row["reason"] = "; ".join(problems)
        return row

    arrays = {role: _load_label(p) for role, p in files.items()}
    t = [arrays[f"teacher:{n}"] for n in teacher_names if f"teacher:{n}" in arrays]
    try:
        if labeled:
            before = arrays["label"]
            annotated = item.get("annotated_classes")
            if rule == "seed003":
                fused = fuse_labeled(before, arrays["pseudo_A"], arrays["pseudo_B"], annotated)
            elif rule == "seed001":
                fused = fill_from_prediction(before, t[0], annotated)
            else:
                fused = supplement_weak_label(before, t[0], annotated)
        else:
            before = np.zeros(np.shape(next(iter(arrays.values()))), dtype=np.uint8)
            if rule == "seed003":
                fused = fuse_unlabeled(t[0], arrays["pseudo_A"], arrays["pseudo_B"], lesion_votes=t)
            elif rule == "seed001":
                fused = fill_from_prediction(None, t[0])
            else:
                fused = supplement_weak_label(before, t[0], annotated_classes=[])
    except ValueError as exc:  # label values the rules reject (ids outside 0..14, organ-only violations)
        row["reason"] = f"{cid}: {exc} (files: {', '.join(files.values())})"
        return row
    fused = np.asarray(fused).astype(np.uint8)
    affine = nib.load(str(item["image"])).affine
    save_nifti(fused, affine, fused_path)
    rep = fusion_report(before.astype(np.int16), fused)
    row.update({"status": "fused", "fused_label": str(fused_path), "changed_voxels": rep["changed_voxels"],
                "total_voxels": rep["total_voxels"], "classes": rep["classes"],
                "present_classes": [int(c) for c in np.unique(fused) if c != 0]})
    return row


# --------------------------------------------------------------------------- step 1: fusion
def fuse_datalist(datalist: str | os.PathLike, fused_dir: str | os.PathLike, rule: str = "seed003",
                  pseudo_dir: str | os.PathLike | None = None, teacher_names: Sequence[str] = ("model",),
                  dataset_dir: str | os.PathLike | None = None, keys: Sequence[str] = DEFAULT_KEYS,
                  seed004_unlabeled: str = "skip") -> list[dict[str, Any]]:
    """Fuse every case of ``keys`` in ``datalist``; write fused NIfTIs and ``fuse_report.json``.

    Args:
        datalist: interface-2 datalist (paths relative to ``dataset_dir``, default its folder).
        fused_dir: output folder (``<case_id>.nii.gz`` + ``fuse_report.json``).
        rule: ``"seed001"``, ``"seed003"`` or ``"seed004"``.
        pseudo_dir: teacher pseudo labels ``<pseudo_dir>/<name>/<case_id>.nii.gz``.
        teacher_names: teacher checkpoint names, first = S1 / teacher (seed003 lesion votes use
            all of them).
        keys: datalist sections; ``training`` items are labeled, ``unlabeled`` ones are not.
        seed004_unlabeled: ``"skip"`` (paper) or ``"teacher_organs"``.
    Returns:
        the report rows (also written to ``<fused_dir>/fuse_report.json``).
    """
    if rule not in RULE_SETS:
        raise ValueError(f"unknown rule set {rule!r}; choose one of {RULE_SETS}")
    if seed004_unlabeled not in ("skip", "teacher_organs"):
        raise ValueError(f"seed004_unlabeled must be 'skip' or 'teacher_organs', got {seed004_unlabeled!r}")
    items = datalist_items(datalist, dataset_dir, keys)
    fused_dir = Path(fused_dir)
    fused_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in tqdm(items, desc=f"fuse ({rule})", unit="case", disable=None, file=sys.stderr):
        row = fuse_case(item, rule, pseudo_dir, list(teacher_names), fused_dir / f"{item['case_id']}.nii.gz",
                        seed004_unlabeled)
        if row["status"] != "fused":
            logger.warning("skipped %s: %s", row["case_id"], row["reason"])
        rows.append(row)
    save_json({"rule": rule, "datalist": str(datalist), "pseudo_dir": str(pseudo_dir) if pseudo_dir else None,
               "teacher_names": list(teacher_names), "cases": rows}, fused_dir / FUSE_REPORT_NAME)
    n_ok = sum(r["status"] == "fused" for r in rows)
    print(f"fuse: {n_ok} fused, {len(rows) - n_ok} skipped -> {fused_dir}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- step 2: selection
def case_scores(case_ids: Sequence[str], history_dirs: Sequence[str | os.PathLike]) -> dict[str, tuple[float | None, str]]:
    """Seed 001 uncertainty score of each case from its pseudo labels in consecutive rounds.

    Args:
        case_ids: cases to score.
        history_dirs: folders ``<dir>/<case_id>.nii.gz`` of the teacher's pseudo labels, one per
            round, oldest first.
    Returns:
        ``{case_id: (score or None, note)}``; ``None`` with a note when fewer than two rounds
        have the case or their headers do not match (never resampled).
    """
    out: dict[str, tuple[float | None, str]] = {}
    for cid in case_ids:
        paths = [Path(d) / f"{cid}.nii.gz" for d in history_dirs]
        paths = [p for p in paths if p.is_file()]
        if len(paths) < 2:
            out[cid] = (None, f"pseudo labels of {len(paths)} round(s): no uncertainty score")
            continue
        problems = [q for p in paths[:-1]
                    for q in geometry_problems(paths[-1], {"pseudo label of an earlier round": str(p)})]
        if problems:
            out[cid] = (None, "; ".join(problems))
            continue
        out[cid] = (uncertainty_score([_load_label(p) for p in paths]), f"{len(paths)} rounds")
    return out


def _rel(path: str | os.PathLike, root: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


def _fmt_score(s: float | None) -> str:
    if s is None:
        return ""
    return "inf" if math.isinf(s) else f"{s:.6g}"


def select_and_write(fused_dir: str | os.PathLike, datalist: str | os.PathLike, out_datalist: str | os.PathLike,
                     report_path: str | os.PathLike, history_dirs: Sequence[str | os.PathLike] = (),
                     threshold: float | None = None, keep_fraction: float | None = None,
                     dataset_dir: str | os.PathLike | None = None, defer_selection: bool = False) -> dict[str, Any]:
    """Score, select, and write the new datalist and the report (JSON + CSV next to it).

    Selection: labeled cases whose partial label annotates all 13 organs are always selected
    ("fully labeled"); cases without a score (fewer than two rounds) are selected ("no
    uncertainty score yet"); the others go through :func:`abdoseg.label_fusion.uncertainty.select_cases` with
    ``threshold`` / ``keep_fraction`` (both ``None``: all selected). Skipped cases are rejected.
    ``defer_selection=True``: scores are computed and reported, but every fused case is selected
    (seed 001 trains its intermediate rounds on all data and selects once, before the final
    training).

    New datalist (paths relative to the dataset root): ``training`` = selected fused cases
    (``label`` = fused file, ``annotated_classes`` = 1..14, ``group`` from the classes present,
    pseudo_A/B kept), ``training_all_organs`` = those whose fused label holds all 13 organs,
    ``training_with_lesion`` = those whose fused label holds a lesion (seed 002's tumor model),
    ``unlabeled`` = the source's unlabeled items not in ``training``, ``validation`` copied.

    Returns:
        the report dict (also written to ``report_path`` and ``report_path`` with ``.csv``).
    """
    fused_dir = Path(fused_dir)
    fuse_rep_path = fused_dir / FUSE_REPORT_NAME
    if not fuse_rep_path.is_file():
        raise InputError(fuse_rep_path, "fusion report not found (run the fuse step first)")
    fuse_rep = json.loads(fuse_rep_path.read_text())
    rows: list[dict[str, Any]] = fuse_rep["cases"]
    dl_path = Path(datalist)
    root = Path(dataset_dir) if dataset_dir is not None else dl_path.parent
    source = json.loads(dl_path.read_text())
    src_items = {Path(it["image"]).name: it for key in ("training", "unlabeled") for it in source.get(key, [])}

    fused_ids = [r["case_id"] for r in rows if r["status"] == "fused"]
    scores = case_scores(fused_ids, history_dirs)
    full = {r["case_id"] for r in rows if r["status"] == "fused" and r["labeled"]
            and set(ORGAN_IDS) <= set(src_items.get(Path(r["image"]).name, {}).get("annotated_classes", []))}
    to_judge = {cid: s for cid, (s, _) in scores.items() if s is not None and cid not in full}
    if to_judge and (threshold is not None or keep_fraction is not None):
        sel, _ = select_cases({k: float(v) for k, v in to_judge.items()}, threshold, keep_fraction)
        selected_judged = set(sel)
    else:
        selected_judged = {cid for cid, s in to_judge.items() if math.isfinite(s)}

    new: dict[str, list[dict[str, Any]]] = {"training": [], "training_all_organs": [], "training_with_lesion": [],
                                            "unlabeled": [],
                                            "validation": list(source.get("validation", []))}
    for r in rows:
        cid = r["case_id"]
        score, note = scores.get(cid, (None, ""))
        r["uncertainty"] = score
        if r["status"] != "fused":
            r["selected"], r["selection_reason"] = False, f"not fused: {r['reason']}"
        elif cid in full:
            r["selected"], r["selection_reason"] = True, "fully labeled (13 organs annotated)"
        elif score is None:
            r["selected"], r["selection_reason"] = True, f"no uncertainty score yet ({note})"
        elif defer_selection:
            r["selected"], r["selection_reason"] = True, "selection deferred to the last round (score reported only)"
        else:
            r["selected"] = cid in selected_judged
            r["selection_reason"] = "uncertainty " + ("kept" if r["selected"] else "rejected") + \
                f" (threshold={threshold}, keep_fraction={keep_fraction})"
        src = src_items.get(Path(r["image"]).name, {})
        if r["selected"]:
            item = {"image": src.get("image", _rel(r["image"], root)), "label": _rel(r["fused_label"], root),
                    "annotated_classes": list(FOREGROUND_IDS), "group": group_of(r["present_classes"])}
            item.update({k: v for k, v in src.items() if k.startswith("pseudo_")})
            new["training"].append(item)
            if set(ORGAN_IDS) <= set(r["present_classes"]):
                new["training_all_organs"].append(item)
            if LESION_ID in r["present_classes"]:
                new["training_with_lesion"].append(item)
        elif not r["labeled"] and src:
            new["unlabeled"].append(src)
    save_json(new, out_datalist)
    report = {"rule": fuse_rep["rule"], "source_datalist": str(dl_path), "datalist": str(out_datalist),
              "fused_dir": str(fused_dir), "history_dirs": [str(d) for d in history_dirs],
              "threshold": threshold, "keep_fraction": keep_fraction, "defer_selection": bool(defer_selection),
              "counts": {"cases": len(rows), "fused": len(fused_ids),
                         "skipped": len(rows) - len(fused_ids),
                         "selected": sum(bool(r["selected"]) for r in rows),
                         "rejected": sum(not r["selected"] for r in rows)},
              "cases": rows}
    report_path = Path(report_path)
    save_json(_json_safe(report), report_path)
    write_report_csv(rows, report_path.with_suffix(".csv"))
    c = report["counts"]
    print(f"select: {c['selected']} selected, {c['rejected']} rejected of {c['cases']} -> {out_datalist}",
          file=sys.stderr)
    return report


def _json_safe(obj: Any) -> Any:
    """inf/nan scores become the strings "inf"/"nan" (strict JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_report_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One line per case: case_id, split, rule, status, selected, uncertainty, changed_voxels,
    ``<class>_gained`` / ``<class>_lost`` for classes 0..14, reason (atomic write)."""
    cols = ["case_id", "split", "rule", "status", "selected", "uncertainty", "changed_voxels"]
    cols += [f"{LABELS[c]}_{k}" for c in CSV_CLASS_IDS for k in ("gained", "lost")]
    cols += ["reason", "selection_reason"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        classes = r.get("classes") or {}
        line = [r["case_id"], r["split"], r["rule"], r["status"], int(bool(r.get("selected"))),
                _fmt_score(r.get("uncertainty")), "" if r.get("changed_voxels") is None else r["changed_voxels"]]
        for c in CSV_CLASS_IDS:
            entry = classes.get(LABELS[c], {})
            line += [entry.get("gained", 0), entry.get("lost", 0)] if r["status"] == "fused" else ["", ""]
        line += [r.get("reason", ""), r.get("selection_reason", "")]
        w.writerow(line)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)
