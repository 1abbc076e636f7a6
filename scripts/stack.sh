#!/usr/bin/env bash
# One machine, one command: Orthanc with DICOMweb + MONAI Label (monailabel_app/ serving the fine
# bundle) + the OHIF viewer MONAI Label ships (served by it at /ohif/).
#
#   bash scripts/stack.sh start    # then open http://127.0.0.1:8000/ohif/
#   .venv/bin/python -m abdoseg.dicom.dicomweb push path/to/ct.nii.gz http://127.0.0.1:8042/dicom-web
#   bash scripts/stack.sh stop
#
# Everything lives in $STACK_DIR (default runs/stack): orthanc/orthanc.json and its database, a copy
# of monailabel_app/ with a copy of the bundle in app/model/ (training writes its models/model.pt
# there, never into bundles/), the DICOMweb cache, logs and pid files. Ports: ORTHANC_PORT (8042),
# ML_PORT (8000); BUNDLE (bundles/fine_organ_tumor); DEVICE for training is chosen in the viewer.
# Orthanc listens on 127.0.0.1 only, without authentication: a single-user workstation set-up.
# Needs `bash scripts/setup.sh` (installs orthanc, orthanc-dicomweb, chromium, chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STACK_DIR=${STACK_DIR:-$REPO/runs/stack}
ORTHANC_PORT=${ORTHANC_PORT:-8042}
ML_PORT=${ML_PORT:-8000}
BUNDLE=${BUNDLE:-$REPO/bundles/fine_organ_tumor}
PY=$REPO/.venv/bin/python
NAME=$(basename "$BUNDLE")

wait_http() {  # url what pidfile
  for _ in $(seq 1 180); do
    if curl -fs -o /dev/null "$1"; then return 0; fi
    if ! kill -0 "$(cat "$3")" 2>/dev/null; then
      echo "error: $2 exited; see its log in $STACK_DIR" >&2; return 1
    fi
    sleep 1
  done
  echo "error: $2 did not answer $1 in 180 s; see its log in $STACK_DIR" >&2
  return 1
}

stop_one() {  # pidfile
  if [ -f "$1" ]; then
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then kill -- "-$pid" 2>/dev/null || kill "$pid"; fi
    rm -f "$1"
  fi
}

case "${1:-}" in
  start)
    command -v Orthanc >/dev/null || { echo "error: Orthanc not installed: run bash scripts/setup.sh" >&2; exit 1; }
    [ -f "$BUNDLE/configs/inference.json" ] || { echo "error: $BUNDLE: not a bundle (no configs/inference.json)" >&2; exit 1; }
    mkdir -p "$STACK_DIR"
    "$PY" -m abdoseg.dicom.dicomweb orthanc-config "$STACK_DIR/orthanc" --port "$ORTHANC_PORT" >/dev/null
    setsid Orthanc "$STACK_DIR/orthanc/orthanc.json" >"$STACK_DIR/orthanc.log" 2>&1 &
    echo $! >"$STACK_DIR/orthanc.pid"
    wait_http "http://127.0.0.1:$ORTHANC_PORT/system" Orthanc "$STACK_DIR/orthanc.pid"
    # the app's code is refreshed from monailabel_app/ on every start; its model/ (trained weights) is kept
    mkdir -p "$STACK_DIR/app"
    (cd monailabel_app && tar --exclude=./model --exclude=__pycache__ --exclude=./logs --exclude=./bin -cf - .) \
      | (cd "$STACK_DIR/app" && tar -xf -)
    if [ ! -d "$STACK_DIR/app/model/$NAME" ]; then
      mkdir -p "$STACK_DIR/app/model"
      cp -r "$BUNDLE" "$STACK_DIR/app/model/$NAME"
    fi
    MONAI_LABEL_DICOMWEB_CACHE_PATH="$STACK_DIR/cache" PYTHONWARNINGS=ignore setsid "$PY" -m monailabel.main start_server \
      --app "$STACK_DIR/app" --studies "http://127.0.0.1:$ORTHANC_PORT/dicom-web" \
      --host 127.0.0.1 --port "$ML_PORT" \
      --conf models "$NAME" --conf zoo_source github --conf sam2 false \
      >"$STACK_DIR/monailabel.log" 2>&1 &
    echo $! >"$STACK_DIR/monailabel.pid"
    wait_http "http://127.0.0.1:$ML_PORT/info/" "MONAI Label" "$STACK_DIR/monailabel.pid"
    echo "Orthanc (DICOMweb): http://127.0.0.1:$ORTHANC_PORT/dicom-web"
    echo "MONAI Label:        http://127.0.0.1:$ML_PORT/  (model $NAME)"
    echo "Viewer (OHIF):      http://127.0.0.1:$ML_PORT/ohif/  -> study -> mode 'MONAI Label'"
    echo "Push a CT:          $PY -m abdoseg.dicom.dicomweb push CT.nii.gz http://127.0.0.1:$ORTHANC_PORT/dicom-web"
    echo "Stop:               bash scripts/stack.sh stop"
    ;;
  stop)
    stop_one "$STACK_DIR/monailabel.pid"
    stop_one "$STACK_DIR/orthanc.pid"
    echo "stopped (data kept in $STACK_DIR)"
    ;;
  *)
    echo "usage: bash scripts/stack.sh start|stop" >&2
    exit 2
    ;;
esac
