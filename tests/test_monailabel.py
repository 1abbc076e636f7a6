"""MONAI Label 0.8.5 end to end: the monaibundle app (monailabel_app/) serving bundles/fine_organ_tumor.

A copy of the fine bundle with freshly initialised weights goes into a temporary app's ``model/``
folder; ``monailabel start_server`` runs offline on 127.0.0.1 (``--conf zoo_source github``,
``--conf sam2 false``); ``POST /infer/fine_organ_tumor?image=<id>`` must return a 3D NIfTI label in
the image's geometry, equal to what the bundle's own inference path gives for the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from abdoseg.io import save_nifti
from abdoseg.labels import LABELS

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
FINE = REPO / "bundles" / "fine_organ_tumor"
MODEL = "fine_organ_tumor"
START_TIMEOUT_S = 180.0
INFER_TIMEOUT_S = 300.0


def _parser(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_ct(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Small abdomen-like CT (int16 HU, 4x4x5 mm, x/y flipped affine): soft-tissue ellipse + two blobs."""
    rng = np.random.default_rng(1)
    shape = (28, 24, 14)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((x - 14) / 12) ** 2 + ((y - 12) / 10) ** 2 <= 1
    hu = np.where(body, 30.0, -1000.0)
    hu[body & (((x - 9) / 4) ** 2 + ((y - 11) / 4) ** 2 + ((z - 7) / 3) ** 2 <= 1)] = 130
    hu[body & (((x - 19) / 3) ** 2 + ((y - 13) / 3) ** 2 + ((z - 7) / 3) ** 2 <= 1)] = 200
    hu = (hu + rng.normal(0, 10, shape)).astype(np.int16)
    affine = np.array([[-4.0, 0, 0, 60], [0, -4.0, 0, 50], [0, 0, 5.0, -30], [0, 0, 0, 1]])
    save_nifti(hu, affine, path)
    return hu, affine


@pytest.fixture(scope="module")
def app_setup(tmp_path_factory) -> dict:
    try:
        import monailabel  # noqa: F401
    except ImportError:
        pytest.fail("monailabel is not installed: run `bash scripts/setup.sh`")
    root = tmp_path_factory.mktemp("monailabel")
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    bundle = app / "model" / MODEL
    shutil.copytree(FINE, bundle, ignore=shutil.ignore_patterns("*.pt", "eval", "__pycache__"))
    for net_id, fname, seed in (("network_def", "model.pt", 0), ("coarse_network_def", "coarse_model.pt", 1)):
        torch.manual_seed(seed)
        net = _parser(bundle).get_parsed_content(net_id, instantiate=True)
        (bundle / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), str(bundle / "models" / fname))
    studies = root / "studies"
    hu, affine = _small_ct(studies / "SMALL_0001.nii.gz")
    return {"root": root, "app": app, "bundle": bundle, "studies": studies, "hu": hu, "affine": affine}


@pytest.fixture()
def server(app_setup):
    port = _free_port()
    log_path = app_setup["root"] / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_setup["app"]),
           "--studies", str(app_setup["studies"]), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        info = None
        while time.perf_counter() - t0 < START_TIMEOUT_S:
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        if info is None:
            pytest.fail(f"monailabel /info/ did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
        startup_s = time.perf_counter() - t0
        print(f"\nmonailabel start_server -> /info/ answered in {startup_s:.1f} s")
        yield {"url": url, "info": info, "proc": proc, "log": log_path, "startup_s": startup_s}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_info_then_infer_label_in_image_geometry_matching_bundle_inference(server, app_setup, tmp_path):
    """One test (one server start) so that pytest-xdist cannot start a second server on another worker."""
    model = server["info"]["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {name: cid for cid, name in LABELS.items() if cid != 0}
    assert "sam_2d" not in server["info"]["models"]  # --conf sam2 false

    req = urllib.request.Request(f"{server['url']}/infer/{MODEL}?image=SMALL_0001&output=image", data=b"",
                                 method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=INFER_TIMEOUT_S) as r:
        assert r.status == 200
        body = r.read()
    round_trip_s = time.perf_counter() - t0
    print(f"\nPOST /infer/{MODEL} round trip {round_trip_s:.1f} s ({app_setup['hu'].shape} voxels)")
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    img = nib.load(str(out))
    label = np.asarray(img.dataobj)
    assert label.ndim == 3 and label.shape == app_setup["hu"].shape
    np.testing.assert_allclose(img.affine, app_setup["affine"], atol=1e-4)
    assert np.issubdtype(label.dtype, np.integer)
    assert label.min() >= 0 and label.max() <= 14

    # the same bundle, same weights, through the bundle's own inference path (abdoseg.cascade)
    parser = _parser(app_setup["bundle"])
    parser["device"] = "$torch.device('cpu')"
    parser.get_parsed_content("load_weights")
    ref, ref_affine = parser.get_parsed_content("segment")({"image": str(app_setup["studies"] / "SMALL_0001.nii.gz")})
    np.testing.assert_allclose(ref_affine, app_setup["affine"], atol=1e-4)
    assert ref.shape == label.shape
    agreement = float((np.asarray(ref) == label).mean())
    assert agreement >= 0.99, agreement
    assert len(np.unique(label)) > 1  # the untrained network still predicts several classes; not an empty mask
