#!/usr/bin/env python
"""The project's benchmarks, one command: ``python scripts/bench.py <subcommand> [args]``.

Each subcommand lives in ``scripts/benchmarks/<module>.py`` (its docstring is its ``--help``);
what they share (phantom cases, random-weight bundles, child-process and GPU memory measurement,
tables into the docs) is ``scripts/benchlib.py``. Experiments (``experiment_label_modes.py``,
``measure_postprocess.py``) and ``eval_accuracy.py`` stay separate scripts.

    .venv/bin/python scripts/bench.py --help
    .venv/bin/python scripts/bench.py cascade --slices 55,554 --threads 2
    .venv/bin/python scripts/bench.py stages --ct ../shared/data/real_ct/ircadb07/image.nii.gz --random_weights
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, benchmarks/ (also when imported)

#: subcommand -> (module under benchmarks/, one line for the overview)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "cascade": ("cascade", "cascade vs single stage end to end, fresh process per case (time, peak RSS, DSC)"),
    "stages": ("inference", "where the time of one cascade inference goes, stage by stage (one CT)"),
    "compare": ("inference", "whole `abdoseg segment` process vs model-zoo wholeBody, alternating"),
    "onnx": ("onnx", "whole cascade: PyTorch vs ONNX Runtime on CPU"),
    "coarse": ("coarse", "coarse ROI stage: coverage, ROI volume, time on held-out phantoms"),
    "training": ("training", "one optimizer step of a bundle's network: float32 vs autocast"),
    "data": ("data", "training data pipeline (disk cache) at growing dataset sizes"),
    "learning": ("learning", "learning curves of fine-stage training recipes at equal wall time"),
    "systems": ("systems", "the five seed systems trained and scored side by side"),
    "gpu": ("gpu", "GPU readiness: the cascade on CUDA with AMP, FLARE's GPU memory measure"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (module_name, line) in SUBCOMMANDS.items():
        module = importlib.import_module(f"benchmarks.{module_name}")
        doc = getattr(module, f"{name.upper()}_DOC", module.__doc__)
        sp = sub.add_parser(name, help=line, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp, name)
        sp.set_defaults(run=module.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = vars(args).pop("run")  # args stay plain data (some subcommands write them into their JSON)
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
