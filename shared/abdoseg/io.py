"""NIfTI input/output with clear errors and atomic writes (temporary name, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """A user input file is unusable; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def load_nifti(path: str | os.PathLike, dtype: Any = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file as ``(array, affine 4x4, header)``; array in file voxel order (i, j, k).

    Raises :class:`InputError` naming the file when it is missing or not a readable NIfTI image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt input
        raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr, np.asarray(img.affine, dtype=np.float64), img.header


def voxel_spacing_mm(header: nib.Nifti1Header) -> tuple[float, float, float]:
    """Voxel spacing (mm) of the first three axes from a NIfTI header."""
    return tuple(float(z) for z in header.get_zooms()[:3])  # type: ignore[return-value]


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it into place only on success.

    A killed or failing writer leaves no file at ``final_path`` (only, at worst, a ``*.tmp``
    file which the next run overwrites).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final_path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=f"{suffix}.tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # nibabel chooses compression from the file name; keep the real suffix last.
    tmp_named = tmp_path.with_name(tmp_path.name[: -len(".tmp")])
    try:
        yield tmp_named
        os.replace(tmp_named, final_path)
    finally:
        for p in (tmp_path, tmp_named):
            if p.exists():
                p.unlink()


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
               header: nib.Nifti1Header | None = None) -> Path:
    """Write ``array`` with ``affine`` to ``path`` atomically; dtype of the array is kept."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(np.asarray(array).dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (indent 2)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def case_id_from_image(path: str | os.PathLike) -> str:
    """FLARE naming: ``FLARE23_0001_0000.nii.gz`` -> ``FLARE23_0001``; other files: name without extension."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name
