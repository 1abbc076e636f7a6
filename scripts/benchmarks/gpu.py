"""GPU readiness: the fine_organ_tumor cascade on CUDA with AMP (float16) over the seed papers'
eight CT sizes (512 x 512 x 55 ... 554 phantoms), with FLARE's GPU memory measure.

Per case (one process, model loaded once, one untimed warm-up case first unless ``--no_warmup``):

* ``wall_s``        wall time from reading the NIfTI to the written mask (CUDA synchronised),
* ``gpu_max_mb``    maximum of (total - free) GPU memory sampled every 0.1 s by a thread,
* ``gpu_auc_mb_s``  area under that curve, FLARE's rule: sum of the samples x 0.1 s,
* ``torch_max_allocated_mb`` the caching allocator's peak (tensors only), for comparison.

(total - free) is read (``benchlib.gpu_memory_reader``) with pynvml (``pip install -e ".[gpu]"``: nvidia-ml-py, as FLARE's Efficiency.py),
else with ``torch.cuda.mem_get_info`` (the same driver figure); the JSON says which. Like FLARE's,
the figure is device-wide: it includes the CUDA context and any other process on that GPU.

The cascade is ``abdoseg.inference.segmenter.segmenter_from_bundle(bundle, device="cuda",
overrides={"autocast_dtype": "float16"})``, i.e. the bundle's own inference config. Weights: the
bundle's ``models/model.pt`` + ``models/coarse_model.pt``; ``--random_weights`` runs a temporary copy
with seeded random weights instead (network time does not depend on weights, but an untrained
coarse stage finds an arbitrary ROI, so the figures are then not representative; the report says so).

Writes ``<out_dir>/bench_gpu.json`` and ``<out_dir>/bench_gpu.md`` (phantoms are cached in
``<out_dir>/cases``). Without a CUDA device it stops at once with a message, running nothing.

Usage::

    .venv/bin/python scripts/bench.py gpu --out_dir runs/bench_gpu
    .venv/bin/python scripts/bench.py gpu --bundle runs/demo/bundles/fine_organ_tumor --slices 55,554
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (FINE_BUNDLE, PERIOD_S, REPO, SEED_SLICES, MemorySampler, gpu_memory_reader, parse_slices,
                      phantom_cases, random_weight_bundle, require_cuda)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = [f"# GPU readiness: fine_organ_tumor cascade on {meta.get('gpu', '?')}", "",
            f"torch {meta.get('torch')} (CUDA {meta.get('cuda')}), AMP {meta.get('autocast_dtype')}, "
            f"memory source {meta.get('memory_source')}, sampled every {meta.get('period_s')} s; "
            f"weights: {meta.get('weights')}; warm-up: {meta.get('warmup')}.", "",
            "| case | shape | spacing (mm) | wall (s) | GPU max (MB) | GPU AUC (MB·s) | torch max alloc. (MB) | "
            "foreground |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head.append(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | "
                    f"{'x'.join(f'{s:.2f}' for s in r['spacing_mm'])} | {r['wall_s']:.2f} | {r['gpu_max_mb']:.0f} | "
                    f"{r['gpu_auc_mb_s']:.0f} | {r['torch_max_allocated_mb']:.0f} | {r['foreground_fraction']:.3f} |")
    if rows:
        head.append(f"| **total** | | | {sum(r['wall_s'] for r in rows):.2f} | "
                    f"{max(r['gpu_max_mb'] for r in rows):.0f} | {sum(r['gpu_auc_mb_s'] for r in rows):.0f} | | |")
    return "\n".join(head) + "\n"


def write_report(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    from abdoseg.io import atomic_path, save_json

    md = out_dir / "bench_gpu.md"
    save_json({"meta": meta, "cases": rows}, out_dir / "bench_gpu.json")
    with atomic_path(md) as tmp:
        tmp.write_text(markdown_table(rows, meta), encoding="utf-8")
    return out_dir / "bench_gpu.json", md


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def bench(args: argparse.Namespace) -> tuple[Path, Path]:
    require_cuda("bench.py gpu")
    import nibabel as nib
    import numpy as np
    import torch

    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import save_nifti, voxel_spacing_mm

    out = Path(args.out_dir)
    bundle = Path(args.bundle)
    missing = [p for p in (bundle / "models" / "model.pt", bundle / "models" / "coarse_model.pt") if not p.is_file()]
    if missing and not args.random_weights:
        raise SystemExit(f"bench.py gpu: trained weights not found ({', '.join(map(str, missing))}); pass --bundle "
                         "<trained fine_organ_tumor> or --random_weights (timing only)")
    cases = [img for img, _ in phantom_cases(out, parse_slices(args.slices), args.seed, args.preset, labels=False)]
    torch_index = torch.cuda.current_device()
    read_mb, source, info = gpu_memory_reader(torch_index)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        weights = "bundle models/*.pt"
        if args.random_weights:
            bundle, _ = random_weight_bundle(bundle, Path(tmp))
            weights = "random (seeded; untrained coarse ROI: not representative)"
        seg = segmenter_from_bundle(bundle, device="cuda", overrides={"autocast_dtype": args.autocast_dtype})
        if not args.no_warmup:  # CUDA context, cuDNN autotuning, allocator growth: not part of a case
            seg({"image": str(cases[0])})
            torch.cuda.synchronize()
        rows = []
        for img_p in cases:
            case = img_p.name[: -len("_0000.nii.gz")]
            header = nib.load(str(img_p)).header
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            sampler = MemorySampler(read_mb, args.period_s).start()
            t0 = time.perf_counter()
            try:
                mask, affine = seg({"image": str(img_p)})
                save_nifti(mask.astype(np.uint8), affine, out / "masks" / f"{case}.nii.gz")
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            finally:
                stats = sampler.stop()
            row = {"case": case, "shape": [int(s) for s in header.get_data_shape()[:3]],
                   "spacing_mm": [float(s) for s in voxel_spacing_mm(header)], "wall_s": round(wall, 3),
                   **stats, "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                   "foreground_fraction": float((mask > 0).mean())}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"gpu": torch.cuda.get_device_name(torch_index), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "autocast_dtype": args.autocast_dtype, "memory_source": source,
            "period_s": args.period_s, "auc_rule": "sum(samples) * period_s (FLARE)", "weights": weights,
            "bundle": str(Path(args.bundle).resolve()), "warmup": "none" if args.no_warmup else cases[0].name,
            "host": platform.node(), **info}
    return write_report(out, rows, meta)


def add_arguments(ap: argparse.ArgumentParser, command: str = "gpu") -> None:
    ap.add_argument("--bundle", default=str(FINE_BUNDLE),
                    help="fine_organ_tumor bundle with models/model.pt + coarse_model.pt")
    ap.add_argument("--out_dir", default=str(REPO / "runs" / "bench_gpu"))
    ap.add_argument("--slices", default=",".join(map(str, SEED_SLICES)), help="comma-separated slice counts")
    ap.add_argument("--preset", default="full", help="phantom preset of the cases (full: 512 x 512; small: quick)")
    ap.add_argument("--seed", type=int, default=0, help="phantom dataset seed")
    ap.add_argument("--autocast_dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--period_s", type=float, default=PERIOD_S, help="memory sampling period (FLARE: 0.1)")
    ap.add_argument("--random_weights", action="store_true", help="seeded random weights (timing only)")
    ap.add_argument("--no_warmup", action="store_true", help="time the first case cold")


def run(args: argparse.Namespace) -> int:
    json_p, md_p = bench(args)
    print(md_p.read_text(encoding="utf-8"))
    print(f"wrote {json_p} and {md_p}", file=sys.stderr)
    return 0
