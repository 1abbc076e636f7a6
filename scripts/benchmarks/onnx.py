"""Whole-cascade CPU timing: PyTorch vs ONNX Runtime, in one process, on phantoms of several sizes.

The fine bundle is copied to a temporary folder; its ``models/*.pt`` are used when present, else
freshly initialised seeded weights are saved there (the speed of a network does not depend on its
weights; the ROI, and with it the fine grid, does: it is printed). Both networks are exported to
ONNX with :func:`abdoseg.bundle.export.export`, then every phantom (written as NIfTI) runs through the
bundle's own segmenter (``inference.json``: read -> coarse ROI crop -> fine sliding window ->
scores to labels -> post-processing) once with the torch networks (:func:`abdoseg.bundle.export.torch_cascade`)
and once with ORT sessions (:func:`abdoseg.bundle.export.onnx_cascade`): one untimed warm-up each, then
``--repeats`` timed runs, alternating which runtime goes first. Reported per case: medians, the
torch/ORT ratio (> 1: ORT faster), the ROI and fine grid of each, and how many voxels of the two
masks differ. The torch cascade runs under the config's ``autocast_dtype`` (bfloat16 on CPUs
with native bf16), ORT in float32: ``--overrides '{"autocast_dtype": null}'`` compares float32
with float32; ``'{"fine_spacing_mm": [4, 4, 6]}'`` gives a quick run.

    .venv/bin/python scripts/bench.py onnx --threads 2 --repeats 3 --out runs/bench_onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from benchlib import FINE_BUNDLE, random_weight_bundle, record_roi

#: (label, make_case kwargs): default small phantom, a longer small one, a medium-sized one.
CASES = [
    ("small", dict(seed=0, preset="small")),
    ("small-60sl", dict(seed=1, preset="small", shape=(128, 128, 60))),
    ("medium-80sl", dict(seed=2, preset="medium", shape=(192, 224, 80))),
]


def time_case(segmenter, image: str) -> tuple:
    """(seconds, mask) of one case."""
    t0 = time.perf_counter()
    mask, _ = segmenter({"image": image})
    return time.perf_counter() - t0, mask


def add_arguments(ap: argparse.ArgumentParser, command: str = "onnx") -> None:
    ap.add_argument("--bundle", default=str(FINE_BUNDLE))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: torch's)")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma separated subset of " +
                    ", ".join(c[0] for c in CASES))
    ap.add_argument("--overrides", default="{}", help="JSON dict of inference.json ids -> values (both runtimes)")
    ap.add_argument("--atol", type=float, default=None,
                    help="largest |onnx - torch| logit difference the export accepts (default: abdoseg.bundle.export's)")
    ap.add_argument("--out", default=None, help="JSON file for the results")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from abdoseg.bundle.export import export, onnx_cascade, torch_cascade
    from abdoseg.data.phantom import make_case
    from abdoseg.io import save_json, save_nifti

    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    wanted = args.cases.split(",")
    overrides = json.loads(args.overrides)
    result: dict = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                    "overrides": overrides, "load_avg_start": list(os.getloadavg()), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        bundle, result["weights"] = random_weight_bundle(Path(args.bundle), Path(tmp), keep_trained=True)
        t0 = time.perf_counter()
        export(str(bundle), formats="onnx", runner="inprocess", **({"atol": args.atol} if args.atol else {}))
        result["export_s"] = round(time.perf_counter() - t0, 2)
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
        segs = {"torch": torch_cascade(bundle, overrides=overrides),
                "onnx": onnx_cascade(bundle, intra_op_threads=args.threads, overrides=overrides)}
        # torch runs under the config's autocast (bfloat16 on CPUs with native bf16); ORT always in float32
        result["autocast_dtype"] = {name: getattr(seg.inferer, "autocast_dtype", None) for name, seg in segs.items()}
        seen = {name: record_roi(seg) for name, seg in segs.items()}
        for label, kw in CASES:
            if label not in wanted:
                continue
            img, _, affine = make_case(**kw)
            path = str(save_nifti(img, affine, Path(tmp) / f"{label}_0000.nii.gz"))
            spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            masks: dict[str, np.ndarray] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, seg in segs.items():
                    _, masks[name] = time_case(seg, path)  # warm-up, and the masks to compare
                for r in range(args.repeats):
                    for name in (["torch", "onnx"] if r % 2 == 0 else ["onnx", "torch"]):
                        times[name].append(time_case(segs[name], path)[0])
            roi = {k: {"start": list(s["roi"].start), "stop": list(s["roi"].stop)} for k, s in seen.items()}
            diff = int((masks["torch"] != masks["onnx"]).sum())
            row = {
                "case": label, "shape": list(img.shape), "spacing_mm": [round(float(v), 3) for v in spacing],
                "roi_ras": roi["onnx"], "fine_grid": seen["onnx"]["fine_grid"],
                "torch_s": [round(t, 3) for t in times["torch"]], "onnx_s": [round(t, 3) for t in times["onnx"]],
                "torch_median_s": round(statistics.median(times["torch"]), 3),
                "onnx_median_s": round(statistics.median(times["onnx"]), 3),
                "diff_voxels": diff, "diff_fraction": diff / masks["torch"].size,
                "same_roi": roi["onnx"] == roi["torch"],
            }
            row["ratio_torch_over_onnx"] = round(row["torch_median_s"] / row["onnx_median_s"], 2)
            result["cases"].append(row)
            print(f"{label:12s} shape {tuple(img.shape)} fine grid {tuple(row['fine_grid'])}: "
                  f"torch {row['torch_median_s']:.2f} s, ORT {row['onnx_median_s']:.2f} s, "
                  f"ratio {row['ratio_torch_over_onnx']:.2f}, {diff} differing voxels "
                  f"({100 * row['diff_fraction']:.3f} %), same ROI: {row['same_roi']}", flush=True)
    result["load_avg_end"] = list(os.getloadavg())
    if args.out:
        save_json(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))
    return 0
