"""Checkpoints: the one loader every path uses, and what training saves.

Every weight file of the project is a plain ``state_dict`` (``torch.load(weights_only=True)``
reads it on torch >= 2.6). :func:`load_weights` is the single place where a file meets a network:
it unwraps the usual containers, strips DDP's ``module.`` prefix, loads strictly and turns a
mismatch into one :class:`~abdoseg.io.InputError` line naming the file (instead of hundreds of
``size mismatch`` lines).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from abdoseg.io import InputError

__all__ = ["load_state_dict_file", "load_weights", "torch_load_problem", "inference_state_dict", "InferenceWeights"]

#: Keys under which trainers commonly nest the network's state dict.
_WRAPPER_KEYS = ("state_dict", "model", "network")
#: DynUNet deep-supervision heads: used by the training loss only, absent at inference.
_DEEP_SUPERVISION_KEYS = ("deep_supervision_heads.", "super_head.")


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a plain state dict (``weights_only``): ``{"model": sd}``-style wrappers unwrapped,
    DDP's ``module.`` prefix stripped. Raises :class:`InputError` naming ``path`` when the file is
    missing or is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            sd = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        raise InputError(path, torch_load_problem(exc)) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(path, "does not hold a state dict (a mapping of parameter names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def torch_load_problem(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: what is wrong with the file, without
    PyTorch's advice to retry with ``weights_only=False`` (which runs whatever the file holds)."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip() \
            if "WeightsUnpickler error:" in text else ""
        return ("not a plain PyTorch state dict: it holds Python objects that the safe loader refuses"
                + (f" ({detail})" if detail else "") + "; use a checkpoint saved as torch.save(network.state_dict())")
    if "PytorchStreamReader" in text or "central directory" in text or isinstance(exc, EOFError):
        first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        return f"truncated or corrupt checkpoint ({first}); copy or download it again"
    first = text.splitlines()[0] if text else ""
    return f"not a readable PyTorch state dict ({type(exc).__name__}: {first[:200]})"


def _mismatch_summary(network: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    own = network.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of another shape (e.g. {k}: file {tuple(sd[k].shape)}, "
                     f"network {tuple(own[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts)


def load_weights(network: torch.nn.Module, path: str | os.PathLike, what: str = "network") -> torch.nn.Module:
    """Load the state dict file ``path`` into ``network`` strictly and return the network.

    A file that does not fit raises one :class:`InputError` line naming the file, ``what`` it was
    meant for, and a summary of the mismatch (e.g. the weights of another architecture)."""
    sd = load_state_dict_file(path)
    target = getattr(network, "module", network)
    summary = _mismatch_summary(target, sd)
    if summary:
        raise InputError(path, f"weights do not fit the {what}: {summary}")
    target.load_state_dict(sd, strict=True)
    return network


def inference_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``network`` for the inference ``network_def`` (``deep_supervision: false``):
    DDP/DataParallel ``module`` unwrapped, DynUNet deep-supervision heads dropped (they are only
    used by the training loss, and TorchScript export fails with them)."""
    net = getattr(network, "module", network)
    return {k: v for k, v in net.state_dict().items() if not any(s in k for s in _DEEP_SUPERVISION_KEYS)}


class InferenceWeights:
    """``save_dict`` entry for MONAI ``CheckpointSaver``: saves :func:`inference_state_dict` (a plain
    state dict that the inference config's network loads strictly)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        return inference_state_dict(self.network)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        net = getattr(self.network, "module", self.network)
        net.load_state_dict(state, strict=False)
