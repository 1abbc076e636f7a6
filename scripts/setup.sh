#!/usr/bin/env bash
# One-shot set-up on a fresh machine: creates .venv and installs the project with torch pinned
# (constraints.txt), so no CUDA wheels are pulled on CPU machines. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# MONAI Label 0.8.5 for monailabel_app/ (the monaibundle app): its listed runtime deps minus
# torchvision (the PyPI build does not import with CPU torch), sam2 and numpymaxflow (would
# downgrade numpy), see monailabel_app/requirements.txt; then monailabel itself without deps.
.venv/bin/python -m pip install -q -c constraints.txt -r monailabel_app/requirements.txt
.venv/bin/python -m pip install -q -c constraints.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
# The browser loop (scripts/stack.sh, tests/test_browser_loop.py): selenium in the venv; Orthanc with
# its DICOMweb plugin, Chromium and its WebDriver from Debian (as root, or with password-less sudo;
# otherwise the command to run is printed and that test fails naming the missing package).
# dicom3tools gives dciodvfy, the DICOM validator tests/test_dicom_seg.py runs on the DICOM SEG.
.venv/bin/python -m pip install -q -c constraints.txt selenium==4.27.1
BROWSER_PKGS="orthanc orthanc-dicomweb chromium chromium-driver dicom3tools"
if ! { [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
       && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/dciodvfy ]; }; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif sudo -n true 2>/dev/null; then APT="sudo -n apt-get"; else APT=""; fi
  if [ -n "$APT" ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive $APT update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $APT install -y -q --no-install-recommends $BROWSER_PKGS >/dev/null
  else
    echo "setup.sh: cannot install $BROWSER_PKGS (needs root and apt-get); run: sudo apt-get install --no-install-recommends $BROWSER_PKGS" >&2
  fi
fi
