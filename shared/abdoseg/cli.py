"""Command line: ``abdoseg <command> [--flags]`` (python-fire). ``abdoseg`` alone lists the commands.

Each command lives in its own module and is imported only when called, so ``abdoseg evaluate``
does not pay for importing the networks.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "generate": ("abdoseg.phantom:generate", "write a synthetic FLARE23-style phantom dataset"),
    "prepare": ("abdoseg.dataprep:prepare", "scan a FLARE23-style folder, write datalist JSON + summary"),
    "demo": ("abdoseg.demo:demo", "whole pipeline on phantoms: generate, train, fuse, segment, evaluate, report"),
    "evaluate": ("abdoseg.evaluate:evaluate", "FLARE23 DSC/NSD of a prediction folder vs a ground-truth folder"),
    "rounds": ("abdoseg.rounds:rounds", "semi-supervised rounds: train teacher -> pseudo-label -> fuse -> select -> retrain"),
    "pack": ("abdoseg.package:pack", "pack a bundle (configs + trained weights) into <name>_v<version>.zip for monai.bundle download"),
    "export": ("abdoseg.export:export", "export coarse and fine networks to TorchScript and ONNX"),
    "segment": ("abdoseg.segment:segment", "segment CT file/folder/DICOM folder with the cascade"),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: abdoseg <command> [--help | flags]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"abdoseg: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    import functools

    import fire

    @functools.wraps(func)
    def quiet(*args, **kwargs):  # commands print their own summaries; fire would echo the return value
        func(*args, **kwargs)

    from abdoseg.io import InputError

    package_dir = str(Path(__file__).resolve().parent)
    show_default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # our warnings: one line each
        if str(filename).startswith(package_dir) or category.__module__.startswith("abdoseg"):
            print(f"abdoseg {name}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            show_default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        fire.Fire(quiet, command=argv[1:], name=f"abdoseg {name}")
    except InputError as exc:
        print(f"abdoseg {name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except OSError as exc:  # a read-only folder, a file where a folder should be, a full disk: no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"abdoseg {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    finally:
        warnings.showwarning = show_default


if __name__ == "__main__":
    main()
