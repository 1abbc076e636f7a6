"""Command line: ``abdoseg <command> [--flags]`` (python-fire). ``abdoseg`` alone lists the commands.

Each command lives in its own module and is imported only when called, so ``abdoseg evaluate``
does not pay for importing the networks.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "generate": ("abdoseg.data.phantom:generate", "write a synthetic FLARE23-style phantom dataset"),
    "prepare": ("abdoseg.data.prepare:prepare", "scan a FLARE23-style folder, write datalist JSON + summary"),
    "demo": ("abdoseg.demo:demo", "whole pipeline on phantoms: generate, train, fuse, segment, evaluate, report"),
    "evaluate": ("abdoseg.evaluation.evaluate:evaluate", "FLARE23 DSC/NSD of a prediction folder vs a ground-truth folder"),
    "rounds": ("abdoseg.label_fusion.rounds:rounds", "semi-supervised rounds: train teacher -> pseudo-label -> fuse -> select -> retrain"),
    "pack": ("abdoseg.bundle.pack:pack", "pack a bundle (configs + trained weights) into <name>_v<version>.zip for monai.bundle download"),
    "export": ("abdoseg.bundle.export:export", "export coarse and fine networks to TorchScript and ONNX"),
    "segment": ("abdoseg.segment:segment", "segment CT file/folder/DICOM folder with the cascade"),
}


#: Library messages that every run printed and that say nothing about the user's data, silenced
#: one by one (message regex, warning category); anything else still shows.
LIBRARY_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # MONAI's DICOM reader is built by every LoadImaged without a reader; this machine has no nvImageCodec
    (r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning),
    # MONAI 1.6 announces a future default of Orientation(d)'s labels; the configs give axcodes explicitly
    (r"monai\.transforms\.spatial\.(array|dictionary) Orientationd?\.__init__:labels: Current default value",
     FutureWarning),
    # MetaTensor(x, affine=...) on a tensor whose meta already has one (MONAI's own inverse transforms)
    (r"Setting affine, but the applied meta contains an affine\. This will be overwritten\.", UserWarning),
)
#: Loggers whose warnings are library noise (MONAI logs the missing nvImageCodec on every reader).
NOISY_LOGGERS: tuple[str, ...] = ("monai.data.nvimgcodec_pydicom_plugin",)


def quiet_library_noise() -> None:
    """Silence exactly :data:`LIBRARY_NOISE` and the warnings of :data:`NOISY_LOGGERS` (errors
    still show); every other warning, and every one of this package, is shown."""
    import logging

    for pattern, category in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: abdoseg <command> [--help | flags]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def input_error_in_chain(exc: BaseException) -> Exception | None:
    """The :class:`~abdoseg.io.InputError` that ``exc`` wraps (``raise ... from``, or raised while
    handling it), or ``None``: its one line is all a user needs."""
    from abdoseg.io import InputError

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, InputError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def join_dash_values(func: Any, args: list[str]) -> list[str]:
    """``args`` with a value that starts with ``-`` (a file named ``-x.nii.gz``) glued to its flag:
    ``-i -x.nii.gz`` -> ``--input=-x.nii.gz``. Fire would read ``-x.nii.gz`` as a flag and pass
    ``input=True``. Only for parameters that are not booleans, and only when the value is not
    itself a flag of ``func``; a negative number stays as it is (fire reads it as a value)."""
    import inspect

    params = {n: p for n, p in inspect.signature(func).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    spellings: dict[str, str] = {}
    for n in params:
        spellings[f"--{n}"] = n
        spellings[f"--{n.replace('_', '-')}"] = n
        spellings[f"-{n}"] = n
    initials: dict[str, list[str]] = {}
    for n in params:
        initials.setdefault(n[0], []).append(n)
    for letter, names in initials.items():  # fire's short flags: a unique first letter
        if len(names) == 1:
            spellings.setdefault(f"-{letter}", names[0])
    flags = set(spellings) | {f"--no{n}" for n in params}

    def takes_value(name: str) -> bool:
        p = params[name]
        return not isinstance(p.default, bool) and p.annotation not in (bool, "bool")

    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = spellings.get(a)
        if name is not None and takes_value(name) and i + 1 < len(args):
            nxt = args[i + 1]
            if nxt.startswith("-") and nxt.split("=", 1)[0] not in flags and nxt != "--" and not _is_number(nxt):
                out.append(f"--{name}={nxt}")
                i += 2
                continue
        out.append(a)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"abdoseg: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    quiet_library_noise()
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
        fire.Fire(quiet, command=join_dash_values(func, argv[1:]), name=f"abdoseg {name}")
    except InputError as exc:
        print(f"abdoseg {name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except OSError as exc:  # a read-only folder, a file where a folder should be, a full disk: no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"abdoseg {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except Exception as exc:  # e.g. MONAI's "Failed to instantiate component" around our InputError
        inner = input_error_in_chain(exc)
        if inner is None:
            raise
        print(f"abdoseg {name}: error: {inner}", file=sys.stderr)
        raise SystemExit(1) from exc
    finally:
        warnings.showwarning = show_default


if __name__ == "__main__":
    main()
