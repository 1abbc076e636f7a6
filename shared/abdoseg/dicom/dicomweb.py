"""Push a CT into a DICOMweb server (Orthanc with its DICOMweb plugin, any PACS with STOW-RS), so
MONAI Label and OHIF can open it: ``python -m abdoseg.dicom.dicomweb push CT URL``.

``CT`` is a NIfTI image (written as one single-frame DICOM CT series, int16 HU, geometry from the
NIfTI affine: slice ``k`` is ``volume[:, :, k]`` with rows along the second axis) or a folder of
DICOM files (sent as they are). Nothing is written next to the input; the input is never changed.
The result is the (StudyInstanceUID, SeriesInstanceUID) the server stores.

STOW-RS (PS3.18 10.5) is a ``multipart/related; type="application/dicom"`` POST to ``URL/studies``;
only the standard library is used, so the abdoseg package needs no DICOMweb client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from abdoseg.io import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_to_ct_datasets(path: str | os.PathLike, patient_id: str | None = None,
                         study_uid: str | None = None, series_uid: str | None = None) -> list[Any]:
    """The NIfTI CT ``path`` as pydicom datasets of one CT series (one per slice along the third
    axis). Raises :class:`InputError` for non-3D images, a sheared affine, or values that are not
    integer HU within int16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from abdoseg.io import case_id_from_image, load_nifti

    vol, affine, _ = load_nifti(path)
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise InputError(path, f"a CT must be 3D, got shape {vol.shape}")
    if not np.all(np.isfinite(vol)):
        raise InputError(path, "non-finite voxel values; not a CT in HU")
    rounded = np.rint(vol)
    if vol.dtype.kind == "f" and np.abs(vol - rounded).max() > 1e-3:
        raise InputError(path, "non-integer voxel values; DICOM CT stores integer HU (round the image first)")
    if rounded.min() < -32768 or rounded.max() > 32767:
        raise InputError(path, f"values {rounded.min():.0f}..{rounded.max():.0f} outside int16; not a CT in HU")
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = lps[:3, :3] / spacing
    gram = dirs.T @ dirs
    if np.abs(gram - np.eye(3)).max() > 1e-4:
        raise InputError(path, "sheared affine (axes not orthogonal); it cannot be a DICOM slice stack")
    pid = patient_id or case_id_from_image(path)
    study_uid, series_uid, for_uid = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    pixels = rounded.astype(np.int16)
    out = []
    for k in range(vol.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = pid[:64], pid[:64]
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.AccessionNumber = "", "", "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.StudyDate, ds.StudyTime = "20260101", "000000"
        ds.SeriesDescription = f"abdoseg push {Path(path).name}"[:64]
        ds.Manufacturer = "abdoseg"
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + lps[:3, 2] * k]
        ds.ImageOrientationPatient = [float(v) for v in (*dirs[:, 0], *dirs[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (2nd axis), column spacing
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        out.append(ds)
    return out


def _encode(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def stow(url: str, datasets: Sequence[Any], timeout: float = 120.0) -> dict:
    """STOW-RS the datasets to ``url`` (the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``);
    returns the server's JSON answer. Raises :class:`InputError` naming the URL when it refuses."""
    boundary = uuid.uuid4().hex
    parts = [b"".join([f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), _encode(ds), b"\r\n"])
             for ds in datasets]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/studies", data=body, method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode() or "{}"
    except urllib.error.HTTPError as exc:
        raise InputError(url, f"STOW-RS refused with HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    except urllib.error.URLError as exc:
        raise InputError(url, f"no DICOMweb server answers ({exc.reason})") from exc
    answer = json.loads(text)
    failed = answer.get("00081198", {}).get("Value") if isinstance(answer, dict) else None
    if failed:
        raise InputError(url, f"STOW-RS stored not all instances: {len(failed)} failed ({failed[:2]})")
    return answer


def push(ct: str | os.PathLike, url: str, patient_id: str | None = None) -> tuple[str, str]:
    """Push the NIfTI or DICOM-folder CT ``ct`` to the DICOMweb server ``url``; returns
    (StudyInstanceUID, SeriesInstanceUID)."""
    import pydicom

    ct = Path(ct)
    if ct.is_dir():
        files = sorted(p for p in ct.rglob("*") if p.is_file())
        datasets = []
        for f in files:
            try:
                datasets.append(pydicom.dcmread(str(f)))
            except Exception:
                continue  # not DICOM (a README, a DICOMDIR's companions, ...)
        if not datasets:
            raise InputError(ct, "no DICOM files in this folder")
        series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
        if len(series) != 1:
            raise InputError(ct, f"{len(series)} series in this folder; push one series at a time")
    elif ct.is_file():
        datasets = nifti_to_ct_datasets(ct, patient_id=patient_id)
    else:
        raise InputError(ct, "no such file or folder")
    stow(url, datasets)
    return str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)


ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_config(folder: str | os.PathLike, http_port: int = 8042) -> Path:
    """Write ``folder/orthanc.json``: an Orthanc for one machine (storage in ``folder/db``, HTTP on
    127.0.0.1 only without authentication, no DICOM network port, DICOMweb at ``/dicom-web/``)."""
    folder = Path(folder).resolve()
    (folder / "db").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "abdoseg", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": int(http_port), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "HttpTimeout": 60, "StableAge": 2,
        "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"127.0.0.1:{int(http_port)}", "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abdoseg.dicom.dicomweb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="push a NIfTI CT or a DICOM series folder to a DICOMweb server (STOW-RS)")
    p.add_argument("ct", help="NIfTI CT file or folder of one DICOM series")
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8042/dicom-web", help="DICOMweb root URL")
    p.add_argument("--patient_id", default=None, help="PatientID for a NIfTI input (default: its case id)")
    c = sub.add_parser("orthanc-config", help="write FOLDER/orthanc.json for a local Orthanc with DICOMweb")
    c.add_argument("folder")
    c.add_argument("--port", type=int, default=8042)
    args = parser.parse_args(argv)
    if args.command == "orthanc-config":
        print(orthanc_config(args.folder, args.port))
        return 0
    try:
        study, series = push(args.ct, args.url, args.patient_id)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"StudyInstanceUID": study, "SeriesInstanceUID": series}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
