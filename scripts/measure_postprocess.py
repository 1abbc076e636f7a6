#!/usr/bin/env python
"""Measure what each post-processing rule of ``abdoseg.inference.postprocess`` does to FLARE23 DSC/NSD.

Runs the fine_organ_tumor bundle's inference (``segmenter_from_bundle``: its preprocessing, network,
inferer and postprocessing with the organ component rule off) over the cases of a datalist key once, then applies each rule set to the same raw masks and
scores them against the ground truth with ``abdoseg.evaluation.metrics.evaluate_case``. Prints a table of
organ mean DSC/NSD and lesion DSC/NSD per rule set and writes ``postprocess_effect.json``.

Usage::

    .venv/bin/python scripts/measure_postprocess.py --dataset_dir runs/pp/phantom_small \\
        --model runs/pp/models/model.pt --overrides '{"fine_spacing_mm": [3.0, 3.0, 5.0]}'

Without ``--coarse_model`` the fine network runs on the whole CT (no ROI: the rules are measured
on the fine network's own errors, independently of the coarse stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "fine_organ_tumor"

RULE_SETS: dict[str, dict] = {
    "none": dict(largest_organ_component=False),
    "largest_organ": dict(largest_organ_component=True),
    "organ_components>=0.1xlargest": dict(largest_organ_component=True, organ_min_fraction_of_largest=0.1),
    "organ_components>=0.3xlargest": dict(largest_organ_component=True, organ_min_fraction_of_largest=0.3),
    "largest_organ+lesion>=50mm3": dict(largest_organ_component=True, min_lesion_volume_mm3=50.0),
    "largest_organ+lesion>=200mm3": dict(largest_organ_component=True, min_lesion_volume_mm3=200.0),
    "largest_organ+lesion<=10mm_from_organ": dict(largest_organ_component=True, lesion_max_distance_mm=10.0),
    "lesion>=50mm3_only": dict(largest_organ_component=False, min_lesion_volume_mm3=50.0),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--datalist", default=None, help="default: <dataset_dir>/datalist.json")
    ap.add_argument("--key", default="validation")
    ap.add_argument("--model", default=None, help="fine network state dict (source 'model'), loaded strictly "
                    "into the inference network_def; for one with deep-supervision heads add "
                    "deep_supervision=true to --overrides")
    ap.add_argument("--bundle_dir", default=None, help=f"fine bundle (default: {BUNDLE})")
    ap.add_argument("--source", default="model", choices=["model", "pseudo_A", "pseudo_B"],
                    help="raw masks: the fine network's output, or the phantom's pseudo labels of the "
                         "training cases scored against groundtruth/labelsTr (realistic organ errors)")
    ap.add_argument("--coarse_model", default=None, help="coarse state dict (default: no ROI stage)")
    ap.add_argument("--overrides", default="{}", help="JSON dict of inference.json overrides")
    ap.add_argument("--out_dir", default=str(REPO / "runs" / "postprocess_effect"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    bundle_dir = Path(args.bundle_dir) if args.bundle_dir else None

    import torch
    from monai.data import load_decathlon_datalist

    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import load_nifti

    torch.set_num_threads(args.threads)
    datalist = args.datalist or str(Path(args.dataset_dir) / "datalist.json")
    if args.source != "model":
        items = load_decathlon_datalist(datalist, True, "training", base_dir=args.dataset_dir)
        return _score(items, args, lambda it: load_nifti(it[args.source])[0],
                      lambda it: str(Path(args.dataset_dir) / "groundtruth" / "labelsTr" / Path(it["label"]).name))
    if not args.model:
        ap.error("--model is required with --source model")
    # the bundle's own inference (one builder, one checkpoint loader); the organ rule off, the
    # lesion rules are off by default in the config: the raw masks on the CT's grid
    overrides = {"largest_organ_component": False, "single_stage": not args.coarse_model,
                 **({"coarse_checkpoint": str(args.coarse_model)} if args.coarse_model else {}),
                 **json.loads(args.overrides)}
    segment = segmenter_from_bundle(bundle_dir or BUNDLE, device="cpu", overrides=overrides, model_path=args.model)

    items = load_decathlon_datalist(datalist, True, args.key, base_dir=args.dataset_dir)
    return _score(items, args, lambda it: segment({"image": it["image"]})[0], lambda it: it["label"])


def _score(items, args, raw_fn, gt_path_fn) -> int:
    from abdoseg.io import load_nifti, voxel_spacing_mm
    from abdoseg.labels import LESION_ID, ORGAN_IDS
    from abdoseg.evaluation.metrics import evaluate_case
    from abdoseg.inference.postprocess import postprocess_labels

    scores: dict[str, list[dict]] = {k: [] for k in RULE_SETS}
    t0 = time.perf_counter()
    for it in items:
        raw = np.asarray(raw_fn(it))
        gt, _, hdr = load_nifti(gt_path_fn(it))
        spacing = voxel_spacing_mm(hdr)
        for name, rules in RULE_SETS.items():
            pred = postprocess_labels(raw, spacing, **rules)
            scores[name].append(evaluate_case(np.asarray(gt), pred, spacing))
        print(f"{Path(it['image']).name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    table = {}
    for name, per_case in scores.items():
        organ_dsc = np.mean([np.mean([c[k][0] for c in per_case]) for k in ORGAN_IDS])
        organ_nsd = np.mean([np.mean([c[k][1] for c in per_case]) for k in ORGAN_IDS])
        les_dsc = np.mean([c[LESION_ID][0] for c in per_case])
        les_nsd = np.mean([c[LESION_ID][1] for c in per_case])
        table[name] = {"organ_dsc": round(float(organ_dsc), 4), "organ_nsd": round(float(organ_nsd), 4),
                       "lesion_dsc": round(float(les_dsc), 4), "lesion_nsd": round(float(les_nsd), 4),
                       "rules": RULE_SETS[name]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"postprocess_effect_{args.source}.json").write_text(
        json.dumps({"cases": len(items), "source": args.source, "table": table}, indent=2) + "\n")
    print(f"{'rules':<40} organ DSC  organ NSD  lesion DSC  lesion NSD   ({len(items)} cases, {args.source})")
    for name, r in table.items():
        print(f"{name:<40} {r['organ_dsc']:9.4f}  {r['organ_nsd']:9.4f}  {r['lesion_dsc']:10.4f}  {r['lesion_nsd']:10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
