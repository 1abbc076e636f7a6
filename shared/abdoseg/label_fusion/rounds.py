"""``abdoseg rounds``: semi-supervised training rounds (seed 001 iterative pseudo labels with
seed 001's own round rule or the seed 003 / seed 004 fusion rules).

Round k (1..N), all outputs in ``<work_dir>/round_<k>/`` so that nothing is overwritten::

    models/           teacher checkpoints + checkpoints.json {name: path}
                      (round 1: trained on the source datalist's "training_all_organs";
                       round k > 1: on round k-1's fused datalist "training")
    pseudo/<name>/    teacher pseudo labels of every training + unlabeled case
    fused/            fused labels + fuse_report.json (rule set ``rule``)
    datalist.json     new datalist (interface 2): selected cases with fused labels
    report.json/.csv  per case: rule, voxels changed per class, uncertainty, selected/rejected
    DONE              written last; a round with DONE is never redone

The uncertainty score of a case in round k compares the teacher's pseudo labels (first
checkpoint name) of rounds 1..k (seed 001 eq. 1); round 1 has none, so every fused case passes.
After the last round the teacher is retrained once more on the last datalist
(``<work_dir>/final/models``, also closed by ``DONE``).

Rule ``seed001`` is seed 001's procedure: round 1 trains on the fully labeled cases; each round's
prediction fills every unannotated class (lesion included) of the partial labels and labels the
unlabeled cases entirely (:func:`abdoseg.label_fusion.rules.fill_from_prediction`); rounds 2..N train on all
of those cases (scores are reported but nothing is rejected, ``select_every_round=False``); the
uncertainty selection (``threshold`` / ``keep_fraction``, scores over the pseudo labels of all N
rounds) happens once, in round N, so the final training uses the selected cases with round N's
labels. The seed 003 / 004 rules select in every round unless ``select_every_round=False``.
Finished rounds are reused as written: raising ``n_rounds`` after a run does not redo the
selection of the round that used to be the last.

A restart skips finished rounds and resumes the unfinished one: training is skipped when its
``checkpoints.json`` exists, pseudo-labeling skips finished cases (:func:`abdoseg.inference.batch.run_batch`),
fusion and selection are recomputed (cheap, deterministic).

Training uses the fine_organ_tumor bundle's training configs (``inference.json`` + ``train.json``) through
:class:`monai.bundle.ConfigWorkflow` with overrides (tiny CPU budget by default); the
pseudo-labeling teacher is its ``configs/inference.json`` (:func:`abdoseg.label_fusion.pseudo_label.bundle_teacher`).
``preset`` merges ``configs/presets/<preset>.json`` after both, so every round trains and
pseudo-labels with a seed system's network, grid and schedule; ``max_epochs=None`` keeps the
config's own epochs, validation, batch and patch count instead of the CPU budget. Seed 001 as its
paper runs it (three rounds, then the final training; the threshold value is not given in the
paper, see the fine bundle's docs)::

    abdoseg rounds D W --rule seed001 --preset seed001 --n_rounds 3 --threshold 0.05 --max_epochs None

Trainer and teacher are pluggable (``trainer``, ``teacher`` = ``"module:function"``) for tests and
other networks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from abdoseg.bundle.config import BUNDLES_DIR, config_files
from abdoseg.io import InputError, exit_if_failed, save_json

logger = logging.getLogger(__name__)

DONE = "DONE"
CHECKPOINTS_JSON = "checkpoints.json"
DEFAULT_FINE_BUNDLE = BUNDLES_DIR / "fine_organ_tumor"

#: Tiny CPU training budget applied to the fine bundle's train.json unless overridden.
DEFAULT_TRAIN_OVERRIDES: dict[str, Any] = {
    "max_epochs": 1,
    "val_interval": 2,
    "num_workers": 0,
    "cache_rate": 0.0,
    "num_samples": 1,
    "batch_size": 1,
}

Trainer = Callable[..., Mapping[str, str]]


def _resolve(spec: str | Callable | None, default: Callable) -> Callable:
    """A callable, ``"module:function"`` or None (-> default)."""
    if spec is None:
        return default
    if callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def bundle_trainer(datalist: str, train_key: str, dataset_dir: str, models_dir: str, *,
                   fine_bundle: str | os.PathLike = DEFAULT_FINE_BUNDLE,
                   overrides: Mapping[str, Any] | None = None,
                   checkpoint_names: Sequence[str] = ("model",), preset: str | None = None,
                   cpu_budget: bool = True) -> dict[str, str]:
    """Train the fine bundle (``configs/inference.json`` + ``configs/train.json``, then ``configs/presets/<preset>.json`` when
    given) and return ``{name: checkpoint path}``.

    Overrides: ``bundle_root`` = the fine bundle, ``ckpt_dir`` = ``models_dir``, ``output_dir``
    = ``models_dir/eval``, ``dataset_dir``, ``datalist``, ``train_key``, then (``cpu_budget``)
    :data:`DEFAULT_TRAIN_OVERRIDES`, then ``overrides``. A checkpoint name ``X`` is
    ``models_dir/X.pt``; ``model`` falls back to ``model_final.pt`` when no validation saved
    a best ``model.pt``.
    """
    from monai.bundle import ConfigWorkflow

    fine = Path(fine_bundle)
    configs = config_files(fine, "training", preset)
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    pairs: dict[str, Any] = {"bundle_root": str(fine), "ckpt_dir": str(models_dir),
                             "output_dir": str(Path(models_dir) / "eval"), "dataset_dir": str(dataset_dir),
                             "datalist": str(datalist), "train_key": train_key}
    if cpu_budget:
        pairs.update(DEFAULT_TRAIN_OVERRIDES)
    pairs.update(dict(overrides or {}))
    logging_file = fine / "configs" / "logging.conf"
    wf = ConfigWorkflow(config_file=configs if len(configs) > 1 else configs[0],
                        meta_file=str(fine / "configs" / "metadata.json"),
                        logging_file=str(logging_file) if logging_file.is_file() else False,
                        workflow_type="train", **pairs)
    wf.initialize()
    wf.run()
    wf.finalize()
    out: dict[str, str] = {}
    for name in checkpoint_names:
        p = Path(models_dir) / f"{name}.pt"
        if not p.is_file() and name == "model" and (Path(models_dir) / "model_final.pt").is_file():
            p = Path(models_dir) / "model_final.pt"
        if not p.is_file():
            raise InputError(p, f"training finished without writing checkpoint {name!r}")
        out[name] = str(p)
    return out


def bundle_teacher_factory(fine_bundle: str | os.PathLike = DEFAULT_FINE_BUNDLE, device: str = "cpu",
                           overrides: Mapping[str, Any] | None = None,
                           preset: str | None = None) -> Callable[[str], Callable]:
    """``factory(checkpoint) -> segment`` from the fine bundle's ``configs/inference.json`` (then
    ``configs/presets/<preset>.json`` when given)."""
    import functools

    from abdoseg.label_fusion import pseudo_label

    fine = Path(fine_bundle)
    configs = config_files(fine, "inference", preset)
    return functools.partial(pseudo_label.bundle_teacher, inference_config=configs if len(configs) > 1 else configs[0],
                             bundle_root=str(fine), device=device, overrides=dict(overrides or {}))


def finished_rounds(work_dir: str | os.PathLike) -> list[int]:
    """Round numbers k whose ``round_<k>/DONE`` exists, sorted."""
    out = []
    for p in Path(work_dir).glob("round_*"):
        suffix = p.name[len("round_"):]
        if suffix.isdigit() and (p / DONE).is_file():
            out.append(int(suffix))
    return sorted(out)


def _mark_done(folder: Path, summary: Mapping[str, Any]) -> None:
    save_json({**summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, folder / DONE)


def _train(trainer: Callable, models_dir: Path, **kwargs: Any) -> dict[str, str]:
    """Train once per folder: reuse ``checkpoints.json`` if a previous run finished training."""
    marker = models_dir / CHECKPOINTS_JSON
    if marker.is_file():
        ckpts = json.loads(marker.read_text())
        if all(Path(p).is_file() for p in ckpts.values()):
            print(f"rounds: reusing trained checkpoints in {models_dir}", file=sys.stderr)
            return ckpts
    models_dir.mkdir(parents=True, exist_ok=True)
    ckpts = {str(k): str(v) for k, v in trainer(models_dir=str(models_dir), **kwargs).items()}
    save_json(ckpts, marker)
    return ckpts


def rounds(dataset_dir: str, work_dir: str, datalist: str | None = None, n_rounds: int = 2,
           rule: str = "seed003", fine_bundle: str | None = None, max_epochs: int | None = 1,
           train_overrides: Mapping[str, Any] | None = None, teacher_overrides: Mapping[str, Any] | None = None,
           checkpoint_names: Sequence[str] = ("model",), threshold: float | None = None,
           keep_fraction: float | None = None, seed004_unlabeled: str = "skip", final_train: bool = True,
           trainer: str | Callable | None = None, teacher: str | Callable | None = None,
           device: str = "cpu", select_every_round: bool | None = None,
           preset: str | None = None) -> dict[str, Any]:
    """Run (or resume) N rounds of train -> pseudo-label -> fuse -> select, then retrain.

    Args:
        dataset_dir: dataset root (interface 1); datalist paths are relative to it.
        work_dir: output root; ``round_<k>/`` per round, ``final/`` for the last retraining.
        datalist: source datalist (default ``<dataset_dir>/datalist.json``, see ``abdoseg prepare``).
        n_rounds: number of rounds.
        rule: fusion rule set, ``"seed001"`` (fill unannotated classes from the prediction),
            ``"seed003"`` or ``"seed004"``.
        fine_bundle: teacher bundle folder (default: the repository's ``bundles/fine_organ_tumor``).
        max_epochs: training epochs per round with the tiny CPU budget of
            :data:`DEFAULT_TRAIN_OVERRIDES` (default 1, validation skipped); ``None``: the
            config's (preset's) own epochs, validation, batch and patches -- the paper's run.
        train_overrides: extra overrides for the fine bundle's train.json (e.g. patch_size).
        teacher_overrides: extra overrides for its inference.json (e.g. coarse_checkpoint).
        checkpoint_names: teacher checkpoints used for pseudo labels (first = S1; seed003 votes
            the lesion over all of them).
        threshold, keep_fraction: uncertainty selection (seed 001); both None = keep all.
        seed004_unlabeled: ``"skip"`` or ``"teacher_organs"`` (rule seed004 only).
        final_train: retrain on the last round's datalist into ``<work_dir>/final``.
        trainer: ``"module:function"`` or callable with the signature of :func:`bundle_trainer`
            (``datalist, train_key, dataset_dir, models_dir, **kw``) returning ``{name: path}``.
        teacher: ``"module:function"`` or callable ``factory(checkpoint) -> segment``.
        device: torch device for the default teacher.
        select_every_round: apply the uncertainty selection in every round (True) or only in the
            last one, before the final training (False); None = False for ``"seed001"`` (the
            paper's order), True for the other rules.
        preset: a fine bundle preset (``configs/presets/<preset>.json``, e.g. ``"seed001"``)
            merged after ``train.json`` for every training and after ``inference.json`` for the
            teacher (default trainer and teacher only).
    Returns:
        summary ``{"rounds": [per-round counts], "final": checkpoints or None}``.
    """
    from abdoseg.label_fusion.workflow import RULE_SETS, fuse_datalist, select_and_write
    from abdoseg.label_fusion.pseudo_label import datalist_items, pseudo_label

    if rule not in RULE_SETS:
        raise ValueError(f"unknown rule set {rule!r}; choose one of {RULE_SETS}")
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    data = Path(dataset_dir).resolve()
    src = Path(datalist).resolve() if datalist else data / "datalist.json"
    if not src.is_file():
        raise InputError(src, "datalist not found (write it with `abdoseg prepare`)")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fine = Path(fine_bundle).resolve() if fine_bundle else DEFAULT_FINE_BUNDLE
    names = [str(n) for n in ([checkpoint_names] if isinstance(checkpoint_names, str) else checkpoint_names)]
    if select_every_round is None:
        select_every_round = rule != "seed001"
    # validation is skipped by default (val_interval > max_epochs): on a CPU one sliding-window
    # validation costs more than the tiny training; the final checkpoint is the teacher then
    budget = max_epochs is not None
    t_overrides = ({"max_epochs": int(max_epochs), "val_interval": int(max_epochs) + 1} if budget else {})
    t_overrides.update(dict(train_overrides or {}))
    default_trainer = lambda **kw: bundle_trainer(fine_bundle=fine, overrides=t_overrides,  # noqa: E731
                                                  checkpoint_names=names, preset=preset, cpu_budget=budget, **kw)
    train_fn = _resolve(trainer, default_trainer)
    factory = (_resolve(teacher, None) if teacher is not None
               else bundle_teacher_factory(fine, device, teacher_overrides, preset=preset))
    items = datalist_items(src, data, ("training", "unlabeled"))

    done = finished_rounds(work)
    summary: dict[str, Any] = {"rounds": [], "final": None}
    for k in range(1, n_rounds + 1):
        rdir = work / f"round_{k}"
        if k in done:
            print(f"rounds: round {k} already finished ({rdir / DONE}), skipped", file=sys.stderr)
            summary["rounds"].append(json.loads((rdir / DONE).read_text()))
            continue
        t0 = time.perf_counter()
        print(f"rounds: round {k}/{n_rounds} in {rdir}", file=sys.stderr)
        if k == 1:
            train_dl, train_key = src, "training_all_organs"
        else:
            train_dl, train_key = work / f"round_{k - 1}" / "datalist.json", "training"
        ckpts = _train(train_fn, rdir / "models", datalist=str(train_dl), train_key=train_key,
                       dataset_dir=str(data))
        missing = [n for n in names if n not in ckpts]
        if missing:
            raise InputError(rdir / "models" / CHECKPOINTS_JSON, f"trainer returned no checkpoint named {missing}")
        reports = pseudo_label(items, factory, {n: ckpts[n] for n in names}, rdir / "pseudo", rank=0, world_size=1)
        exit_if_failed([reason for rep in reports.values() for _, _, reason in rep.failed],
                       "pseudo-label case(s) failed", prefix=f"round {k}: ")
        fuse_datalist(src, rdir / "fused", rule, rdir / "pseudo", names, data, ("training", "unlabeled"),
                      seed004_unlabeled)
        history = [work / f"round_{j}" / "pseudo" / names[0] for j in range(1, k + 1)]
        rep = select_and_write(rdir / "fused", src, rdir / "datalist.json", rdir / "report.json", history,
                               threshold, keep_fraction, data,
                               defer_selection=not select_every_round and k < n_rounds)
        round_summary = {"round": k, "preset": preset, "train_datalist": str(train_dl), "train_key": train_key,
                         "checkpoints": ckpts, "threshold": threshold, "keep_fraction": keep_fraction,
                         "selection": "applied" if select_every_round or k == n_rounds else "deferred",
                         "counts": rep["counts"], "seconds": round(time.perf_counter() - t0, 2)}
        _mark_done(rdir, round_summary)
        summary["rounds"].append(round_summary)
    if final_train:
        fdir = work / "final"
        if (fdir / DONE).is_file():
            summary["final"] = json.loads((fdir / DONE).read_text())["checkpoints"]
        else:
            ckpts = _train(train_fn, fdir / "models", datalist=str(work / f"round_{n_rounds}" / "datalist.json"),
                           train_key="training", dataset_dir=str(data))
            _mark_done(fdir, {"train_datalist": str(work / f"round_{n_rounds}" / "datalist.json"), "checkpoints": ckpts})
            summary["final"] = ckpts
    save_json(summary, work / "rounds_summary.json")
    print(f"rounds: {n_rounds} round(s) finished; summary in {work / 'rounds_summary.json'}", file=sys.stderr)
    return summary
