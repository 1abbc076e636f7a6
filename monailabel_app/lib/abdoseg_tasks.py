# abdoseg additions to MONAI Label's bundle tasks (Apache-2.0, see ../LICENSE).
"""MONAI Label tasks for the abdoseg bundles: what the stock bundle tasks get wrong for them.

* **Only selectable weights are offered.** The stock tasks list every ``models/*.pt`` as
  ``model_filename``; the fine bundle's ``models/`` also holds ``coarse_model.pt`` (the cascade's
  coarse stage, another network), and choosing it failed with HTTP 500 (size mismatch).
  :func:`selectable_model_files` offers only the files whose state dict fits the bundle's
  ``network_def`` (``model.pt`` first: MONAI Label uses the first entry when a request names
  none); the list is recomputed on every ``/info`` and inference, so weights written by training
  (``model_final.pt``) appear without a restart. An inference request naming a file that does not
  fit is answered with the default weights and a warning in the log (what MONAI Label does for a
  file that does not exist); a training request naming one fails at once with an error naming the
  file (the stock task would fail with a size mismatch, or train from scratch).
* **Training progress reaches the viewer.** The stock ``BundleTrainTask.stats()`` is empty; here
  it returns the JSON that the bundle's ``abdoseg.training.handlers.TrainStatsWriter`` (in
  ``train#handlers``) keeps up to date during training (``train_stats`` in ``/info/`` and
  ``/model/<name>``). A run that fails or is stopped (the writer's last word would stay
  ``RUNNING``) shows ``status`` ``ERROR`` / ``STOPPED`` with the error line.
* **MONAI Label's ``image_path`` vs ``Spacingd``.** MONAI's ``Spacingd`` updates every
  ``image_*`` entry of the data as a meta dict; MONAI Label puts the path string in
  ``image_path``, so the fine bundle's preprocessing failed (HTTP 500) under MONAI Label. The path
  is kept aside while the bundle's preprocessing runs.
* **``displayable_configs`` without a viewer.** The stock task reads every displayable setting
  from the request (KeyError when a plain HTTP client sends only ``max_epochs``); missing ones take
  the bundle's defaults here.

Served weights after training: the bundles' ``abdoseg.training.handlers.ModelSaver`` (the one writer of ``model.pt``) writes
``models/model.pt`` at the end of any training in which no validation saved it (fewer epochs than
``val_interval``, or no validation images), and the inference task reloads a ``model.pt`` whose
modification time changed, so the next ``/infer`` uses the new weights.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from abdoseg.bundle.config import config_files, load_bundle_config
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask

from lib.infers.bundle import BundleInferTask

logger = logging.getLogger(__name__)

STATS_HANDLER = "TrainStatsWriter"
DEFAULT_STATS_FILE = os.path.join("models", "train_stats.json")

# (path, mtime_ns, size) -> fits network_def
_FIT_CACHE: Dict[Tuple[str, int, int], bool] = {}
_SHAPES_CACHE: Dict[str, Dict[str, Tuple[int, ...]]] = {}


def _network_shapes(bundle_path: str) -> Dict[str, Tuple[int, ...]]:
    """Parameter/buffer shapes of ``network_def`` in the bundle's ``configs/inference.json``."""
    if bundle_path not in _SHAPES_CACHE:
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle_path, "configs", "inference.json"))
        parser["bundle_root"] = bundle_path
        net = parser.get_parsed_content("network_def", instantiate=True)
        _SHAPES_CACHE[bundle_path] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return _SHAPES_CACHE[bundle_path]


def fits_network(bundle_path: str, path: str) -> bool:
    """Whether the plain state dict ``path`` loads strictly into the bundle's ``network_def``
    (same keys, same shapes; ``module.`` prefixes and ``{"model": ...}`` wrappers allowed)."""
    from abdoseg.networks.checkpoints import load_state_dict_file

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _FIT_CACHE:
        try:
            sd = load_state_dict_file(path)
            own = _network_shapes(bundle_path)
            _FIT_CACHE[key] = set(sd) == set(own) and all(tuple(v.shape) == own[k] for k, v in sd.items())
        except Exception as exc:  # unreadable file, not a state dict, ...
            logger.info(f"{path}: not offered as model_filename ({exc})")
            _FIT_CACHE[key] = False
    return _FIT_CACHE[key]


def selectable_model_files(bundle_path: str) -> List[str]:
    """File names in ``<bundle>/models/`` whose weights fit ``network_def``; ``model.pt`` first,
    then by name length and name (MONAI Label's order)."""
    names = []
    for p in glob.glob(os.path.join(bundle_path, "models", "*.pt")):
        name = os.path.basename(p)
        if not name.startswith(".") and fits_network(bundle_path, p):
            names.append(name)
    return sorted(names, key=lambda n: (n != "model.pt", len(n), n))


def _check_requested_file(bundle_path: str, request: Dict[str, Any], what: str) -> None:
    name = request.get("model_filename")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name:
        return
    path = os.path.join(bundle_path, "models", str(name))
    if os.path.isfile(path) and not fits_network(bundle_path, path):
        raise MONAILabelException(
            MONAILabelError.INVALID_INPUT,
            f"{path}: does not fit network_def of {os.path.join(bundle_path, 'configs', 'inference.json')} "
            f"(another network's weights?); choose one of {selectable_model_files(bundle_path)} for {what}",
        )


class AbdosegBundleInferTask(BundleInferTask):
    """``BundleInferTask`` offering only weight files that fit ``network_def``."""

    def _refresh_model_files(self) -> None:
        if getattr(self, "bundle_path", None) and "model_filename" in self._config:
            self._config["model_filename"] = selectable_model_files(self.bundle_path)

    def config(self) -> Dict[str, Any]:
        self._refresh_model_files()
        return super().config()

    def run_pre_transforms(self, data, transforms):
        # MONAI's Spacingd copies the image's meta into every "image_*" entry of the data dict it
        # takes for a meta dict; MONAI Label's "image_path" (a str) is one, and the fine bundle's
        # preprocessing (Spacingd) then fails with "'str' object has no attribute 'update'". The
        # path is kept aside while the bundle's preprocessing runs (the writer needs it later).
        stash = {k: data.pop(k) for k in [k for k in data if isinstance(k, str) and k.startswith("image_")
                                           and isinstance(data[k], str)]}
        try:
            out = super().run_pre_transforms(data, transforms)
        finally:
            data.update(stash)
        out.update(stash)
        return out

    def __call__(self, request, callbacks=None):
        self._refresh_model_files()
        name = request.get("model_filename")
        name = name[0] if isinstance(name, (list, tuple)) and name else name
        if name and name not in self._config.get("model_filename", []):
            # as MONAI Label does for a file that does not exist: ignore it, use the default
            logger.warning(f"Ignoring <User> provided model_file {name!r}: not one of the weight files that fit "
                           f"network_def of {self.bundle_path} ({self._config.get('model_filename')})")
            request = {k: v for k, v in request.items() if k != "model_filename"}
        return super().__call__(request, callbacks)


class AbdosegBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` with selectable weights only, training stats, and displayable defaults."""

    def config(self) -> Dict[str, Any]:
        options = super().config()
        options["model_filename"] = selectable_model_files(self.bundle_path)
        return options

    def _load_bundle_config(self, path, config):
        """The bundle's training configs merged as ``monai.bundle run training`` gets them
        (``inference.json``, the base, then ``train.json``: :func:`abdoseg.bundle.config.config_files`),
        read by the project's one config reader; the stock task reads ``train.json`` alone."""
        return load_bundle_config(path, config_files(path, "training"))

    def run_single_gpu(self, request, overrides):
        """The stock task runs ``train.json`` alone; the bundle's training is ``inference.json``
        (the base: networks, preprocessing) merged with ``train.json``."""
        import monai.bundle

        monai.bundle.run(run_id=request.get("run_id", "run"), init_id=None, final_id=None,
                         meta_file=self.bundle_metadata_path, config_file=config_files(self.bundle_path, "training"),
                         **overrides)

    def displayable_defaults(self) -> Dict[str, Any]:
        """The bundle's ``displayable_configs`` (a list value -> its first entry, as a viewer's
        drop-down sends it)."""
        for k in self.const.key_displayable_configs():
            if self.bundle_config.get(k):
                values = self.bundle_config.get_parsed_content(k, instantiate=True)
                return {c: (v[0] if isinstance(v, (list, tuple)) and v else v) for c, v in values.items()}
        return {}

    def stats_path(self) -> str:
        """``path`` of the ``TrainStatsWriter`` in ``train#handlers`` (default ``models/train_stats.json``)."""
        handlers = self.bundle_config.get(self.const.key_train_handlers(), []) or []
        for i, h in enumerate(handlers):
            if isinstance(h, dict) and str(h.get("_target_", "")).endswith(STATS_HANDLER) and "path" in h:
                try:
                    parser = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
                    return str(parser.get_parsed_content(f"{self.const.key_train_handlers()}#{i}#path"))
                except Exception as exc:
                    logger.warning(f"train stats path of {self.bundle_path} not resolved ({exc}); using the default")
        return os.path.join(self.bundle_path, DEFAULT_STATS_FILE)

    def last_run(self) -> Optional[Dict[str, Any]]:
        """MONAI Label's record of the last training run of this bundle in this server process
        (status SUBMITTED / RUNNING / DONE / ERROR / STOPPED, start/end time, last output lines)."""
        try:
            from monailabel.utils.async_tasks.utils import tasks
        except ImportError:
            return None
        mine = [t for t in tasks("train") if (t.get("request") or {}).get("bundle_path") == self.bundle_path]
        return mine[-1] if mine else None

    def stats(self) -> Dict[str, Any]:
        """The ``TrainStatsWriter`` JSON; when the last run of this server ended in ERROR or was
        STOPPED (the handler never wrote its end: it was killed, or failed before its first event),
        ``status`` says so, with ``error`` (the run's last output lines) and ``end_ts``."""
        import json

        path = self.stats_path()
        out: Dict[str, Any] = {}
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    out = json.load(f)
            except (OSError, ValueError) as exc:
                logger.warning(f"{path}: training stats not readable ({exc})")
        run = self.last_run()
        if run and run.get("status") in ("ERROR", "STOPPED"):
            details = [str(line) for line in list(run.get("details") or [])]
            errors = [line for line in details if "Error" in line or "Exception" in line]
            out = {**out, "status": run["status"], "end_ts": run.get("end_ts"),
                   "error": (errors[-1] if errors else "\n".join(details[-3:])) or "training process failed"}
        return out

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # the stock method calls os.path.exists(None) when pretrained is False
        if pretrained and model_pytorch:
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def __call__(self, request, datastore: Datastore):
        # a fresh config per run: the stock task inserts its CheckpointLoader into the parsed
        # config's train#handlers in place, so a second run in the same process would reuse the
        # first run's checkpoint path
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        request = dict(request)
        for k, v in self.displayable_defaults().items():
            if k not in request:
                request[k] = v
            elif isinstance(request[k], (list, tuple)):
                request[k] = request[k][0] if request[k] else v
        _check_requested_file(self.bundle_path, request, "training")
        name = request.get("model_filename")
        if isinstance(name, (list, tuple)):
            request["model_filename"] = name[0] if name else "model.pt"
        return super().__call__(request, datastore)


__all__ = ["AbdosegBundleInferTask", "AbdosegBundleTrainTask", "fits_network", "selectable_model_files"]
