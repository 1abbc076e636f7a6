# abdoseg additions to MONAI Label's HTTP endpoints (Apache-2.0, see ../LICENSE).
"""Checks in front of MONAI Label 0.8.5's ``/infer`` and ``/train`` endpoints, and its DICOM SEG
writer replaced.

MONAI Label's route functions call module-level helpers (``monailabel.endpoints.infer.run_inference``,
``monailabel.endpoints.train.run_model``) by name; :func:`install` wraps those helpers once, when the
app is created (``MyApp.__init__``, before the server answers any request):

* an unknown model is ``404`` naming the models there are (stock: ``500`` from a
  ``MONAILabelException``, or a background training that fails);
* ``/infer?image=`` is an image id of the datastore, never a path: MONAI Label's ``infer`` treats
  any existing path as the image (``image=../../../etc/passwd`` opened that file). Only the
  temporary file that the endpoint itself writes for an uploaded ``file`` (or a session's image)
  passes as a path (:data:`PATH_ALLOWED`, set by the wrapper for that request only);
* ``/proxy/dicom/...`` (how OHIF reaches the PACS through MONAI Label) forwards only paths inside
  the DICOMweb root: a ``..`` or ``.`` segment (also percent-encoded) is ``400`` (stock MONAI
  Label forwarded ``/proxy/dicom/../../patients`` to Orthanc's REST API outside ``/dicom-web``);
* ``monailabel.endpoints.infer.nifti_to_dicom_seg`` (``/infer?output=dicom_seg``) is
  :func:`flare23_nifti_to_dicom_seg`: highdicom, segment number = FLARE23 id, no dcmqi.
"""

from __future__ import annotations

import contextvars
import logging
import os
import tempfile
from typing import Any, Iterable

from lib.datastores import refuse

logger = logging.getLogger(__name__)

#: True while the wrapped ``/infer`` handles a request whose image is the endpoint's own upload
#: or a session's image: only then may ``MyApp.infer`` get a file path as ``image``.
PATH_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("abdoseg_infer_path_allowed", default=False)

_INSTALLED = False


def unknown_model(model: Any, known: Iterable[str], what: str):
    known = sorted(known)
    return refuse(404, f"model {model!r} not found for {what}; this app has {known}")


def flare23_nifti_to_dicom_seg(series_dir, label, label_info=None, file_ext="*", use_itk=True) -> str:
    """Drop-in for ``monailabel.datastore.utils.convert.nifti_to_dicom_seg``: the label NIfTI of
    the DICOM series in ``series_dir`` -> a DICOM SEG file (a temporary file, as the stock one) with
    segment number = FLARE23 id and label = class name whatever ``label_info`` lists (it named
    segments by their position in that list)."""
    from abdoseg.dicom.seg import series_seg

    fd, out = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    os.unlink(out)
    return str(series_seg(label, series_dir, out))


def check_proxy_path(path: str) -> str:
    """``path`` (relative to the DICOMweb root) when no segment of it steps out; else HTTP 400."""
    from urllib.parse import unquote

    text = str(path)
    for _ in range(3):  # %252e%252e -> %2e%2e -> ..
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    segments = text.replace("\\", "/").split("/")
    if text.startswith("/") or any(seg in (".", "..") for seg in segments) or "\x00" in text:
        raise refuse(400, f"proxy path {path!r} refused: it must stay inside the DICOMweb root "
                          "(no '.' or '..' segments, no absolute path)")
    return path


def install() -> None:
    """Wrap the endpoint helpers (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import monailabel.endpoints.infer as infer_ep
    import monailabel.endpoints.proxy as proxy_ep
    import monailabel.endpoints.train as train_ep
    from monailabel.interfaces.utils.app import app_instance

    stock_run_inference = infer_ep.run_inference
    stock_run_model = train_ep.run_model

    def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None,
                      output=None):
        instance = app_instance()
        infers = instance._infers
        if model not in infers:
            raise unknown_model(model, infers, "inference")
        token = PATH_ALLOWED.set(bool(file) or bool(session_id))
        try:
            return stock_run_inference(background_tasks, model, image, session_id, params, file, label, output)
        finally:
            PATH_ALLOWED.reset(token)

    def run_model(model, params=None, run_sync=False, enqueue=False):
        trainers = app_instance()._trainers
        if model and model not in trainers:
            raise unknown_model(model, trainers, "training")
        return stock_run_model(model, params, run_sync, enqueue)

    stock_proxy_dicom = proxy_ep.proxy_dicom

    async def proxy_dicom(request, op, path):
        check_proxy_path(path)
        return await stock_proxy_dicom(request, op, path)

    proxy_ep.proxy_dicom = proxy_dicom
    infer_ep.run_inference = run_inference
    train_ep.run_model = run_model
    infer_ep.nifti_to_dicom_seg = flare23_nifti_to_dicom_seg
    _INSTALLED = True
    logger.info("abdoseg HTTP guards installed (unknown model -> 404, image ids only, FLARE23 DICOM SEG)")


__all__ = ["install", "check_proxy_path", "PATH_ALLOWED", "flare23_nifti_to_dicom_seg", "unknown_model"]
