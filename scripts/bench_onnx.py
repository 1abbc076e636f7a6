#!/usr/bin/env python
"""Whole-cascade CPU timing: PyTorch vs ONNX Runtime, in one process, on phantoms of several sizes.

The fine bundle is copied to a temporary folder; its ``models/*.pt`` are used when present, else
freshly initialised seeded weights are saved there (the speed of a network does not depend on its
weights; the ROI, and with it the fine grid, does: it is printed). Both networks are exported to
ONNX with :func:`abdoseg.export.export`, then for every phantom the SAME ``CascadeInferer`` from the
bundle's ``inference.json`` runs once with the torch networks (:func:`abdoseg.export.torch_cascade`)
and once with ORT sessions (:func:`abdoseg.export.onnx_cascade`): one untimed warm-up each, then
``--repeats`` timed runs, alternating which runtime goes first. Reported per case: medians, the
torch/ORT ratio (> 1: ORT faster) and how many voxels of the two masks differ.

    .venv/bin/python scripts/bench_onnx.py --threads 2 --repeats 3 --out runs/bench_onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
#: (label, make_case kwargs): default small phantom, a longer small one, a medium-sized one.
CASES = [
    ("small", dict(seed=0, preset="small")),
    ("small-60sl", dict(seed=1, preset="small", shape=(128, 128, 60))),
    ("medium-80sl", dict(seed=2, preset="medium", shape=(192, 224, 80))),
]


def prepare_bundle(src: Path, dst: Path, seed: int = 0) -> tuple[Path, str]:
    from monai.bundle import ConfigParser

    b = dst / src.name
    shutil.copytree(src, b, ignore=shutil.ignore_patterns("eval", "__pycache__", "*.ts", "*.onnx"))
    (b / "models").mkdir(exist_ok=True)
    parser = ConfigParser()
    parser.read_config(str(b / "configs" / "inference.json"))
    parser["bundle_root"] = str(b)
    sources = []
    for net_id, fname in (("network_def", "model.pt"), ("coarse_network_def", "coarse_model.pt")):
        path = b / "models" / fname
        if path.is_file():
            sources.append(f"{fname}: bundle weights")
            continue
        torch.manual_seed(seed)
        torch.save(parser.get_parsed_content(net_id, instantiate=True).state_dict(), str(path))
        sources.append(f"{fname}: random init (seed {seed})")
    return b, "; ".join(sources)


def run(inferer, network, image) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    with torch.no_grad():
        mask = inferer(image, network)
    return time.perf_counter() - t0, np.asarray(mask)[0, 0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(REPO / "bundles" / "fine_organ_tumor"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma separated subset of " +
                    ", ".join(c[0] for c in CASES))
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    from monai.data import MetaTensor

    from abdoseg.export import export, onnx_cascade, torch_cascade
    from abdoseg.io import save_json
    from abdoseg.phantom import make_case

    torch.set_num_threads(args.threads)
    wanted = args.cases.split(",")
    result: dict = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                    "load_avg_start": list(os.getloadavg()), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        bundle, result["weights"] = prepare_bundle(Path(args.bundle), Path(tmp))
        t0 = time.perf_counter()
        export(str(bundle), formats="onnx", runner="inprocess")
        result["export_s"] = round(time.perf_counter() - t0, 2)
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
        t_inf, t_net = torch_cascade(bundle)
        o_inf, o_net = onnx_cascade(bundle, intra_op_threads=args.threads)
        for label, kw in CASES:
            if label not in wanted:
                continue
            img, _, affine = make_case(**kw)
            image = MetaTensor(torch.from_numpy(img.astype(np.float32))[None, None], affine=torch.from_numpy(affine))
            spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            masks: dict[str, np.ndarray] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, inf, net in (("torch", t_inf, t_net), ("onnx", o_inf, o_net)):
                    _, masks[name] = run(inf, net, image)  # warm-up, and the masks to compare
                for r in range(args.repeats):
                    order = [("torch", t_inf, t_net), ("onnx", o_inf, o_net)]
                    for name, inf, net in (order if r % 2 == 0 else order[::-1]):
                        times[name].append(run(inf, net, image)[0])
            roi = o_inf.last_roi["ras_slices"]
            crop = [b - a for a, b in roi]
            fine = [max(1, round(n * s / f)) for n, s, f in zip(crop, sorted_spacing(affine, spacing),
                                                                  o_inf.fine_spacing_mm)]
            diff = int((masks["torch"] != masks["onnx"]).sum())
            row = {
                "case": label, "shape": list(img.shape), "spacing_mm": [round(float(v), 3) for v in spacing],
                "roi_ras": roi, "fine_grid": fine,
                "torch_s": [round(t, 3) for t in times["torch"]], "onnx_s": [round(t, 3) for t in times["onnx"]],
                "torch_median_s": round(statistics.median(times["torch"]), 3),
                "onnx_median_s": round(statistics.median(times["onnx"]), 3),
                "diff_voxels": diff, "diff_fraction": diff / masks["torch"].size,
                "same_roi": o_inf.last_roi == t_inf.last_roi,
            }
            row["ratio_torch_over_onnx"] = round(row["torch_median_s"] / row["onnx_median_s"], 2)
            result["cases"].append(row)
            print(f"{label:12s} shape {tuple(img.shape)} fine grid {tuple(fine)}: torch {row['torch_median_s']:.2f} s, "
                  f"ORT {row['onnx_median_s']:.2f} s, ratio {row['ratio_torch_over_onnx']:.2f}, "
                  f"{diff} differing voxels ({100 * row['diff_fraction']:.3f} %), same ROI: {row['same_roi']}",
                  flush=True)
    result["load_avg_end"] = list(os.getloadavg())
    if args.out:
        save_json(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))
    return result


def sorted_spacing(affine, spacing) -> list[float]:
    """Spacing in RAS axis order (the order of the cascade's ROI slices)."""
    from abdoseg.cascade import ras_orientation

    ornt = ras_orientation(np.asarray(affine))
    out = [0.0, 0.0, 0.0]
    for i in range(3):
        out[int(ornt[i, 0])] = float(spacing[i])
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
