"""``abdoseg demo``: the whole project on the embedded phantom dataset, end to end.

generate phantoms -> prepare datalist -> train coarse_roi -> train the teacher (fine bundle on
fully labeled cases) -> pseudo-label + fuse (label_fusion, one round) -> train fine_organ_tumor
on the fused labels -> segment the held-out validation phantoms with the cascade -> evaluate
(FLARE23 DSC/NSD) -> ``report.md`` with the per-class table, bar chart and overlays of the best
and the worst case.

Everything lands in ``out_dir`` (the repository's bundles are copied there, trained there and
can be packed from there); every step ends with a marker in ``out_dir/steps`` so a rerun
resumes after the last finished step.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from abdoseg.bundle.config import BUNDLES_DIR, config_files, run_bundle
from abdoseg.io import atomic_path, load_nifti
from abdoseg.steps import MarkedSteps

BUNDLES = ("coarse_roi", "fine_organ_tumor", "label_fusion")
#: Optimizer for the demo's short CPU schedules, written into the fine bundle copy's train.json.
#: The bundle's default (nnU-Net's SGD, lr 0.01, momentum 0.99) is meant for long GPU runs; at
#: 20 epochs on the small phantoms AdamW 2e-3 reached validation mean Dice 0.115 vs 0.032 for SGD
#: (same data, seed and budget, measured side by side).
SHORT_SCHEDULE_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()",
                                            "lr": 0.002, "weight_decay": 1e-05}


def _copy_bundles(out: Path) -> dict[str, Path]:
    dst = {}
    for name in BUNDLES:
        target = out / "bundles" / name
        # configs/docs are refreshed from the repository on every run; trained weights stay
        # symlinks=True: label_fusion's configs/inference.json stays a link to the fine copy's
        # (a link cannot be copied over, so the refreshed folders go first)
        for refreshed in ("configs", "docs"):
            shutil.rmtree(target / refreshed, ignore_errors=True)
        shutil.copytree(BUNDLES_DIR / name, target, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts", "*.onnx", "__pycache__"))
        (target / "models").mkdir(exist_ok=True)
        dst[name] = target
    return dst


def configure_bundle(bundle: Path, settings: dict[str, Any], config: str = "inference.json") -> None:
    """Write ``settings`` (top-level ids of ``configs/<config>``) into a bundle copy. The default,
    ``inference.json``, is the base that training merges too, so the trained bundle stays
    self-consistent (the fine spacing it was trained at is the one it infers at)."""
    path = bundle / "configs" / config
    values = json.loads(path.read_text())
    missing = sorted(set(settings) - set(values))
    if missing:
        raise KeyError(f"{path}: no id(s) {missing} to set")
    values.update(settings)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(values, indent=4) + "\n")


def _best_checkpoint(models_dir: Path) -> Path:
    for name in ("model.pt", "model_final.pt"):
        if (models_dir / name).is_file():
            return models_dir / name
    found = sorted(models_dir.glob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{models_dir}: training wrote no checkpoint")
    return found[-1]


def write_report(out: Path, summary: dict, pred_dir: Path, data_dir: Path, timings: dict[str, float]) -> Path:
    """Markdown report: timings, accuracy table, chart and overlays of the best and worst case."""
    import csv

    from abdoseg.evaluation.evaluate import summary_markdown
    from abdoseg.labels import ORGAN_IDS
    from abdoseg.evaluation.viz import overlay_png

    rows = list(csv.DictReader(open(out / "evaluation" / "metrics_per_case.csv")))
    per_case: dict[str, list[float]] = {}
    for r in rows:
        if int(r["class"]) in ORGAN_IDS and r["dsc"] not in ("", "nan"):
            per_case.setdefault(r["case"], []).append(float(r["dsc"]))
    ranked = sorted(per_case, key=lambda c: sum(per_case[c]) / len(per_case[c]))
    pictures = []
    for tag, case in (("best", ranked[-1]), ("worst", ranked[0])):
        img, aff, _ = load_nifti(data_dir / "imagesVal" / f"{case}_0000.nii.gz")
        pred, _, _ = load_nifti(pred_dir / f"{case}.nii.gz")
        gt, _, _ = load_nifti(data_dir / "labelsVal" / f"{case}.nii.gz")
        mean = sum(per_case[case]) / len(per_case[case])
        png = overlay_png(img, pred, aff, out / f"overlay_{tag}.png", title=f"{case} prediction (organ DSC {mean:.3f})",
                          extra_label=gt, extra_title=f"{case} ground truth")
        pictures.append((tag, case, mean, png.name))
    lines = ["# abdoseg demo report (synthetic phantoms)", "",
             "Phantom data are synthetic: these numbers check that the pipeline works end to end; "
             "they say nothing about accuracy on real CT.", "",
             "## Wall time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += [f"| **total** | **{sum(timings.values()):.1f}** |", "", "## Accuracy on the held-out validation phantoms", "",
              summary_markdown(summary), "", "![per-class DSC/NSD](evaluation/per_class.png)", "",
              "## Best and worst case", ""]
    for tag, case, mean, name in pictures:
        lines += [f"**{tag}**: {case}, mean organ DSC {mean:.3f}", "", f"![{tag}]({name})", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / "report.md"


def demo(out_dir: str = "runs/demo", seed: int = 0, preset: str = "small", n_labeled: int | None = None,
         n_unlabeled: int | None = None, n_val: int | None = None, coarse_epochs: int = 30,
         teacher_epochs: int = 40, fine_epochs: int = 50, rule: str = "seed003",
         fine_spacing_mm: tuple[float, float, float] | None = None) -> str:
    """Run the whole pipeline on phantoms; returns the path of ``report.md``.

    Args:
        out_dir: working folder (phantoms, trained bundle copies, predictions, report).
        seed: phantom and training seed. preset: phantom preset (``small`` is sized for a CPU).
        n_labeled, n_unlabeled, n_val: phantom counts (None: the preset's: 12 / 4 / 4). 20 labeled
            phantoms with coarse 24, teacher 30 and fine 32 epochs (about the same CPU time) measured no better on
            unseen phantoms or real CT (fine docs, "Model card").
        coarse_epochs, teacher_epochs, fine_epochs: training budgets (epochs over the training set).
        rule: label fusion rule set (``seed003`` or ``seed004``).
        fine_spacing_mm: fine-stage spacing written into the fine bundle copy's train and
            inference configs; default: the bundle's own (4x4x6 mm: near the ``small`` preset's
            native resolution, so the CPU budget is spent on learning, not on upsampling).
    """
    from abdoseg.data.prepare import prepare
    from abdoseg.evaluation.evaluate import evaluate
    from abdoseg.data.phantom import generate
    from abdoseg.label_fusion.rounds import rounds

    out = Path(out_dir).resolve()
    steps = MarkedSteps(out, "demo")
    data = out / "data"
    bundles = _copy_bundles(out)
    fine = bundles["fine_organ_tumor"]
    if fine_spacing_mm is not None:
        configure_bundle(fine, {"fine_spacing_mm": [float(x) for x in fine_spacing_mm]})
    configure_bundle(fine, {"optimizer": SHORT_SCHEDULE_OPTIMIZER}, config="train.json")
    pred_dir = out / "predictions"

    steps.run("generate", lambda: generate(str(data), preset=preset, seed=seed, n_labeled=n_labeled,
                                           n_unlabeled=n_unlabeled, n_val=n_val, workers=2))
    steps.run("prepare", lambda: prepare(str(data)))

    def train_coarse() -> None:
        coarse = bundles["coarse_roi"]
        run_bundle(coarse, config_files(coarse, "training"), "training", dataset_dir=str(data), max_epochs=coarse_epochs,
                   val_interval=coarse_epochs, seed=seed)
        shutil.copy2(_best_checkpoint(coarse / "models"), fine / "models" / "coarse_model.pt")

    steps.run("train_coarse", train_coarse)

    def label_rounds() -> None:
        rounds(str(data), str(out / "rounds"), n_rounds=1, rule=rule, fine_bundle=str(fine),
               max_epochs=teacher_epochs, final_train=False,
               teacher_overrides={"coarse_checkpoint": str(fine / "models" / "coarse_model.pt")})
        # the label_fusion bundle copy owns the teacher it just used (network + coarse stage), so it
        # verifies and pseudo-labels on its own (model-zoo verify_bundle needs models/model.pt)
        teacher = bundles["label_fusion"] / "models"
        shutil.copy2(out / "rounds" / "round_1" / "models" / "model.pt", teacher / "model.pt")
        shutil.copy2(fine / "models" / "coarse_model.pt", teacher / "coarse_model.pt")

    steps.run("teacher_pseudo_label_fuse", label_rounds)

    def train_fine() -> None:
        datalist = out / "rounds" / "round_1" / "datalist.json"
        run_bundle(fine, config_files(fine, "training"), "training", dataset_dir=str(data), datalist=str(datalist),
                   train_key="training", label_mode="full", max_epochs=fine_epochs, seed=seed,
                   val_interval=fine_epochs)
        models = fine / "models"
        best = _best_checkpoint(models)
        if best.name != "model.pt":
            shutil.copy2(best, models / "model.pt")

    steps.run("train_fine", train_fine)
    steps.run("segment", lambda: run_bundle(fine, "inference.json", "run", datalist=str(data / "datalist.json"),
                                            data_list_key="validation", dataset_dir=str(data),
                                            output_dir=str(pred_dir)))
    steps.run("evaluate", lambda: evaluate(str(pred_dir), str(data / "labelsVal"), str(out / "evaluation")))
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    report = write_report(out, summary, pred_dir, data, dict(steps.timings))
    print(f"\nreport: {report}", file=sys.stderr)
    return str(report)
