#!/usr/bin/env python
"""The five seed systems side by side: each preset (``bundles/*/configs/presets/seed00X.json``),
CPU-sized, trained on the same phantoms with the same wall-time budget, then segmenting the same
held-out phantoms (a seed training never used), the real CTs and one full-size phantom.

Input: the folder of README command 1 (``abdoseg demo --out_dir runs/demo``): its phantoms, its
fused training labels (``rounds/round_1/datalist.json``, seed 003 fusion) and its coarse network
(for the systems whose coarse stage is this project's: seed 001, 002, 003). Systems with a coarse
stage of their own (seed 000, seed 004) train it from the coarse bundle's preset first.

Per system, in ``--out_dir/<system>/`` (kept apart; every step resumes from a marker):

1. bundle copies whose ``configs/train.json`` / ``inference.json`` are the bundle config merged
   with the preset and the CPU settings below (``abdoseg segment --bundle_dir`` then runs the
   system as is);
2. training with ``abdoseg.training.handlers.TimeBudget`` (``--budget_s``, split between the models a
   system has: seed 002 = organ model 1/2 + two tumor models 1/4 each; seed 000/004 give
   ``--coarse_budget_s`` to their coarse model on top, as the others reuse the demo's coarse net
   trained for about as long) and ``--max_epochs`` as the cap;
3. ``scripts/eval_accuracy.py`` (``abdoseg segment`` + FLARE23 metrics) on ``--unseen`` and
   ``--real_ct``; one full-size phantom segmented in its own process for the time and peak RSS.

Writes ``systems.json`` and ``systems.md`` (the table); ``--docs`` also puts the table into the
fine bundle's docs/README.md between the ``systems-table`` markers.

Usage::

    .venv/bin/abdoseg generate --out_dir runs/unseen7 --preset small --seed 7 --n_labeled 1 --n_unlabeled 0 --n_val 8
    .venv/bin/python scripts/bench.py systems --demo_dir runs/demo --unseen runs/unseen7 \\
        --real_ct ../shared/data/real_ct --out_dir runs/systems --docs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchlib import BUNDLES, FINE_DOCS, SCRIPTS, measure_process, phantom_cases, put_into_docs, segment_command

SYSTEMS = ("seed000", "seed001", "seed002", "seed003", "seed004")
#: the grid every CPU-sized system runs at (the project's default: 4 x 4 x 6 mm, 64 x 64 x 32 windows)
CPU_GRID = {"fine_spacing_mm": [4.0, 4.0, 6.0], "patch_size": [64, 64, 32]}
#: CPU settings per system (fine bundle, coarse bundle or None = the demo's coarse network).
#: Only grids and input sizes change; every network keeps the paper's width and depth.
CPU: dict[str, dict[str, Any]] = {
    "seed000": {"fine": {"fine_input_size": [64, 64, 64], "coarse_input_size": [64, 64, 64]},
                "coarse": {"input_size": [64, 64, 64]}},
    "seed001": {"fine": {**CPU_GRID, "network_def#channels": 16}, "coarse": None},
    "seed002": {"fine": dict(CPU_GRID), "coarse": None},
    "seed003": {"fine": dict(CPU_GRID), "coarse": None},
    "seed004": {"fine": {"fine_input_size": [64, 64, 64], "coarse_input_size": [64, 64, 64]},
                "coarse": {"input_size": [64, 64, 64]}},
}
#: the ids of the fine inference config that make up its coarse stage (restored to the bundle's
#: own for systems that use the demo's coarse network)
COARSE_IDS = ("coarse_hu_window", "coarse_spacing_mm", "coarse_roi_size", "coarse_network_def",
              "coarse_resampling", "coarse_intensity_normalization", "coarse_preprocessing")
#: the demo's optimizer (AdamW 2e-3, see abdoseg.demo): the papers' SGD 0.01 / Adam 1e-4 are set
#: for hundreds of epochs; ``--optimizer paper`` keeps them
SHORT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": 0.002,
                   "weight_decay": 1e-05}


def materialize(src: Path, dst: Path, preset: str | None, overrides: dict[str, Any],
                configs: tuple[str, ...], restore_from_base: tuple[str, ...] = ()) -> None:
    """Copy bundle ``src`` to ``dst`` (no weights) with each config = what its workflow merges
    (``abdoseg.bundle.config.config_files``: ``inference.json`` for inference, ``inference.json``
    + ``train.json`` for training) + preset + overrides, written out whole: the ``train.json``
    written here holds the entire training config (run it alone)."""
    from monai.bundle import ConfigParser

    from abdoseg.bundle.config import config_files

    shutil.copytree(src, dst, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.pt", "*.ts", "*.onnx", "eval", "cache", "__pycache__", "presets"))
    (dst / "models").mkdir(exist_ok=True)
    for name in configs:
        workflow = "training" if name == "train.json" else "inference"
        merged = ConfigParser.load_config_files(config_files(src, workflow, preset))
        base = ConfigParser.load_config_files(config_files(src, workflow))
        for key in restore_from_base:
            if key in base:
                merged[key] = base[key]
        parser = ConfigParser(config=merged)
        for key, value in overrides.items():
            try:
                parser[key] = value
            except (KeyError, IndexError, TypeError):  # an id of the other config (train vs inference)
                pass
        (dst / "configs" / name).write_text(json.dumps(parser.get(), indent=4) + "\n")


def run_bundle(bundle: Path, config: list[str], run_id: str, budget_s: float | None, log: Path,
               **overrides: Any) -> float:
    """``abdoseg.bundle.config.run_bundle`` with an optional TimeBudget overlay; returns wall seconds."""
    from abdoseg.bundle.config import run_bundle as run

    files = list(config)
    if budget_s:
        overlay = bundle / "configs" / "time_limit.json"
        overlay.write_text(json.dumps({"+train#handlers": [{"_target_": "abdoseg.training.handlers.TimeBudget",
                                                            "limit_s": float(budget_s)}]}) + "\n")
        files.append(overlay.name)
    return run(bundle, files, run_id, log=log, **overrides)


def timed_process(cmd: list[str], log: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one child process (output appended to ``log``)."""
    return {k: round(v, 2 if k.endswith("_s") else 1) for k, v in measure_process(cmd, log).items()}


def _epochs_done(models: Path) -> int | None:
    stats = models / "train_stats.json"
    if not stats.is_file():
        return None
    data = json.loads(stats.read_text())
    return data.get("epoch") or data.get("total_epochs")


def _datalist_with_lesion(datalist: Path, out: Path) -> Path:
    """The fused datalist with ``training_with_lesion`` (cases whose fused label holds a lesion):
    label_fusion writes that key; a datalist of an older demo gets it from the cases' groups."""
    dl = json.loads(datalist.read_text())
    if "training_with_lesion" not in dl:
        dl["training_with_lesion"] = [i for i in dl["training"] if str(i.get("group", "")).endswith("+tumor")]
    if not dl["training_with_lesion"]:
        raise SystemExit(f"{datalist}: no training case with a lesion for seed 002's tumor models")
    out.write_text(json.dumps(dl, indent=2) + "\n")
    return out


def run_system(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from abdoseg.networks import count_parameters
    from abdoseg.steps import MarkedSteps
    from monai.bundle import ConfigParser

    demo, out = Path(args.demo_dir).resolve(), Path(args.out_dir).resolve() / name
    steps = MarkedSteps(out, name)
    log = out / "log.txt"
    data = demo / "data"
    fused = demo / "rounds" / "round_1" / "datalist.json"
    cpu = CPU[name]
    fine, coarse = out / "bundles" / "fine_organ_tumor", out / "bundles" / "coarse_roi"
    fine_overrides = dict(cpu["fine"])
    if args.optimizer == "short":
        fine_overrides["optimizer"] = SHORT_OPTIMIZER
    materialize(BUNDLES / "fine_organ_tumor", fine, name, fine_overrides, ("train.json", "inference.json"),
                restore_from_base=COARSE_IDS if cpu["coarse"] is None else ())
    # RAM cache, filled before the trainer starts: the budget is spent on training, not on resampling
    common = {"dataset_dir": str(data), "seed": args.seed, "cache_dir": "", "num_workers": 0}
    times: dict[str, float] = json.loads((out / "train_seconds.json").read_text()) if (out / "train_seconds.json").is_file() else {}

    def save_times() -> None:
        (out / "train_seconds.json").write_text(json.dumps(times, indent=2) + "\n")

    def train_coarse() -> None:
        if cpu["coarse"] is None:
            shutil.copy2(demo / "bundles" / "fine_organ_tumor" / "models" / "coarse_model.pt", fine / "models" / "coarse_model.pt")
            return
        overrides = dict(cpu["coarse"])
        if args.optimizer == "short":
            overrides["optimizer"] = SHORT_OPTIMIZER
        materialize(BUNDLES / "coarse_roi", coarse, name, overrides, ("train.json", "inference.json"))
        times["coarse"] = run_bundle(coarse, ["train.json"], "training", args.coarse_budget_s, log, max_epochs=args.max_epochs,
                                     val_interval=args.max_epochs, **common)
        save_times()
        best = coarse / "models" / ("model.pt" if (coarse / "models" / "model.pt").is_file() else "model_final.pt")
        shutil.copy2(best, fine / "models" / "coarse_model.pt")

    steps.run("train_coarse", train_coarse)

    def train(models: Path, budget: float, seed: int, **extra: Any) -> None:
        t = run_bundle(fine, ["train.json"], "training", budget, log, datalist=str(extra.pop("datalist", fused)),
                       train_key=extra.pop("train_key", "training"), ckpt_dir=str(models), max_epochs=args.max_epochs,
                       val_interval=args.max_epochs, **{**common, "seed": seed}, **extra)
        times[models.name] = t
        save_times()

    if name == "seed002":
        lesion_dl = _datalist_with_lesion(fused, out / "datalist_with_lesion.json")
        steps.run("train_organ_model", lambda: train(fine / "models", args.budget_s / 2, args.seed))
        for k in (1, 2):
            def tumor(k: int = k) -> None:
                models = fine / f"models_tumor_{k}"
                train(models, args.budget_s / 4, args.seed + k, datalist=lesion_dl, train_key="training_with_lesion",
                      key_metric_channels=[0, 14])
                best = models / ("model.pt" if (models / "model.pt").is_file() else "model_final.pt")
                shutil.copy2(best, fine / "models" / f"tumor_{k}.pt")
            steps.run(f"train_tumor_model_{k}", tumor)
    else:
        steps.run("train_fine", lambda: train(fine / "models", args.budget_s, args.seed))

    acc_dir = out / "accuracy"
    eval_cmd = [sys.executable, str(SCRIPTS / "eval_accuracy.py"), "--bundle", str(fine), "--out_dir", str(acc_dir),
                "--phantoms", str(Path(args.unseen).resolve())]
    if args.real_ct:
        eval_cmd += ["--real_ct", str(Path(args.real_ct).resolve())]
    steps.run("evaluate", lambda: timed_process(eval_cmd, log))

    def time_fullsize() -> None:
        src = Path(args.fullsize_ct).resolve()
        dst = out / "fullsize_pred" / src.name.replace("_0000.nii.gz", ".nii.gz")
        if dst.exists():
            dst.unlink()
        runs = [timed_process(segment_command(src, dst, fine), log) for _ in range(args.repeats)]
        (out / "fullsize.json").write_text(json.dumps(runs, indent=2) + "\n")

    steps.run("time_fullsize", time_fullsize)

    acc = json.loads((acc_dir / "summary.json").read_text())
    ph = acc["phantoms"]
    runs = json.loads((out / "fullsize.json").read_text())
    med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2]  # noqa: E731
    parser = ConfigParser()
    parser.read_config(str(fine / "configs" / "inference.json"))
    n_params = count_parameters(parser.get_parsed_content("network_def"))
    models = [fine / "models"] + sorted(fine.glob("models_tumor_*"))
    return {
        "system": name, "params_m": round(n_params / 1e6, 2),
        "network": parser.get("network_def")["_target_"].split(".")[-1],
        "train_s": round(sum(times.values()), 1), "epochs": [_epochs_done(m) for m in models],
        "organ_dsc": ph["organ_dsc"], "organ_nsd": ph["organ_nsd"], "lesion_dsc": ph["lesion_dsc"],
        "lesion_nsd": ph["lesion_nsd"],
        "per_class_dsc": {k: v.get("dsc") for k, v in ph.get("per_class", {}).items()},
        "real_ct_dsc": acc.get("real_ct_dsc", {}),
        "fullsize_wall_s": med("wall_s"), "fullsize_cpu_s": med("cpu_s"), "fullsize_peak_rss_mb": med("peak_rss_mb"),
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from abdoseg.io import load_nifti

    shape = load_nifti(Path(args.fullsize_ct))[0].shape
    real = sorted({c for r in rows for c in r["real_ct_dsc"]})
    head = ("| system | network (params) | train s (epochs) | organ DSC | organ NSD | lesion DSC | lesion NSD | "
            + "".join(f"{c} liver / spleen / kidneys | " for c in real)
            + f"{'x'.join(map(str, shape))} CT: s / peak MB |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|" + "---|" * len(real) + "---|"]
    for r in rows:
        cells = []
        for c in real:
            d = r["real_ct_dsc"].get(c, {})
            kid = [d[k] for k in ("right kidney", "left kidney") if k in d]
            cells.append(" / ".join(f"{d[k]:.2f}" if k in d else "-" for k in ("liver", "spleen"))
                         + " / " + ("-" if not kid else f"{sum(kid) / len(kid):.2f}"))
        epochs = "+".join(str(e) if e is not None else "?" for e in r["epochs"])
        lines.append(f"| {r['system']} | {r['network']} ({r['params_m']} M) | {r['train_s']:.0f} ({epochs}) | "
                     f"{r['organ_dsc']:.3f} | {r['organ_nsd']:.3f} | {r['lesion_dsc']:.3f} | {r['lesion_nsd']:.3f} | "
                     + "".join(f"{c} | " for c in cells)
                     + f"{r['fullsize_wall_s']:.1f} / {r['fullsize_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser, command: str = "systems") -> None:
    ap.add_argument("--demo_dir", required=True, help="output folder of README command 1 (abdoseg demo)")
    ap.add_argument("--unseen", required=True, help="held-out phantoms (abdoseg generate --seed 7 ...)")
    ap.add_argument("--real_ct", default="", help="real CT folder (test set only), e.g. ../shared/data/real_ct")
    ap.add_argument("--fullsize_ct", default="", help="full-size CT to time (default: a 512x512x150 phantom, seed 9002)")
    ap.add_argument("--out_dir", default="runs/systems")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--budget_s", type=float, default=420.0, help="training wall time per system (fine models)")
    ap.add_argument("--coarse_budget_s", type=float, default=60.0, help="coarse training of seed 000 / seed 004")
    ap.add_argument("--max_epochs", type=int, default=50)
    ap.add_argument("--optimizer", choices=("short", "paper"), default="short")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="full-size timing runs per system (median)")
    ap.add_argument("--docs", action="store_true", help="write the table into the fine bundle's docs/README.md")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.fullsize_ct:
        args.fullsize_ct = str(phantom_cases(out / "fullsize", [150], seed=9002, labels=False)[0][0])
    rows = []
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if name not in CPU:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        rows.append(run_system(name, args))
        (out / "systems.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table(rows, args), flush=True)
    md = table(rows, args)
    (out / "systems.md").write_text(md + "\n")
    if args.docs:
        put_into_docs(md, FINE_DOCS, "systems-table")
    print(md)
    return 0
