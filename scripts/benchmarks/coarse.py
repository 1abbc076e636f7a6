"""Benchmark the coarse ROI stage on held-out full-size phantoms.

The coarse stage is the fine bundle's own :class:`abdoseg.inference.coarse_roi.CoarseRoiCropd`
(transform ``preprocessing`` of ``--bundle``'s ``inference.json``, the one ``abdoseg segment``
runs) with ``coarse_checkpoint`` = ``--model`` (the coarse_roi bundle's ``models/model.pt``: the same
network). For each case (``abdoseg.data.phantom.make_case(seed, "full", slices=n)`` for the slice counts
below, a dataset seed never used for training), the CT and its label are oriented to RAS (as the
bundle's ``Orientationd`` does) and the stage's steps 1-3 (:meth:`CoarseRoiCropd.roi_box`: resample +
window, coarse network, box) run; reported:

* coverage: fraction of ground-truth foreground voxels (labels 1..14) inside the ROI box
  (target >= 99.5 % in >= 98 % of cases);
* ROI volume fraction (box voxels / CT voxels);
* coarse time per case (resample + network + box, model already loaded), median.

Usage::

    .venv/bin/python scripts/bench.py coarse --model bundles/coarse_roi/models/model.pt \
        --out runs/bench_coarse_roi.json

Exit status 1 when the coverage target is not met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from benchlib import BUNDLES, FINE_BUNDLE, SEED_SLICES

HELD_OUT_SEED = 9001  # training phantoms use seed 0 (`abdoseg generate` default)


def coarse_stage(bundle: str | Path, model: str | Path, margin_mm: float | None, min_component_fraction: float | None):
    """The fine bundle's ``CoarseRoiCropd`` with ``model`` as its weights (loaded now), on CPU."""
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.inference.coarse_roi import CoarseRoiCropd

    if not Path(model).is_file():
        raise SystemExit(f"{model}: coarse weights not found (train the coarse_roi bundle first)")
    parser = load_bundle_config(bundle)
    parser["device"] = "$torch.device('cpu')"
    parser["coarse_checkpoint"] = str(model)
    if margin_mm is not None:
        parser["margin_mm"] = margin_mm
    stage = next(t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, CoarseRoiCropd))
    stage.min_component_fraction = min_component_fraction
    return stage


def add_arguments(ap: argparse.ArgumentParser, command: str = "coarse") -> None:
    ap.add_argument("--model", default=str(BUNDLES / "coarse_roi" / "models" / "model.pt"))
    ap.add_argument("--bundle", default=str(FINE_BUNDLE),
                    help="fine bundle whose inference.json defines the coarse stage")
    ap.add_argument("--out", default="runs/bench_coarse_roi.json")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--slices", type=int, nargs="*", default=list(SEED_SLICES))
    ap.add_argument("--preset", default="full", help="phantom preset of the cases (full: 512 x 512; small: quick)")
    ap.add_argument("--margin_mm", type=float, default=None, help="default: the bundle's margin_mm")
    ap.add_argument("--min_component_fraction", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation
    from tqdm import tqdm

    from abdoseg.data.phantom import make_case
    from abdoseg.inference.roi import EmptyRoiWarning
    from abdoseg.io import save_json

    torch.set_num_threads(args.threads)

    stage = coarse_stage(args.bundle, args.model, args.margin_mm, args.min_component_fraction)
    to_ras = Orientation(axcodes="RAS", labels=None)
    rows = []
    for i, n in enumerate(tqdm(args.slices, desc="coarse ROI bench")):
        image, label, affine = make_case(args.seed, args.preset, slices=n, index=i)
        aff = torch.from_numpy(np.asarray(affine, dtype=np.float64))
        image = to_ras(MetaTensor(torch.from_numpy(image)[None], affine=aff))
        fg = to_ras(MetaTensor(torch.from_numpy(label > 0)[None], affine=aff))[0].numpy()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyRoiWarning)
            box = stage.roi_box(image)
        seconds = time.perf_counter() - t0
        cov = box.contains_fraction(fg)
        rows.append({"index": i, "slices": n, "shape": list(label.shape),
                     "spacing_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                     "coverage": cov, "roi_volume_fraction": box.volume_fraction,
                     "roi_ras": {"start": list(box.start), "stop": list(box.stop)},
                     "empty_warning": any(issubclass(w.category, EmptyRoiWarning) for w in caught),
                     "seconds": seconds})
        tqdm.write(f"case {i} slices={n} shape={label.shape} coverage={cov:.4f} "
                   f"roi_frac={box.volume_fraction:.3f} t={seconds:.2f}s")
        del image, label, fg
        save_json({"partial": True, "cases": rows}, args.out)  # progress survives an interrupted run
    covs = [r["coverage"] for r in rows]
    summary = {
        "n_cases": len(rows),
        "seed": args.seed,
        "model": str(args.model),
        "margin_mm": stage.margin_mm,
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
