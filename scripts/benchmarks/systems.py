#!/usr/bin/env python
"""The five seed systems side by side: each preset (``bundles/*/configs/presets/seed00X.json``),
CPU-sized, each making its training labels by its own paper's procedure from the same raw
phantoms, trained with the same wall-time budget, then segmenting the same held-out phantoms (a
seed training never used), the real CTs and one full-size phantom.

Input: the folder of README command 1 (``abdoseg demo --out_dir runs/demo``): its raw phantoms
(``data/``: partial labels, pseudo labels A and B, unlabeled scans, written once by ``abdoseg
generate`` + ``abdoseg prepare``) and its coarse network (the cascade's ROI for every teacher and
for the systems whose coarse stage is this project's: seed 001, 002, 003). The demo's own fused
labels are not used. Systems with a coarse stage of their own (seed 000, seed 004) train it from
the coarse bundle's preset on their own labels.

Per system, in ``--out_dir/<system>/`` (kept apart; every step resumes from a marker):

1. bundle copies whose ``configs/train.json`` / ``inference.json`` are the bundle config merged
   with the preset and the CPU settings below (``abdoseg segment --bundle_dir`` then runs the
   system as is);
2. ``labels``: the system's own label procedure (:data:`LABELS`), scaled down to
   ``--label_epochs`` epochs per teacher training (seed 003's teacher: at least 3, its S1-S3 are
   its last three epochs) and ``--rounds`` rounds (seed 001), written to ``labels/datalist.json``
   (+ ``labels/labels.json``: procedure, seconds, counts);
3. training on that datalist with ``abdoseg.training.handlers.TimeBudget`` (``--budget_s``, split
   between the models a system has: seed 002 = organ model 1/2 + two tumor models 1/4 each; seed
   000/004 give ``--coarse_budget_s`` to their coarse model on top, as the others reuse the demo's
   coarse net trained for about as long) and ``--max_epochs`` as the cap; validation every
   ``--val_interval`` epochs (teachers and students), and the checkpoint each preset chooses
   (:data:`FINAL_CHECKPOINT`: the last weights for seed 001 / 003, the best validation for the
   others, seed 002's tumor models by the lesion score);
4. ``scripts/eval_accuracy.py`` (``abdoseg segment`` + FLARE23 metrics) on ``--unseen`` and
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


#: each system's own label procedure (the fine docs' seed tables), as run here from the raw phantoms
LABELS = {
    "seed000": "seed 003 fusion of the labelled cases (A ∪ B, partial label as referee); unlabeled scans not used",
    "seed001": "rounds with the seed001 preset: round 1 on the fully labelled cases, each round's prediction fills "
               "every unannotated class and labels the unlabeled scans, uncertainty selection (threshold) in the "
               "last round",
    "seed002": "Dataset 1: the CSM (fine default recipe on the fully labelled cases) fills every unannotated organ "
               "and labels the unlabeled scans' organs (rule seed004, teacher_organs); OSM on training, TSMs on "
               "the real tumor annotations (training_with_lesion)",
    "seed003": "teacher (seed003_teacher preset, partial labels) saving S1-S3 at its last three epochs; seed 003 "
               "fusion (labelled: A ∪ B with the partial label as referee; unlabeled: S1 referee, lesion 2-of-3 "
               "vote of S1-S3)",
    "seed004": "teacher (fine default recipe on the fully labelled cases) supplements each labelled case's "
               "unannotated organs (rule seed004); lesion never pseudo-labelled; unlabeled scans skipped",
}
#: short names for the table
LABELS_SHORT = {"seed000": "A∪B fusion", "seed001": "{rounds} rounds + selection", "seed002": "CSM label sets",
                "seed003": "S1-S3 teacher + fusion", "seed004": "teacher supplement"}
#: systems whose preset keeps the last weights (``val_interval`` = ``max_epochs``: nnU-Net's final
#: checkpoint); the others keep the best validation checkpoint (``model.pt``)
FINAL_CHECKPOINT = ("seed001", "seed003")


def _epochs_done(models: Path) -> int | None:
    stats = models / "train_stats.json"
    if not stats.is_file():
        return None
    data = json.loads(stats.read_text())
    return data.get("epoch") or data.get("total_epochs")


def _validated(models: Path) -> bool:
    """Whether a training in ``models`` ran at least one validation (``train_stats.json``)."""
    stats = models / "train_stats.json"
    if not stats.is_file():
        return False
    data = json.loads(stats.read_text())
    epoch = data.get("best_metric_epoch", data.get("eval", {}).get("best_metric_epoch", -1))
    return epoch is not None and epoch >= 1


def _choose_checkpoint(models: Path, final: bool) -> str:
    """Make ``models/model.pt`` the checkpoint the preset chooses: the last weights (``final``) or
    the best validation (``model.pt`` as :class:`abdoseg.training.handlers.ModelSaver` wrote it:
    the last weights when no validation ran within the budget). Returns what ``model.pt`` is:
    ``"final"``, ``"best"`` or ``"final (no validation ran)"``."""
    best, last = models / "model.pt", models / "model_final.pt"
    if final and last.is_file():
        shutil.copy2(last, best)
        return "final"
    if not best.is_file():
        shutil.copy2(last, best)
    return "best" if _validated(models) else "final (no validation ran)"


def label_fusion_threshold(preset: str = "seed001") -> float | None:
    """The selection threshold of label_fusion's ``presets/<preset>.json`` (seed 001: 0.05)."""
    return json.loads((BUNDLES / "label_fusion" / "configs" / "presets" / f"{preset}.json").read_text()).get("threshold")


def make_labels(name: str, args: argparse.Namespace, data: Path, out: Path, fine: Path, coarse_ckpt: Path,
                log: Path, common: dict[str, Any]) -> dict[str, Any]:
    """Run ``name``'s own label procedure from the raw dataset ``data`` into ``out`` (``datalist.json``
    = the student's datalist, fused labels under ``out``); returns the summary also written to
    ``out/labels.json``. Teachers are CPU-sized fine bundle copies (``out/teacher``) with the
    demo's coarse network, trained ``--label_epochs`` epochs with validation every
    ``--val_interval`` epochs."""
    import time

    from abdoseg.label_fusion.pseudo_label import datalist_items, pseudo_label
    from abdoseg.label_fusion.rounds import bundle_teacher_factory, rounds
    from abdoseg.label_fusion.workflow import fuse_datalist, select_and_write

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    src = data / "datalist.json"
    epochs = max(1, args.label_epochs)

    def teacher_bundle(preset: str | None, overrides: dict[str, Any]) -> Path:
        dst = out / "teacher"
        if args.optimizer == "short":
            overrides = {**overrides, "optimizer": SHORT_OPTIMIZER}
        materialize(BUNDLES / "fine_organ_tumor", dst, preset, {**CPU_GRID, **overrides}, ("train.json", "inference.json"),
                    restore_from_base=COARSE_IDS)
        shutil.copy2(coarse_ckpt, dst / "models" / "coarse_model.pt")
        return dst

    def train(bundle: Path, models_dir: str | Path, datalist: str | Path, train_key: str, n_epochs: int,
              names: tuple[str, ...] = ("model",), final: bool = False) -> dict[str, str]:
        models = Path(models_dir)
        run_bundle(bundle, ["train.json"], "training", None, log, datalist=str(datalist), train_key=train_key,
                   ckpt_dir=str(models), max_epochs=n_epochs, val_interval=min(args.val_interval, n_epochs), **common)
        if "model" in names:
            _choose_checkpoint(models, final)
        return {n: str(models / f"{n}.pt") for n in names}

    def teacher_fuse(bundle: Path, ckpts: dict[str, str], rule: str, keys: tuple[str, ...],
                     label_keys: tuple[str, ...], seed004_unlabeled: str = "skip") -> None:
        """Pseudo-label the cases of ``label_keys`` with every checkpoint, fuse those of ``keys``, select."""
        items = datalist_items(src, data, label_keys)
        reports = pseudo_label(items, bundle_teacher_factory(bundle, "cpu"), ckpts, out / "pseudo", rank=0, world_size=1)
        failed = [reason for rep in reports.values() for _, _, reason in rep.failed]
        if failed:
            raise SystemExit(f"{name}: pseudo-labelling failed: {failed}")
        fuse_datalist(src, out / "fused", rule, out / "pseudo", list(ckpts), data, keys, seed004_unlabeled)

    datalist = out / "datalist.json"
    summary: dict[str, Any] = {"system": name, "procedure": LABELS[name], "label_epochs": epochs}
    if name == "seed000":
        fuse_datalist(src, out / "fused", "seed003", None, (), data, ("training",))
    elif name == "seed001":
        threshold = label_fusion_threshold("seed001")
        trainer = lambda datalist, train_key, dataset_dir, models_dir: train(  # noqa: E731
            fine, models_dir, datalist, train_key, epochs, final=True)
        rounds(str(data), str(out / "rounds"), n_rounds=args.rounds, rule="seed001", fine_bundle=str(fine),
               threshold=threshold, final_train=False, trainer=trainer)
        shutil.copy2(out / "rounds" / f"round_{args.rounds}" / "datalist.json", datalist)
        shutil.copy2(out / "rounds" / f"round_{args.rounds}" / "report.json", out / "report.json")
        summary.update(rounds=args.rounds, threshold=threshold)
    elif name in ("seed002", "seed004"):
        bundle = teacher_bundle(None, {})
        ckpts = train(bundle, out / "teacher" / "models", src, "training_all_organs", epochs)
        if name == "seed002":
            teacher_fuse(bundle, ckpts, "seed004", ("training", "unlabeled"), ("training", "unlabeled"), "teacher_organs")
        else:
            teacher_fuse(bundle, ckpts, "seed004", ("training", "unlabeled"), ("training",), "skip")
    elif name == "seed003":
        epochs = max(3, epochs)  # S1, S2, S3 = the last three epochs
        bundle = teacher_bundle("seed003_teacher", {"network_def#base_channels": 8, "network_def#max_channels": 64,
                                                    "checkpoint_epochs": [0, -1, -2]})
        ckpts = train(bundle, out / "teacher" / "models", src, "training", epochs, names=("S1", "S2", "S3"))
        # labelled cases are fused from A, B and the partial label; S1-S3 label the unlabeled scans
        teacher_fuse(bundle, ckpts, "seed003", ("training", "unlabeled"), ("unlabeled",))
        summary["label_epochs"] = epochs
    else:
        raise SystemExit(f"no label procedure for {name!r}")
    if name != "seed001":
        select_and_write(out / "fused", src, datalist, out / "report.json", (), None, None, data)
    dl = json.loads(datalist.read_text())
    summary["counts"] = {k: len(v) for k, v in dl.items() if isinstance(v, list)}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "labels.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_system(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from abdoseg.networks import count_parameters
    from abdoseg.steps import MarkedSteps
    from monai.bundle import ConfigParser

    demo, out = Path(args.demo_dir).resolve(), Path(args.out_dir).resolve() / name
    steps = MarkedSteps(out, name)
    log = out / "log.txt"
    data = demo / "data"
    demo_coarse = demo / "bundles" / "fine_organ_tumor" / "models" / "coarse_model.pt"
    cpu = CPU[name]
    fine, coarse = out / "bundles" / "fine_organ_tumor", out / "bundles" / "coarse_roi"
    fine_overrides = dict(cpu["fine"])
    if args.optimizer == "short":
        fine_overrides["optimizer"] = SHORT_OPTIMIZER
    materialize(BUNDLES / "fine_organ_tumor", fine, name, fine_overrides, ("train.json", "inference.json"),
                restore_from_base=COARSE_IDS if cpu["coarse"] is None else ())
    if cpu["coarse"] is None and not (fine / "models" / "coarse_model.pt").is_file():
        shutil.copy2(demo_coarse, fine / "models" / "coarse_model.pt")
    # RAM cache, filled before the trainer starts: the budget is spent on training, not on resampling
    common = {"dataset_dir": str(data), "seed": args.seed, "cache_dir": "", "num_workers": 0}
    times: dict[str, float] = json.loads((out / "train_seconds.json").read_text()) if (out / "train_seconds.json").is_file() else {}

    def save_times() -> None:
        (out / "train_seconds.json").write_text(json.dumps(times, indent=2) + "\n")

    labels_dir = out / "labels"
    steps.run("labels", lambda: make_labels(name, args, data, labels_dir, fine, demo_coarse, log, common))
    labels = json.loads((labels_dir / "labels.json").read_text())
    fused = labels_dir / "datalist.json"
    final = name in FINAL_CHECKPOINT
    chosen: dict[str, str] = json.loads((out / "checkpoints.json").read_text()) if (out / "checkpoints.json").is_file() else {}

    def save_chosen() -> None:
        (out / "checkpoints.json").write_text(json.dumps(chosen, indent=2) + "\n")

    def train_coarse() -> None:
        if cpu["coarse"] is None:
            return
        overrides = dict(cpu["coarse"])
        if args.optimizer == "short":
            overrides["optimizer"] = SHORT_OPTIMIZER
        materialize(BUNDLES / "coarse_roi", coarse, name, overrides, ("train.json", "inference.json"))
        # on the system's own labels (seed 004: the supplemented set)
        times["coarse"] = run_bundle(coarse, ["train.json"], "training", args.coarse_budget_s, log, max_epochs=args.max_epochs,
                                     val_interval=args.val_interval, datalist=str(fused), train_key="training", **common)
        save_times()
        chosen["coarse"] = _choose_checkpoint(coarse / "models", False)
        save_chosen()
        shutil.copy2(coarse / "models" / "model.pt", fine / "models" / "coarse_model.pt")

    steps.run("train_coarse", train_coarse)

    def train(models: Path, budget: float, seed: int, **extra: Any) -> None:
        t = run_bundle(fine, ["train.json"], "training", budget, log, datalist=str(extra.pop("datalist", fused)),
                       train_key=extra.pop("train_key", "training"), ckpt_dir=str(models), max_epochs=args.max_epochs,
                       val_interval=args.val_interval, **{**common, "seed": seed}, **extra)
        times[models.name] = t
        save_times()
        chosen[models.name] = _choose_checkpoint(models, final)
        save_chosen()

    if name == "seed002":
        if not json.loads(fused.read_text()).get("training_with_lesion"):
            raise SystemExit(f"{fused}: no training case with a lesion for seed 002's tumor models")
        steps.run("train_organ_model", lambda: train(fine / "models", args.budget_s / 2, args.seed))
        for k in (1, 2):
            def tumor(k: int = k) -> None:
                models = fine / f"models_tumor_{k}"
                train(models, args.budget_s / 4, args.seed + k, train_key="training_with_lesion",
                      key_metric_channels=[0, 14])
                shutil.copy2(models / "model.pt", fine / "models" / f"tumor_{k}.pt")
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

    if args.repeats > 0:
        steps.run("time_fullsize", time_fullsize)

    acc = json.loads((acc_dir / "summary.json").read_text())
    ph = acc["phantoms"]
    runs = json.loads((out / "fullsize.json").read_text()) if args.repeats > 0 else []
    med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2] if runs else None  # noqa: E731
    parser = ConfigParser()
    parser.read_config(str(fine / "configs" / "inference.json"))
    n_params = count_parameters(parser.get_parsed_content("network_def"))
    models = [fine / "models"] + sorted(fine.glob("models_tumor_*"))
    return {
        "system": name, "labels": LABELS_SHORT[name].format(rounds=labels.get("rounds")), "label_procedure": LABELS[name],
        "label_s": labels["seconds"], "label_epochs": labels["label_epochs"], "label_counts": labels["counts"],
        "checkpoints": {k: v if v != "best" or _validated(coarse / "models" if k == "coarse" else fine / k)
                        else "final (no validation ran)" for k, v in chosen.items()}, "params_m": round(n_params / 1e6, 2),
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

    shape = load_nifti(Path(args.fullsize_ct))[0].shape if args.fullsize_ct else ("full-size",)
    real = sorted({c for r in rows for c in r["real_ct_dsc"]})
    head = ("| system | labels: procedure (s, training cases) | network (params) | train s (epochs) | organ DSC | organ NSD | lesion DSC | lesion NSD | "
            + "".join(f"{c} liver / spleen / kidneys | " for c in real)
            + f"{'x'.join(map(str, shape))} CT: s / peak MB |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|" + "---|" * len(real) + "---|"]
    for r in rows:
        cells = []
        for c in real:
            d = r["real_ct_dsc"].get(c, {})
            kid = [d[k] for k in ("right kidney", "left kidney") if k in d]
            cells.append(" / ".join(f"{d[k]:.2f}" if k in d else "-" for k in ("liver", "spleen"))
                         + " / " + ("-" if not kid else f"{sum(kid) / len(kid):.2f}"))
        epochs = "+".join(str(e) if e is not None else "?" for e in r["epochs"])
        labels = f"{r['labels']} ({r['label_s']:.0f} s, {r['label_counts'].get('training', 0)})"
        lines.append(f"| {r['system']} | {labels} | {r['network']} ({r['params_m']} M) | {r['train_s']:.0f} ({epochs}) | "
                     f"{r['organ_dsc']:.3f} | {r['organ_nsd']:.3f} | {r['lesion_dsc']:.3f} | {r['lesion_nsd']:.3f} | "
                     + "".join(f"{c} | " for c in cells)
                     + (f"{r['fullsize_wall_s']:.1f} / {r['fullsize_peak_rss_mb']:.0f} |"
                        if r["fullsize_wall_s"] is not None else "- |"))
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
    ap.add_argument("--val_interval", type=int, default=5,
                    help="validation every N epochs, teachers and students (checkpoint choice as each preset's)")
    ap.add_argument("--label_epochs", type=int, default=20,
                    help="epochs of each teacher training in the label procedures (seed 003: at least 3)")
    ap.add_argument("--rounds", type=int, default=3, help="seed 001's rounds (its paper: 3)")
    ap.add_argument("--optimizer", choices=("short", "paper"), default="short")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="full-size timing runs per system (median); 0: no full-size timing")
    ap.add_argument("--docs", action="store_true", help="write the table into the fine bundle's docs/README.md")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.fullsize_ct and args.repeats > 0:
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
