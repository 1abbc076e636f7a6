"""Training data pipeline at growing dataset sizes: the fine bundle with its disk cache.

Generates one small-preset phantom set (``abdoseg generate --preset small --n_labeled MAX
--n_unlabeled 0 --n_val 2`` + ``abdoseg prepare``); the set of N cases is the datalist of its
first N training cases (the generator makes case i the same whatever the count). For each N, in
fresh processes:

1. fill the cache: ``python -m monai.bundle run fill_cache`` with the fine bundle's train.json
   (every case's deterministic prefix decoded once and written to ``cache_dir``; one folder for
   all sizes, filled in increasing order, so a size's fill time is that of the cases it adds);
2. train: the fine bundle's train.json through ``ConfigWorkflow`` (what ``monai.bundle run``
   does) with ``max_epochs 1`` and ``train#trainer#epoch_length`` = ``--iterations`` (random
   cases of the N), a tiny network, validation off; ignite events time each ``next(dataloader)``
   (data wait) and each iteration.

Reports per N: peak RSS of each process (``os.wait4`` rusage), fill seconds per case, seconds per
training iteration and the share of it spent waiting for data (iterations after the first), and
the cache size on disk. ``--ram_baseline`` also trains with the previous in-RAM ``CacheDataset``
(``cache_dir ""``, ``cache_rate 1.0``), ``--no_cache_baseline`` without any cache (``cache_rate
0.0``: gzip NIfTI decoded every iteration). Prints a Markdown table, writes JSON.

    .venv/bin/python scripts/bench.py data --sizes 50 200 400 --out runs/bench_data_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from benchlib import FINE_BUNDLE as BUNDLE, REPO, bench_command, measure_process

CONFIGS = BUNDLE / "configs"
#: the training configs: inference.json (the base: network, preprocessing) then train.json
TRAINING_CONFIGS = [str(CONFIGS / "inference.json"), str(CONFIGS / "train.json")]
#: Tiny CPU training (the data side is what is measured): a 3-level 8-channel network, 32x32x16
#: patches, one per case, the small preset's spacing.
TRAIN_OVERRIDES = {
    "network_def#channels": 8,
    "network_def#kernel_size": [[3, 3, 3]] * 3,
    "network_def#strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "network_def#deep_supr_num": 1,
    "patch_size": [32, 32, 16],
    "num_samples": 1,
    "fine_spacing_mm": [3.0, 3.0, 5.0],
    "device": "$torch.device('cpu')",
    "amp": False,
    "max_epochs": 1,
    "val_interval": 1000,
    "num_workers": 0,
}


def _run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` in the repository (output to ``log``); (wall seconds, peak RSS MB) or exit."""
    m = measure_process(cmd, log, cwd=REPO)
    return m["wall_s"], m["peak_rss_mb"]


def _du_mb(folder: Path) -> tuple[float, int]:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def _cli_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _generate(work: Path, n: int, workers: int) -> Path:
    data = work / "data"
    if not (data / "datalist.json").is_file():
        exe = [sys.executable, "-m", "abdoseg.cli"]
        _run([*exe, "generate", "--out_dir", str(data), "--preset", "small", "--n_labeled", str(n),
              "--n_unlabeled", "0", "--n_val", "2", "--workers", str(workers)], work / "generate.log")
        _run([*exe, "prepare", "--data_dir", str(data)], work / "prepare.log")
    return data


def _subset(data: Path, n: int, out: Path) -> Path:
    dl = json.loads((data / "datalist.json").read_text())
    if len(dl["training"]) < n:
        raise SystemExit(f"{data} has {len(dl['training'])} training cases, fewer than {n}")
    dl["training"] = dl["training"][:n]
    out.write_text(json.dumps(dl, indent=1))
    return out


def _overrides(data: Path, datalist: Path, run_dir: Path, cache_dir: str) -> dict:
    return {"bundle_root": str(BUNDLE), "dataset_dir": str(data), "datalist": str(datalist),
            "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "eval"), "cache_dir": cache_dir,
            **TRAIN_OVERRIDES}


def child_train(args: argparse.Namespace) -> None:
    """Child process: train with the overrides in ``args.child``; write timings to ``args.result``."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    overrides = json.loads(Path(args.child).read_text())
    wf = ConfigWorkflow(config_file=TRAINING_CONFIGS, meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", **overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    marks: dict[str, float] = {}
    waits: list[float] = []
    ends: list[float] = []

    @trainer.on(Events.GET_BATCH_STARTED)
    def _get_started(_):
        marks["get"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _get_done(_):
        waits.append(time.perf_counter() - marks["get"])

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch(_):
        marks["epoch"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iter_done(_):
        ends.append(time.perf_counter())

    t0 = time.perf_counter()
    wf.run()
    wall = time.perf_counter() - t0
    wf.finalize()
    starts = [marks["epoch"], *ends[:-1]]
    its = [e - s for s, e in zip(starts, ends)]
    steady_its, steady_waits = its[1:], waits[1:len(its)]
    Path(args.result).write_text(json.dumps({
        "iterations": len(its), "run_s": wall, "first_iteration_s": its[0] if its else None,
        "s_per_iteration": sum(steady_its) / max(len(steady_its), 1),
        "data_wait_s_per_iteration": sum(steady_waits) / max(len(steady_waits), 1),
        "data_wait_share": sum(steady_waits) / max(sum(steady_its), 1e-9),
    }))


def bench_size(n: int, data: Path, work: Path, iterations: int, mode: str, fill_threads: int) -> dict:
    """One size. The disk cache folder is shared by the sizes, filled in increasing order (the N
    cases' entries are the same files whatever the set they are listed in): fill time and size
    are those of the entries the N-case set adds / holds. ``mode``: disk, ram (CacheDataset,
    cache_rate 1.0) or none (cache_rate 0.0: NIfTI decoded every iteration)."""
    cache = mode == "disk"
    tag = f"n{n}" + ("" if cache else f"_{mode}")
    run_dir = work / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    datalist = _subset(data, n, run_dir / "datalist.json")
    cache_dir = work / "cache"
    ov = _overrides(data, datalist, run_dir, str(cache_dir) if cache else "")
    ov["cache_rate"] = 0.0 if mode == "none" else 1.0
    row: dict = {"cases": n, "cache": {"disk": "disk", "ram": "RAM (CacheDataset, cache_rate 1.0)",
                                       "none": "none (cache_rate 0.0)"}[mode]}
    if cache:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "fill_cache", "--config_file", repr(TRAINING_CONFIGS),
               "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
        for k, v in {**ov, "num_workers": fill_threads}.items():
            cmd += [f"--{k}", _cli_value(v)]
        before = _du_mb(cache_dir)[1]
        fill_s, fill_rss = _run(cmd, run_dir / "fill.log")
        size_mb, files = _du_mb(cache_dir)
        row.update({"fill_s": round(fill_s, 1), "filled": files - before,
                    "fill_s_per_case": round(fill_s / max(files - before, 1), 3),
                    "fill_peak_rss_mb": round(fill_rss), "cache_mb": round(size_mb, 1), "cache_files": files})
    ov["train#trainer#epoch_length"] = iterations
    (run_dir / "overrides.json").write_text(json.dumps(ov, indent=1))
    result = run_dir / "train_result.json"
    train_s, train_rss = _run(bench_command("data") + ["--child", str(run_dir / "overrides.json"),
                                                       "--result", str(result)], run_dir / "train.log")
    timing = json.loads(result.read_text())
    row.update({"train_s": round(train_s, 1), "train_peak_rss_mb": round(train_rss),
                "iterations": timing["iterations"], "s_per_iteration": round(timing["s_per_iteration"], 3),
                "data_wait_s_per_iteration": round(timing["data_wait_s_per_iteration"], 3),
                "data_wait_share": round(timing["data_wait_share"], 3)})
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| cases | cache | fill: s/case | fill: peak RSS MB | cache on disk MB | training: peak RSS MB "
            "| s/iteration | data wait s/it | data wait share |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['cases']} | {r['cache'].split(' ')[0]} | {r.get('fill_s_per_case', '-')} | "
                     f"{r.get('fill_peak_rss_mb', '-')} | {r.get('cache_mb', '-')} | {r['train_peak_rss_mb']} | "
                     f"{r['s_per_iteration']:.3f} | {r['data_wait_s_per_iteration']:.3f} | {100 * r['data_wait_share']:.0f} % |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser, command: str = "data") -> None:
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 400])
    ap.add_argument("--iterations", type=int, default=30, help="training iterations per size (epoch_length)")
    ap.add_argument("--out", default="runs/bench_data_pipeline", help="work folder (phantoms, caches, results)")
    ap.add_argument("--json", default=None, help="result JSON (default <out>/bench_data_pipeline.json)")
    ap.add_argument("--workers", type=int, default=2, help="abdoseg generate --workers")
    ap.add_argument("--ram_baseline", type=int, nargs="*", default=[],
                    help="sizes to train also with the in-RAM CacheDataset (cache_dir '', cache_rate 1.0)")
    ap.add_argument("--no_cache_baseline", type=int, nargs="*", default=[],
                    help="sizes to train also without any cache (cache_dir '', cache_rate 0.0)")
    ap.add_argument("--fill_threads", type=int, default=2, help="threads filling the cache (fill_cache's num_workers)")
    ap.add_argument("--keep_cache", action="store_true", help="keep the cache folder (deleted at the end)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        child_train(args)
        return 0
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _generate(work, max(args.sizes + args.ram_baseline + args.no_cache_baseline), args.workers)
    print(f"phantoms ready in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    rows = []
    shutil.rmtree(work / "cache", ignore_errors=True)
    for n in sorted(args.sizes):
        rows.append(bench_size(n, data, work, args.iterations, "disk", args.fill_threads))
        print(json.dumps(rows[-1]), flush=True)
    if not args.keep_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    for mode, sizes in (("ram", args.ram_baseline), ("none", args.no_cache_baseline)):
        for n in sorted(sizes):
            rows.append(bench_size(n, data, work, args.iterations, mode, args.fill_threads))
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
              "cpus": os.cpu_count(), "iterations": args.iterations, "train_overrides": TRAIN_OVERRIDES,
              "total_s": round(time.perf_counter() - t0, 1), "rows": rows}
    out = Path(args.json) if args.json else work / "bench_data_pipeline.json"
    out.write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    print(f"\n{out} ({result['total_s']} s)")
    return 0
