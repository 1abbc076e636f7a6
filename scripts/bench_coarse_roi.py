"""Benchmark the coarse ROI stage on held-out full-size phantoms.

For each case (``abdoseg.phantom.make_case(seed, "full", slices=n)`` for the slice counts below,
a dataset seed never used for training), runs :func:`abdoseg.roi.predict_coarse_roi` with the
trained bundle weights and reports:

* coverage: fraction of ground-truth foreground voxels (labels 1..14) inside the ROI box
  (target >= 99.5 % in >= 98 % of cases);
* ROI volume fraction (box voxels / CT voxels);
* coarse time per case (resample + network + box, model already loaded), median.

Usage::

    .venv/bin/python scripts/bench_coarse_roi.py --model bundles/coarse_roi/models/model.pt \
        --out runs/bench_coarse_roi.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from abdoseg.io import save_json
from abdoseg.phantom import make_case
from abdoseg.roi import EmptyRoiWarning, load_coarse_network, predict_coarse_roi

SLICES = (55, 100, 150, 215, 334, 448, 499, 554)
HELD_OUT_SEED = 9001  # training phantoms use seed 0 (`abdoseg generate` default)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundles/coarse_roi/models/model.pt")
    ap.add_argument("--out", default="runs/bench_coarse_roi.json")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--slices", type=int, nargs="*", default=list(SLICES))
    ap.add_argument("--margin_mm", type=float, default=None, help="default: abdoseg.preprocessing.ROI_MARGIN_MM")
    ap.add_argument("--min_component_fraction", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    net = load_coarse_network(args.model)
    rows = []
    for i, n in enumerate(tqdm(args.slices, desc="coarse ROI bench")):
        image, label, affine = make_case(args.seed, "full", slices=n, index=i)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyRoiWarning)
            res = predict_coarse_roi(image, affine, net, margin_mm=args.margin_mm,
                                     min_component_fraction=args.min_component_fraction)
        seconds = time.perf_counter() - t0
        fg = label > 0
        cov = res.box.contains_fraction(fg)
        rows.append({"index": i, "slices": n, "shape": list(image.shape),
                     "spacing_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                     "coverage": cov, "roi_volume_fraction": res.box.volume_fraction,
                     "roi": {"start": list(res.box.start), "stop": list(res.box.stop)},
                     "empty_warning": any(issubclass(w.category, EmptyRoiWarning) for w in caught),
                     "seconds": seconds})
        tqdm.write(f"case {i} slices={n} shape={image.shape} coverage={cov:.4f} "
                   f"roi_frac={res.box.volume_fraction:.3f} t={seconds:.2f}s")
        del image, label
        save_json({"partial": True, "cases": rows}, args.out)  # progress survives an interrupted run
    covs = [r["coverage"] for r in rows]
    summary = {
        "n_cases": len(rows),
        "seed": args.seed,
        "model": str(args.model),
        "coverage_min": min(covs),
        "coverage_median": statistics.median(covs),
        "fraction_cases_coverage_ge_99_5": float(np.mean([c >= 0.995 for c in covs])),
        "target_met": float(np.mean([c >= 0.995 for c in covs])) >= 0.98,
        "roi_volume_fraction_median": statistics.median(r["roi_volume_fraction"] for r in rows),
        "seconds_median": statistics.median(r["seconds"] for r in rows),
        "seconds_max": max(r["seconds"] for r in rows),
        "torch_threads": args.threads,
    }
    save_json({"summary": summary, "cases": rows}, args.out)
    print(json.dumps(summary, indent=2))
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
