"""MONAI Label 0.8.5 end to end: the monaibundle app (monailabel_app/) serving bundles/fine_organ_tumor.

A copy of the fine bundle with freshly initialised weights (and the cascade's coarse weights in
``models/coarse_model.pt``) goes into a temporary app's ``model/`` folder; ``monailabel start_server``
runs offline on 127.0.0.1 (``--conf zoo_source github``, ``--conf sam2 false``). One test, one server
start (pytest-xdist cannot start a second server on another worker), the annotate -> train -> serve
loop a user runs from a viewer:

1. ``/info/``: labels, only weight files that fit ``network_def`` offered (not ``coarse_model.pt``),
   the bundle's ``displayable_configs`` among the training options;
2. ``POST /infer`` returns a 3D label in the image's geometry equal to the bundle's own inference;
3. ``PUT /datastore/label`` stores a corrected label;
4. ``POST /train`` (1 epoch, fewer than ``val_interval``: no validation) finishes, the served
   ``models/model.pt`` is new weights and ``train_stats`` reports the finished epoch;
5. ``POST /infer`` again gives a different mask, closer to the corrected label;
6. a training that fails ends with ``train_stats`` status ERROR and its error.

Between 2 and 3 the server's refusals: unknown model 404 on ``/infer`` and ``/train``; image ids,
paths and tags leaving the studies folder 400 (nothing written outside); a label of the wrong shape
422 naming the image and both shapes (monailabel_app/lib/datastores.py, http_guards.py).

To keep it fast the copied bundle runs the fine stage at the CT's own 4 x 4 x 5 mm with 32 x 32 x 16
training patches (both configs changed alike); the network is the bundle's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx

import nibabel as nib
import numpy as np
import pytest
from conftest import stop_process_group
import torch
from monai.bundle import ConfigParser

from abdoseg.io import save_nifti
from abdoseg.labels import LABELS

#: the tests' tiny synthetic CTs are smaller than an abdomen: that warning is expected here (any
#: other abdoseg warning is an error, pyproject.toml)
pytestmark = pytest.mark.filterwarnings("ignore::abdoseg.inference.ct_checks.ImplausibleCTWarning")


REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
FINE = REPO / "bundles" / "fine_organ_tumor"
MODEL = "fine_organ_tumor"
START_TIMEOUT_S = 180.0
INFER_TIMEOUT_S = 300.0
TRAIN_TIMEOUT_S = 300.0
FAST = {"fine_spacing_mm": [4.0, 4.0, 5.0]}  # the small CT's own spacing: no resampling


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
    return make_app(tmp_path_factory.mktemp("monailabel"))


def make_app(root: Path, studies: bool = True) -> dict:
    """A copy of monailabel_app/ under ``root`` serving a fast copy of the fine bundle with freshly
    initialised weights; with ``studies``, a studies folder holding the small CT."""
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    bundle = app / "model" / MODEL
    shutil.copytree(FINE, bundle, ignore=shutil.ignore_patterns("*.pt", "eval", "__pycache__"))
    for cfg, extra in (("inference.json", {}), ("train.json", {"patch_size": [32, 32, 16]})):
        path = bundle / "configs" / cfg
        config = json.loads(path.read_text())
        config.update({**FAST, **extra})
        path.write_text(json.dumps(config, indent=1))
    for net_id, fname, seed in (("network_def", "model.pt", 0), ("coarse_network_def", "coarse_model.pt", 1)):
        torch.manual_seed(seed)
        net = _parser(bundle).get_parsed_content(net_id, instantiate=True)
        (bundle / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), str(bundle / "models" / fname))
    if not studies:
        return {"root": root, "app": app, "bundle": bundle}
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
        stop_process_group(proc)



def _infer(url: str, tmp_path: Path, name: str, params: dict | None = None) -> nib.Nifti1Image:
    data = {"params": json.dumps(params)} if params else None
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/infer/{MODEL}", params={"image": "SMALL_0001", "output": "image"}, data=data,
                   timeout=INFER_TIMEOUT_S)
    assert r.status_code == 200, r.text[-2000:]
    print(f"POST /infer/{MODEL} ({name}) round trip {time.perf_counter() - t0:.1f} s")
    out = tmp_path / f"{name}.nii.gz"
    out.write_bytes(r.content)
    return nib.load(str(out))


def _corrected_label(hu: np.ndarray) -> np.ndarray:
    """What an annotator would draw on the small CT: body = liver (1), the bright blob = spleen (3)."""
    label = np.where(hu > -500, 1, 0).astype(np.uint8)
    label[hu > 165] = 3
    return label


def _wait_for_training(url: str, log: Path) -> dict:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < TRAIN_TIMEOUT_S:
        status = httpx.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            print(f"POST /train/{MODEL} -> {status['status']} after {time.perf_counter() - t0:.1f} s")
            return status
        time.sleep(1.0)
    pytest.fail(f"training did not finish in {TRAIN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _refusals_over_http(url: str, app_setup: dict, tmp_path: Path) -> None:
    """Unknown models 404; ids, tags and paths leaving the studies folder 400; a label that does not
    fit its image 422 naming both; nothing written outside the studies folder or stored for them."""
    studies, root = app_setup["studies"], app_setup["root"]
    outside = root / "outside"
    outside.mkdir(exist_ok=True)
    save_nifti(app_setup["hu"], app_setup["affine"], outside / "private.nii.gz")  # a valid CT, not in studies
    before = _tree(root) - _tree(studies)
    label_bytes = (studies / "SMALL_0001.nii.gz").read_bytes()  # any NIfTI on the image's grid
    ok_label = tmp_path / "zeros.nii.gz"
    save_nifti(np.zeros(app_setup["hu"].shape, np.uint8), app_setup["affine"], ok_label)

    r = httpx.post(f"{url}/infer/no_such_model", params={"image": "SMALL_0001"}, timeout=60)
    assert r.status_code == 404 and "no_such_model" in r.text and MODEL in r.text, (r.status_code, r.text)
    r = httpx.post(f"{url}/train/no_such_model", json={"max_epochs": 1}, timeout=60)
    assert r.status_code == 404 and "no_such_model" in r.text, (r.status_code, r.text)

    for image in ("../../../etc/passwd", str(outside / "private.nii.gz"), "../outside/private", "/etc/passwd"):
        r = httpx.post(f"{url}/infer/{MODEL}", params={"image": image, "output": "image"}, timeout=60)
        assert r.status_code == 400 and "refused" in r.text, (image, r.status_code, r.text[:500])
        r = httpx.get(f"{url}/datastore/image", params={"image": image}, timeout=60)
        assert r.status_code == 400, (image, r.status_code, r.text[:500])
    r = httpx.post(f"{url}/infer/{MODEL}", params={"image": "NO_SUCH_IMAGE"}, timeout=60)
    assert r.status_code == 404 and "NO_SUCH_IMAGE" in r.text, (r.status_code, r.text)
    for params in ({"image": "SMALL_0001", "tag": "../../escapetag"}, {"image": "SMALL_0001", "tag": "/tmp/abs"},
                   {"image": "../../escapeimage", "tag": "final"}):
        r = httpx.put(f"{url}/datastore/label", params=params,
                      files={"label": ("x.nii.gz", ok_label.read_bytes())}, timeout=60)
        assert r.status_code == 400 and "refused" in r.text, (params, r.status_code, r.text)
    r = httpx.put(f"{url}/datastore/image", params={"image": "../../escapeimage"},
                  files={"file": ("x.nii.gz", label_bytes)}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    # a label of the wrong shape: refused at PUT, naming the image and both shapes
    wrong = tmp_path / "wrong.nii.gz"
    save_nifti(np.zeros((10, 10, 10), np.uint8), app_setup["affine"], wrong)
    r = httpx.put(f"{url}/datastore/label", params={"image": "SMALL_0001", "tag": "final"},
                  files={"label": ("wrong.nii.gz", wrong.read_bytes())}, timeout=60)
    assert r.status_code == 422, (r.status_code, r.text)
    shape = tuple(app_setup["hu"].shape)
    assert "'SMALL_0001'" in r.text and "(10, 10, 10)" in r.text and str(shape) in r.text, r.text
    assert _tree(root) - _tree(studies) == before, "files written outside the studies folder"
    assert not list(studies.rglob("*escape*")) and not list((studies / "labels").rglob("*.nii*"))


def test_infer_label_train_infer_loop_over_http(server, app_setup, tmp_path):
    """One test (one server start) so that pytest-xdist cannot start a second server on another worker."""
    from abdoseg.inference.segmenter import segmenter_from_bundle

    url, info, bundle = server["url"], server["info"], app_setup["bundle"]
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {name: cid for cid, name in LABELS.items() if cid != 0}
    assert "sam_2d" not in info["models"]  # --conf sam2 false
    # only weights that fit network_def are offered: not the cascade's coarse_model.pt
    assert (bundle / "models" / "coarse_model.pt").is_file()
    assert model["config"]["model_filename"] == ["model.pt"]
    trainer = info["trainers"][MODEL]["config"]
    assert trainer["model_filename"] == ["model.pt"]
    displayable = json.loads((FINE / "configs" / "train.json").read_text())["displayable_configs"]
    assert {"learning_rate", "val_interval"} <= set(displayable)
    assert {k: trainer[k] for k in displayable} == displayable
    assert info["train_stats"][MODEL] == {}  # not trained yet

    # 1. infer: a label in the image's geometry, equal to the bundle's own inference path
    img = _infer(url, tmp_path, "before")
    before = np.asarray(img.dataobj)
    assert before.ndim == 3 and before.shape == app_setup["hu"].shape
    np.testing.assert_allclose(img.affine, app_setup["affine"], atol=1e-4)
    assert np.issubdtype(before.dtype, np.integer) and before.min() >= 0 and before.max() <= 14
    ref, ref_affine = segmenter_from_bundle(bundle, device="cpu")({"image": str(app_setup["studies"] / "SMALL_0001.nii.gz")})
    np.testing.assert_allclose(ref_affine, app_setup["affine"], atol=1e-4)
    agreement = float((ref == before).mean())
    assert agreement >= 0.99, agreement
    assert len(np.unique(before)) > 1  # the untrained network still predicts several classes
    # asking for the coarse weights by name: ignored with a warning (as MONAI Label does for a
    # missing file), not an HTTP 500 from a size mismatch
    same = np.asarray(_infer(url, tmp_path, "coarse_requested", {"model_filename": "coarse_model.pt"}).dataobj)
    assert np.array_equal(same, before)

    # 1b. the server stays in its folder and names what it refuses (monailabel_app/lib/datastores.py,
    # http_guards.py); nothing is written outside the studies folder
    _refusals_over_http(url, app_setup, tmp_path)

    # 2. the annotator's corrected label
    corrected = _corrected_label(app_setup["hu"])
    save_nifti(corrected, app_setup["affine"], tmp_path / "corrected.nii.gz")
    r = httpx.put(f"{url}/datastore/label", params={"image": "SMALL_0001", "tag": "final"},
                  files={"label": ("SMALL_0001.nii.gz", (tmp_path / "corrected.nii.gz").read_bytes())}, timeout=60)
    assert r.status_code == 200, r.text[-2000:]

    # 3. train 1 epoch (< val_interval: no validation runs) as a viewer starts it
    served = bundle / "models" / "model.pt"
    old_weights, old_mtime = served.read_bytes(), served.stat().st_mtime_ns
    r = httpx.post(f"{url}/train/{MODEL}", json={"max_epochs": 1, "num_samples": 8, "device": "cpu"}, timeout=60)
    assert r.status_code == 200, r.text[-2000:]
    status = _wait_for_training(url, server["log"])
    assert status["status"] == "DONE", (status, server["log"].read_text()[-4000:])
    assert served.stat().st_mtime_ns != old_mtime and served.read_bytes() != old_weights
    new = torch.load(served, weights_only=True)
    _parser(bundle).get_parsed_content("network_def", instantiate=True).load_state_dict(new, strict=True)
    stats = httpx.get(f"{url}/info/", timeout=30).json()["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["epoch"] == 1 and stats["total_epochs"] == 1
    assert stats["iteration"] == 1 and np.isfinite(stats["loss"]) and "total_time" in stats
    assert stats["best_metric_epoch"] == -1  # no validation ran: model.pt is the last epoch's weights
    model_files = httpx.get(f"{url}/info/", timeout=30).json()["models"][MODEL]["config"]["model_filename"]
    assert model_files[0] == "model.pt" and "coarse_model.pt" not in model_files

    # 4. infer again: the served model changed, and its mask moved towards the corrected label
    after = np.asarray(_infer(url, tmp_path, "after").dataobj)
    assert after.shape == before.shape
    assert (after != before).any()
    assert (after == corrected).mean() > (before == corrected).mean()

    # 5. a training that fails ends with train_stats saying so (not "RUNNING" forever)
    r = httpx.post(f"{url}/train/{MODEL}", json={"max_epochs": 1, "device": "cpu", "model_filename": "coarse_model.pt"},
                   timeout=60)
    assert r.status_code == 200, r.text[-2000:]
    assert _wait_for_training(url, server["log"])["status"] == "ERROR"
    stats = httpx.get(f"{url}/info/", timeout=30).json()["train_stats"][MODEL]
    assert stats["status"] == "ERROR" and "coarse_model.pt" in stats["error"], stats
