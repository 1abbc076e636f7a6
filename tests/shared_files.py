"""Files the suite needs from the workspace's ``../shared`` folder (next to the repository, see
README "Development"): the MONAI metadata schema, model-zoo's ``ci/`` and the real CT cases.
A missing one fails the test that needs it with a message saying what and where; it never skips."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MONAI_SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"
MODEL_ZOO_CI = SHARED / "peers" / "model-zoo-ci"  # Project-MONAI/model-zoo ci/
REAL_CT = SHARED / "data" / "real_ct"


def require(path: Path, what: str) -> Path:
    """``path``, or a test failure naming ``what`` and where it was looked for."""
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: the suite needs the workspace's ../shared folder beside the "
                    "repository (README, Development)", pytrace=False)
    return path
