#!/usr/bin/env python
"""Benchmark the fine_organ_tumor cascade end to end (read NIfTI -> write mask) on phantom CTs of
the seed papers' eight sizes (512 x 512 x 55 ... 554), against a single-stage pipeline (the same
fine network, sliding window over the whole CT at the same fine spacing, no ROI).

Every (case, pipeline) runs in a fresh Python process, as in the FLARE efficiency evaluation, and
reports:

* ``case_s``     wall time from reading the NIfTI to the written mask (model already loaded),
* ``process_s``  wall time of the whole process (imports, model build/load, the case),
* ``peak_rss_mb`` peak resident memory of the process (``resource.getrusage``),
* on CUDA: ``gpu_max_mb`` and ``gpu_auc_mb_s`` from (total - free) memory sampled every 0.1 s
  with pynvml (FLARE's Efficiency.py method), else torch's reserved memory sampled the same way.

Weights: ``models/model.pt`` / ``models/coarse_model.pt`` of the bundle when present, else random
fine weights (the run time of a network does not depend on its weights) and an *oracle* coarse
stage: the real coarse network still runs (same cost), but the ROI comes from the phantom's
ground-truth foreground, so the ROI size is realistic (``--oracle_roi`` forces it). The table
says which was used. After timing, the masks of each pipeline are scored against the truth
(FLARE23 DSC/NSD, not timed; ``--no_eval`` skips it), so speed is reported at a known accuracy.

Usage::

    .venv/bin/python scripts/bench_cascade.py --out_dir runs/bench            # all eight sizes
    .venv/bin/python scripts/bench_cascade.py --slices 55,554 --threads 2     # a subset
    .venv/bin/python scripts/bench_cascade.py --bundle runs/demo/bundles/fine_organ_tumor --seed 7  # trained demo weights
    .venv/bin/python scripts/bench_cascade.py --real_ct ../shared/data/real_ct --oracle_roi          # real CTs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "fine_organ_tumor"
SEED_SLICES = (55, 100, 150, 215, 334, 448, 499, 554)


# ------------------------------------------------------------------------------------------------
# worker: one case, one pipeline, fresh process
# ------------------------------------------------------------------------------------------------
class _GpuSampler:
    """(total - free) GPU memory in MB every ``period_s`` (pynvml), else torch reserved memory."""

    def __init__(self, period_s: float = 0.1):
        import torch

        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self.source = "torch_reserved"
        self._handle = None
        try:
            import pynvml  # type: ignore

            pynvml.nvmlInit()
            idx = torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self._nvml = pynvml
            self.source = "pynvml"
        except Exception:
            self._handle = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float:
        if self._handle is not None:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            return (info.total - info.free) / 2**20
        import torch

        return torch.cuda.memory_reserved() / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _oracle_coarse(net, label_path: str, coarse_spacing_mm):
    """A coarse stand-in that runs ``net`` (for its cost) but answers with the ground-truth
    foreground resampled (nearest) to the coarse grid, in the inferer's RAS frame."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from abdoseg.cascade import affine_spacing_mm, ras_orientation, resampled_shape, to_ras
    from abdoseg.io import load_nifti

    lab, aff, _ = load_nifti(label_path)
    ornt = ras_orientation(aff)
    ras = to_ras(torch.as_tensor(np.asarray(lab) > 0), ornt)
    sp = affine_spacing_mm(aff)
    ras_sp = [0.0] * 3
    for i in range(3):
        ras_sp[int(ornt[i, 0])] = sp[i]
    cshape = resampled_shape(ras.shape, ras_sp, coarse_spacing_mm)
    fg = F.interpolate(ras[None, None].float(), size=cshape, mode="nearest")[0, 0]

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.strides = getattr(net, "strides", None)

        def forward(self, x):
            out = self.net(x)
            if any(s < c for s, c in zip(x.shape[2:], fg.shape)):
                return out  # sliding-window patch: cannot place the oracle, keep the net's answer
            logits = torch.zeros((x.shape[0], 2, *x.shape[2:]), dtype=out.dtype, device=x.device)
            f = fg.to(x.device)
            logits[:, 1, : f.shape[0], : f.shape[1], : f.shape[2]] = f * 10
            return logits + 0 * out[:, :2]

    return Oracle()


def worker(args: argparse.Namespace) -> None:
    t_process = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from monai.bundle import ConfigParser

    from abdoseg.checkpoints import load_state_dict_file
    from abdoseg.io import save_nifti

    parser = ConfigParser()
    bundle = Path(args.bundle)
    parser.read_config(str(bundle / "configs" / "inference.json"))
    device = "cuda:0" if torch.cuda.is_available() and not args.cpu else "cpu"
    parser.update({"bundle_root": str(bundle), "device": device, **json.loads(args.overrides)})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network")
    fine_ckpt = bundle / "models" / "model.pt"
    fine_weights = fine_ckpt.is_file()
    if fine_weights:
        net.load_state_dict(load_state_dict_file(fine_ckpt, map_location=device))
    net.eval()
    inferer = parser.get_parsed_content("inferer")
    if args.pipeline == "single":
        inferer.coarse_network = None
        weights = "single-stage"
    elif Path(inferer.coarse_checkpoint or "").is_file() and not args.oracle_roi:
        weights = "coarse_model.pt"
    else:
        inferer.coarse_network = _oracle_coarse(inferer.coarse_network, args.label, inferer.coarse_spacing_mm)
        # the oracle can only answer a whole-volume pass (sliding-window patches carry no position)
        inferer.coarse_roi_size = tuple(max(int(r), 160) for r in inferer.coarse_roi_size)
        inferer.coarse_checkpoint = None
        inferer._coarse_loaded = True
        weights = "oracle ROI"
    segment = parser.get_parsed_content("segment", instantiate=True)
    segment.inferer = inferer
    segment.network = net

    cuda = device.startswith("cuda")
    sampler = _GpuSampler() if cuda else None
    if sampler:
        sampler.__enter__()
    t0 = time.perf_counter()
    mask, affine = segment({"image": args.image})
    save_nifti(mask.astype("uint8"), affine, args.output)
    if cuda:
        torch.cuda.synchronize()
    case_s = time.perf_counter() - t0
    if sampler:
        sampler.__exit__()
    res = {
        "case": Path(args.output).name, "pipeline": args.pipeline, "roi": weights, "device": device,
        "fine_weights": "model.pt" if fine_weights else "random",
        "shape": list(mask.shape), "case_s": round(case_s, 2),
        "process_s": round(time.perf_counter() - t_process, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "roi_ras_slices": inferer.last_roi["ras_slices"] if inferer.last_roi else None,
        "foreground_fraction": float((mask > 0).mean()),
    }
    if sampler:
        s = sampler.samples or [0.0]
        res.update(gpu_source=sampler.source, gpu_max_mb=round(max(s), 1), gpu_auc_mb_s=round(sum(s) * 0.1, 1),
                   torch_max_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    print("BENCH_RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _make_cases(out: Path, slices: list[int], seed: int) -> list[tuple[Path, Path]]:
    from abdoseg.io import save_nifti
    from abdoseg.phantom import make_case

    cases = []
    for i, n in enumerate(slices):
        img_p = out / "cases" / f"BENCH_{n:03d}_0000.nii.gz"
        lab_p = out / "cases_gt" / f"BENCH_{n:03d}.nii.gz"
        if not (img_p.is_file() and lab_p.is_file()):
            t = time.perf_counter()
            img, lab, aff = make_case(seed, preset="full", slices=n, index=i)
            save_nifti(img, aff, img_p)
            save_nifti(lab, aff, lab_p)
            print(f"generated {img_p.name} {img.shape} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cases.append((img_p, lab_p))
    return cases


def _real_cases(out: Path, real_ct: Path) -> list[tuple[Path, Path]]:
    """Real CTs (``data/real_ct``-style case folders with ``image.nii.gz``): their organ masks,
    merged to FLARE ids in memory (:func:`abdoseg.dataprep.load_real_case_label`), are written to
    ``out/cases_gt`` for the oracle ROI and the scores; the CTs themselves are read in place."""
    from abdoseg.dataprep import load_real_case_label
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default=str(REPO / "runs" / "bench_cascade"))
    ap.add_argument("--slices", default=",".join(map(str, SEED_SLICES)), help="comma-separated slice counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--cpu", action="store_true", help="force CPU even if CUDA is available")
    ap.add_argument("--skip_single", action="store_true", help="only time the cascade")
    ap.add_argument("--overrides", default="{}", help="JSON dict of inference.json overrides")
    ap.add_argument("--bundle", default=str(BUNDLE),
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
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    out = Path(args.out_dir)
    if args.real_ct:
        cases = _real_cases(out, Path(args.real_ct))
    else:
        cases = _make_cases(out, [int(s) for s in str(args.slices).split(",") if s], args.seed)
    pipelines = ["cascade"] + ([] if args.skip_single else ["single"])
    results = []
    for img_p, lab_p in cases:
        for pipe in pipelines:
            pred = out / f"pred_{pipe}" / lab_p.name  # <case>.nii.gz
            cmd = [sys.executable, __file__, "--worker", "--pipeline", pipe, "--image", str(img_p), "--label",
                   str(lab_p), "--output", str(pred), "--threads", str(args.threads), "--overrides", args.overrides,
                   "--bundle", str(args.bundle)]
            if args.cpu:
                cmd.append("--cpu")
            if args.oracle_roi:
                cmd.append("--oracle_roi")
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
                  f"process {res['process_s']:7.2f} s  peak RSS {res['peak_rss_mb']:8.1f} MB  [{res['roi']}]{gpu}",
                  flush=True)

    summary: dict = {"device": results[0]["device"] if results else None, "threads": args.threads, "cases": results}
    for pipe in pipelines:
        rs = [r for r in results if r["pipeline"] == pipe]
        if rs:
            summary[pipe] = {k: statistics.median(r[k] for r in rs) for k in ("case_s", "process_s", "peak_rss_mb")}
            summary[pipe]["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
            if "gpu_max_mb" in rs[0]:
                summary[pipe].update(median_gpu_max_mb=statistics.median(r["gpu_max_mb"] for r in rs),
                                     median_gpu_auc_mb_s=statistics.median(r["gpu_auc_mb_s"] for r in rs))
    if "cascade" in summary and "single" in summary:
        pairs = {}
        for r in results:
            pairs.setdefault(r["case"], {})[r["pipeline"]] = r["case_s"]
        ratios = [p["single"] / p["cascade"] for p in pairs.values() if "single" in p and "cascade" in p]
        summary["speedup_single_over_cascade_median"] = round(statistics.median(ratios), 2) if ratios else None
        summary["speedup_of_medians"] = round(summary["single"]["case_s"] / summary["cascade"]["case_s"], 2)
    if not args.no_eval and results:
        # accuracy of the very masks that were timed (not timed itself): "at equal or better DSC"
        from abdoseg.evaluate import evaluate

        gt_dir = out / "cases_gt_run"
        gt_dir.mkdir(parents=True, exist_ok=True)
        for old in gt_dir.iterdir():  # score only the cases of this run
            old.unlink()
        for _, lab_p in cases:
            (gt_dir / lab_p.name).symlink_to(lab_p.resolve())
        for pipe in pipelines:
            if pipe in summary:
                s = evaluate(str(out / f"pred_{pipe}"), str(gt_dir), str(out / f"eval_{pipe}"), workers=1)
                summary[pipe].update(organ_dsc=s["organ_dsc"], organ_nsd=s["organ_nsd"],
                                     lesion_dsc=s["lesion_dsc"], lesion_nsd=s["lesion_nsd"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
