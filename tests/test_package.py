"""abdoseg pack: bundle -> <name>_v<version>.zip -> `python -m monai.bundle download --url file://...` in a
fresh folder -> verify_metadata / verify_net_in_out / inference from the downloaded copy; contents
(weights in, eval outputs and caches out), deterministic bytes, clear errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from abdoseg.io import InputError, save_nifti
from abdoseg.bundle.pack import pack, referenced_model_files
from shared_files import MODEL_ZOO_CI, MONAI_SCHEMA, require

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")


REPO = Path(__file__).resolve().parents[1]
FINE = REPO / "bundles" / "fine_organ_tumor"
NAME = "fine_organ_tumor"


def init_weights(bundle: Path, net_id: str, path: Path, seed: int = 0) -> Path:
    """Freshly initialised plain state dict of ``net_id`` from the bundle's inference.json."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    net = parser.get_parsed_content(net_id, instantiate=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), str(path))
    return path


def bundle_copy(dst: Path, with_weights: bool = True) -> Path:
    """Copy of the fine bundle (configs, docs, LICENSE) with fresh weights and some junk to leave out."""
    b = dst / NAME
    shutil.copytree(FINE, b, ignore=shutil.ignore_patterns("*.pt", "eval", "__pycache__"))
    if with_weights:
        init_weights(b, "network_def", b / "models" / "model.pt")
        init_weights(b, "coarse_network_def", b / "models" / "coarse_model.pt")
    (b / "eval").mkdir(exist_ok=True)
    (b / "eval" / "CASE.nii.gz").write_bytes(b"old prediction")
    (b / "configs" / "__pycache__").mkdir(exist_ok=True)
    (b / "configs" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (b / "models").mkdir(exist_ok=True)  # a clean clone has no models/ folder content
    (b / "models" / "checkpoint_epoch=3.pt").write_bytes(b"training leftover")
    (b / "persistent_cache").mkdir(exist_ok=True)
    (b / "persistent_cache" / "a.pt").write_bytes(b"cache")
    return b


def small_ct(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small abdomen-like CT (int16 HU): soft-tissue ellipse in air with two brighter blobs; 4x4x5 mm."""
    rng = np.random.default_rng(seed)
    shape = (28, 24, 14)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((x - 14) / 12) ** 2 + ((y - 12) / 10) ** 2 <= 1
    hu = np.where(body, 30.0, -1000.0)
    hu[body & (((x - 9) / 4) ** 2 + ((y - 11) / 4) ** 2 + ((z - 7) / 3) ** 2 <= 1)] = 130
    hu[body & (((x - 19) / 3) ** 2 + ((y - 13) / 3) ** 2 + ((z - 7) / 3) ** 2 <= 1)] = 200
    hu = (hu + rng.normal(0, 10, shape)).astype(np.int16)
    affine = np.array([[-4.0, 0, 0, 60], [0, -4.0, 0, 50], [0, 0, 5.0, -30], [0, 0, 0, 1]])  # LPS-like flips
    save_nifti(hu, affine, path)
    return hu, affine


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pack")
    bundle = bundle_copy(root / "src")
    zip_path = Path(pack(str(bundle), out_dir=str(root / "dist")))
    return bundle, zip_path


def test_zip_layout_weights_in_junk_out(packed):
    bundle, zip_path = packed
    meta = json.loads((FINE / "configs" / "metadata.json").read_text())
    assert zip_path.name == f"{NAME}_v{meta['version']}.zip"
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert all(n.startswith(f"{NAME}/") for n in names)
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                "configs/logging.conf", "models/model.pt", "models/coarse_model.pt"):
        assert f"{NAME}/{rel}" in names, rel
    assert not [n for n in names if "/eval/" in n or "cache" in n or n.endswith(".pyc") or "checkpoint_epoch" in n]
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read(f"{NAME}/models/model.pt") == (bundle / "models" / "model.pt").read_bytes()
    assert referenced_model_files(FINE / "configs" / "inference.json") == ["coarse_model.pt", "model.pt"]
    assert not list(zip_path.parent.glob("*.tmp")) and len(list(zip_path.parent.iterdir())) == 1


def test_same_inputs_same_bytes(packed, tmp_path):
    bundle, zip_path = packed
    again = Path(pack(str(bundle), out_dir=str(tmp_path)))
    assert again.read_bytes() == zip_path.read_bytes()


def test_download_verify_and_infer_from_downloaded_copy(packed, tmp_path):
    """The user path: monai.bundle download from a file:// URL, verify, then run inference from the copy."""
    _, zip_path = packed
    dl = tmp_path / "downloaded"
    env = dict(os.environ)  # warnings stay visible in the captured output (no blanket PYTHONWARNINGS=ignore)
    subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", NAME,
                    "--url", zip_path.resolve().as_uri(), "--bundle_dir", str(dl)],
                   check=True, capture_output=True, text=True, env=env, timeout=300)
    b = dl / NAME
    assert (b / "models" / "model.pt").is_file() and (b / "models" / "coarse_model.pt").is_file()

    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(b / "configs" / "metadata.json"),
                    filepath=str(require(MONAI_SCHEMA, "the MONAI bundle metadata schema")))
    verify_net_in_out(net_id="network_def", meta_file=str(b / "configs" / "metadata.json"),
                      config_file=str(b / "configs" / "inference.json"), device="cpu",
                      n=2)  # 32^3: at 16^3 the 5-level net's 1x1x1 bottleneck fails InstanceNorm

    images, out = tmp_path / "images", tmp_path / "pred"
    hu, affine = small_ct(images / "SMALL_0001_0000.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(b / "configs" / "inference.json"),
         "--meta_file", str(b / "configs" / "metadata.json"), "--logging_file", str(b / "configs" / "logging.conf"),
         "--bundle_root", str(b), "--input_dir", str(images), "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = nib.load(str(out / "SMALL_0001.nii.gz"))
    arr = np.asarray(pred.dataobj)
    assert arr.shape == hu.shape and arr.dtype == np.uint8
    np.testing.assert_allclose(pred.affine, affine, atol=1e-4)
    # the downloaded bundle's own run writes exactly what its cascade computes in process
    from abdoseg.inference.segmenter import segmenter_from_bundle

    ref, _ = segmenter_from_bundle(b, device="cpu")(
        {"image": str(images / "SMALL_0001_0000.nii.gz")})
    np.testing.assert_array_equal(arr, ref)


def test_missing_weights_clear_error_nothing_written(tmp_path):
    bundle = bundle_copy(tmp_path / "src", with_weights=False)
    with pytest.raises(InputError, match=r"models/model\.pt: trained weights missing"):
        pack(str(bundle), out_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
    # weights given, but the coarse checkpoint inference.json needs is still missing
    w = init_weights(bundle, "network_def", tmp_path / "trained" / "fine.pt")
    with pytest.raises(InputError, match=r"coarse_model\.pt: configs/inference.json needs"):
        pack(str(bundle), out_dir=str(tmp_path / "dist"), weights=str(w))
    c = init_weights(bundle, "coarse_network_def", tmp_path / "trained" / "coarse.pt")
    z = Path(pack(str(bundle), out_dir=str(tmp_path / "dist"), weights=str(w), model_files={"coarse_model.pt": str(c)}))
    with zipfile.ZipFile(z) as zf:
        assert zf.read(f"{NAME}/models/model.pt") == w.read_bytes()
        assert zf.read(f"{NAME}/models/coarse_model.pt") == c.read_bytes()
    assert not (bundle / "models" / "model.pt").exists()  # the bundle folder is never modified


def test_bad_weights_and_metadata_are_named(tmp_path):
    bundle = bundle_copy(tmp_path / "src")
    wrong = init_weights(bundle, "coarse_network_def", tmp_path / "wrong.pt")  # 2-class coarse net as the fine net
    with pytest.raises(InputError, match=r"wrong\.pt: weights do not fit the network_def"):
        pack(str(bundle), out_dir=str(tmp_path / "dist"), weights=str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pt: not a (plain|readable) PyTorch state dict"):
        pack(str(bundle), out_dir=str(tmp_path / "dist"), weights=str(junk))
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "9.9.9"  # not in the changelog
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"metadata\.json: version 9\.9\.9 has no entry in 'changelog'"):
        pack(str(bundle), out_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_cli_exit_code_and_message(tmp_path):
    bundle = bundle_copy(tmp_path / "src", with_weights=False)
    proc = subprocess.run([sys.executable, "-m", "abdoseg.cli", "pack", "--bundle_dir", str(bundle),
                           "--out_dir", str(tmp_path / "dist")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "abdoseg pack: error:" in proc.stderr and "trained weights missing" in proc.stderr


BUNDLES = ("coarse_roi", "fine_organ_tumor", "label_fusion")


COMMITTED_WEIGHTS = {"coarse_roi": ("model.pt",), "fine_organ_tumor": ("model.pt", "coarse_model.pt"),
                     "label_fusion": ("model.pt", "coarse_model.pt")}


@pytest.mark.parametrize("mode", ["min", "full"])
def test_model_zoo_verify_bundle_passes_on_the_committed_bundles(mode, tmp_path):
    """model-zoo's own acceptance check, `ci/verify_bundle.py` in min and full mode, on the three
    bundles exactly as committed (their phantom-trained weights included), offline: the bundles
    under one parent with `model_info.json`, the metadata schema in `eval/schema.json`."""
    require(MODEL_ZOO_CI / "verify_bundle.py", "model-zoo's ci/verify_bundle.py")
    schema = require(MONAI_SCHEMA, "the MONAI bundle metadata schema")
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "model_info.json").write_text("{}")
    for name in BUNDLES:
        for fname in COMMITTED_WEIGHTS[name]:  # a fresh clone has them: they are tracked by git
            assert (REPO / "bundles" / name / "models" / fname).is_file(), f"{name}/models/{fname} not committed"
        b = parent / name
        shutil.copytree(REPO / "bundles" / name, b, ignore=shutil.ignore_patterns("eval", "cache", "__pycache__"))
        (b / "eval").mkdir()
        shutil.copy(schema, b / "eval" / "schema.json")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name in BUNDLES:
        proc = subprocess.run([sys.executable, "verify_bundle.py", "-b", name, "-p", str(parent), "-m", mode],
                              cwd=str(MODEL_ZOO_CI), capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{name} ({mode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        for step in ("directory is verified correctly", "version and changelog are verified correctly",
                     "metadata format is verified correctly"):
            assert step in proc.stdout, f"{name}: {step!r} missing:\n{proc.stdout[-2000:]}"
