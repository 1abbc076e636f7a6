#!/usr/bin/env python
"""Learning efficiency of fine-stage training recipes: each recipe trains on the same data with
the same wall-time budget, one after the other in this invocation, and every snapshot along the
way segments phantoms of a seed that training never used (the whole cascade, FLARE23 rules).
Prints the learning curves (organ DSC vs training seconds) and a throughput table.

Input: the folder of README command 1 (``abdoseg demo --out_dir runs/demo``): its phantoms, its
fused training labels (``rounds/round_1/datalist.json``), its trained fine bundle copy (configs
with the demo's settings, and ``models/coarse_model.pt`` for the cascade's coarse stage).

A *recipe* is a JSON overlay of the fine bundle's ``train.json`` ids, merged after it (as the
presets are), and after ``inference.json`` for the segmentation. Built in:

- ``recipe``: the fine bundle's recipe as the demo runs it (no overlay: bfloat16 autocast on a CPU
  with native bf16, AdamW 2e-3, 64x64x32 patches at 4x4x6 mm, ...);
- ``previous``: the recipe before issue 10's throughput work, i.e. float32 training
  (``{"train_autocast_dtype": null}``), same everything else;
- ``workers1``: the recipe with one DataLoader worker process (``{"num_workers": 1}``), which
  prepares the next patches while the main process computes;
- on request (``--recipe NAME=``): ``margin_jitter40`` (training ROI margins 0-60 mm instead of
  10-30 mm) and ``lesion_crops3`` (lesion-centred patches 3x as often as each organ's).

``--recipe NAME=FILE.json`` (repeatable) replaces them with your own overlays (``NAME=`` alone
is a built-in recipe, or the bundle's recipe as is). ``--recipe NAME=@DIR`` trains the bundle's
recipe on every labelled phantom of the dataset ``DIR`` (``abdoseg generate``) with its hidden full
truth as labels (more data: the committed weights' recipe). A rerun with more recipes into the same
``--out_dir`` trains only the new ones and tabulates all.

Per recipe, in ``--out_dir/<name>/`` (every step resumes):

1. a copy of the demo's fine bundle with ``configs/recipe.json`` (the overlay) and
   ``configs/learning_curve.json`` (``+train#handlers``: :class:`abdoseg.training.handlers.LearningCurveRecorder`
   every ``--every_s`` seconds and :class:`abdoseg.training.handlers.TimeBudget` at ``--budget_s``);
2. ``python -m monai.bundle run training`` on the fused labels (``--max_epochs`` is the cap the
   learning-rate schedule counts; no validation in between, so the clock counts training only);
3. every snapshot ``curve_<k>.pt`` segments ``--unseen/imagesVal`` through the bundle's
   ``inference.json`` (+ ``recipe.json``), scored against ``labelsVal`` (organ DSC/NSD, lesion DSC,
   per-lesion detection); results are kept in ``curve_eval.json``.

Writes ``learning.json``, ``learning.md`` (curve table + throughput table) and
``learning_curve.png``; ``--docs`` puts the Markdown into the fine bundle's docs/README.md
between the ``learning-table`` markers.

Usage::

    .venv/bin/abdoseg demo --out_dir runs/demo
    .venv/bin/abdoseg generate --out_dir runs/unseen7 --preset small --seed 7 --n_labeled 1 --n_unlabeled 0 --n_val 8
    .venv/bin/python scripts/bench.py learning --demo_dir runs/demo --unseen runs/unseen7 \\
        --out_dir runs/learning --budget_s 660 --every_s 110 --docs
    # more recipes into the same folder (only the new ones train):
    .venv/bin/python scripts/bench.py learning --out_dir runs/learning --budget_s 660 --every_s 110 \
        --recipe previous= --recipe recipe= --recipe workers1= --recipe margin_jitter40= --recipe lesion_crops3= --docs
    # the committed weights: 40 minutes on 96 phantoms (learning rate decaying over the budget):
    .venv/bin/abdoseg generate --out_dir runs/data96 --preset small --seed 100 --n_labeled 96 --n_unlabeled 0 --n_val 0
    .venv/bin/python scripts/bench.py learning --out_dir runs/learn_long --budget_s 2400 --every_s 480 \\
        --recipe data96=@runs/data96 --docs --docs_section learning-long
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from benchlib import FINE_DOCS, link_files, put_into_docs
#: built-in recipes: name -> train.json overlay (``None`` values are JSON ``null``)
RECIPES: dict[str, dict[str, Any]] = {
    "previous": {"train_autocast_dtype": None},
    "recipe": {},
    "workers1": {"num_workers": 1},
    # wider training ROI margins (0-60 mm instead of 10-30 mm): the fine net also sees the
    # context a loose coarse ROI hands it at inference (pelvis, back muscles)
    "margin_jitter40": {"margin_jitter_mm": 40.0},
    # lesion-centred patches 3x as often as each organ's
    "lesion_crops3": {"crop_class_ratios": "$[0.5] + [1.0] * (@num_classes - 2) + [3.0]"},
}
#: what runs without ``--recipe``
DEFAULT_RECIPES = ("previous", "recipe", "workers1")


def parse_recipes(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``["name=file.json", "name="]`` -> ``{name: overlay}`` (``name=`` alone: the built-in
    :data:`RECIPES` entry, or no overlay); none given: :data:`DEFAULT_RECIPES`."""
    if not specs:
        return {name: RECIPES[name] for name in DEFAULT_RECIPES}
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"--recipe {spec!r}: need NAME=FILE.json (NAME: letters, digits, - or _)")
        if not file:
            out[name] = dict(RECIPES.get(name, {}))
            continue
        if file.startswith("@"):
            out[name] = truth_datalist_overlay(Path(file[1:]))
            continue
        path = Path(file)
        try:
            overlay = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--recipe {spec!r}: {path}: cannot read a JSON object ({exc})") from None
        if not isinstance(overlay, dict):
            raise SystemExit(f"--recipe {spec!r}: {path}: must hold a JSON object of train.json ids")
        out[name] = overlay
    return out


def truth_datalist_overlay(dataset_dir: Path) -> dict[str, Any]:
    """Recipe overlay that trains on every labelled phantom of ``dataset_dir`` (``abdoseg generate``)
    with its hidden full truth (``groundtruth/labelsTr``) as the label, i.e. more phantoms with the
    labels the fusion approaches (organ DSC 0.975 against truth) and all their lesions. Writes
    ``dataset_dir/datalist_truth.json`` (atomic) and returns ``{"dataset_dir", "datalist"}``."""
    from abdoseg.io import atomic_path

    from abdoseg.io import nifti_cases

    root = dataset_dir.resolve()
    cases = sorted(nifti_cases(root / "imagesTr")[0])
    missing = [c for c in cases if not (root / "groundtruth" / "labelsTr" / f"{c}.nii.gz").is_file()]
    if not cases or missing:
        raise SystemExit(f"{root}: need imagesTr/*_0000.nii.gz with groundtruth/labelsTr truth "
                         f"(a dataset of `abdoseg generate`); missing truth for {missing[:5]}" if missing else
                         f"{root}: no imagesTr/*_0000.nii.gz (run `abdoseg generate --out_dir {root} --n_labeled 96`)")
    training = [{"image": f"imagesTr/{c}_0000.nii.gz", "label": f"groundtruth/labelsTr/{c}.nii.gz",
                 "annotated_classes": list(range(1, 15)), "pseudo_A": f"pseudo_A/{c}.nii.gz"} for c in cases]
    datalist = {"training": training, "validation": [{"image": t["image"], "label": t["label"]} for t in training[:2]]}
    with atomic_path(root / "datalist_truth.json") as tmp:
        Path(tmp).write_text(json.dumps(datalist, indent=1))
    return {"dataset_dir": str(root), "datalist": str(root / "datalist_truth.json")}


def demo_fine_epochs(bundle: Path) -> int:
    """The epochs the demo trained its fine bundle for (``models/train_stats.json``)."""
    stats = bundle / "models" / "train_stats.json"
    try:
        return int(json.loads(stats.read_text())["total_epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"{stats}: cannot read the demo's fine epochs; pass --max_epochs") from None


def prepare_bundle(src: Path, dst: Path, overlay: dict[str, Any], budget_s: float, every_s: float,
                   wallclock_lr: bool = True) -> None:
    """Copy the trained demo bundle (configs + coarse weights, not its fine weights) and write the
    recipe and learning-curve overlays. ``wallclock_lr``: the learning rate decays over
    ``budget_s`` (:class:`abdoseg.training.handlers.WallClockPolyLR` in place of the epoch-level
    ``LrScheduleHandler``, ``train#handlers#0``), so every recipe ends its schedule when its
    minutes end, whatever its speed."""
    shutil.copytree(src, dst, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model.pt", "model_final.pt", "curve*", "eval", "cache", "__pycache__"))
    (dst / "configs" / "recipe.json").write_text(json.dumps(overlay, indent=4) + "\n")
    handlers = [{"_target_": "abdoseg.training.handlers.LearningCurveRecorder", "save_dir": "$@ckpt_dir + '/curve'",
                 "every_s": float(every_s), "network": "@network"},
                {"_target_": "abdoseg.training.handlers.TimeBudget", "limit_s": float(budget_s)}]
    curve: dict[str, Any] = {"+train#handlers": handlers}
    if wallclock_lr:
        curve["train#handlers#0"] = {"_target_": "abdoseg.training.handlers.WallClockPolyLR", "optimizer": "@optimizer",
                                     "budget_s": float(budget_s)}
    (dst / "configs" / "learning_curve.json").write_text(json.dumps(curve, indent=4) + "\n")


def evaluate_snapshots(bundle: Path, unseen: Path, tag: str = "") -> list[dict[str, Any]]:
    """Segment every phantom of ``unseen/imagesVal`` with every snapshot of ``bundle/models/curve``;
    returns the curve points with ``organ_dsc``, ``organ_nsd``, ``lesion_dsc``, ``per_class`` and
    ``lesion_detection`` added (under ``point[tag]`` when ``tag`` is given, e.g. ``"seen"`` for
    the training phantoms). Cached per snapshot in ``curve_eval.json`` (``curve_eval_<tag>.json``)."""
    import torch
    from tqdm import tqdm

    from abdoseg.networks.checkpoints import load_weights
    from abdoseg.evaluation.evaluate import summarize, summarize_detection
    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import atomic_path, load_nifti, voxel_spacing_mm
    from abdoseg.labels import LESION_ID
    from abdoseg.evaluation.metrics import evaluate_case, lesion_detection

    curve_dir = bundle / "models" / "curve"
    points = json.loads((curve_dir / "curve.json").read_text())
    cache_file = curve_dir / (f"curve_eval_{tag}.json" if tag else "curve_eval.json")
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cases = sorted((unseen / "imagesVal").glob("*_0000.nii.gz"))
    if not cases:
        raise SystemExit(f"{unseen / 'imagesVal'}: no *_0000.nii.gz phantoms (run abdoseg generate, see --help)")
    segmenter = None
    for point in points:
        target = point.setdefault(tag, {}) if tag else point
        if point["file"] in cache:
            target.update(cache[point["file"]])
            continue
        if segmenter is None:
            torch.manual_seed(0)
            segmenter = segmenter_from_bundle(bundle, config=["configs/inference.json", "configs/recipe.json"],
                                              model_path=curve_dir / points[0]["file"])
        load_weights(segmenter.network, curve_dir / point["file"])
        rows, detections = [], {}
        for image in tqdm(cases, desc=f"{bundle.parent.name} {point['file']}", unit="case", file=sys.stderr):
            case = image.name[: -len("_0000.nii.gz")]
            gt, _, header = load_nifti(unseen / "labelsVal" / f"{case}.nii.gz")
            mask, _ = segmenter({"image": str(image)})
            spacing = voxel_spacing_mm(header)
            for c, (dsc, nsd) in sorted(evaluate_case(gt, mask, spacing).items()):
                rows.append({"case": case, "class": c, "dsc": round(dsc, 4), "nsd": round(nsd, 4)})
            detections[case] = lesion_detection(gt, mask, spacing, LESION_ID)
        summary = summarize(rows)
        result = {"organ_dsc": summary["organ_dsc"], "organ_nsd": summary["organ_nsd"],
                  "lesion_dsc": summary["lesion_dsc"],
                  "per_class": {k: v["dsc"] for k, v in summary["per_class"].items()},
                  "lesion_detection": summarize_detection(detections, rows)}
        target.update(result)
        cache[point["file"]] = result
        with atomic_path(cache_file) as tmp:
            Path(tmp).write_text(json.dumps(cache, indent=1))
    return points


def throughput(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Training throughput from the last curve point: voxels/s, samples/s, s/iteration, data share."""
    last = points[-1]
    wall = max(last["wall_s"], 1e-9)
    per_it = [(b["wall_s"] - a["wall_s"]) / (b["iteration"] - a["iteration"]) for a, b in zip(points, points[1:])
              if b["iteration"] > a["iteration"]]
    return {"wall_s": last["wall_s"], "cpu_s": last["cpu_s"], "iterations": last["iteration"], "epochs": last["epoch"],
            "samples": last["samples"], "voxels_per_s": round(last["voxels"] / wall),
            "samples_per_s": round(last["samples"] / wall, 3),
            "s_per_iteration_median": round(statistics.median(per_it), 3) if per_it else None,
            "data_fraction": round(last["data_s"] / wall, 3), "n_intervals": len(per_it)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, sd = _mean_sd(values)
    return f"{m:.3f}" if len(values) < 2 else f"{m:.3f} ± {sd:.3f}"


def group_runs(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{"name_s0": ..., "name_s1": ...}`` -> ``{"name": [run, run]}`` (runs carry ``recipe``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in results.values():
        groups.setdefault(run["recipe"], []).append(run)
    return groups


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Curve table (mean over seeds per snapshot; unseen and, where measured, seen) and the
    summary table (final organ DSC mean ± SD over seeds, throughput, lesion detection)."""
    from abdoseg.labels import class_name

    groups = group_runs(results)
    names = list(groups)
    first = next(iter(results.values()))
    seeds = sorted({r["seed"] for r in results.values()})
    has_seen = any("seen" in r["points"][-1] for r in results.values())
    lines = [f"Budget {args.budget_s:g} s of training per run (wall, 2-core CPU, one run at a time), "
             f"snapshot every {args.every_s:g} s, learning rate "
             + ("decaying over the budget (`WallClockPolyLR`)" if args.lr_schedule == "wallclock"
                else "on the bundle's epoch schedule")
             + f", training seeds {', '.join(map(str, seeds))}; organ DSC = mean of the 13 organ classes on the "
             f"{first['n_unseen']} phantoms of `{Path(args.unseen).name}` (a seed training never used)"
             + (" and on the first training phantoms (`seen`, their hidden ground truth)" if has_seen else "")
             + ", whole cascade, FLARE23 rules. Command: `python scripts/bench.py learning "
             f"--budget_s {args.budget_s:g} --every_s {args.every_s:g}"
             + (f" --max_epochs {args.max_epochs}" if args.max_epochs else "")
             + (f" --seeds {' '.join(map(str, args.seeds))}" if list(args.seeds) != [0] else "")
             + "".join(f" --recipe {r}" for r in getattr(args, "recipe", []) or []) + "` (see its --help).", "",
             "Learning curves: organ DSC of each snapshot (mean over seeds), unseen"
             + (" / seen" if has_seen else "") + ", at its training wall seconds:", "",
             "| snapshot | " + " | ".join(f"{n}: s | {n}: DSC" for n in names) + " |",
             "|---:|" + "---:|---:|" * len(names)]
    for k in range(max(len(r["points"]) for r in results.values())):
        cells = []
        for n in names:
            pts = [r["points"][k] for r in groups[n] if k < len(r["points"])]
            if not pts:
                cells += ["", ""]
                continue
            cell = f"{statistics.fmean(p['organ_dsc'] for p in pts):.3f}"
            if has_seen and all("seen" in p for p in pts):
                cell += f" / {statistics.fmean(p['seen']['organ_dsc'] for p in pts):.3f}"
            cells += [f"{statistics.fmean(p['wall_s'] for p in pts):.0f}", cell]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Final snapshot, mean ± SD over the training seeds:", "",
              "| recipe | seeds | unseen organ DSC | unseen organ NSD | seen organ DSC | lesion DSC | lesions found "
              "| FP / case | iterations | s/iteration | training voxels/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = statistics.fmean(r["throughput"]["voxels_per_s"] for r in groups[names[0]])
    for name in names:
        runs = groups[name]
        lasts = [r["points"][-1] for r in runs]
        dets = [p.get("lesion_detection") or {} for p in lasts]
        found = sum(d.get("n_detected", 0) for d in dets)
        total = sum(d.get("n_lesions", 0) for d in dets)
        fp = _mean_sd([d.get("false_positives_per_case") for d in dets if d])[0]
        seen = [p["seen"]["organ_dsc"] for p in lasts if "seen" in p]
        vox = statistics.fmean(r["throughput"]["voxels_per_s"] for r in runs)
        ratio = f" ({vox / base:.2f}x)" if base and name != names[0] else ""
        per_it = [r["throughput"]["s_per_iteration_median"] for r in runs if r["throughput"]["s_per_iteration_median"]]
        lines.append(f"| {name} | {len(runs)} | {_fmt([p['organ_dsc'] for p in lasts])} | "
                     f"{_fmt([p['organ_nsd'] for p in lasts])} | {_fmt(seen) if seen else '-'} | "
                     f"{_fmt([p['lesion_dsc'] for p in lasts])} | {found} / {total} | {fp:.2f} | "
                     f"{statistics.fmean(r['throughput']['iterations'] for r in runs):.0f} | "
                     f"{statistics.median(per_it) if per_it else float('nan'):.3f} | {vox:,.0f}{ratio} |")
    worst = {}
    for name in names:
        per_class: dict[str, list[float]] = {}
        for r in groups[name]:
            for c, v in r["points"][-1]["per_class"].items():
                per_class.setdefault(c, []).append(v)
        worst[name] = sorted(((c, statistics.fmean(v)) for c, v in per_class.items()), key=lambda kv: kv[1])[:4]
    lines += ["", "Weakest classes at the end (unseen, mean over seeds): " + "; ".join(
        f"{name}: " + ", ".join(f"{class_name(int(c))} {v:.2f}" for c, v in w) for name, w in worst.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Organ DSC against training seconds per run: unseen solid, seen (training phantoms) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abdoseg.io import atomic_path

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    colors: dict[str, Any] = {}
    for run_name, res in results.items():
        pts = res["points"]
        recipe = res["recipe"]
        label = f"{recipe}: unseen" if recipe not in colors else None
        line, = ax.plot([p["wall_s"] for p in pts], [p["organ_dsc"] for p in pts], marker="o", label=label,
                        color=colors.get(recipe))
        colors.setdefault(recipe, line.get_color())
        if all("seen" in p for p in pts):
            ax.plot([p["wall_s"] for p in pts], [p["seen"]["organ_dsc"] for p in pts], marker=".", linestyle="--",
                    color=colors[recipe], label=f"{recipe}: seen (training phantoms)" if label else None)
    ax.set_xlabel("training wall seconds (2-core CPU)")
    ax.set_ylabel("organ DSC, mean of 13 organs")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Learning curves, one line per training seed (scripts/bench.py learning)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def make_seen_set(demo: Path, out: Path, n: int) -> Path:
    """``out/seen/{imagesVal,labelsVal}``: links to the first ``n`` labelled training phantoms of
    the demo and their hidden full ground truth (``data/groundtruth/labelsTr``), so the snapshots
    are scored on data they were trained on, beside the unseen seed."""
    from abdoseg.io import nifti_cases

    images = sorted(nifti_cases(demo / "data" / "imagesTr")[0].items())[:n]
    truths = []
    for case, _ in images:
        truth = demo / "data" / "groundtruth" / "labelsTr" / f"{case}.nii.gz"
        if not truth.is_file():
            raise SystemExit(f"{truth}: no hidden ground truth for training phantom {case} (a phantom dataset of abdoseg generate?)")
        truths.append(truth)
    seen = out / "seen"
    link_files(seen / "imagesVal", [image for _, image in images])
    link_files(seen / "labelsVal", truths)
    return seen


def add_arguments(ap: argparse.ArgumentParser, command: str = "learning") -> None:
    ap.add_argument("--demo_dir", default="runs/demo", help="a finished `abdoseg demo` folder")
    ap.add_argument("--unseen", default="runs/unseen7", help="phantoms of an unused seed (imagesVal/ + labelsVal/)")
    ap.add_argument("--out_dir", default="runs/learning")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=overlay.json (repeatable); default: previous, recipe, workers1")
    ap.add_argument("--budget_s", type=float, default=660.0, help="training wall seconds per run")
    ap.add_argument("--every_s", type=float, default=110.0, help="seconds between snapshots")
    ap.add_argument("--lr_schedule", choices=("wallclock", "epochs"), default="wallclock",
                    help="wallclock: poly decay over --budget_s (every recipe ends its schedule with its minutes); "
                         "epochs: the bundle's schedule over --max_epochs")
    ap.add_argument("--max_epochs", type=int, default=0,
                    help="epoch cap (0: 10000 with --lr_schedule wallclock, else the demo's fine epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per recipe (the run-to-run spread)")
    ap.add_argument("--seen", type=int, default=4, help="also score every snapshot on this many training phantoms (0: off)")
    ap.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # old spelling of --seeds N
    ap.add_argument("--docs", action="store_true", help="write the tables into the fine bundle's docs/README.md")
    ap.add_argument("--docs_section", default="learning-table",
                    help="the docs' <!-- SECTION:start/end --> markers to write between")


def run(args: argparse.Namespace) -> int:
    if args.seed is not None:
        args.seeds = [args.seed]

    from abdoseg.bundle.config import run_bundle
    from abdoseg.io import atomic_path
    from abdoseg.steps import MarkedSteps

    demo, unseen, out = Path(args.demo_dir).resolve(), Path(args.unseen).resolve(), Path(args.out_dir).resolve()
    src = demo / "bundles" / "fine_organ_tumor"
    datalist = demo / "rounds" / "round_1" / "datalist.json"
    for need in (src / "configs" / "train.json", src / "models" / "coarse_model.pt", datalist, unseen / "labelsVal"):
        if not need.exists():
            raise SystemExit(f"{need}: not found (run README command 1, `abdoseg demo --out_dir {args.demo_dir}`, "
                             "and generate the unseen phantoms first; see --help)")
    max_epochs = args.max_epochs or (10000 if args.lr_schedule == "wallclock" else demo_fine_epochs(src))
    recipes = parse_recipes(args.recipe)
    seen = make_seen_set(demo, out, args.seen) if args.seen > 0 else None
    runs = [(name, seed) for name in recipes for seed in args.seeds]
    for name, seed in runs:
        overlay = recipes[name]
        work = out / f"{name}_s{seed}"
        bundle = work / "bundle"
        steps = MarkedSteps(work, "learning")
        steps.run("prepare", lambda: prepare_bundle(src, bundle, overlay, args.budget_s, args.every_s,
                                                    wallclock_lr=args.lr_schedule == "wallclock"))
        # a recipe may bring its own training data (e.g. more phantoms): its dataset_dir/datalist win
        data_args = {"dataset_dir": str(demo / "data"), "datalist": str(datalist)}
        data_args = {k: v for k, v in data_args.items() if k not in overlay}
        steps.run("train", lambda: run_bundle(
            bundle, ["inference.json", "train.json", "recipe.json", "learning_curve.json"], "training", log=work / "train.log",
            train_key="training", label_mode="full", max_epochs=int(max_epochs), val_interval=int(max_epochs) + 1,
            seed=seed, **data_args))
        print(f"{name} seed {seed}: trained ({work / 'train.log'})", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for name, seed in runs:
        bundle = out / f"{name}_s{seed}" / "bundle"
        points = evaluate_snapshots(bundle, unseen)
        if seen is not None:
            points = [dict(p, seen=q["seen"]) for p, q in zip(points, evaluate_snapshots(bundle, seen, tag="seen"))]
        results[f"{name}_s{seed}"] = {"recipe": name, "seed": seed, "overlay": recipes[name], "points": points,
                                      "throughput": throughput(points),
                                      "n_unseen": len(list((unseen / "imagesVal").glob("*_0000.nii.gz")))}
    md = markdown(results, args)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "learning.json") as tmp:
        Path(tmp).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    with atomic_path(out / "learning.md") as tmp:
        Path(tmp).write_text(md)
    plot(results, out / "learning_curve.png")
    print(md)
    if args.docs:
        put_into_docs(md, FINE_DOCS, args.docs_section)
        print(f"tables written into {FINE_DOCS}", file=sys.stderr)
    return 0
