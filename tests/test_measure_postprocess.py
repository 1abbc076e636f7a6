
"""scripts/measure_postprocess.py runs on a tiny dataset: the fine bundle's own inference (one
builder, one checkpoint loader), every rule set scored, the table written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from abdoseg.io import save_nifti

from test_package import FINE, init_weights, small_ct

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("measure_postprocess", REPO / "scripts" / "measure_postprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_postprocess_runs_on_one_case(tmp_path):
    data = tmp_path / "data"
    hu, affine = small_ct(data / "imagesVal" / "SMALL_0001_0000.nii.gz")
    label = np.zeros(hu.shape, np.uint8)
    label[hu > 100] = 1  # liver-like blob
    save_nifti(label, affine, data / "labelsVal" / "SMALL_0001.nii.gz")
    (data / "datalist.json").write_text(json.dumps({"validation": [
        {"image": "imagesVal/SMALL_0001_0000.nii.gz", "label": "labelsVal/SMALL_0001.nii.gz"}]}))
    weights = init_weights(FINE, "network_def", tmp_path / "model.pt")
    out = tmp_path / "out"

    rc = _script().main(["--dataset_dir", str(data), "--model", str(weights), "--out_dir", str(out), "--threads", "1"])

    assert rc == 0
    result = json.loads((out / "postprocess_effect_model.json").read_text())
    script = _script()
    assert result["cases"] == 1 and set(result["table"]) == set(script.RULE_SETS)
    for row in result["table"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("organ_dsc", "organ_nsd", "lesion_dsc", "lesion_nsd"))
