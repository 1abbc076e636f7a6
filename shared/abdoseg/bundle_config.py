"""Read a bundle's config the way ``monai.bundle run`` does, for code that drives bundles."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any

from abdoseg.io import InputError


def load_bundle_config(bundle_dir: str | Path, config: str | Sequence[str] = "configs/inference.json") -> Any:
    """``monai.bundle.ConfigParser`` of ``<bundle_dir>/<config>`` (a list is merged in order, as
    ``--config_file "['a.json','b.json']"`` does) with its metadata (when present) and
    ``bundle_root`` set to ``bundle_dir``. Raises :class:`InputError` if a config is missing."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    files = [bundle_dir / c for c in ([config] if isinstance(config, (str, Path)) else config)]
    for cfg in files:
        if not cfg.is_file():
            raise InputError(cfg, "bundle config not found")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    meta = bundle_dir / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_dir)
    return parser
