"""The radiologist's loop on one machine: Orthanc (DICOMweb) + MONAI Label (monailabel_app/, the fine
bundle) + the OHIF viewer MONAI Label ships, driven in headless Chromium (selenium, Debian's
chromium-driver).

1. Orthanc starts with its DICOMweb plugin (``abdoseg.dicom.dicomweb.orthanc_config``); the small CT is
   pushed into it (``python -m abdoseg.dicom.dicomweb push``, STOW-RS);
2. MONAI Label starts with ``--studies http://127.0.0.1:<port>/dicom-web`` and no internet (no dcmqi
   download);
3. OHIF's ``monai-label`` mode opens the study, the MONAI Label panel connects to the server and its
   "Run" (auto-segmentation) draws the overlay: coloured pixels appear in the three views
   (screenshots ``before_run.png`` / ``after_run.png``; copied to ``$ABDOSEG_SCREENSHOTS`` when set);
4. a corrected label with most classes missing (1 liver, 3 spleen, 9 gallbladder, 14 lesion) is saved
   with ``PUT /datastore/label`` -- the call MONAI Label's clients make to save (the OHIF build MONAI
   Label 0.8.5 ships has no brush and no save in its ``monai-label`` mode; 3D Slicer's MONAI Label
   module is the editing client, see the README);
5. the DICOM SEG stored in Orthanc has segment number = FLARE23 id (frames for 1, 3, 9, 14 only);
6. ``POST /train`` (1 epoch) reads the label back from that SEG (the cached copy is removed first) and
   the label it trained on has the corrected class values.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
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

from abdoseg.io import save_nifti
from abdoseg.labels import FOREGROUND_IDS, LABELS
from test_monailabel import MODEL, _free_port, _wait_for_training, make_app

ORTHANC = "/usr/sbin/Orthanc"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
START_TIMEOUT_S = 180.0
BROWSER_TIMEOUT_S = 120.0
KEPT = (1, 3, 9, 14)


def _need(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.fail(f"{path} missing: the browser loop needs the Debian package {package!r} "
                    "(`bash scripts/setup.sh` installs orthanc, orthanc-dicomweb, chromium, chromium-driver)")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"{what} did not answer {url} in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    stop_process_group(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from abdoseg.dicom.dicomweb import ORTHANC_DICOMWEB_PLUGIN, orthanc_config

    _need(ORTHANC, "orthanc")
    _need(ORTHANC_DICOMWEB_PLUGIN, "orthanc-dicomweb")
    _need(CHROMIUM, "chromium")
    _need(CHROMEDRIVER, "chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: run `bash scripts/setup.sh`")
    root = tmp_path_factory.mktemp("browser_loop")
    procs = []
    try:
        oport = _free_port()
        config = orthanc_config(root / "orthanc", oport)
        olog = root / "orthanc.log"
        with open(olog, "w") as log:
            procs.append(subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        orthanc = f"http://127.0.0.1:{oport}"
        print(f"\nOrthanc up in {_wait_http(orthanc + '/system', procs[-1], olog, 'Orthanc'):.1f} s")
        setup = make_app(root)
        push = subprocess.run([sys.executable, "-m", "abdoseg.dicom.dicomweb", "push",
                               str(setup["studies"] / "SMALL_0001.nii.gz"), orthanc + "/dicom-web"],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        uids = json.loads(push.stdout)
        mport = _free_port()
        mlog = root / "monailabel.log"
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(setup["app"]),
               "--studies", orthanc + "/dicom-web", "--host", "127.0.0.1", "--port", str(mport),
               "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
        with open(mlog, "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        url = f"http://127.0.0.1:{mport}"
        print(f"MONAI Label (DICOMweb studies) up in {_wait_http(url + '/info/', procs[-1], mlog, 'MONAI Label'):.1f} s")
        assert not list((setup["app"] / "bin").glob("*"))  # no dcmqi fetched (MONAI Label puts it there)
        yield {**setup, **uids, "orthanc": orthanc, "url": url, "log": mlog, "root": root}
    finally:
        for p in reversed(procs):
            _stop(p)


def _coloured_pixels(png: bytes) -> int:
    """Pixels in the viewports (the screen between the side panels) that are clearly not grey."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    h, w, _ = img.shape
    view = img[int(h * 0.12):int(h * 0.95), int(w * 0.21):int(w * 0.79)]
    spread = view.max(axis=2) - view.min(axis=2)
    return int((spread > 40).sum())


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # WebGL through SwiftShader: OHIF renders with it in a headless browser without a GPU
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
              "--use-angle=swiftshader", "--window-size=1400,900", "--no-proxy-server"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _until(fn, timeout: float, what: str, driver=None):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            out = fn()
        except Exception:  # elements re-rendered while looked at
            out = None
        if out:
            return out
        time.sleep(1.0)
    if driver is not None:
        driver.save_screenshot(str(Path(os.environ.get("TMPDIR", "/tmp")) / "browser_loop_failure.png"))
    pytest.fail(f"{what} not seen in {timeout:.0f} s")


def _run_auto_segmentation_in_ohif(stack: dict, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = _driver()
    try:
        t0 = time.perf_counter()
        d.get(f"{stack['url']}/ohif/monai-label?StudyInstanceUIDs={stack['StudyInstanceUID']}")
        server_field = _until(lambda: [i for i in d.find_elements(By.TAG_NAME, "input")
                                       if (i.get_attribute("value") or "").startswith("http")],
                              BROWSER_TIMEOUT_S, "the MONAI Label panel's server field", d)[0]
        for b in d.find_elements(By.XPATH, "//button[normalize-space(.)='Confirm and Hide']"):
            b.click()
        server_field.send_keys(Keys.CONTROL, "a")
        server_field.send_keys(stack["url"] + "/")
        server_field.find_element(By.XPATH, "following::button[1]").click()  # connect
        run = _until(lambda: [b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Run"],
                     BROWSER_TIMEOUT_S, "the panel's Run button (models loaded from the server)", d)[0]
        # the CT drawn in the three views (W/L overlay text present), no segmentation yet
        _until(lambda: len(re.findall(r"W:\s*400", d.find_element(By.TAG_NAME, "body").text)) == 3,
               BROWSER_TIMEOUT_S, "the CT in three views (window 400 / level 40 overlay)", d)
        time.sleep(3)
        before = d.get_screenshot_as_png()
        (shots / "before_run.png").write_bytes(before)
        print(f"OHIF monai-label mode ready in {time.perf_counter() - t0:.1f} s")
        t1 = time.perf_counter()
        run.click()
        # the panel's blue labels count as coloured too (~4700 pixels before Run); the overlay of the
        # 28 x 24 x 14 CT adds ~80000 in the three views
        base = _coloured_pixels(before)
        after = _until(lambda: (lambda png: png if _coloured_pixels(png) > 3 * base + 20000
                                else None)(d.get_screenshot_as_png()),
                       BROWSER_TIMEOUT_S, "the segmentation overlay after Run", d)
        time.sleep(2)
        after = d.get_screenshot_as_png()
        (shots / "after_run.png").write_bytes(after)
        print(f"Run -> overlay drawn in {time.perf_counter() - t1:.1f} s "
              f"(coloured viewport pixels {_coloured_pixels(before)} -> {_coloured_pixels(after)})")
    finally:
        d.quit()
    log = stack["log"].read_text()
    # the overlay came from the server's inference of this series
    assert re.search(rf"Infer Request \(final\): .*'model': '{MODEL}'.*{re.escape(stack['SeriesInstanceUID'])}", log)


def _raw_get(base: str, path: str) -> int:
    """HTTP status of GET ``path`` sent as is (no client-side removal of dot segments)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _corrected_label(hu: np.ndarray) -> np.ndarray:
    """Body = liver (1), the 200 HU blob = spleen (3), the 130 HU blob = gallbladder (9), a small
    lesion (14) inside the liver: every other class missing."""
    label = np.where(hu > -500, 1, 0).astype(np.uint8)
    label[hu > 165] = 3
    label[(hu > 95) & (hu <= 165)] = 9
    label[12:15, 4:7, 5:8] = 14
    return label


def test_radiologist_loop_in_the_browser(stack, tmp_path):
    import pydicom
    from dicomweb_client import DICOMwebClient

    shots = tmp_path / "screenshots"
    shots.mkdir()
    series, study = stack["SeriesInstanceUID"], stack["StudyInstanceUID"]

    # 3. OHIF: auto-segmentation from the MONAI Label panel draws the overlay
    _run_auto_segmentation_in_ohif(stack, shots)
    if os.environ.get("ABDOSEG_SCREENSHOTS"):
        dest = Path(os.environ["ABDOSEG_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for p in shots.iterdir():
            shutil.copy(p, dest / p.name)

    # 3b. /infer?output=dicom_seg (what a DICOM client asks for): FLARE23 segment numbers too, no dcmqi
    r = httpx.post(f"{stack['url']}/infer/{MODEL}", params={"image": series, "output": "dicom_seg"},
                   data={"params": json.dumps({"label_info": [{"name": "spleen"}, {"name": "liver"}]})}, timeout=300)
    assert r.status_code == 200, r.text[-2000:]
    inferred = pydicom.dcmread(io.BytesIO(r.content))
    assert inferred.Modality == "SEG" and inferred.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert [(int(x.SegmentNumber), x.SegmentLabel) for x in inferred.SegmentSequence] == \
        [(i, LABELS[i]) for i in FOREGROUND_IDS]
    # the DICOMweb datastore takes DICOM UIDs only: nothing leaves its cache folder
    for params in ({"image": series, "tag": "../../escapetag"}, {"image": "../../../etc/passwd", "tag": "final"}):
        r = httpx.put(f"{stack['url']}/datastore/label", params=params,
                      files={"label": ("x.nii.gz", b"not read")}, timeout=60)
        assert r.status_code == 400 and "refused" in r.text, (params, r.status_code, r.text)
    r = httpx.post(f"{stack['url']}/infer/{MODEL}", params={"image": "../../../etc/passwd"}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert not list(stack["root"].rglob("*escapetag*"))
    # OHIF's proxy to the PACS stays inside the DICOMweb root (stock: Orthanc's whole REST API)
    for path in ("/proxy/dicom/../../patients", "/proxy/dicom/wado/%2e%2e/%2e%2e/patients"):
        assert _raw_get(stack["url"], path) == 400, path
    assert _raw_get(stack["url"], "/proxy/dicom/qido/studies") == 200

    # 4. save a corrected label with classes missing (the save call of MONAI Label's clients)
    corrected = _corrected_label(stack["hu"])
    assert set(np.unique(corrected)) == {0, *KEPT}
    save_nifti(corrected, stack["affine"], tmp_path / "corrected.nii.gz")
    r = httpx.put(f"{stack['url']}/datastore/label", params={"image": series, "tag": "final"},
                  files={"label": ("corrected.nii.gz", (tmp_path / "corrected.nii.gz").read_bytes())},
                  data={"params": json.dumps({"label_info": [{"name": "liver"}, {"name": "right_kidney"}]})},
                  timeout=120)
    assert r.status_code == 200, r.text[-2000:]

    # 5. the SEG in Orthanc: segment number = FLARE23 id, frames only for the classes drawn
    client = DICOMwebClient(url=stack["orthanc"] + "/dicom-web")
    segs = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1, segs
    seg_uid = pydicom.Dataset.from_json(segs[0]).SeriesInstanceUID
    seg = client.retrieve_series(study, seg_uid)[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == \
        [(i, LABELS[i]) for i in FOREGROUND_IDS]
    framed = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
              for f in seg.PerFrameFunctionalGroupsSequence}
    assert framed == set(KEPT), framed

    # 6. train 1 epoch; the label it reads is the SEG from Orthanc (cached copy removed first)
    cache = next((stack["root"] / "cache").iterdir())
    cached = cache / "labels" / "final" / f"{series}.nii.gz"
    assert cached.is_file()
    cached.unlink()
    r = httpx.post(f"{stack['url']}/train/{MODEL}", json={"max_epochs": 1, "num_samples": 4, "device": "cpu"},
                   timeout=60)
    assert r.status_code == 200, r.text[-2000:]
    status = _wait_for_training(stack["url"], stack["log"])
    assert status["status"] == "DONE", (status, stack["log"].read_text()[-4000:])
    assert cached.is_file(), "training did not read the label back from the SEG"
    trained_on = nib.load(str(cached))
    assert np.array_equal(np.asarray(trained_on.dataobj), corrected)
    np.testing.assert_allclose(trained_on.affine, stack["affine"], atol=1e-4)
    stats = httpx.get(f"{stack['url']}/info/", timeout=30).json()["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["epoch"] == 1
