"""NIfTI input/output with clear errors and atomic writes (temporary name, then rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Iterator

import nibabel as nib
import numpy as np


def _isal_gzip_open(filename: str, mode: str = "rb", compresslevel: int = 1, mtime: int = 0,
                    keep_open: bool = False) -> Any:
    """nibabel's ``.gz`` opener through ISA-L (``python-isal``): the same gzip format, inflate
    about 2-3x faster than zlib (a 79 MB CT: 0.56 vs 1.67 s); writes use ISA-L level
    ``min(compresslevel, 3)`` with ``mtime=0`` and no file name in the header, so the same array
    gives the same bytes whatever the (temporary) file name."""
    from isal import igzip

    if "r" in mode:
        return igzip.open(filename, mode)
    raw = open(filename, mode)  # no file name in the gzip header (temporary names differ per run)
    gz = igzip.IGzipFile(filename="", mode=mode, compresslevel=max(0, min(3, int(compresslevel))), fileobj=raw,
                         mtime=0)
    gz.myfileobj = raw  # closed with the gzip stream
    return gz


def use_fast_gzip() -> bool:
    """Register :func:`_isal_gzip_open` as nibabel's ``.gz`` opener (nibabel's extension map, used
    by ``nib.load`` / ``nib.save`` and so by MONAI's ``NibabelReader``); False when ``isal`` is
    not installed (nibabel keeps zlib)."""
    try:
        import isal.igzip  # noqa: F401
        from nibabel.openers import ImageOpener, Opener
    except ImportError:
        return False
    entry = (_isal_gzip_open, ("mode", "compresslevel", "mtime", "keep_open"))
    Opener.compress_ext_map[".gz"] = entry
    ImageOpener.compress_ext_map[".gz"] = entry
    return True


FAST_GZIP: bool = use_fast_gzip()


class AbdosegWarning(UserWarning):
    """Base of every warning this package issues (CT sanity, empty ROI or ground truth, DICOM
    series choice, cache, packing): the test suite turns them into errors unless a test expects
    one, so a new warning cannot pass unnoticed."""


class InputError(ValueError):
    """A user input file is unusable; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def exit_if_failed(problems: Sequence[str], what: str = "case(s) failed", prefix: str = "") -> None:
    """The one failure report of every batch (segment, bundle inference, pseudo-labels, rounds):
    after everything else ran, exit non-zero with ``<prefix><n> <what>:`` and one indented line
    per problem (each already names its file). Returns quietly when ``problems`` is empty."""
    if problems:
        raise SystemExit(f"{prefix}{len(problems)} {what}:\n" + "\n".join(f"  {p}" for p in problems))


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


#: Marker in the name of a file that is still being written (see :func:`atomic_path`).
PARTIAL_MARKER = ".partial"
#: A partial file of another host (whose writer we cannot ask) is stale after this many seconds.
STALE_FOREIGN_PARTIAL_S = 3600.0
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_PARTIAL_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<tid>\d+)\.partial(?:\..*)?$")
_LEGACY_RANDOM = re.compile(r"\.[a-z0-9_]{8}(?=\.)")


def _data_suffix(name: str) -> str:
    lower = name.lower()
    for ext in (".nii.gz", ".tar.gz"):
        if lower.endswith(ext):
            return name[-len(ext):]
    return Path(name).suffix


def is_hidden_or_partial(path: str | os.PathLike) -> bool:
    """True for names that are never data: hidden (``.x``), still being written
    (``*.partial*``, ``*.tmp``, ``*.part``) or editor backups (``x~``)."""
    name = Path(path).name
    lower = name.lower()
    return (name.startswith(".") or name.endswith("~") or lower.endswith((".tmp", ".part", PARTIAL_MARKER))
            or f"{PARTIAL_MARKER}." in lower)


def visible_entries(folder: str | os.PathLike) -> list[Path]:
    """Sorted entries of ``folder`` that may be data (see :func:`is_hidden_or_partial`)."""
    return sorted(p for p in Path(folder).iterdir() if not is_hidden_or_partial(p))


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii.gz`` / ``.nii`` name, in any letter case."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (any letter case): ``A.NII.GZ`` -> ``A``."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def nifti_cases(folder: str | os.PathLike, case_id: Callable[[Path], str] | None = None
                ) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The one case discovery of a folder of NIfTI files (prepare, evaluate, segment):
    ``({case id: file}, {case id: [every file]} of the ids that several files map to)``.

    Only the folder's own ``.nii.gz``/``.nii`` files (any letter case; hidden and half-written files
    never, see :func:`visible_entries`), sorted. ``case_id`` maps a file to its case (default
    :func:`case_id_from_image`: ``X_0000.nii.gz`` and ``X.nii.gz`` are both ``X``; label and mask
    folders pass :func:`nifti_stem`). Two files of one case are returned as a clash, never silently
    resolved (:func:`clash_reason` words it). A missing folder has no cases."""
    folder = Path(folder)
    case_of = case_id or case_id_from_image
    out: dict[str, Path] = {}
    clashes: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out, clashes
    for p in visible_entries(folder):
        if not p.is_file() or not is_nifti(p):
            continue
        cid = case_of(p)
        if cid in out:
            clashes.setdefault(cid, [out[cid]]).append(p)
        else:
            out[cid] = p
    return out, clashes


def clash_reason(case_id: str, files: Sequence[Path]) -> str:
    """One line: which files of one folder all map to ``case_id`` and what to do."""
    names = " and ".join(Path(p).name for p in files)
    return f"{names} in {Path(files[0]).parent.name}/ all map to case {case_id}; rename or remove all but one"


def link_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be opened when it is a symbolic link loop or a dangling link, else ``None``."""
    import errno

    path = Path(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself); remove or fix it"
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        return f"cannot be opened ({exc.strerror or exc})"
    return None


def partial_path(final_path: str | os.PathLike) -> Path:
    """Where :func:`atomic_path` writes ``final_path`` before renaming it: a hidden name fixed by the
    target, this host and this process/thread, ending in the target's suffix (nibabel picks the
    compression from it): ``.CASE.nii.gz.<host>-<pid>-<tid>.partial.nii.gz``."""
    final_path = Path(final_path)
    name = final_path.name
    tag = f"{_HOST_TAG}-{os.getpid()}-{threading.get_native_id()}"
    return final_path.with_name(f".{name}.{tag}{PARTIAL_MARKER}{_data_suffix(name)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _is_stale_partial(path: Path, target: str | None = None) -> bool:
    """``path`` is a temporary file of :func:`atomic_path` (this or an earlier version) whose writer
    is gone: same host and its process is dead, another host and untouched for
    ``STALE_FOREIGN_PARTIAL_S``, or the old random-name format. ``target``: only for that file name."""
    m = _PARTIAL_RE.match(path.name)
    if m:
        if target is not None and m["target"] != target:
            return False
        if m["host"] == _HOST_TAG:
            pid = int(m["pid"])
            if pid == os.getpid():
                return int(m["tid"]) != threading.get_native_id() and not any(
                    t.native_id == int(m["tid"]) for t in threading.enumerate())
            return not _pid_alive(pid)
        try:
            return time.time() - path.stat().st_mtime > STALE_FOREIGN_PARTIAL_S
        except OSError:
            return False
    t = _legacy_target(path.name)
    return t is not None and (target is None or t == target)


def _legacy_target(name: str) -> str | None:
    """Target file name of a temporary file written by earlier versions (``tempfile.mkstemp``):
    ``.<target>.<8 random chars><suffixes of target>[.tmp]``; ``None`` for any other name."""
    if not name.startswith("."):
        return None
    rest = name[: -len(".tmp")] if name.endswith(".tmp") else name
    for m in _LEGACY_RANDOM.finditer(rest):
        target, sfx = rest[1: m.start()], rest[m.end():]
        if target and sfx and "".join(Path(target).suffixes) == sfx:
            return target
    return None


def remove_stale_partials(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete what killed writers left in ``folder`` (see :func:`_is_stale_partial`); only for the
    file name ``target`` when given. Returns the removed paths; never raises for a vanished file."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for p in candidates:
        if _is_stale_partial(p, target) and not p.is_dir():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
            except OSError:
                continue
    return removed


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it into place only on success.

    The temporary name (:func:`partial_path`) is hidden and fixed by the target and the writing
    process, so nothing ever lists it as data; a failing writer removes it, and whatever a killed
    writer left behind for the same target is removed by the next write of that target
    (:func:`remove_stale_partials`). Concurrent writers of one target use different names, and
    the last rename wins with a complete file.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final_path.parent, final_path.name)
    tmp = partial_path(final_path)
    try:
        yield tmp
        os.replace(tmp, final_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_items_exist(items: Sequence[Any], key: str | Sequence[str] = "image",
                      source: str | os.PathLike | None = None) -> list[Any]:
    """Raise :class:`InputError` naming the first listed file that does not exist (and the datalist
    ``source`` that lists it), before any reader tries; returns ``items`` unchanged.

    ``items``: datalist entries (dicts; ``key`` may name one key or several, a value may be one path
    or a list of paths; entries without the key are skipped) or plain paths.
    """
    keys = [key] if isinstance(key, str) else list(key)
    where = f" (listed in {source})" if source not in (None, "") else ""
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            found = [(k, item[k]) for k in keys if k in item and item[k] not in (None, "")]
        else:
            found = [(None, item)]
        for k, value in found:
            for path in (value if isinstance(value, (list, tuple)) else [value]):
                if not isinstance(path, (str, os.PathLike)):
                    continue
                if not Path(path).exists():
                    what = f"item {i}" + (f" {k!r}" if k is not None else "")
                    raise InputError(path, f"file not found ({what}{where})")
    return list(items)


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and check that a file can be written in it; raises
    :class:`InputError` naming the folder otherwise (read-only, a file in the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise InputError(folder, "exists and is not a folder") from exc
    except OSError as exc:
        raise InputError(folder, f"cannot create the output folder ({exc.strerror or exc})") from exc
    if not folder.is_dir():
        raise InputError(folder, "exists and is not a folder")
    probe = partial_path(folder / ".write_probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(folder, f"output folder is not writable ({exc.strerror or exc})") from exc
    return folder


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
    """FLARE naming: ``FLARE23_0001_0000.nii.gz`` -> ``FLARE23_0001``; other files: name without
    extension (matched in any letter case: ``CT.NII.GZ`` -> ``CT``)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.lower().endswith(ext):  # CT.NII.GZ is case CT, as ct.nii.gz is case ct
            name = name[: -len(ext)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name
