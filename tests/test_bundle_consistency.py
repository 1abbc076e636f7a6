"""The bundles must agree with each other: the fine bundle loads the coarse bundle's weights."""

import json
from pathlib import Path

from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def _parsed(bundle: str, config: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / config))
    parser.read_meta(str(ROOT / "bundles" / bundle / "configs" / "metadata.json"))
    return parser


def test_fine_bundle_coarse_net_matches_coarse_bundle_network():
    coarse = _parsed("coarse_roi", "inference.json")
    fine = _parsed("fine_organ_tumor", "inference.json")
    a = coarse.get_parsed_content("network_def")
    b = fine.get_parsed_content("coarse_network_def")
    shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert shapes_a == shapes_b
    # the coarse weights load strictly into the fine bundle's coarse network
    b.load_state_dict(a.state_dict(), strict=True)


def test_fine_and_coarse_use_the_same_coarse_preprocessing():
    coarse = json.loads((ROOT / "bundles/coarse_roi/configs/inference.json").read_text())
    fine = json.loads((ROOT / "bundles/fine_organ_tumor/configs/inference.json").read_text())
    for key in ("coarse_spacing_mm", "coarse_hu_window", "coarse_roi_size", "body_hu_threshold", "body_margin_mm"):  # one name per setting
        assert fine[key] == coarse[key], key
    assert fine["coarse_resampling"][0]["pixdim"] == "@coarse_spacing_mm" == coarse["resampling"][0]["pixdim"]


def test_documented_bundle_zip_names_are_what_pack_writes():
    """Every ``<bundle>_v<version>.zip`` in the README and the bundle docs is the name ``abdoseg
    pack`` gives today (``<name>_v<metadata version>.zip``); a stale version makes the documented
    ``monai.bundle download`` fail."""
    import re

    repo = ROOT
    versions = {b.name: json.loads((b / "configs" / "metadata.json").read_text())["version"]
                for b in (repo / "bundles").iterdir() if (b / "configs" / "metadata.json").is_file()}
    docs = [repo / "README.md", *sorted((repo / "bundles").glob("*/docs/README.md"))]
    found = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for name, version in re.findall(r"\b(" + "|".join(versions) + r")_v(\d+\.\d+\.\d+)\.zip", text):
            found.append((doc.name, name, version))
            assert version == versions[name], f"{doc}: {name}_v{version}.zip, but pack writes {name}_v{versions[name]}.zip"
    assert found, "no documented zip name found: the check would check nothing"


def test_training_docs_say_to_run_prepare_first():
    """A fresh ``abdoseg generate`` folder has no datalist.json: the documented training command
    needs ``abdoseg prepare`` first, and the docs say so where training is described."""
    repo = ROOT
    for doc in (repo / "README.md", repo / "bundles" / "fine_organ_tumor" / "docs" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        assert "abdoseg prepare --data_dir" in text and "datalist.json does not exist" in text, doc
