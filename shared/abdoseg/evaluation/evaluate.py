"""``abdoseg evaluate``: FLARE23 DSC/NSD of a folder of predictions against a folder of ground truth.

Cases are matched by file name: ground truth ``gt_dir/{case}.nii.gz`` is scored against
``pred_dir/{case}.nii.gz`` (or ``{case}.nii``). A missing prediction is scored as an empty
prediction and listed in the summary; no prediction at all (an empty or wrong folder) is an
error. Shapes and affines are checked (from the headers) before any work: a prediction on another
voxel grid than its ground truth is an error naming both files, and so is a label value outside
the FLARE23 ids 0..14. Hidden and temporary (``.partial``/``.tmp``) files are never read.
Cases run in a process pool (``imap``: one case in memory per worker). Per-case values are
rounded to 4 decimals and class means are means of those, rounded to 4, as in the official
``FLARE23_DSC_NSD_Eval.py``.

Outputs in ``out_dir`` (each written atomically, all after the last case):
``metrics_per_case.csv`` (case, class, name, dsc, nsd), ``lesions_per_case.csv`` (per-lesion
detection, :func:`abdoseg.evaluation.metrics.lesion_detection`: every ground-truth lesion of >= 1 mL with its
volume, covered fraction and whether it was found, and each case's false-positive count),
``summary.json``, ``summary.md``, ``per_class.png`` (DSC and NSD bars per class).
"""

from __future__ import annotations

import csv
import io as _io
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from abdoseg.geometry import AFFINE_TOL_MM, affine_difference_mm, affine_spacing_mm
from abdoseg.io import (AbdosegWarning, InputError, atomic_path, clash_reason, load_nifti, nifti_cases, nifti_stem, save_json,
                        voxel_spacing_mm)
from abdoseg.labels import FOREGROUND_IDS, LESION_ID, NSD_TOLERANCE_MM, ORGAN_IDS, class_name
from abdoseg.evaluation.metrics import (LESION_MIN_COVERED_FRACTION, LESION_MIN_VOLUME_ML, _code_to_normals, evaluate_case,
                             lesion_detection)

CSV_NAME = "metrics_per_case.csv"
LESION_CSV_NAME = "lesions_per_case.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CHART_PNG = "per_class.png"


class EmptyGroundTruthWarning(AbdosegWarning):
    """A ground-truth label map holds no foreground at all: its scores say nothing about the
    prediction (the message names the files)."""


def _list_cases(folder: Path) -> dict[str, Path]:
    """``{case: file}`` of the ``.nii.gz``/``.nii`` files of ``folder`` (:func:`abdoseg.io.nifti_cases`,
    case = file name without the extension); two files of one case are an error naming both."""
    files, clashes = nifti_cases(folder, case_id=nifti_stem)
    for case, paths in clashes.items():
        raise InputError(folder, clash_reason(case, paths))
    return dict(sorted(files.items()))


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` from the header only."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 3:
        raise InputError(path, f"expected a 3-D label map, got shape {shape}")
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "the affine (voxel -> world matrix) has NaN/infinite entries")
    return shape, affine


def _header_shape(path: Path) -> tuple[int, ...]:
    return _header(path)[0]


def _check_same_grid(pred_path: Path, gt_path: Path) -> None:
    """Raise :class:`InputError` naming both files when the prediction is not on the ground truth's
    voxel grid (shape, spacing, orientation or origin): its scores would be meaningless."""
    (p_shape, p_aff), (g_shape, g_aff) = _header(pred_path), _header(gt_path)
    if p_shape != g_shape:
        raise InputError(pred_path, f"shape {p_shape} differs from ground truth {gt_path} shape {g_shape}")
    diff = affine_difference_mm(p_aff, g_aff)
    if diff > AFFINE_TOL_MM:
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        raise InputError(pred_path, f"voxel grid differs from ground truth {gt_path} (affines differ by up to "
                                    f"{diff:.4g} mm): spacing {fmt(affine_spacing_mm(p_aff))} vs "
                                    f"{fmt(affine_spacing_mm(g_aff))} mm, origin {fmt(p_aff[:3, 3])} vs "
                                    f"{fmt(g_aff[:3, 3])} mm; resample the prediction onto the ground truth")


def _check_label_values(arr: np.ndarray, path: Any) -> None:
    """Raise :class:`InputError` naming ``path`` unless every value is a FLARE23 id 0..14."""
    from abdoseg.data.prepare import label_class_counts

    _, problem = label_class_counts(arr)
    if problem:
        raise InputError(path, problem.replace("label ", "label map ", 1) + " (FLARE23 ids are 0..14)")


def _parse_classes(classes: Any, case_ids: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Classes to score per case.

    ``None`` -> all 14; an int or a sequence of ints (or "1,2,5") -> those for every case; a
    path to a JSON file -> ``{case: [ids]}`` or a FLARE-style ``dataset.json`` whose
    ``cases[case]["annotated_classes"]`` lists them.
    """
    case_ids = list(case_ids)
    if classes is None:
        return {c: FOREGROUND_IDS for c in case_ids}
    if isinstance(classes, str) and classes.endswith(".json"):
        path = Path(classes)
        if not path.is_file():
            raise InputError(path, "classes file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(path, f"not valid JSON ({exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("cases"), dict):
            data = {k: v.get("annotated_classes") for k, v in data["cases"].items() if isinstance(v, dict)}
        out = {}
        for c in case_ids:
            ids = data.get(c) if isinstance(data, dict) else None
            if ids is None:
                raise InputError(path, f"no class list for case {c!r}")
            out[c] = _check_ids(ids, path)
        return out
    if isinstance(classes, str):
        classes = [s for s in classes.replace(",", " ").split() if s]
    if isinstance(classes, (int, np.integer)):
        classes = [classes]
    ids = _check_ids(classes, "--classes")
    return {c: ids for c in case_ids}


def _check_ids(ids: Any, where: Any) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(i) for i in ids}))
    except (TypeError, ValueError) as exc:
        raise InputError(where, f"class ids must be integers, got {ids!r}") from exc
    bad = [i for i in out if i not in FOREGROUND_IDS]
    if bad:
        raise InputError(where, f"unknown class ids {bad} (valid: 1..14)")
    return out


def _evaluate_one(task: tuple) -> tuple:
    """Worker: load one GT/prediction pair and score it. Returns ("ok", case, results, wall s, CPU s)
    or ("error", path, problem) for an unusable file (InputError does not pickle)."""
    case, gt_path, pred_path, threshold, classes = task
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        gt, _, header = load_nifti(gt_path)
        _check_label_values(gt, gt_path)
        spacing = voxel_spacing_mm(header)
        if pred_path is None:
            pred = np.zeros(gt.shape, dtype=np.uint8)
        else:
            pred, _, _ = load_nifti(pred_path)
            if pred.shape != gt.shape:
                raise InputError(pred_path, f"shape {pred.shape} differs from ground truth {gt_path} shape {gt.shape}")
            _check_label_values(pred, pred_path)
        results = evaluate_case(gt, pred, spacing, nsd_dsc_threshold=threshold, classes=classes)
        detection = lesion_detection(gt, pred, spacing, LESION_ID) if LESION_ID in classes else None
    except InputError as exc:
        return ("error", exc.path, exc.problem)
    return ("ok", case, results, detection, time.perf_counter() - t0, time.process_time() - c0, not np.any(gt))


def _mean4(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Class means and organ/lesion means from per-case rows (keys case, class, dsc, nsd).

    Organ DSC/NSD = mean of the organ-class means (all 13 when every organ is scored, as in the
    official script); lesion reported separately; ``None`` where a class was never scored.
    """
    per_class: dict[str, dict[str, Any]] = {}
    for c in FOREGROUND_IDS:
        sel = [r for r in rows if r["class"] == c]
        if not sel:
            continue
        per_class[str(c)] = {
            "name": class_name(c),
            "tolerance_mm": NSD_TOLERANCE_MM[c],
            "n_cases": len(sel),
            "dsc": _mean4([r["dsc"] for r in sel]),
            "nsd": _mean4([r["nsd"] for r in sel]),
        }
    organs = [c for c in ORGAN_IDS if str(c) in per_class]
    lesion = per_class.get(str(LESION_ID))
    return {
        "organ_dsc": _mean4([per_class[str(c)]["dsc"] for c in organs]),
        "organ_nsd": _mean4([per_class[str(c)]["nsd"] for c in organs]),
        "organ_classes": organs,
        "lesion_dsc": lesion["dsc"] if lesion else None,
        "lesion_nsd": lesion["nsd"] if lesion else None,
        "per_class": per_class,
    }


def summarize_detection(detections: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """Per-lesion sensitivity and false positives per case over the cases whose lesion class was
    scored (``detections``: ``{case: lesion_detection(...)}``), and the lesion DSC over the cases
    that have a lesion (from the per-case ``rows``; tumor-free cases score 1 or 0 and would hide
    it); ``None`` when no case scored lesions."""
    if not detections:
        return None
    with_lesions = [r["dsc"] for r in rows if r["class"] == LESION_ID and detections.get(r["case"], {}).get("n_lesions")]
    n_lesions = sum(d["n_lesions"] for d in detections.values())
    n_detected = sum(d["n_detected"] for d in detections.values())
    n_fp = sum(d["n_false_positives"] for d in detections.values())
    return {
        "n_cases": len(detections),
        "n_cases_with_lesions": sum(1 for d in detections.values() if d["n_lesions"]),
        "n_lesions": n_lesions,
        "n_detected": n_detected,
        "sensitivity": round(n_detected / n_lesions, 4) if n_lesions else None,
        "false_positives_per_case": round(n_fp / len(detections), 4),
        "min_volume_ml": LESION_MIN_VOLUME_ML,
        "min_covered_fraction": LESION_MIN_COVERED_FRACTION,
        "lesion_dsc_cases_with_lesions": _mean4(with_lesions),
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """Markdown report: header facts, then one row per class and the organ/lesion means."""
    lines = [
        "# FLARE23 evaluation",
        "",
        f"- cases: {summary['n_cases']} (missing predictions scored as empty: "
        f"{len(summary['missing_predictions'])})",
        f"- NSD set to 0 when DSC < {summary['nsd_dsc_threshold']}",
        f"- predictions: `{summary['pred_dir']}`; ground truth: `{summary['gt_dir']}`",
        "",
        "| class | name | NSD tol. (mm) | cases | DSC | NSD |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c, v in summary["per_class"].items():
        lines.append(f"| {c} | {v['name']} | {v['tolerance_mm']:g} | {v['n_cases']} | {_fmt(v['dsc'])} | {_fmt(v['nsd'])} |")
    n_org = len(summary["organ_classes"])
    lines.append(f"| | **organs (mean of {n_org} class means)** | | | **{_fmt(summary['organ_dsc'])}** | **{_fmt(summary['organ_nsd'])}** |")
    lines.append(f"| | **lesion** | | | **{_fmt(summary['lesion_dsc'])}** | **{_fmt(summary['lesion_nsd'])}** |")
    det = summary.get("lesion_detection")
    if det:
        sens = "-" if det["sensitivity"] is None else f"{det['sensitivity']:.2f}"
        lines += ["", f"Lesion detection (ground-truth lesions >= {det['min_volume_ml']:g} mL, found when >= "
                  f"{100 * det['min_covered_fraction']:g} % of the lesion is predicted as lesion): **{det['n_detected']} / {det['n_lesions']} found "
                  f"(sensitivity {sens})** in {det['n_cases_with_lesions']} case(s) with lesions; "
                  f"**{det['false_positives_per_case']:.2f} false-positive lesions per case** over "
                  f"{det['n_cases']} case(s); lesion DSC on the cases with lesions: "
                  f"{_fmt(det['lesion_dsc_cases_with_lesions'])}."]
    if summary["missing_predictions"]:
        lines += ["", "Missing predictions (scored as empty): " + ", ".join(summary["missing_predictions"])]
    if summary["unmatched_predictions"]:
        lines += ["", "Predictions without ground truth (ignored): " + ", ".join(summary["unmatched_predictions"])]
    return "\n".join(lines) + "\n"


def _write_chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(summary["per_class"].items())
    names = [v["name"] for _, v in items]
    x = np.arange(len(items))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(items) + 2), 4.5))
    ax.bar(x - 0.2, [v["dsc"] for _, v in items], 0.4, label="DSC")
    ax.bar(x + 0.2, [v["nsd"] for _, v in items], 0.4, label="NSD")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("mean over cases")
    ax.set_title(f"FLARE23 metrics, {summary['n_cases']} cases: organ DSC {_fmt(summary['organ_dsc'])}, "
                 f"NSD {_fmt(summary['organ_nsd'])}", fontsize=10)
    ax.legend(loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "name", "dsc", "nsd"])
    for r in rows:
        writer.writerow([r["case"], r["class"], class_name(r["class"]), f"{r['dsc']:.4f}", f"{r['nsd']:.4f}"])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _write_lesion_csv(detections: dict[str, dict[str, Any]], path: Path) -> None:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "lesion", "volume_ml", "covered_fraction", "detected", "case_false_positives"])
    for case, d in detections.items():
        if not d["lesions"]:
            writer.writerow([case, "", "", "", "", d["n_false_positives"]])
        for i, lesion in enumerate(d["lesions"], 1):
            writer.writerow([case, i, f"{lesion['volume_ml']:.3f}", f"{lesion['covered_fraction']:.4f}",
                             int(lesion["detected"]), d["n_false_positives"]])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def evaluate(pred_dir: str, gt_dir: str, out_dir: str, nsd_dsc_threshold: float = 0.2,
             workers: int = 2, classes: Any = None) -> dict[str, Any]:
    """Score every ``gt_dir/{case}.nii.gz`` against ``pred_dir/{case}.nii.gz`` (FLARE23 DSC/NSD).

    Args:
        pred_dir: folder of predicted label maps (FLARE class ids).
        gt_dir: folder of ground-truth label maps; its header spacing (mm) is used for NSD.
        out_dir: where the CSV, summary JSON/Markdown and bar chart go (created).
        nsd_dsc_threshold: NSD = 0 when DSC < this (0.2 now; 0.1 was used in FLARE 2023).
        workers: processes (1 = in this process).
        classes: None (all 14), ids for every case ("1,2,14" or a list), or a JSON file
            ``{case: [ids]}`` / a dataset.json with ``cases[id].annotated_classes``.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``).

    Raises:
        InputError: a folder is missing or empty, no prediction matches a ground-truth case, a
            file is unreadable, a label value is not a FLARE23 id 0..14, or a prediction's voxel
            grid (shape, spacing, orientation, origin) differs from its ground truth (the message
            names both files).
    """
    t_start = time.perf_counter()
    pred_dir_p, gt_dir_p, out_dir_p = Path(pred_dir), Path(gt_dir), Path(out_dir)
    if not gt_dir_p.is_dir():
        raise InputError(gt_dir_p, "ground-truth folder not found")
    if not pred_dir_p.is_dir():
        raise InputError(pred_dir_p, "prediction folder not found")
    gts = _list_cases(gt_dir_p)
    if not gts:
        raise InputError(gt_dir_p, "no *.nii.gz ground-truth files")
    preds = _list_cases(pred_dir_p)
    if not preds:
        raise InputError(pred_dir_p, "no *.nii.gz prediction files (wrong --pred_dir?)")
    case_classes = _parse_classes(classes, gts)
    missing = [c for c in gts if c not in preds]
    unmatched = [c for c in preds if c not in gts]
    if len(missing) == len(gts):
        raise InputError(pred_dir_p, f"none of its {len(preds)} prediction file(s) matches a ground-truth case of "
                                     f"{gt_dir_p} (e.g. {next(iter(preds))} vs {next(iter(gts))}); predictions "
                                     "must be named <case>.nii.gz like the ground truth")
    for case, gt_path in gts.items():  # cheap header checks before any work
        if case in preds:
            _check_same_grid(preds[case], gt_path)
        else:
            _header_shape(gt_path)
    if missing:
        print(f"abdoseg evaluate: warning: {len(missing)} missing prediction(s) scored as empty: "
              + ", ".join(missing), file=sys.stderr)
    threshold = float(nsd_dsc_threshold)
    tasks = [(c, str(p), str(preds[c]) if c in preds else None, threshold, case_classes[c]) for c, p in gts.items()]

    from tqdm import tqdm

    _code_to_normals()  # load the lookup table once; forked workers inherit it
    workers = max(1, min(int(workers), len(tasks)))
    rows: list[dict[str, Any]] = []
    case_seconds: list[float] = []
    case_cpu: list[float] = []
    detections: dict[str, dict[str, Any]] = {}
    empty_gt: list[str] = []

    def consume(results: Iterable[tuple]) -> None:
        for out in tqdm(results, total=len(tasks), desc="evaluate", unit="case", file=sys.stderr):
            if out[0] == "error":
                raise InputError(out[1], out[2])
            _, case, res, detection, secs, cpu, gt_empty = out
            if gt_empty:
                empty_gt.append(case)
            if detection is not None:
                detections[case] = detection
            case_seconds.append(secs)
            case_cpu.append(cpu)
            for c, (dsc, nsd) in sorted(res.items()):
                rows.append({"case": case, "class": c, "dsc": round(dsc, 4), "nsd": round(nsd, 4)})

    if workers == 1:
        consume(map(_evaluate_one, tasks))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            consume(pool.imap(_evaluate_one, tasks, chunksize=1))

    detections = dict(sorted(detections.items()))
    empty_gt.sort()
    if empty_gt:
        names = ", ".join(str(gts[c]) for c in empty_gt[:5]) + (f" and {len(empty_gt) - 5} more" if len(empty_gt) > 5
                                                               else "")
        warnings.warn(f"{names}: ground truth is all background (no class 1..14 anywhere): each class scores 0 "
                      "wherever the prediction has it and 1 where it does not, whatever the segmentation quality; "
                      "check that these are the right label files, or leave the cases out", EmptyGroundTruthWarning, stacklevel=2)
    detection_summary = summarize_detection(detections, rows)
    summary: dict[str, Any] = {
        "n_cases": len(tasks),
        "nsd_dsc_threshold": threshold,
        "pred_dir": str(pred_dir_p),
        "gt_dir": str(gt_dir_p),
        **summarize(rows),
        "lesion_detection": detection_summary,
        "missing_predictions": missing,
        "unmatched_predictions": unmatched,
        "empty_ground_truth": empty_gt,
        "timing": {
            "workers": workers,
            "wall_s": round(time.perf_counter() - t_start, 2),
            "mean_case_s": round(float(np.mean(case_seconds)), 2),  # wall, per worker
            "mean_case_cpu_s": round(float(np.mean(case_cpu)), 2),
        },
    }
    _write_csv(rows, out_dir_p / CSV_NAME)
    if detections:
        _write_lesion_csv(detections, out_dir_p / LESION_CSV_NAME)
    save_json(summary, out_dir_p / SUMMARY_JSON)
    md = summary_markdown(summary)
    with atomic_path(out_dir_p / SUMMARY_MD) as tmp:
        tmp.write_text(md)
    _write_chart(summary, out_dir_p / CHART_PNG)
    print(md)
    return summary
