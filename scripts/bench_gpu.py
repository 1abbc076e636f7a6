#!/usr/bin/env python
"""GPU readiness: the fine_organ_tumor cascade on CUDA with AMP (float16) over the seed papers'
eight CT sizes (512 x 512 x 55 ... 554 phantoms), with FLARE's GPU memory measure.

Per case (one process, model loaded once, one untimed warm-up case first unless ``--no_warmup``):

* ``wall_s``        wall time from reading the NIfTI to the written mask (CUDA synchronised),
* ``gpu_max_mb``    maximum of (total - free) GPU memory sampled every 0.1 s by a thread,
* ``gpu_auc_mb_s``  area under that curve, FLARE's rule: sum of the samples x 0.1 s,
* ``torch_max_allocated_mb`` the caching allocator's peak (tensors only), for comparison.

(total - free) is read with pynvml (``pip install -e ".[gpu]"``: nvidia-ml-py, as FLARE's Efficiency.py),
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

    .venv/bin/python scripts/bench_gpu.py --out_dir runs/bench_gpu
    .venv/bin/python scripts/bench_gpu.py --bundle runs/demo/bundles/fine_organ_tumor --slices 55,554
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "fine_organ_tumor"
SEED_SLICES = (55, 100, 150, 215, 334, 448, 499, 554)
PERIOD_S = 0.1  # FLARE's sampling period
NO_CUDA_MESSAGE = ("bench_gpu.py: no CUDA device available (torch {torch} {build}, torch.cuda.is_available() is "
                   "False). This benchmark measures GPU time and memory and needs an NVIDIA GPU with a CUDA build "
                   "of torch; nothing was run.")


# ------------------------------------------------------------------------------------------------
# GPU memory sampling (FLARE's method)
# ------------------------------------------------------------------------------------------------
def memory_stats(samples_mb: list[float], period_s: float = PERIOD_S) -> dict[str, float]:
    """FLARE's figures from (total - free) samples taken every ``period_s``: maximum (MB) and area
    under the curve (MB*s) = sum of the samples x ``period_s``."""
    if not samples_mb:
        return {"gpu_max_mb": 0.0, "gpu_auc_mb_s": 0.0, "n_samples": 0}
    return {"gpu_max_mb": round(max(samples_mb), 1), "gpu_auc_mb_s": round(sum(samples_mb) * period_s, 1),
            "n_samples": len(samples_mb)}


class MemorySampler:
    """A thread calling ``read_mb()`` every ``period_s`` between :meth:`start` and :meth:`stop`.

    One sample is taken at start and one at stop, so a case shorter than the period still has two.
    ``read_mb`` is any ``() -> float`` (MB); see :func:`gpu_memory_reader`."""

    def __init__(self, read_mb: Callable[[], float], period_s: float = PERIOD_S) -> None:
        self.read_mb = read_mb
        self.period_s = float(period_s)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period_s):
                self.samples.append(float(self.read_mb()))
        except BaseException as exc:  # reported by stop(), not lost in the thread
            self.error = exc

    def start(self) -> "MemorySampler":
        self.samples.append(float(self.read_mb()))
        self._thread = threading.Thread(target=self._run, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"GPU memory sampling failed: {self.error}") from self.error
        self.samples.append(float(self.read_mb()))
        return memory_stats(self.samples, self.period_s)

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if not self._stop.is_set():
            self.stop()


def _nvml_index(torch_index: int) -> int:
    """NVML counts physical GPUs; torch counts those in CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and all(v.isdigit() for v in ids) and torch_index < len(ids):
        return int(ids[torch_index])
    return torch_index


def gpu_memory_reader(torch_index: int = 0) -> tuple[Callable[[], float], str, dict[str, str]]:
    """``(read_mb, source, info)``: (total - free) MB of the GPU from pynvml when importable, else
    from ``torch.cuda.mem_get_info``; ``info`` has the driver version when pynvml is there."""
    import torch

    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(torch_index))

        def read_nvml() -> float:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return (mem.total - mem.free) / 2**20

        driver = pynvml.nvmlSystemGetDriverVersion()
        return read_nvml, "pynvml", {"driver": driver.decode() if isinstance(driver, bytes) else str(driver)}
    except Exception:
        def read_torch() -> float:
            free, total = torch.cuda.mem_get_info(torch_index)
            return (total - free) / 2**20

        return read_torch, "torch.cuda.mem_get_info", {}


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
def require_cuda() -> None:
    """Exit with a clear message (status 1) when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        raise SystemExit(NO_CUDA_MESSAGE.format(torch=torch.__version__, build=build))


def _make_cases(out: Path, slices: list[int], seed: int) -> list[Path]:
    from abdoseg.io import save_nifti
    from abdoseg.data.phantom import make_case

    cases = []
    for i, n in enumerate(slices):
        img_p = out / "cases" / f"BENCH_{n:03d}_0000.nii.gz"
        if not img_p.is_file():
            t = time.perf_counter()
            img, _, aff = make_case(seed, preset="full", slices=n, index=i)
            save_nifti(img, aff, img_p)
            print(f"generated {img_p.name} {img.shape} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cases.append(img_p)
    return cases


def _random_weight_bundle(bundle: Path, dst: Path) -> Path:
    """Copy of ``bundle`` (configs only) with seeded random ``models/model.pt`` + ``coarse_model.pt``."""
    import shutil

    import torch
    from monai.bundle import ConfigParser

    b = dst / bundle.name
    shutil.copytree(bundle, b, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    (b / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(str(b / "configs" / "inference.json"))
    parser["bundle_root"] = str(b)
    for net_id, name in (("network_def", "model.pt"), ("coarse_network_def", "coarse_model.pt")):
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content(net_id).state_dict(), b / "models" / name)
    return b


def run(args: argparse.Namespace) -> tuple[Path, Path]:
    require_cuda()
    import nibabel as nib
    import numpy as np
    import torch

    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import save_nifti, voxel_spacing_mm

    out = Path(args.out_dir)
    bundle = Path(args.bundle)
    missing = [p for p in (bundle / "models" / "model.pt", bundle / "models" / "coarse_model.pt") if not p.is_file()]
    if missing and not args.random_weights:
        raise SystemExit(f"bench_gpu.py: trained weights not found ({', '.join(map(str, missing))}); pass --bundle "
                         "<trained fine_organ_tumor> or --random_weights (timing only)")
    slices = [int(s) for s in str(args.slices).split(",") if s.strip()]
    cases = _make_cases(out, slices, args.seed)
    torch_index = torch.cuda.current_device()
    read_mb, source, info = gpu_memory_reader(torch_index)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        weights = "bundle models/*.pt"
        if args.random_weights:
            bundle = _random_weight_bundle(bundle, Path(tmp))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(BUNDLE),
                    help="fine_organ_tumor bundle with models/model.pt + coarse_model.pt")
    ap.add_argument("--out_dir", default=str(REPO / "runs" / "bench_gpu"))
    ap.add_argument("--slices", default=",".join(map(str, SEED_SLICES)), help="comma-separated slice counts")
    ap.add_argument("--seed", type=int, default=0, help="phantom dataset seed")
    ap.add_argument("--autocast_dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--period_s", type=float, default=PERIOD_S, help="memory sampling period (FLARE: 0.1)")
    ap.add_argument("--random_weights", action="store_true", help="seeded random weights (timing only)")
    ap.add_argument("--no_warmup", action="store_true", help="time the first case cold")
    args = ap.parse_args(argv)
    json_p, md_p = run(args)
    print(md_p.read_text(encoding="utf-8"))
    print(f"wrote {json_p} and {md_p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
