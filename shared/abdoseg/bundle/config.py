"""Read a bundle's config the way ``monai.bundle run`` does, for code that drives bundles."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any

from abdoseg.io import InputError

BUNDLES_DIR: Path = Path(__file__).resolve().parents[3] / "bundles"
"""The repository's ``bundles/`` folder (coarse_roi, fine_organ_tumor, label_fusion) for a source checkout."""


def check_json_file(path: str | Path) -> Any:
    """The parsed content of the JSON file ``path`` (``.yaml``/``.yml`` files are left to MONAI and
    return ``None``). Raises :class:`InputError` naming the file, line and column when it is not
    valid JSON (MONAI's parser would end in a long ``JSONDecodeError`` traceback)."""
    import json

    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a text file (byte {exc.start} is not UTF-8); expected JSON") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


WORKFLOW_CONFIGS: dict[str, tuple[str, ...]] = {
    "inference": ("inference.json",),
    "training": ("inference.json", "train.json"),
}
"""The config files (under ``configs/``) a workflow merges, in order. ``inference.json`` is each
bundle's base: it defines the network(s), the windows, spacings and preprocessing chains once;
``train.json`` adds only what training needs (``--config_file "['configs/inference.json',
'configs/train.json']"``)."""


def config_files(bundle_dir: str | Path, workflow: str = "inference", preset: str | None = None,
                 multi_gpu: bool = False) -> list[str]:
    """The config files ``monai.bundle run`` merges for ``workflow`` of ``bundle_dir``:
    :data:`WORKFLOW_CONFIGS`, then ``configs/multi_gpu_train.json`` (``multi_gpu``, training only),
    then ``configs/presets/<preset>.json``. Raises :class:`InputError` naming a missing file (for a
    missing preset, the presets there are listed)."""
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"workflow must be one of {sorted(WORKFLOW_CONFIGS)}, got {workflow!r}")
    configs = Path(bundle_dir).resolve() / "configs"
    files = [configs / name for name in WORKFLOW_CONFIGS[workflow]]
    if multi_gpu and workflow == "training":
        files.append(configs / "multi_gpu_train.json")
    if preset:
        files.append(configs / "presets" / f"{preset}.json")
    for f in files:
        if not f.is_file():
            have = ", ".join(sorted(p.stem for p in (configs / "presets").glob("*.json")))
            raise InputError(f, "bundle config not found" + (f" (presets: {have})" if f.parent.name == "presets" else ""))
    return [str(f) for f in files]


def load_bundle_config(bundle_dir: str | Path, config: str | Sequence[str] = "configs/inference.json") -> Any:
    """``monai.bundle.ConfigParser`` of ``<bundle_dir>/<config>`` (a list is merged in order, as
    ``--config_file "['a.json','b.json']"`` does) with its metadata (when present) and
    ``bundle_root`` set to ``bundle_dir``. Raises :class:`InputError` naming the file if a config
    is missing or is not valid JSON (nor is ``configs/metadata.json``)."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    files = [bundle_dir / c for c in ([config] if isinstance(config, (str, Path)) else config)]
    for cfg in files:
        if not cfg.is_file():
            raise InputError(cfg, "bundle config not found")
        check_json_file(cfg)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    meta = bundle_dir / "configs" / "metadata.json"
    if meta.is_file():
        check_json_file(meta)
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_dir)
    return parser


def run_bundle(bundle_dir: str | Path, config: str | Sequence[str], run_id: str = "run",
               log: str | Path | None = None, **overrides: Any) -> float:
    """``python -m monai.bundle run <run_id>`` on a bundle folder in a child process, as a user
    would type it; returns its wall seconds.

    Args:
        bundle_dir: the bundle (``configs/metadata.json``, ``configs/logging.conf``).
        config: config file name(s) under ``configs/`` or paths; a list is merged in order
            (``--config_file "['train.json', 'overlay.json']"``).
        run_id: the config id to run (``training``, ``run``, ...).
        log: append the command and its output to this file (default: this process's streams).
        overrides: ``--key value`` pairs; non-strings are passed as JSON.

    Raises:
        subprocess.CalledProcessError: the run failed (its output is in ``log``).
    """
    import json
    import subprocess
    import sys
    import time

    bundle = Path(bundle_dir)
    names = [config] if isinstance(config, (str, Path)) else list(config)
    files = [str(bundle / "configs" / c) if not Path(c).is_absolute() else str(c) for c in names]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id,
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--config_file", files[0] if len(files) == 1 else repr(files),
           "--logging_file", str(bundle / "configs" / "logging.conf"),
           "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    t0 = time.perf_counter()
    if log is None:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=str(bundle))
    else:
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            subprocess.run(cmd, check=True, cwd=str(bundle), stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0
