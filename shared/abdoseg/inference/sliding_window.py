"""Sliding-window inferers of the fine stage, built on MONAI's ``SlidingWindowInferer``.

:class:`FitSlidingWindowInferer` is MONAI's sliding window with one change: the window is never
larger than it needs to be. MONAI pads an input smaller than ``roi_size`` up to ``roi_size``
(a 90 x 80 x 40 ROI crop would run as 192 x 192 x 128: 11x the work); here each axis gets the
smallest multiple of the network's divisor that needs no more windows than ``roi_size`` would
(an ROI that fits runs as one pass over itself, padded to the divisor). ``mirror_axes`` adds
nnU-Net's mirroring test-time augmentation (for a network trained with flips on those axes; no preset uses it, none trains with flips): the logits of every combination of
flips over those axes, flipped back and averaged (2**k passes for k axes).

:class:`AutocastInferer` is the training counterpart: MONAI's ``SimpleInferer`` under
``torch.autocast`` (bfloat16 on CPUs that compute it natively), float32 scores out.

:class:`EnsembleInferer` (seed 002's CFS) runs several fine networks and merges their softmax by
ordered class rules.

Shapes: inputs (B, 1, X, Y, Z); outputs (B, C, X, Y, Z) scores (logits, or probabilities for the
ensemble).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from abdoseg.networks.checkpoints import load_weights

__all__ = ["network_divisor", "fit_window", "cpu_has_fast_bf16", "default_autocast_dtype", "train_autocast_dtype",
           "autocast", "AutocastInferer", "FitSlidingWindowInferer", "EnsembleInferer"]


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there autocast to
    bfloat16 roughly halves the fine network's time (measured 0.94 -> 0.40 us/voxel on a 64x64x32
    window, 2 cores); elsewhere bfloat16 is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_autocast_dtype(device: Any) -> str | None:
    """The inference autocast dtype for ``device``: float16 on CUDA, bfloat16 on a CPU that computes
    it natively (:func:`cpu_has_fast_bf16`), else None (float32). Same masks as float32 up to
    near-ties (demo model on 8 unseen phantoms: organ DSC 0.5312 float32, 0.5314 bfloat16)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "float16"
    return "bfloat16" if kind == "cpu" and cpu_has_fast_bf16() else None


def train_autocast_dtype(device: Any) -> str | None:
    """The training autocast dtype of :class:`AutocastInferer` for ``device``: bfloat16 on a CPU that
    computes it natively, else None. On CUDA MONAI's own ``amp`` (float16 + GradScaler) is used
    instead. Fine Pocket U-Net, 2 x 64x64x32 patches, 2 cores: 0.90 -> 0.68 s per optimizer step
    (``scripts/bench.py training``)."""
    kind = torch.device(device).type
    return "bfloat16" if kind == "cpu" and cpu_has_fast_bf16() else None


def _check_dtype(dtype: str | None) -> str | None:
    if dtype not in (None, "float16", "bfloat16"):
        raise ValueError(f"autocast dtype must be None, 'float16' or 'bfloat16', got {dtype!r}")
    return dtype


def autocast(device: torch.device, dtype: str | None):
    """``torch.autocast`` of ``device``'s type to ``dtype``; a no-op context when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def network_divisor(network: Any, default: int = 16) -> tuple[int, int, int]:
    """Product of the network's strides per axis (DynUNet ``strides``), else ``default``."""
    strides = getattr(network, "strides", None)
    if not strides:
        return (default,) * 3  # type: ignore[return-value]
    div = [1, 1, 1]
    for s in strides:
        s = [int(s)] * 3 if isinstance(s, int) else [int(v) for v in s]
        div = [d * v for d, v in zip(div, s)]
    return tuple(div)  # type: ignore[return-value]


def _n_windows(size: int, window: int, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference places along an axis (same formula)."""
    if size <= window:
        return 1
    interval = max(1, int(window * (1 - overlap)))
    return int(math.ceil((size - window) / interval)) + 1


def fit_window(size: int, roi: int, divisor: int, overlap: float) -> int:
    """Smallest window (multiple of ``divisor``, at most ``roi`` rounded down to the divisor) that
    tiles ``size`` with no more windows than ``roi`` would: 200 voxels with roi 192 -> 2 windows of
    128, not 2 of 192; 90 voxels -> one window of 96."""
    roi = max(divisor, (roi // divisor) * divisor)
    target = _n_windows(size, roi, overlap)
    for w in range(divisor, roi + 1, divisor):
        if _n_windows(size, w, overlap) <= target:
            return w
    return roi


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


class AutocastInferer(SimpleInferer):
    """MONAI ``SimpleInferer`` whose forward pass runs under ``torch.autocast`` of the input's device
    (the training inferer: MONAI's trainer ``amp`` is CUDA only). Outputs are returned as float32,
    so the loss is computed in full precision; the backward pass follows autocast's casts.

    Args:
        dtype: ``None`` (plain float32 forward), ``"bfloat16"`` or ``"float16"``.
    """

    def __init__(self, dtype: str | None = None) -> None:
        super().__init__()
        self.dtype = _check_dtype(dtype)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        with autocast(inputs.device, self.dtype):
            out = network(inputs, *args, **kwargs)
        if self.dtype is None:
            return out
        if isinstance(out, (list, tuple)):
            return type(out)(o.float() for o in out)
        return out.float()


class FitSlidingWindowInferer(SlidingWindowInferer):
    """MONAI ``SlidingWindowInferer`` whose window is fitted to each input (see module docstring).

    Args:
        roi_size: largest window (voxels); the fitted window never exceeds it.
        sw_batch_size, overlap, mode: as ``SlidingWindowInferer`` (constant blending by default).
        autocast_dtype: ``None`` (float32), ``"float16"`` (CUDA) or ``"bfloat16"`` (CPU with
            AVX512-BF16/AMX, or CUDA): the network runs under ``torch.autocast`` of the input's
            device; scores are returned as float32.
        default_divisor: window multiple when the network has no ``strides``.
        mirror_axes: spatial axes (0 = X, 1 = Y, 2 = Z of the input) of mirroring test-time
            augmentation, as nnU-Net: the input is run once per combination of flips over these
            axes, each output flipped back, the logits averaged. ``()`` (default): one pass.
            Only meaningful for a network trained with mirroring: left/right classes (kidneys,
            adrenals) are told apart by their surroundings, not their side.
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "constant", autocast_dtype: str | None = None, default_divisor: int = 16,
                 mirror_axes: Sequence[int] = (), **kwargs: Any) -> None:
        super().__init__(roi_size=tuple(int(r) for r in roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                         mode=mode, cache_roi_weight_map=False, **kwargs)
        self.max_roi_size = tuple(int(r) for r in roi_size)
        self.autocast_dtype = _check_dtype(autocast_dtype)
        self.default_divisor = int(default_divisor)
        axes = tuple(int(a) for a in mirror_axes)
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2; got {list(mirror_axes)}")
        self.mirror_axes = axes

    def flip_combinations(self) -> list[tuple[int, ...]]:
        """Tensor dims flipped by each pass (``()`` = the input as is), in the order they run."""
        from itertools import combinations

        dims = [a + 2 for a in self.mirror_axes]
        return [c for k in range(len(dims) + 1) for c in combinations(dims, k)]

    def window_for(self, spatial_shape: Sequence[int], network: Any) -> tuple[int, ...]:
        """The fitted window for an input of ``spatial_shape``."""
        div = network_divisor(network, self.default_divisor)
        window = [fit_window(int(s), r, d, float(self.overlap)) for s, r, d in zip(spatial_shape, self.max_roi_size, div)]
        if all(w == d for w, d in zip(window, div)):  # 1x1x1 bottleneck: instance norm needs > 1 voxel
            window[0] *= 2
        return tuple(window)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Scores (B, C, *inputs.shape[2:]) as float32."""
        self.roi_size = self.window_for(inputs.shape[2:], network)
        total: torch.Tensor | None = None
        passes = self.flip_combinations()
        for dims in passes:
            x = torch.flip(inputs, dims) if dims else inputs
            with autocast(inputs.device, self.autocast_dtype):
                out = super().__call__(x, lambda t: _first_output(network(t, *args, **kwargs)))
            out = _first_output(out).float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
        assert total is not None
        return total if len(passes) == 1 else total.div_(len(passes))


class EnsembleInferer(Inferer):
    """Several fine networks merged by ordered class rules (seed 002's CFS: organs from the organ
    model, lesion from the averaged tumor models).

    Args:
        inferer: the window inferer every member runs through (a :class:`FitSlidingWindowInferer`).
        members: ``{"network": module | None, "checkpoint": path | None}`` each; ``network: None``
            is the network passed to ``__call__`` (the bundle's ``network_def`` with
            ``models/model.pt``, what MONAI Label loads). A member module that is the call's
            network or another member's (as a config's ``@network_def`` gives) is deep-copied
            before its checkpoint is loaded, so no member ever overwrites another's weights.
        rules: ordered ``{"members": [indices], "classes": [class ids]}``. Each rule averages the
            softmax of its members; the first gives the base prediction (its classes, background
            elsewhere); each later rule overwrites the voxels where its argmax is in its classes.

    Returns probabilities (B, C, X, Y, Z).
    """

    def __init__(self, inferer: Inferer, members: Sequence[Mapping[str, Any]], rules: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        if not members or not rules:
            raise ValueError("EnsembleInferer needs at least one member and one rule")
        self.inferer = inferer
        self.members: list[dict[str, Any]] = []
        seen: list[int] = []
        for m in members:
            net = m.get("network")
            if net is not None and id(net) in seen:
                net = copy.deepcopy(net)
            if net is not None:
                seen.append(id(net))
            ckpt = m.get("checkpoint")
            self.members.append({"network": net, "checkpoint": None if ckpt in (None, "") else str(ckpt), "loaded": False})
        self.rules = []
        for r in rules:
            idx = [int(i) for i in r["members"]]
            if not idx or any(i < 0 or i >= len(self.members) for i in idx):
                raise ValueError(f"rule {dict(r)} refers to members outside 0..{len(self.members) - 1}")
            self.rules.append({"members": idx, "classes": [int(c) for c in r["classes"]]})

    def _member_net(self, i: int, network: Any, device: torch.device) -> Any:
        m = self.members[i]
        if m["network"] is None:
            if network is None:
                raise ValueError(f"ensemble member {i} uses the call's network, but none was given")
            return network
        if m["network"] is network:  # the config handed the bundle's own module to a member
            m["network"] = copy.deepcopy(network)
        if not m["loaded"]:
            if m["checkpoint"] is not None:
                load_weights(m["network"], m["checkpoint"], what=f"ensemble member {i}")
            m["loaded"] = True
        return m["network"].to(device).eval()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache: dict[int, torch.Tensor] = {}

        def probs(i: int) -> torch.Tensor:
            if i not in cache:
                cache[i] = torch.softmax(self.inferer(inputs, self._member_net(i, network, inputs.device)), 1)
            return cache[i]

        merged: torch.Tensor | None = None
        for k, rule in enumerate(self.rules):
            p = torch.stack([probs(i) for i in rule["members"]]).mean(0)
            lab = p.argmax(1, keepdim=True)
            inside = torch.isin(lab, torch.tensor(rule["classes"], device=lab.device))
            if k == 0:
                background = torch.zeros_like(p)
                background[:, 0] = 1.0
                merged = torch.where(inside | (lab == 0), p, background)
            else:
                merged = torch.where(inside, p, merged)
        assert merged is not None
        return merged
