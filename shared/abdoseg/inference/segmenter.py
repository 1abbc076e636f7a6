"""A bundle's inference config as one callable: ``path -> (mask, affine)``.

:class:`BundleSegmenter` composes exactly what MONAI Label composes from ``inference.json``:
``preprocessing`` -> ``inferer(image, network)`` -> ``postprocessing``. :func:`segmenter_from_bundle`
is the one place that builds it from a bundle folder (``abdoseg segment``, pseudo-labeling, the
ONNX Runtime cascade and the benchmarks all use it). :class:`SaveMaskd` is the bundle's writer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import Compose, SaveImaged

from abdoseg.networks.checkpoints import load_weights
from abdoseg.io import InputError, case_id_from_image, check_items_exist, exit_if_failed, save_nifti, visible_entries

__all__ = ["CaseDataset", "skip_failed_cases", "raise_if_failed", "as_input_error", "BundleSegmenter", "segmenter_from_bundle", "list_images", "pending_items", "SaveMaskd", "output_path"]


def as_input_error(exc: BaseException, path: str | os.PathLike) -> InputError:
    """The :class:`InputError` inside MONAI's ``RuntimeError("applying transform ...")`` chain, or
    a one-line InputError naming ``path`` for any other reader/transform failure."""
    cause: BaseException = exc
    while True:
        if isinstance(cause, InputError):
            return cause
        if cause.__cause__ is None:
            break
        cause = cause.__cause__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return InputError(path, f"could not be read as a CT image ({type(cause).__name__}: {text})")


class BundleSegmenter:
    """``segmenter({"image": path}) -> (uint8 mask (X, Y, Z), affine 4x4)`` on the file's own grid.

    ``preprocessing`` loads ``item["image"]``; any loader error becomes an :class:`InputError`
    naming the file. The postprocessing must return ``pred`` on the input's grid (the fine bundle's
    ends with ``Invertd``); the affine returned is the file's own (``original_affine``).
    """

    def __init__(self, preprocessing: Callable, inferer: Callable, network: torch.nn.Module,
                 postprocessing: Callable | None = None, device: str | torch.device | None = None,
                 image_key: str = "image", pred_key: str = "pred") -> None:
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.postprocessing = postprocessing
        self.device = torch.device(device) if device is not None else None
        self.image_key = image_key
        self.pred_key = pred_key

    def _preprocess(self, path: str) -> dict:
        try:
            return self.preprocessing({self.image_key: path})
        except Exception as exc:
            raise as_input_error(exc, path) from None

    def __call__(self, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        path = str(item[self.image_key])
        data = self._preprocess(path)
        img = data[self.image_key]
        if not isinstance(img, MetaTensor) or img.ndim != 4:
            raise InputError(path, f"preprocessing must yield a channel-first (1, X, Y, Z) MetaTensor, got {tuple(img.shape)}")
        device = self.device
        if device is None:
            try:
                device = next(self.network.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        if hasattr(self.network, "eval"):
            self.network.eval()
        with torch.no_grad():
            pred = self.inferer(img[None].to(device), self.network)
        data[self.pred_key] = pred[0].cpu() if isinstance(pred, torch.Tensor) else pred
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        mask = data[self.pred_key]
        mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if mask.ndim == 4:
            mask = mask[0] if mask.shape[0] == 1 else np.argmax(mask, axis=0)
        original_affine = img.meta.get("original_affine", img.affine)
        original_affine = np.asarray(original_affine.cpu().numpy() if isinstance(original_affine, torch.Tensor)
                                     else original_affine, dtype=np.float64)
        shape = tuple(int(s) for s in np.asarray(img.meta.get("spatial_shape", mask.shape)).reshape(-1)[:3])
        if tuple(mask.shape) != shape:
            raise RuntimeError(f"{path}: mask shape {tuple(mask.shape)} != image shape {shape}; the bundle's "
                               "postprocessing must return the mask on the input grid (Invertd)")
        return np.rint(mask).astype(np.uint8, copy=False) if mask.dtype.kind == "f" else mask.astype(np.uint8, copy=False), original_affine


def segmenter_from_bundle(bundle_dir: str | os.PathLike, device: str | torch.device = "cpu",
                          overrides: Mapping[str, Any] | None = None, model_path: str | os.PathLike | None = None,
                          network: torch.nn.Module | None = None,
                          config: str | Sequence[str] = "configs/inference.json") -> BundleSegmenter:
    """The bundle's inference as a :class:`BundleSegmenter`, weights loaded.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``, ``models/model.pt``).
        device: torch device for both networks (the config's ``device``).
        overrides: config id -> value, applied after ``device`` (e.g. ``{"single_stage": True}``).
        model_path: fine weights (default: the config's ``model_path``).
        network: use this module as the fine network (e.g. an ONNX Runtime session wrapper)
            instead of ``network_def`` + weights.
        config: config file(s) relative to ``bundle_dir``, merged in order.
    """
    from abdoseg.bundle.config import load_bundle_config

    bundle = Path(bundle_dir)
    parser = load_bundle_config(bundle, config)
    parser["device"] = f"$torch.device({str(torch.device(device))!r})"
    for key, value in (overrides or {}).items():
        parser[key] = value
    if network is None:
        network = parser.get_parsed_content("network_def").to(torch.device(device))
        path = model_path if model_path is not None else parser.get_parsed_content("model_path")
        load_weights(network, path, what="network_def of " + str(bundle / "configs" / "inference.json"))
    post = parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
    if isinstance(post, Compose):  # the caller writes the mask, as MONAI Label does: drop the bundle's writer
        post = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
    return BundleSegmenter(preprocessing=parser.get_parsed_content("preprocessing"),
                           inferer=parser.get_parsed_content("inferer"), network=network.eval(),
                           postprocessing=post, device=device)


def output_path(image: str | os.PathLike, output_dir: str | os.PathLike, suffix: str = ".nii.gz") -> Path:
    """``<output_dir>/<case id><suffix>`` (FLARE's ``_0000`` dropped)."""
    return Path(output_dir) / f"{case_id_from_image(image)}{suffix}"


def list_images(input_dir: str | os.PathLike | None = None, datalist: str | os.PathLike | None = None,
                data_list_key: str = "validation", base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Inference items ``[{"image": path}, ...]`` from a folder (every file but hidden and partial
    ones, sorted; a non-image file then fails with a clear error) or a datalist JSON (``data_list_key``, paths
    relative to ``base_dir`` or the datalist's folder)."""
    if (input_dir in (None, "")) == (datalist in (None, "")):
        raise ValueError("give exactly one of input_dir or datalist")
    if input_dir not in (None, ""):
        folder = Path(input_dir)
        if not folder.is_dir():
            raise InputError(folder, "input folder not found")
        return [{"image": str(p)} for p in visible_entries(folder) if p.is_file()]
    from monai.data import load_decathlon_datalist

    dl = Path(datalist)  # type: ignore[arg-type]
    if not dl.is_file():
        raise InputError(dl, "datalist not found")
    items = load_decathlon_datalist(str(dl), True, data_list_key, base_dir=str(base_dir or dl.parent))
    check_items_exist(items, "image", source=dl)
    return [{"image": str(it["image"])} for it in items]


def pending_items(items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, overwrite: bool = False) -> list[dict]:
    """``items`` whose mask ``<output_dir>/<case>.nii.gz`` does not exist yet (all if ``overwrite``):
    a rerun resumes where the last one stopped."""
    return [dict(it) for it in items if overwrite or not output_path(it["image"], output_dir).is_file()]


class SaveMaskd(SaveImaged):
    """Write ``data[key]`` (1, X, Y, Z) as uint8 ``<output_dir>/<case>.nii.gz`` with the input CT's
    affine, atomically (temporary name, then rename). A ``SaveImaged`` so that MONAI Label, which
    drops ``SaveImaged`` from a bundle's postprocessing, never writes files on the server."""

    def __init__(self, keys: str = "pred", output_dir: str | os.PathLike = "./eval", image_key: str = "image") -> None:
        super().__init__(keys=keys, output_dir=str(output_dir), output_dtype=np.uint8, resample=False)
        self.output_dir = str(output_dir)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:  # type: ignore[override]
        d = dict(data)
        image = d[self.image_key]
        meta = image.meta if isinstance(image, MetaTensor) else {}
        source = str(meta.get("filename_or_obj", "case"))
        affine = meta.get("original_affine", getattr(image, "affine", None))
        affine = np.asarray(affine.cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        for key in self.key_iterator(d):
            mask = d[key]
            mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            mask = mask.reshape(mask.shape[-3:])
            save_nifti(np.rint(mask).astype(np.uint8) if mask.dtype.kind == "f" else mask.astype(np.uint8, copy=False),
                       affine, output_path(source, self.output_dir))
        return d


class CaseDataset(Dataset):
    """MONAI ``Dataset`` for batch inference: a case whose preprocessing fails (unreadable file,
    not a CT, ...) becomes ``{"failed_image": path, "error": one-line reason}`` instead of an
    exception, so one bad file never stops a folder; :func:`skip_failed_cases` (the evaluator's
    ``iteration_update``) records it and :func:`raise_if_failed` (``finalize``) lists it."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as exc:
            path = str(self.data[index].get("image", f"item {index}"))
            return {"failed_image": path, "error": str(as_input_error(exc, path))}


def skip_failed_cases(engine: Any, batchdata: Mapping[str, Any]) -> dict:
    """``iteration_update`` of a ``SupervisedEvaluator`` over a :class:`CaseDataset`: failed cases
    are logged and kept in ``engine.state.failed_cases``; the others run the evaluator's own
    iteration (inferer + postprocessing)."""
    import logging

    if "error" in batchdata:
        failed = getattr(engine.state, "failed_cases", [])
        for reason in batchdata["error"]:
            logging.getLogger(__name__).error("%s", reason)
            failed.append(str(reason))
        engine.state.failed_cases = failed
        return {}
    return engine._iteration(engine, batchdata)


def raise_if_failed(engine: Any) -> None:
    """Exit non-zero, naming every failed case, after the whole batch ran."""
    exit_if_failed(getattr(engine.state, "failed_cases", []))
