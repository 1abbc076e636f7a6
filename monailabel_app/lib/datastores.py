# abdoseg additions to MONAI Label's datastores (Apache-2.0, see ../LICENSE).
"""Datastores of the abdoseg MONAI Label app: the stock local and DICOMweb datastores, kept inside
their folder, refusing labels that do not fit their image, and reading/writing DICOM SEG with the
FLARE23 class ids.

**Inside the folder.** MONAI Label 0.8.5 joins image ids, label tags and label file names from
HTTP requests straight into paths: ``PUT /datastore/label?tag=../../x`` wrote outside the studies
folder and ``image=../../etc/passwd`` opened that file. Here every id and tag must be a plain name
(:func:`check_name`: no ``/``, ``\\``, NUL, ``.`` or ``..``; on the DICOMweb datastore image and
label ids must be DICOM UIDs), and every path built from them must resolve inside the datastore
folder (:func:`inside`); otherwise the request is answered ``400`` with a message naming the value
and the folder, before anything is read or written. An unknown image is ``404``.

**Labels that fit their image.** ``save_label`` compares the label with its image (size, spacing,
origin, direction through SimpleITK's header reader, and label values FLARE23 ids 0-14) and
answers ``422`` naming the image id, both files' shapes and both affines, so a wrong label never
reaches training (where it failed later with a tensor-size error that named nothing).

**DICOM SEG with FLARE23 ids, no dcmqi.** The DICOMweb datastore writes a saved ``final`` label as
a DICOM SEG with :func:`abdoseg.dicom.seg.series_seg` (highdicom: segment number = FLARE23 id,
label = class name, SNOMED CT codes; classes absent from the label have no frames) instead of
MONAI Label's ``nifti_to_dicom_seg`` (names segments by their position in ``label_info``, and
dcmqi renumbers them 1..N), and reads a SEG back for training with
:func:`abdoseg.dicom.seg.read_dicom_seg` (segments -> classes by label or code, never by number),
instead of pydicom-seg's ``MultiClassReader`` (segment number = label value). Neither path uses
dcmqi, so the app does not download it at start-up (``MyApp._download_dcmqi_tools``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from enum import Enum
from typing import Any, Dict

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)

#: DICOM UID: digit groups separated by dots, at most 64 characters (PS3.5 9.1)
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: FLARE23 ids a label may hold
MAX_LABEL_ID = 14
#: a label's grid may differ from its image's by this fraction of the smallest voxel spacing
GRID_TOL_VOXELS = 0.01
#: label info key marking a DICOM SEG converted by abdoseg's reader (not MONAI Label's positional one)
READER_KEY = "abdoseg_seg_reader"


def refuse(status: int, message: str) -> HTTPException:
    logger.warning(f"refused ({status}): {message}")
    return HTTPException(status_code=status, detail=message)


def check_name(value: Any, what: str, root: str) -> str:
    """``value`` as a plain file-name component (an image id, label id or tag), else HTTP 400."""
    if isinstance(value, Enum):  # DefaultLabelTag.FINAL: str() would give "DefaultLabelTag.FINAL"
        value = value.value
    text = "" if value is None else str(value)
    if (not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text
            or os.path.isabs(text) or len(text) > 255):
        raise refuse(400, f"{what} {text!r} refused: it must be a plain name of an entry inside the datastore "
                          f"{root} (no '/', '\\', '..' or absolute path)")
    return text


def check_uid(value: Any, what: str, root: str) -> str:
    text = check_name(value, what, root)
    if len(text) > 64 or not UID_RE.match(text):
        raise refuse(400, f"{what} {text!r} refused: the DICOMweb datastore {root} takes DICOM UIDs "
                          "(digits and dots, at most 64 characters)")
    return text


def inside(root: str, path: str, what: str) -> str:
    """``path`` resolved; HTTP 400 when it lies outside ``root`` (symbolic links followed)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise refuse(400, f"{what} refused: it resolves to {real}, outside the datastore {real_root}")
    return real


def _grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(size in voxels (x, y, z, ...), 4x4 voxel -> LPS affine) from the file's header (SimpleITK)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    dim = reader.GetDimension()
    size = tuple(int(v) for v in reader.GetSize())
    affine = np.eye(4)
    if dim >= 3:
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        affine[:3, :3] = direction @ np.diag(np.asarray(reader.GetSpacing()[:3], dtype=np.float64))
        affine[:3, 3] = np.asarray(reader.GetOrigin()[:3], dtype=np.float64)
    return size, affine


def check_label_fits(image_id: str, image_path: str, label_path: str, tag: str) -> None:
    """HTTP 422 when the label file is unreadable, not on its image's grid (size and affine), or
    holds values other than FLARE23 ids 0-14; the message names the image and both geometries."""
    import SimpleITK as sitk

    where = f"label for image {image_id!r} (tag {tag!r})"
    try:
        label_size, label_affine = _grid(label_path)
    except Exception as exc:
        raise refuse(422, f"{where}: not a readable image file ({exc})") from exc
    image_size, image_affine = _grid(image_path)
    spacing = np.linalg.norm(image_affine[:3, :3], axis=0)
    tol = GRID_TOL_VOXELS * float(spacing.min()) if spacing.size else 1e-3
    fmt = lambda a: np.array2string(np.round(a[:3], 4), separator=", ").replace("\n", "")  # noqa: E731
    if label_size != image_size:
        raise refuse(422, f"{where}: shape {label_size} does not match the image {os.path.basename(image_path)} "
                          f"shape {image_size}; a label must be drawn on its image's grid")
    if not np.allclose(label_affine, image_affine, atol=tol, rtol=0):
        raise refuse(422, f"{where}: affine (voxel -> LPS mm) {fmt(label_affine)} does not match the image "
                          f"{os.path.basename(image_path)} affine {fmt(image_affine)} (shape {image_size} both); "
                          "a label must be drawn on its image's grid")
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_path)))
    bad = [v for v in values.tolist() if v != int(v) or not 0 <= int(v) <= MAX_LABEL_ID]
    if bad:
        raise refuse(422, f"{where}: label values {bad[:10]} are not FLARE23 ids 0-{MAX_LABEL_ID}")


class _FolderGuard:
    """Checks shared by both datastores (mixed in before the stock class)."""

    def _root(self) -> str:
        return os.path.realpath(self._datastore_path)

    def _image_id(self, image_id: Any) -> str:
        return check_name(image_id, "image id", self._root())

    def _tag(self, tag: Any) -> str:
        tag = check_name(tag, "label tag", self._root())
        inside(self._root(), self._datastore.label_path(tag), f"label tag {tag!r}")
        return tag

    def _known_image(self, image_id: Any) -> str:
        image_id = self._image_id(image_id)
        if not self._datastore.objects.get(image_id):
            raise refuse(404, f"image {image_id!r} not found in the datastore {self._root()}")
        return image_id

    # ----- reads
    def get_image_uri(self, image_id: str) -> str:
        image_id = self._image_id(image_id)
        uri = super().get_image_uri(image_id)
        return inside(self._root(), uri, f"image {image_id!r}") if uri else uri

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        return super().get_image_info(self._image_id(image_id))

    def get_label_uri(self, label_id: str, label_tag: str, *args, **kwargs) -> str:
        label_id = self._image_id(label_id)
        label_tag = self._tag(label_tag)
        uri = super().get_label_uri(label_id, label_tag, *args, **kwargs)
        return inside(self._root(), uri, f"label {label_id!r} (tag {label_tag!r})") if uri else uri

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(self._image_id(label_id), self._tag(label_tag))

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        return super().get_labels_by_image_id(self._image_id(image_id))

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return super().get_label_by_image_id(self._image_id(image_id), self._tag(tag))

    # ----- writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if not image_id:
            image_id = self._to_id(os.path.basename(image_filename))[0]
        image_id = self._image_id(image_id)
        _, ext = self._to_id(os.path.basename(image_filename))
        inside(self._root(), os.path.join(self._datastore.image_path(), self._filename(image_id, ext)),
               f"image {image_id!r}")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        return super().remove_image(self._known_image(image_id))

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return super().remove_label(self._image_id(label_id), self._tag(label_tag))

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        return super().update_image_info(self._known_image(image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        return super().update_label_info(self._known_image(label_id), self._tag(label_tag), info)

    def _checked_label_file(self, image_id: str, label_filename: str, label_tag: str) -> tuple[str, str]:
        """(label file to store, temporary file to remove or ""): a ``.bin`` label (OHIF's raw
        buffer) becomes an image on its image's grid; the label must fit its image."""
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not os.path.exists(image_uri):
            raise refuse(404, f"image {image_id!r} not found in the datastore {self._root()}")
        tmp = ""
        if label_filename.endswith(".bin"):
            try:
                tmp = label_filename = binary_to_image(image_uri, label_filename)
            except ValueError as exc:
                raise refuse(422, f"label for image {image_id!r} (tag {label_tag!r}): the raw label buffer does "
                                  f"not fit the image ({exc})") from exc
        check_label_fits(image_id, image_uri, label_filename, label_tag)
        _, ext = self._to_id(os.path.basename(label_filename))
        inside(self._root(), os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, ext)),
               f"label for image {image_id!r} (tag {label_tag!r})")
        return label_filename, tmp


class AbdosegLocalDatastore(_FolderGuard, LocalDatastore):
    """MONAI Label's local (studies folder) datastore that stays in its folder and refuses labels
    that do not fit their image."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        image_id = self._known_image(image_id)
        label_tag = self._tag(label_tag or DefaultLabelTag.FINAL.value)
        label_filename, tmp = self._checked_label_file(image_id, label_filename, label_tag)
        try:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        finally:
            if tmp:
                os.unlink(tmp)


class AbdosegDICOMWebDatastore(_FolderGuard, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore (cache folder + PACS) with UID-only ids, labels checked
    against their image, and DICOM SEG written and read with the FLARE23 ids (no dcmqi)."""

    def _image_id(self, image_id: Any) -> str:
        return check_uid(image_id, "image id (SeriesInstanceUID)", self._root())

    def _known_image(self, image_id: Any) -> str:
        image_id = self._image_id(image_id)
        if image_id not in self.list_images() and not self._datastore.objects.get(image_id):
            raise refuse(404, f"image series {image_id!r} not found on {self.name()}")
        return image_id

    def get_image_uri(self, image_id: str) -> str:
        image_id = self._image_id(image_id)
        if not self._datastore.objects.get(image_id) and image_id not in self.list_images():
            return ""  # the stock datastore would try to download a series that does not exist
        converted = DICOMWebDatastore.get_image_uri(self, image_id)  # downloads and converts once
        uri = LocalDatastore.get_image_uri(self, image_id)  # the copy in the cache folder
        if converted and converted != uri and os.path.dirname(converted) == tempfile.gettempdir():
            os.unlink(converted)  # the stock datastore leaves its first conversion in the temp folder
        return inside(self._root(), uri, f"image {image_id!r}") if uri else uri

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        label_tag = self._tag(label_tag)
        label_id = check_uid(label_id, "label id (SeriesInstanceUID)", self._root())
        image_id = self._image_id(image_id) if image_id else ""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            # a label stored in the cache folder under its image's id (MONAI Label's label ids)
            uri = LocalDatastore.get_label_uri(self, label_id, label_tag)
            return inside(self._root(), uri, f"label {label_id!r} (tag {label_tag!r})") if uri else uri
        # a SEG series on the DICOMweb server for the image series image_id
        label_dir = inside(self._root(), os.path.join(self._datastore.label_path(label_tag), label_id),
                           f"label {label_id!r}")
        label_nii = inside(self._root(), os.path.join(self._datastore.label_path(label_tag), f"{image_id}.nii.gz"),
                           f"label of image {image_id!r}")
        current = self._datastore.objects.get(image_id)
        info = current.labels[label_tag].info if current and label_tag in current.labels else {}
        if (os.path.exists(label_nii) and info.get(READER_KEY) and info.get("SeriesInstanceUID") == label_id):
            return label_nii
        if not os.path.isdir(label_dir) or not os.listdir(label_dir):
            dicom_web_download_series(None, label_id, label_dir, self._client, self._fetch_by_frame)
        return self._seg_to_label(image_id, label_id, label_dir, label_tag)

    def _seg_to_label(self, image_id: str, seg_series: str, label_dir: str, label_tag: str) -> str:
        """The downloaded SEG series -> ``labels/final/<image id>.nii.gz`` on the image's grid,
        classes by segment label or code (:func:`abdoseg.dicom.seg.read_dicom_seg`)."""
        from abdoseg.dicom.seg import read_dicom_seg
        from abdoseg.io import save_nifti

        files = sorted(os.path.join(label_dir, f) for f in os.listdir(label_dir) if f.endswith(".dcm"))
        if len(files) != 1:
            raise refuse(422, f"SEG series {seg_series}: expected one DICOM SEG instance, found {len(files)}")
        image_uri = self.get_image_uri(image_id)
        label, affine = read_dicom_seg(files[0], image_uri)
        fd, tmp = tempfile.mkstemp(suffix=".nii.gz")
        os.close(fd)
        try:
            save_nifti(label, affine, tmp)
            info = {**self._dicom_info(seg_series), READER_KEY: "abdoseg.dicom.seg.read_dicom_seg"}
            LocalDatastore.save_label(self, image_id, tmp, label_tag, info)
        finally:
            os.unlink(tmp)
        return LocalDatastore.get_label_uri(self, image_id, label_tag)

    def _download_labeled_data(self):
        """The stock method, except that when several SEGs reference one image series (a label
        corrected and saved twice) the newest one (ContentDate/ContentTime, else SeriesDate/
        SeriesTime) is the training label; the stock method let the last in the server's answer
        order win."""
        from pydicom.dataset import Dataset

        newest: Dict[str, tuple[str, str]] = {}  # image series -> (time stamp, SEG series)
        images = set(self.list_images())
        for seg in (Dataset.from_json(d) for d in self._client.search_for_series(search_filters={"Modality": "SEG"})):
            seg_uid = str(seg["SeriesInstanceUID"].value)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg["StudyInstanceUID"].value),
                                                                           seg_uid)[0])
            ref = meta.get("ReferencedSeriesSequence")
            if not ref:
                logger.warning(f"Label Ignored:: ReferencedSeriesSequence is NOT found: {seg_uid}")
                continue
            image = str(ref[0].SeriesInstanceUID)
            if image not in images:
                logger.warning(f"Label Ignored:: ReferencedSeriesSequence is NOT in filtered image list: {seg_uid}")
                continue
            stamp = "".join(str(meta.get(k, "") or "") for k in ("ContentDate", "ContentTime")) or \
                "".join(str(meta.get(k, "") or "") for k in ("SeriesDate", "SeriesTime"))
            if image not in newest or (stamp, seg_uid) > newest[image]:
                newest[image] = (stamp, seg_uid)
        stale = set(LocalDatastore.get_labeled_images(self)) - set(newest)
        for image in stale:  # labels whose SEG is gone from the server
            uri = LocalDatastore.get_label_uri(self, image, DefaultLabelTag.FINAL)
            if uri and os.path.exists(uri):
                logger.info(f"Label {image} not on the server any more; removed from the cache")
                os.unlink(uri)
            obj = self._datastore.objects.get(image)
            if obj and DefaultLabelTag.FINAL in obj.labels:
                obj.labels.pop(DefaultLabelTag.FINAL)
                self._update_datastore_file()
        for image, (_, seg_uid) in newest.items():
            self.get_image_uri(image)
            self.get_label_uri(seg_uid, DefaultLabelTag.FINAL, image)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        from abdoseg.dicom.seg import series_seg
        from abdoseg.io import InputError

        image_id = self._known_image(image_id)
        label_tag = self._tag(label_tag or DefaultLabelTag.FINAL.value)
        label_filename, tmp = self._checked_label_file(image_id, label_filename, label_tag)
        try:
            label_info = dict(label_info or {})
            if label_tag == DefaultLabelTag.FINAL:
                image_dir = inside(self._root(), os.path.join(self._datastore.image_path(), image_id),
                                   f"image {image_id!r}")
                out_dir = tempfile.mkdtemp(prefix="abdoseg_seg_")
                try:
                    seg_file = series_seg(label_filename, image_dir, os.path.join(out_dir, "seg.dcm"))
                    import pydicom

                    seg = pydicom.dcmread(str(seg_file))
                    self._client.store_instances([seg])
                finally:
                    shutil.rmtree(out_dir, ignore_errors=True)
                image_info = self.get_image_info(image_id)
                label_info.update({
                    "SeriesInstanceUID": str(seg.SeriesInstanceUID), "Modality": "SEG",
                    "PatientID": image_info.get("PatientID"), "StudyInstanceUID": image_info.get("StudyInstanceUID"),
                    READER_KEY: "abdoseg.dicom.seg.series_seg",
                })
                logger.info(f"stored DICOM SEG {seg.SeriesInstanceUID} of image {image_id} on {self.name()} "
                            "(segment number = FLARE23 id)")
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        except InputError as exc:
            raise refuse(422, f"label for image {image_id!r}: {exc}") from exc
        finally:
            if tmp:
                os.unlink(tmp)


__all__ = ["AbdosegLocalDatastore", "AbdosegDICOMWebDatastore", "check_name", "check_uid", "inside",
           "check_label_fits"]
