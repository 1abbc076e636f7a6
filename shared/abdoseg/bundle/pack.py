"""Pack a MONAI bundle folder into a model-zoo style zip: ``<name>_v<version>.zip`` with ``<name>/`` at its top.

The zip is what ``python -m monai.bundle download --name <name> --url file:///abs/<name>_v<version>.zip
--bundle_dir D`` expects: MONAI downloads the file and extracts it into ``D``, giving ``D/<name>/...``.

What goes in:
- every file of the bundle except evaluation outputs, caches and build leftovers
  (folders ``eval/``, ``__pycache__/``, ``.pytest_cache/``, any folder whose name contains ``cache``,
  ``runs/``, ``mlruns/``; files ``*.pyc``, ``*.tmp``, hidden files);
- from ``models/`` only ``model.pt`` (required), the checkpoints ``configs/inference.json``
  refers to as ``models/<file>`` (for the fine bundle: ``coarse_model.pt``), and exported
  ``model.ts`` / ``model.onnx`` when present; training leftovers (other ``*.pt``) stay out.

Weights given with ``weights=`` (and ``model_files=``) replace the bundle's copies inside the zip; the
bundle folder itself is never modified. Every checkpoint is checked to be a plain state dict that
``torch.load(weights_only=True)`` reads, and ``models/model.pt`` must load (strictly) into the
``network_def`` of ``configs/inference.json``. The zip is written atomically (temporary name, then
rename) with fixed timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

from abdoseg.io import AbdosegWarning, InputError, atomic_path

EXCLUDED_DIRS = {"eval", "__pycache__", ".pytest_cache", "runs", "mlruns", ".ipynb_checkpoints"}
EXCLUDED_SUFFIXES = (".pyc", ".tmp")
EXPORTED_MODELS = ("model.ts", "model.onnx")
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MODEL_REF = re.compile(r"models/([A-Za-z0-9_.\-]+\.(?:pt|pth|ts|onnx))")


def _excluded(rel: Path) -> bool:
    """True for evaluation outputs, caches, hidden and temporary files (``rel`` relative to the bundle)."""
    for part in rel.parts[:-1]:
        if part in EXCLUDED_DIRS or "cache" in part.lower() or part.startswith("."):
            return True
    name = rel.name
    return name.startswith(".") or name.endswith(EXCLUDED_SUFFIXES)


def referenced_model_files(inference_config: str | Path) -> list[str]:
    """File names ``X`` that ``configs/inference.json`` refers to as ``models/X`` (sorted, unique)."""
    text = Path(inference_config).read_text()
    return sorted(set(_MODEL_REF.findall(text)))


def _read_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    version = meta.get("version")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise InputError(path, f"'version' must be a string like 0.1.0, got {version!r}")
    if version not in meta.get("changelog", {}):
        raise InputError(path, f"version {version} has no entry in 'changelog'")
    return meta


def _check_state_dict(path: Path) -> dict:
    """Load ``path`` with :func:`abdoseg.networks.checkpoints.load_state_dict_file` (``weights_only=True``)
    and require a non-empty state dict; raises InputError naming the file."""
    from abdoseg.networks.checkpoints import load_state_dict_file

    sd = load_state_dict_file(path, map_location="cpu")
    if not sd:
        raise InputError(path, "empty state dict (expected a non-empty {name: tensor} mapping)")
    return sd


def _check_network_weights(bundle: Path, weights: Path) -> None:
    """``weights`` must load strictly into ``network_def`` of the bundle's inference.json
    (:func:`abdoseg.networks.checkpoints.load_weights`, the one loader)."""
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.networks.checkpoints import load_weights

    net = load_bundle_config(bundle).get_parsed_content("network_def", instantiate=True)
    load_weights(net, weights, what="network_def of configs/inference.json")


def pack(bundle_dir: str, out_dir: str = "dist", weights: str | None = None,
         model_files: Mapping[str, str] | None = None, check_weights: bool = True) -> str:
    """Pack ``bundle_dir`` into ``out_dir/<name>_v<version>.zip`` (``<name>`` = the bundle folder's name).

    Args:
        bundle_dir: bundle folder (``configs/metadata.json``, ``configs/inference.json``, ``LICENSE``,
            ``models/model.pt`` unless ``weights`` is given).
        out_dir: where the zip goes (created if missing).
        weights: trained network weights (plain state dict) packed as ``models/model.pt``.
        model_files: more checkpoints to pack, ``{"coarse_model.pt": "path/to/coarse.pt"}`` -> ``models/coarse_model.pt``.
        check_weights: load every checkpoint with ``weights_only=True`` and ``model.pt`` into ``network_def``.

    Returns:
        the zip's path. Raises :class:`abdoseg.io.InputError` naming the file for a missing or bad input.
    """
    bundle = Path(bundle_dir).resolve()
    if not bundle.is_dir():
        raise InputError(bundle, "bundle folder not found")
    for rel in REQUIRED_FILES:
        if not (bundle / rel).is_file():
            raise InputError(bundle / rel, "required bundle file missing")
    meta = _read_metadata(bundle)
    name = bundle.name
    if not (bundle / "docs" / "README.md").is_file():
        warnings.warn(f"{bundle / 'docs' / 'README.md'}: missing (MONAI model-zoo convention); packing without it",
                      AbdosegWarning, stacklevel=2)

    # models/: name in the zip -> source file
    models: dict[str, Path] = {}
    for fname in ("model.pt", *referenced_model_files(bundle / "configs" / "inference.json"), *EXPORTED_MODELS):
        if (bundle / "models" / fname).is_file():
            models[fname] = bundle / "models" / fname
    for fname, src in {**(model_files or {}), **({"model.pt": weights} if weights else {})}.items():
        if "/" in fname or "\\" in fname:
            raise InputError(fname, "model_files keys are file names inside models/, without folders")
        src_path = Path(src)
        if not src_path.is_file():
            raise InputError(src_path, f"weights file not found (for models/{fname})")
        models[fname] = src_path
    if "model.pt" not in models:
        raise InputError(bundle / "models" / "model.pt",
                         "trained weights missing: train the bundle first or pass --weights path/to/model.pt")
    for fname in referenced_model_files(bundle / "configs" / "inference.json"):
        if fname not in models:
            raise InputError(bundle / "models" / fname,
                             f"configs/inference.json needs models/{fname}: copy it there or pass "
                             f"--model_files '{{\"{fname}\": \"path\"}}'")
    if check_weights:
        for fname, src in models.items():
            if fname.endswith((".pt", ".pth")):
                _check_state_dict(src)
        _check_network_weights(bundle, models["model.pt"])

    files: dict[str, Path] = {}
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle)
        if not path.is_file() or _excluded(rel) or rel.parts[0] == "models":
            continue
        files[rel.as_posix()] = path
    for fname, src in models.items():
        files[f"models/{fname}"] = src

    out = Path(out_dir) / f"{name}_v{meta['version']}.zip"
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, src in sorted(files.items()):
            info = zipfile.ZipInfo(f"{name}/{rel}", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, src.read_bytes())
    print(f"packed {len(files)} files ({', '.join(sorted(models))} in models/) -> {out}")
    return str(out)
