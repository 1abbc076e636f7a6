"""Benchmark the fine_organ_tumor cascade end to end (read NIfTI -> write mask) on phantom CTs of
the seed papers' eight sizes (512 x 512 x 55 ... 554), against a single-stage pipeline: the same
bundle with ``--overrides``-style ``{"single_stage": true}`` (same fine network and spacing,
sliding window over the whole CT, no coarse network, no ROI).

Both pipelines are the bundle's own :func:`abdoseg.inference.segmenter.segmenter_from_bundle`
(exactly what ``abdoseg segment`` runs). Every (case, pipeline) runs in a fresh Python process,
as in the FLARE efficiency evaluation, and reports:

* ``case_s``     wall time from reading the NIfTI to the written mask (model already loaded),
* ``process_s``  wall time of the whole process (imports, config + weights, the case),
* ``peak_rss_mb`` peak resident memory of the process (``resource.getrusage``),
* ``roi`` (the box on the oriented CT's voxel grid) and ``fine_grid`` (what the fine inferer saw),
* on CUDA: ``gpu_max_mb`` and ``gpu_auc_mb_s`` from (total - free) memory sampled every 0.1 s
  (FLARE's Efficiency.py method, ``benchlib.MemorySampler``: pynvml, else ``torch.cuda.mem_get_info``).

Weights: the bundle's ``model_path`` / ``coarse_checkpoint`` when present, else seeded random fine
weights (the run time of a network does not depend on its weights) and an *oracle* coarse stage:
the coarse network (random weights) still runs on the coarse input (same cost), but the foreground
it answers is the ground truth resampled (nearest, world coordinates) to that coarse grid
(``CoarseRoiCropd.coarse_input``'s affine), so the ROI - box + ``margin_mm`` of the largest
component, exactly as for the real network - is realistic (``--oracle_roi`` forces it). The table
says which was used. After timing, the masks of each pipeline are scored against the truth
(FLARE23 DSC/NSD, not timed; ``--no_eval`` skips it), so speed is reported at a known accuracy.

Usage::

    .venv/bin/python scripts/bench.py cascade --out_dir runs/bench            # all eight sizes
    .venv/bin/python scripts/bench.py cascade --slices 55,554 --threads 2     # a subset
    .venv/bin/python scripts/bench.py cascade --bundle runs/demo/bundles/fine_organ_tumor --seed 7  # trained demo weights
    .venv/bin/python scripts/bench.py cascade --real_ct ../shared/data/real_ct --oracle_roi          # real CTs
    .venv/bin/python scripts/bench.py cascade --overrides '{"autocast_dtype": null}'                 # any inference.json id
    .venv/bin/python scripts/bench.py cascade --preset small --slices 20 --skip_single              # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import FINE_BUNDLE, REPO, SEED_SLICES, bench_command, link_files, parse_slices, phantom_cases


# ------------------------------------------------------------------------------------------------
# worker: one case, one pipeline, fresh process
# ------------------------------------------------------------------------------------------------
def _oracle_coarse_mask(coarse_roi, label_path: str):
    """``CoarseRoiCropd.coarse_mask`` stand-in: runs the real coarse network on the coarse input
    (for its cost), then answers with the ground-truth foreground sampled (nearest) at the world
    positions of the coarse grid's voxel centres (the coarse input MetaTensor's affine)."""
    import numpy as np

    from abdoseg.io import load_nifti

    label, label_affine, _ = load_nifti(label_path)
    fg = np.asarray(label) > 0
    del label
    world_to_label = np.linalg.inv(np.asarray(label_affine, dtype=np.float64))
    network_mask = type(coarse_roi).coarse_mask

    def coarse_mask(coarse):
        network_mask(coarse_roi, coarse)  # the coarse network's cost; its answer is replaced
        shape = coarse.shape[1:]
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        m = world_to_label @ np.asarray(coarse.affine.cpu(), dtype=np.float64)
        idx = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < fg.shape), axis=1)
        out = np.zeros(len(idx), bool)
        out[inside] = fg[tuple(idx[inside].T)]
        return out.reshape(tuple(shape))

    return coarse_mask


def worker(args: argparse.Namespace) -> None:
    t_process = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.inference.coarse_roi import CoarseRoiCropd
    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import save_nifti
    from benchlib import MemorySampler, gpu_memory_reader, record_roi

    bundle = Path(args.bundle)
    device = "cuda:0" if torch.cuda.is_available() and not args.cpu else "cpu"
    overrides = json.loads(args.overrides)
    if args.pipeline == "single":
        overrides["single_stage"] = True
    parser = load_bundle_config(bundle)
    for k, v in overrides.items():
        parser[k] = v
    fine_weights = Path(parser.get_parsed_content("model_path")).is_file()
    if args.pipeline == "single":
        roi = "single-stage"
    elif Path(parser.get_parsed_content("coarse_checkpoint") or "").is_file() and not args.oracle_roi:
        roi = "coarse_model.pt"
    else:
        roi = "oracle ROI"
        overrides["coarse_checkpoint"] = None  # keep the (seeded random) coarse weights
    torch.manual_seed(0)
    network = None if fine_weights else parser.get_parsed_content("network_def")
    segment = segmenter_from_bundle(bundle, device, overrides, network=network)
    coarse = next(t for t in segment.preprocessing.transforms if isinstance(t, CoarseRoiCropd))
    if roi == "oracle ROI":
        coarse.coarse_mask = _oracle_coarse_mask(coarse, args.label)
    seen = record_roi(segment)  # the ROI box and the fine grid of this case, recorded on the way

    cuda = device.startswith("cuda")
    sampler = None
    if cuda:
        read_mb, source, _ = gpu_memory_reader(torch.cuda.current_device())
        sampler = MemorySampler(read_mb).start()
    t0 = time.perf_counter()
    mask, affine = segment({"image": args.image})
    save_nifti(mask, affine, args.output)
    if cuda:
        torch.cuda.synchronize()
    case_s = time.perf_counter() - t0
    gpu = sampler.stop() if sampler else None
    box = seen["roi"]
    res = {
        "case": Path(args.output).name, "pipeline": args.pipeline, "roi": roi, "device": device,
        "fine_weights": "model.pt" if fine_weights else "random",
        "shape": list(mask.shape), "case_s": round(case_s, 2),
        "process_s": round(time.perf_counter() - t_process, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "roi_box": {"start": list(box.start), "stop": list(box.stop)},
        "roi_volume_fraction": round(box.volume_fraction, 4), "fine_grid": seen["fine_grid"],
        "foreground_fraction": float((mask > 0).mean()),
    }
    if gpu:
        res.update(gpu_source=source, gpu_max_mb=gpu["gpu_max_mb"], gpu_auc_mb_s=gpu["gpu_auc_mb_s"],
                   torch_max_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    print("BENCH_RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _real_cases(out: Path, real_ct: Path) -> list[tuple[Path, Path]]:
    """Real CTs (``data/real_ct``-style case folders with ``image.nii.gz``): their organ masks,
    merged to FLARE ids in memory (:func:`abdoseg.data.prepare.load_real_case_label`), are written to
    ``out/cases_gt`` for the oracle ROI and the scores; the CTs themselves are read in place."""
    from abdoseg.data.prepare import load_real_case_label
    from abdoseg.io import save_nifti

    cases = []
    for case_dir in sorted(p for p in real_ct.iterdir() if (p / "image.nii.gz").is_file()):
        lab_p = out / "cases_gt" / f"{case_dir.name}.nii.gz"
        if not lab_p.is_file():
            label, affine, _ = load_real_case_label(case_dir)
            save_nifti(label, affine, lab_p)
        cases.append((case_dir / "image.nii.gz", lab_p))
    if not cases:
        raise SystemExit(f"{real_ct}: no case folder with an image.nii.gz")
    return cases


def add_arguments(ap: argparse.ArgumentParser, command: str = "cascade") -> None:
    ap.add_argument("--out_dir", default=str(REPO / "runs" / "bench_cascade"))
    ap.add_argument("--slices", default=",".join(map(str, SEED_SLICES)), help="comma-separated slice counts")
    ap.add_argument("--preset", default="full", help="phantom preset of the cases (full: 512 x 512; small: quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--cpu", action="store_true", help="force CPU even if CUDA is available")
    ap.add_argument("--skip_single", action="store_true", help="only time the cascade")
    ap.add_argument("--overrides", default="{}", help="JSON dict of inference.json ids -> values (both pipelines)")
    ap.add_argument("--bundle", default=str(FINE_BUNDLE),
                    help="fine_organ_tumor bundle folder (its configs and models/*.pt), e.g. a trained demo copy")
    ap.add_argument("--real_ct", default=None,
                    help="folder of real CT case folders (image.nii.gz + organ masks, e.g. ../shared/data/real_ct) "
                         "to time instead of phantoms; use with --oracle_roi (a phantom-trained coarse net is "
                         "not meant for real CT)")
    ap.add_argument("--oracle_roi", action="store_true",
                    help="ROI from the ground-truth foreground (+ margin) while the coarse network still runs")
    ap.add_argument("--no_eval", action="store_true",
                    help="skip scoring each pipeline's masks against the phantom truth (FLARE23 DSC/NSD)")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", default="cascade", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0

    out = Path(args.out_dir)
    if args.real_ct:
        cases = _real_cases(out, Path(args.real_ct))
    else:
        cases = phantom_cases(out, parse_slices(args.slices), args.seed, args.preset)
    pipelines = ["cascade"] + ([] if args.skip_single else ["single"])
    results = []
    for img_p, lab_p in cases:
        for pipe in pipelines:
            pred = out / f"pred_{pipe}" / lab_p.name  # <case>.nii.gz
            cmd = bench_command("cascade") + ["--worker", "--pipeline", pipe, "--image", str(img_p), "--label",
                   str(lab_p), "--output", str(pred), "--threads", str(args.threads), "--overrides", args.overrides,
                   "--bundle", str(args.bundle)] + ["--cpu"] * args.cpu + ["--oracle_roi"] * args.oracle_roi
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"FAILED {img_p.name} {pipe}:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(line[-1][len("BENCH_RESULT "):])
            res["subprocess_s"] = round(wall, 2)
            results.append(res)
            gpu = f"  gpu max {res['gpu_max_mb']} MB auc {res['gpu_auc_mb_s']} MB*s" if "gpu_max_mb" in res else ""
            print(f"{res['case']:<22} {pipe:<8} {str(tuple(res['shape'])):<18} case {res['case_s']:7.2f} s  "
                  f"process {res['process_s']:7.2f} s  peak RSS {res['peak_rss_mb']:8.1f} MB  "
                  f"ROI {res['roi_volume_fraction']:.3f} fine {tuple(res['fine_grid'])}  [{res['roi']}]{gpu}",
                  flush=True)

    summary: dict = {"device": results[0]["device"] if results else None, "threads": args.threads,
                     "overrides": json.loads(args.overrides), "cases": results}
    for pipe in pipelines:
        rs = [r for r in results if r["pipeline"] == pipe]
        if rs:
            summary[pipe] = {k: statistics.median(r[k] for r in rs) for k in ("case_s", "process_s", "peak_rss_mb")}
            summary[pipe]["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
            if "gpu_max_mb" in rs[0]:
                summary[pipe].update(median_gpu_max_mb=statistics.median(r["gpu_max_mb"] for r in rs),
                                     median_gpu_auc_mb_s=statistics.median(r["gpu_auc_mb_s"] for r in rs))
    if "cascade" in summary and "single" in summary:
        pairs: dict = {}
        for r in results:
            pairs.setdefault(r["case"], {})[r["pipeline"]] = r["case_s"]
        ratios = [p["single"] / p["cascade"] for p in pairs.values() if "single" in p and "cascade" in p]
        summary["speedup_single_over_cascade_median"] = round(statistics.median(ratios), 2) if ratios else None
        summary["speedup_of_medians"] = round(summary["single"]["case_s"] / summary["cascade"]["case_s"], 2)
    if not args.no_eval and results:
        # accuracy of the very masks that were timed (not timed itself): "at equal or better DSC"
        from abdoseg.evaluation.evaluate import evaluate

        gt_dir = link_files(out / "cases_gt_run", [lab_p for _, lab_p in cases], fresh=True)  # this run's cases
        for pipe in pipelines:
            if pipe in summary:
                s = evaluate(str(out / f"pred_{pipe}"), str(gt_dir), str(out / f"eval_{pipe}"), workers=1)
                summary[pipe].update(organ_dsc=s["organ_dsc"], organ_nsd=s["organ_nsd"],
                                     lesion_dsc=s["lesion_dsc"], lesion_nsd=s["lesion_nsd"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    return 0
