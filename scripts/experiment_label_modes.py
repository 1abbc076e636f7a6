"""Experiment: how to train the fine model when labels are partial (phantoms, CPU budget).

Five arms, all scored on the same held-out validation phantoms (``labelsVal``, full truth) and
all trained with the same final budget (same seed, train.json overrides, and the same epochs or, with
``--budget_cases``, the same number of iterations):

  a  naive       fine train.json, ``label_mode=full`` on the partial ``training`` labels
                 (unannotated classes count as background)
  b  partial     ``label_mode=partial`` (``abdoseg.training.losses.MarginalExclusionLoss``), same labels
  c  seed004     teacher (trained on ``training_all_organs``) -> pseudo labels -> fusion rule
                 ``seed004`` (partial label + teacher's missing organs) -> ``label_mode=full``
  d  seed003     same teacher + pseudo labels -> fusion rule ``seed003`` -> ``label_mode=full``
  e  seed001     ``abdoseg.label_fusion.rounds`` with 2 rounds and seed 001's own round rule ``seed001``
                 (partial labels keep their annotated classes, every unannotated class, lesion
                 included, comes from the previous round's prediction; unlabeled cases take the
                 prediction), uncertainty selection (``keep_fraction`` / ``threshold``) once, in
                 round 2, before the final training -> ``label_mode=full`` on round 2's datalist

Shared work (done once): phantoms + datalist, coarse_roi training (or ``--coarse_checkpoint``),
the teacher of round 1 and its pseudo labels (``<work_dir>/rounds/round_1``: arm d uses its
seed003 datalist, arm c re-fuses its pseudo labels with rule seed004). Arm e runs its rounds in
``<work_dir>/rounds_seed001``: its round 1 reuses that teacher and its pseudo labels (the same
for every rule), fuses them with rule seed001, and round 2 trains a new teacher on the result.

Resumable: every shared step ends with ``<work_dir>/steps/<name>.done`` (:class:`abdoseg.steps.MarkedSteps`); every arm runs in
``<work_dir>/arms/<arm>/`` (its own copy of the bundles, predictions, evaluation) and ends with
``<work_dir>/arms/<arm>/DONE``. A rerun skips what is finished. The final Markdown table is
printed and written to ``<work_dir>/results.md``.

Final models are trained without validation (``val_interval > max_epochs``): the validation
phantoms are the test set here, so no checkpoint is selected on them; the last checkpoint
(``model_final.pt``) is the arm's model.

Example (the budget documented in bundles/label_fusion/docs/README.md)::

    .venv/bin/python scripts/experiment_label_modes.py --work_dir runs/label_modes \\
        --n_labeled 16 --n_unlabeled 6 --n_val 4 --fine_epochs 3 --teacher_epochs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "shared"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # benchlib

from abdoseg.data.prepare import prepare  # noqa: E402
from abdoseg.bundle.config import config_files, run_bundle as _run_bundle  # noqa: E402
from abdoseg.demo import _best_checkpoint, _copy_bundles  # noqa: E402
from abdoseg.evaluation.evaluate import evaluate  # noqa: E402
from abdoseg.io import atomic_path, save_json  # noqa: E402
from abdoseg.label_fusion.workflow import fuse_datalist, select_and_write  # noqa: E402
from abdoseg.data.phantom import generate  # noqa: E402
from abdoseg.label_fusion.rounds import DONE, rounds  # noqa: E402
from abdoseg.steps import MarkedSteps  # noqa: E402
from benchlib import link_files  # noqa: E402

ARMS: dict[str, str] = {
    "a": "naive: partial labels as full (missing classes = background)",
    "b": "partial-label loss (MarginalExclusionLoss)",
    "c": "seed 004: teacher supplements missing organs",
    "d": "seed 003: fusion of partial + pseudo A/B + teacher",
    "e": "seed 001: 2 rounds, unannotated classes from the prediction + uncertainty selection",
}
TEACHER_NAMES = ("model",)


def _log(msg: str) -> None:
    print(f"\n=== [label_modes] {msg} ===", file=sys.stderr, flush=True)


def _n_items(datalist: Path, key: str) -> int:
    return len(json.loads(datalist.read_text()).get(key, []))


def run_arm(arm: str, work: Path, data: Path, coarse_ckpt: Path, datalist: Path, train_key: str, label_mode: str,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train the fine bundle for one arm, segment the validation split, evaluate; returns the row."""
    adir = work / "arms" / arm
    if (adir / DONE).is_file():
        print(f"[label_modes] arm {arm}: done earlier, skipped", file=sys.stderr)
        return json.loads((adir / DONE).read_text())
    _log(f"arm {arm}: {ARMS[arm]}")
    fine = _copy_bundles(adir)["fine_organ_tumor"]
    shutil.copy2(coarse_ckpt, fine / "models" / "coarse_model.pt")
    epochs = arm_epochs(args.fine_epochs, _n_items(datalist, train_key), args.budget_cases)
    t0 = time.perf_counter()
    _run_bundle(fine, config_files(fine, "training"), "run", dataset_dir=str(data), datalist=str(datalist), train_key=train_key,
                label_mode=label_mode, max_epochs=epochs, val_interval=epochs + 1,
                seed=args.seed, **args.train_overrides)
    t_train = time.perf_counter() - t0
    models = fine / "models"
    shutil.copy2(models / "model_final.pt", models / "model.pt")  # the last epoch, never selected on val
    pred = adir / "predictions"
    t1 = time.perf_counter()
    _run_bundle(fine, "inference.json", "run", datalist=str(data / "datalist.json"), data_list_key="validation",
                dataset_dir=str(data), output_dir=str(pred), **args.infer_overrides)
    t_seg = time.perf_counter() - t1
    summary = evaluate(str(pred), str(data / "labelsVal"), str(adir / "evaluation"))
    if not isinstance(summary, dict):
        summary = json.loads((adir / "evaluation" / "summary.json").read_text())
    row = {"arm": arm, "method": ARMS[arm], "datalist": str(datalist.relative_to(work)) if datalist.is_relative_to(work)
           else str(datalist), "train_key": train_key, "label_mode": label_mode,
           "n_train": _n_items(datalist, train_key), "epochs": epochs, "organ_dsc": summary["organ_dsc"], "organ_nsd": summary["organ_nsd"],
           "lesion_dsc": summary["lesion_dsc"], "lesion_nsd": summary["lesion_nsd"],
           "train_s": round(t_train, 1), "segment_s": round(t_seg, 1)}
    save_json(row, adir / DONE)
    return row


def arm_epochs(fine_epochs: int, n_train: int, budget_cases: int | None) -> int:
    """Epochs of an arm's final model: ``fine_epochs``, or, with ``budget_cases``, the epochs that give
    every arm the same number of training iterations (``fine_epochs * budget_cases`` case-visits),
    so an arm with more training cases does not also get more gradient steps."""
    if not budget_cases:
        return fine_epochs
    return max(1, round(fine_epochs * budget_cases / max(1, n_train)))


def label_quality(arm: str, work: Path, data: Path, datalist: Path, train_key: str) -> dict[str, Any]:
    """FLARE23 DSC/NSD of the labels an arm trains on against the phantoms' hidden full truth.

    Every ``train_key`` item's ``label`` is scored (all 14 classes) against
    ``groundtruth/labelsTr`` or ``groundtruth/unlabeledTr``; unannotated classes of a partial
    label count as background, as arm a trains on them (arm b's loss ignores them instead).
    Folders of symbolic links ``<work>/label_quality/<arm>/{labels,truth}`` feed
    :func:`abdoseg.evaluation.evaluate.evaluate`; its summary is returned (cached in ``summary.json``).
    """
    qdir = work / "label_quality" / arm
    if (qdir / "evaluation" / "summary.json").is_file():
        return json.loads((qdir / "evaluation" / "summary.json").read_text())
    items = json.loads(datalist.read_text())[train_key]
    labels, truths = {}, {}
    for it in items:
        label = data / it["label"]
        case = label.name[: -len(".nii.gz")]
        truth = [t for t in (data / "groundtruth" / "labelsTr" / f"{case}.nii.gz",
                             data / "groundtruth" / "unlabeledTr" / f"{case}.nii.gz") if t.is_file()]
        if not truth:
            raise FileNotFoundError(f"{data / 'groundtruth'}: no hidden truth for {case}")
        labels[f"{case}.nii.gz"], truths[f"{case}.nii.gz"] = label, truth[0]
    link_files(qdir / "labels", labels, fresh=True)
    link_files(qdir / "truth", truths, fresh=True)
    return evaluate(str(qdir / "labels"), str(qdir / "truth"), str(qdir / "evaluation"))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, timings: dict[str, float],
                     wall_s: float) -> str:
    lines = ["| arm | method | final training data | label_mode | cases | epochs | organ DSC | organ NSD | lesion DSC | lesion NSD | train s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['method']} | `{r['datalist']}` [{r['train_key']}] | {r['label_mode']} | "
                     f"{r['n_train']} | {r.get('epochs', '-')} | {_fmt(r['organ_dsc'])} | {_fmt(r['organ_nsd'])} | {_fmt(r['lesion_dsc'])} | "
                     f"{_fmt(r['lesion_nsd'])} | {r['train_s']:.0f} |")
    lines += ["", "Training labels of each arm against the phantoms' hidden full truth (`groundtruth/`), "
              "all classes scored, unannotated = background:", "",
              "| arm | cases | organ DSC | organ NSD | lesion DSC | lesion NSD |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = r.get("label_quality")
        if q:
            lines.append(f"| {r['arm']} | {r['n_train']} | {_fmt(q['organ_dsc'])} | {_fmt(q['organ_nsd'])} | "
                         f"{_fmt(q['lesion_dsc'])} | {_fmt(q['lesion_nsd'])} |")
    shared = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    budget = (f"{args.fine_epochs} x {args.budget_cases} case-visits (epochs scaled per arm)" if args.budget_cases
              else f"{args.fine_epochs} epochs")
    lines += ["", f"Final-model budget (all arms): {budget}, seed {args.seed}, overrides "
              f"`{json.dumps(args.train_overrides)}`; teacher: {args.teacher_epochs} epochs per round; "
              f"selection in round 2 of arm e: keep_fraction={args.keep_fraction}, threshold={args.threshold}.",
              f"Shared steps: {shared}. Wall time of this invocation: {wall_s:.0f} s "
              "(a resumed invocation counts only what it redid)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="runs/label_modes")
    p.add_argument("--seed", type=int, default=0, help="phantom seed and training seed of every network")
    p.add_argument("--preset", default="small")
    p.add_argument("--n_labeled", type=int, default=16)
    p.add_argument("--n_unlabeled", type=int, default=6)
    p.add_argument("--n_val", type=int, default=4)
    p.add_argument("--coarse_epochs", type=int, default=20)
    p.add_argument("--coarse_checkpoint", default=None,
                   help="reuse a trained coarse_roi model.pt instead of training one (must not have seen the "
                        "validation phantoms)")
    p.add_argument("--teacher_epochs", type=int, default=3, help="teacher epochs per round (rounds 1 and 2)")
    p.add_argument("--fine_epochs", type=int, default=3, help="final fine model epochs, identical for every arm")
    p.add_argument("--budget_cases", type=int, default=None,
                   help="equal iterations: every arm gets fine_epochs * budget_cases case-visits (epochs scaled by "
                        "its number of training cases); default: equal epochs")
    p.add_argument("--keep_fraction", type=float, default=0.75, help="arm e, round 2 selection")
    p.add_argument("--threshold", type=float, default=None, help="arm e, round 2 selection")
    p.add_argument("--train_overrides", type=json.loads,
                   default={"fine_spacing_mm": [3.0, 3.0, 5.0], "patch_size": [64, 64, 32], "num_samples": 1,
                            "cache_rate": 1.0},
                   help="JSON dict of fine train.json overrides for the teacher AND every final model")
    p.add_argument("--infer_overrides", type=json.loads, default={"fine_spacing_mm": [3.0, 3.0, 5.0]},
                   help="JSON dict of fine inference.json overrides (pseudo labels and validation segmentation)")
    p.add_argument("--arms", default="abcde", help="subset of arms to run, e.g. 'ab'")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    save_json(vars(args), work / "args.json")
    data = work / "data"
    steps = MarkedSteps(work, "label_modes")
    shared = _copy_bundles(work)
    coarse_model = shared["fine_organ_tumor"] / "models" / "coarse_model.pt"

    steps.run("generate", lambda: generate(str(data), preset=args.preset, seed=args.seed, n_labeled=args.n_labeled,
                                           n_unlabeled=args.n_unlabeled, n_val=args.n_val, workers=2))
    steps.run("prepare", lambda: prepare(str(data)))
    src = data / "datalist.json"

    def coarse() -> None:
        if args.coarse_checkpoint:
            print(f"[label_modes] reusing coarse checkpoint {args.coarse_checkpoint}", file=sys.stderr)
            shutil.copy2(args.coarse_checkpoint, coarse_model)
            return
        cb = shared["coarse_roi"]
        # coarse_roi saves checkpoints on validation only: validate once, after the last epoch
        _run_bundle(cb, config_files(cb, "training"), "training", dataset_dir=str(data), max_epochs=args.coarse_epochs,
                    val_interval=args.coarse_epochs, seed=args.seed)
        shutil.copy2(_best_checkpoint(cb / "models"), coarse_model)

    steps.run("coarse", coarse)

    rounds_dir = work / "rounds"
    teacher_overrides = {"coarse_checkpoint": str(coarse_model), **args.infer_overrides}
    round_kw = dict(rule="seed003", fine_bundle=str(shared["fine_organ_tumor"]), max_epochs=args.teacher_epochs,
                    train_overrides={**args.train_overrides, "seed": args.seed}, teacher_overrides=teacher_overrides,
                    checkpoint_names=TEACHER_NAMES, final_train=False)
    arms = [a for a in args.arms if a in ARMS]
    if any(a in arms for a in "cde"):
        # round 1: teacher on training_all_organs -> pseudo labels -> seed003 fusion (arm d)
        steps.run("teacher_round1", lambda: rounds(str(data), str(rounds_dir), n_rounds=1, **round_kw))
    if "c" in arms:
        def fuse004() -> None:
            r1 = rounds_dir / "round_1"
            fuse_datalist(src, work / "fused_seed004", "seed004", r1 / "pseudo", TEACHER_NAMES, data,
                          ("training", "unlabeled"), "skip")
            select_and_write(work / "fused_seed004", src, work / "seed004_datalist.json", work / "seed004_report.json",
                             [r1 / "pseudo" / TEACHER_NAMES[0]], None, None, data)

        steps.run("fuse_seed004", fuse004)
    rounds001_dir = work / "rounds_seed001"
    if "e" in arms:
        def seed001_rounds() -> None:
            # round 1's teacher and pseudo labels do not depend on the rule: reuse them (rounds()
            # skips training when checkpoints.json lists existing files, and finished pseudo labels)
            src_r1, dst_r1 = rounds_dir / "round_1", rounds001_dir / "round_1"
            if not (dst_r1 / DONE).is_file():
                (dst_r1 / "models").mkdir(parents=True, exist_ok=True)
                shutil.copy2(src_r1 / "models" / "checkpoints.json", dst_r1 / "models" / "checkpoints.json")
                shutil.copytree(src_r1 / "pseudo", dst_r1 / "pseudo", dirs_exist_ok=True)
            rounds(str(data), str(rounds001_dir), n_rounds=2, keep_fraction=args.keep_fraction,
                   threshold=args.threshold, **{**round_kw, "rule": "seed001"})

        steps.run("seed001_rounds", seed001_rounds)

    plans = {"a": (src, "training", "full"), "b": (src, "training", "partial"),
             "c": (work / "seed004_datalist.json", "training", "full"),
             "d": (rounds_dir / "round_1" / "datalist.json", "training", "full"),
             "e": (rounds001_dir / "round_2" / "datalist.json", "training", "full")}
    rows = [run_arm(a, work, data, coarse_model, *plans[a], args) for a in arms]
    for r in rows:
        dl, key, _ = plans[r["arm"]]
        q = label_quality(r["arm"], work, data, dl, key)
        r["label_quality"] = {k: q[k] for k in ("organ_dsc", "organ_nsd", "lesion_dsc", "lesion_nsd")}
    wall = time.perf_counter() - t_start
    md = results_markdown(rows, args, steps.timings, wall)
    with atomic_path(work / "results.md") as tmp:
        tmp.write_text(md)
    save_json(rows, work / "results.json")
    print("\n" + md)
    print(f"results: {work / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
