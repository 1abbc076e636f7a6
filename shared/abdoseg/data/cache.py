"""Training data on a disk cache: MONAI's ``PersistentDataset``, made safe to share and to trust.

The bundles' ``train#dataset`` / ``validate#dataset`` are :func:`cached_dataset`: with a
``cache_dir`` every case's deterministic prefix of the transform chain (everything before the
first random transform: NIfTI decoding, orientation, and in coarse_roi also resampling and
intensity scaling) is computed once, written to ``cache_dir`` as one ``.pt`` file per case and
read back in later epochs and runs, so training memory does not grow with the number of cases and
no gzip NIfTI is decoded again. ``cache_dir`` empty or None: MONAI's ``CacheDataset`` in RAM with
``cache_rate`` (the previous behaviour, fine for small data).

:class:`DiskCacheDataset` differs from ``PersistentDataset`` in four ways:

* a cache file that cannot be read (truncated, empty, garbage: ``PersistentDataset`` raises for
  the first two) is deleted and recomputed, with a warning, never trusted;
* files are written under a hidden temporary name in ``cache_dir`` itself and renamed into place
  (``PersistentDataset`` writes in ``/tmp`` and moves, which is a copy, visible while incomplete,
  when ``cache_dir`` is on another file system, e.g. shared by the ranks of a multi-node run);
* the cache key hashes the data item **and the size and modification time of every file it
  names** (a label corrected in place, e.g. by MONAI Label, gives a new entry, not a stale one)
  and the deterministic transforms (``hash_transform``, default ``pickle_hashing``), so a changed
  spacing or a new datalist never reads old entries; different bundles can share one folder;
* entries are stored as computed (MetaTensors with their affine and metadata) and read with
  ``torch.load(weights_only=True)`` allowing only the MONAI/numpy types such entries contain, so a
  cache hit gives the same item as a recompute.
"""

from __future__ import annotations

import os
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import SUPPORTED_PICKLE_MOD, pickle_hashing
from monai.utils import look_up_option
from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys

from abdoseg.io import AbdosegWarning, partial_path, remove_stale_partials

__all__ = ["DiskCacheDataset", "cached_dataset", "warm_cache", "file_stamped_hashing", "CACHE_SAFE_GLOBALS"]


def _numpy_globals() -> list[Any]:
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    types: list[Any] = [np.ndarray, np.dtype, multiarray.multiarray._reconstruct, multiarray.multiarray.scalar]
    for name in ("bool_", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                 "float16", "float32", "float64", "complex64", "complex128", "str_", "bytes_"):
        types.append(type(np.dtype(getattr(np, name))))
    return types


#: What ``torch.load(weights_only=True)`` may build from a cache file besides tensors and plain
#: Python values: MetaTensor and the MONAI enums its metadata uses, numpy arrays and scalars.
CACHE_SAFE_GLOBALS: list[Any] = [MetaTensor, MetaKeys, SpaceKeys, TraceKeys, *_numpy_globals()]


def _file_stamp(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        try:
            st = os.stat(value)
        except (OSError, ValueError):
            return None
        return (st.st_size, st.st_mtime_ns) if not os.path.isdir(value) else None
    if isinstance(value, (list, tuple)):
        stamps = [_file_stamp(v) for v in value]
        return stamps if any(s is not None for s in stamps) else None
    return None


def file_stamped_hashing(item: Any) -> bytes:
    """``pickle_hashing`` of ``item`` plus (size, mtime) of each file a value of it names."""
    if isinstance(item, dict):
        stamps = {str(k): s for k, v in item.items() if (s := _file_stamp(v)) is not None}
    else:
        stamps = {"": _file_stamp(item)}
    return pickle_hashing({"item": item, "files": stamps})


class DiskCacheDataset(PersistentDataset):
    """``PersistentDataset`` that rebuilds unreadable entries and writes atomically (module doc)."""

    def __init__(self, data: Sequence, transform: Sequence[Callable] | Callable, cache_dir: str | os.PathLike,
                 hash_func: Callable[..., bytes] = file_stamped_hashing,
                 hash_transform: Callable[..., bytes] | None = pickle_hashing, **kwargs: Any) -> None:
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_func=hash_func,
                         hash_transform=hash_transform, **kwargs)
        remove_stale_partials(self.cache_dir)  # what killed writers left (never another live writer's file)

    def set_transform_hash(self, hash_xform_func: Callable[..., bytes]) -> None:
        try:
            super().set_transform_hash(hash_xform_func)
        except Exception as exc:  # e.g. a Lambdad that pickle cannot hash: key on the class names
            names = "".join(type(t).__name__ for t in self.transform.flatten().transforms)
            warnings.warn(f"transforms not hashable ({exc}); cache keyed on their class names only", AbdosegWarning, stacklevel=2)
            self.transform_hash = hash_xform_func(names).decode("utf-8")

    def cache_path(self, item: Any) -> Path:
        """The cache file of one data item (it may not exist yet)."""
        return self.cache_dir / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _load(self, path: Path) -> Any:
        with torch.serialization.safe_globals(CACHE_SAFE_GLOBALS):
            return torch.load(path, weights_only=True)

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        path = self.cache_path(item_transformed)
        if path.is_file():
            try:
                return self._load(path)
            except FileNotFoundError:
                pass  # removed meanwhile (another rank rebuilding it): recompute
            except Exception as exc:  # truncated, empty, garbage, unknown types: rebuild, never trust
                warnings.warn(f"{path}: unreadable cache entry ({type(exc).__name__}: {str(exc)[:200]}); "
                              "deleting and recomputing it", AbdosegWarning, stacklevel=2)
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        result = self._pre_transform(deepcopy(item_transformed))  # keep the hashed item unchanged
        tmp = partial_path(path)
        try:
            torch.save(result, tmp, pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                       pickle_protocol=self.pickle_protocol)
            os.replace(tmp, path)
        except OSError as exc:  # full or read-only disk: train on, uncached
            warnings.warn(f"{path}: cache entry not written ({exc})", AbdosegWarning, stacklevel=2)
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        return result


def cached_dataset(data: Sequence, transform: Sequence[Callable] | Callable, cache_dir: str | os.PathLike | None = None,
                   cache_rate: float = 1.0, num_workers: int | None = 0, progress: bool = True,
                   **kwargs: Any) -> DiskCacheDataset | CacheDataset:
    """The bundles' training/validation dataset: :class:`DiskCacheDataset` in ``cache_dir``, or
    MONAI's ``CacheDataset`` in RAM (``cache_rate`` of the cases) when ``cache_dir`` is empty/None.
    ``kwargs`` go to the chosen class."""
    if cache_dir in (None, "") or str(cache_dir).strip().lower() in ("none", "null"):
        return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers,
                            progress=progress, **kwargs)
    return DiskCacheDataset(data=data, transform=transform, cache_dir=cache_dir, **kwargs)


def warm_cache(dataset: Any, num_threads: int | None = 0) -> int:
    """Compute the missing cache entries of a :class:`DiskCacheDataset` (``num_threads`` > 1: in
    that many threads), e.g. once before a multi-GPU run so that the ranks do not all decode the
    same cases in their first epoch. Other datasets: nothing to do. Returns the entries computed."""
    if not isinstance(dataset, DiskCacheDataset):
        return 0
    missing = [item for item in dataset.data if not dataset.cache_path(item).is_file()]
    if (num_threads or 0) > 1:
        from multiprocessing.pool import ThreadPool

        with ThreadPool(int(num_threads)) as pool:
            for _ in pool.imap_unordered(dataset._cachecheck, missing):
                pass
    else:
        for item in missing:
            dataset._cachecheck(item)
    return len(missing)
