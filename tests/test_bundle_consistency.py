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
    assert fine["coarse_spacing_mm"] == coarse["pixdim"]
    assert fine["hu_window"] == coarse["hu_window"]
