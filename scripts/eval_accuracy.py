#!/usr/bin/env python
"""Accuracy of a trained fine bundle on data it never saw: held-out phantoms of another seed and
the real CTs of ``../shared/data/real_ct`` (a test set: never trained on).

Segments with ``abdoseg segment`` (the user's path) into ``--out_dir/<name>/``, then scores with
the official FLARE23 rules (``abdoseg.evaluation.metrics``): phantoms against ``labelsVal/``; real CTs against
their merged organ masks (merged in memory, never written; partial labels: only the annotated
classes are scored); a case folder with a ``label.nii.gz`` and no IRCAD masks (the TotalSegmentator
example: TotalSegmentator's own output, remapped to FLARE ids) is a silver check, DSC per organ it labels. Prints Markdown tables and writes ``summary.json``.

Usage::

    .venv/bin/abdoseg generate --out_dir runs/unseen7 --preset small --seed 7 --n_labeled 1 --n_unlabeled 0 --n_val 8
    .venv/bin/python scripts/eval_accuracy.py --bundle runs/demo/bundles/fine_organ_tumor \\
        --phantoms runs/unseen7 --real_ct ../shared/data/real_ct --out_dir runs/accuracy

``--segment_cmd`` replaces the segmenting command (e.g. an older checkout's ``abdoseg``) for
before/after comparisons: ``"PYTHONPATH=/old/shared .venv/bin/python -m abdoseg.cli segment"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np

from benchlib import ABDOSEG

REPO = Path(__file__).resolve().parents[1]
REAL_CLASSES = {"liver": 1, "right kidney": 2, "spleen": 3, "aorta": 5, "left kidney": 13}


def _segment(cmd: str, src: Path, dst: Path, bundle: str) -> None:
    env = dict(os.environ)
    parts = shlex.split(cmd)
    while parts and "=" in parts[0] and not parts[0].startswith("-"):
        k, v = parts.pop(0).split("=", 1)
        env[k] = v
    full = parts + ["-i", str(src), "-o", str(dst), "--bundle_dir", bundle, "--device", "cpu"]
    res = subprocess.run(full, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(full)} failed:\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--phantoms", default="", help="generated dataset folder with imagesVal/ + labelsVal/")
    ap.add_argument("--real_ct", default="", help="folder of real CT cases (image.nii.gz + masks)")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--segment_cmd", default=f"{ABDOSEG} segment")
    args = ap.parse_args()
    from abdoseg.data.prepare import load_real_case_label
    from abdoseg.evaluation.evaluate import evaluate
    from abdoseg.io import load_nifti
    from abdoseg.labels import ORGAN_IDS, class_name
    from abdoseg.evaluation.metrics import dice

    out = Path(args.out_dir)
    summary: dict = {}
    if args.phantoms:
        pred_dir = out / "phantoms_pred"
        _segment(args.segment_cmd, Path(args.phantoms) / "imagesVal", pred_dir, args.bundle)
        summary["phantoms"] = evaluate(str(pred_dir), str(Path(args.phantoms) / "labelsVal"),
                                       str(out / "phantoms_metrics"))
        print((out / "phantoms_metrics" / "summary.md").read_text())
    if args.real_ct:
        rows = {}
        for case in sorted(p for p in Path(args.real_ct).iterdir() if (p / "image.nii.gz").is_file()):
            if not (case / "masks_ircad").is_dir():
                continue
            pred_path = out / "real_pred" / f"{case.name}.nii.gz"
            if not pred_path.is_file():
                _segment(args.segment_cmd, case / "image.nii.gz", pred_path, args.bundle)
            gt, aff, annotated = load_real_case_label(case)
            pred, _, _ = load_nifti(pred_path)
            pred = np.asarray(pred)
            rows[case.name] = {name: round(dice(gt == cls, pred == cls), 3)
                               for name, cls in REAL_CLASSES.items() if cls in annotated}
        summary["real_ct_dsc"] = rows
        print("\n| case | " + " | ".join(REAL_CLASSES) + " |\n|---|" + "---:|" * len(REAL_CLASSES))
        for c, r in rows.items():
            print(f"| {c} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in REAL_CLASSES) + " |")
        silver = {}
        for case in sorted(p for p in Path(args.real_ct).iterdir() if (p / "label.nii.gz").is_file()
                           and (p / "image.nii.gz").is_file() and not (p / "masks_ircad").is_dir()):
            # a "silver" reference (e.g. TotalSegmentator's own output): organs it labels only
            pred_path = out / "real_pred" / f"{case.name}.nii.gz"
            if not pred_path.is_file():
                _segment(args.segment_cmd, case / "image.nii.gz", pred_path, args.bundle)
            gt, _, _ = load_nifti(case / "label.nii.gz")
            pred, _, _ = load_nifti(pred_path)
            gt, pred = np.asarray(gt), np.asarray(pred)
            silver[case.name] = {class_name(c): round(dice(gt == c, pred == c), 3)
                                 for c in ORGAN_IDS if (gt == c).any()}
        if silver:
            summary["silver_dsc"] = silver
            for c, r in silver.items():
                print(f"\n{c} (silver reference, DSC per organ it labels; mean {np.mean(list(r.values())):.3f}):")
                print("| " + " | ".join(r) + " |\n|" + "---:|" * len(r) + "\n| " + " | ".join(f"{v:.2f}" for v in r.values()) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
