"""Marginal loss + exclusion loss for partially labeled multi-organ segmentation.

Shi, Xiao, Chen, Zhou: "Marginal loss and exclusion loss for partially supervised multi-organ
segmentation", Medical Image Analysis 70 (2021) 101979 (arXiv 2007.03868).

A partial label's background is a *merged* label: true background plus every class that was not
annotated for that case. Notation per case: ``p = softmax(logits)`` over C classes, ``A`` the
annotated foreground classes, ``M = {0} ∪ (foreground classes not in A)`` the merged set.

Marginal loss (the paper's marginal CE + marginal Dice)
    The merged background probability is the marginal ``q_0 = sum_{j in M} p_j``; annotated
    classes keep ``q_c = p_c``. Cross entropy and Dice are computed on ``q`` against the partial
    label, over the channels {0} ∪ A only (unannotated channels have no target; they are merged).
    With every class annotated this is exactly MONAI ``DiceCELoss(to_onehot_y=True,
    softmax=True)`` (same smoothing, mean over voxels for CE and over (case, class) for Dice).

    Gradient fact used by the tests: the marginal loss depends on the logits of M only through
    ``logsumexp_{j in M} z_j``, hence for j, j' in M:  dL/dz_j / p_j == dL/dz_j' / p_j'; the
    loss is invariant to any permutation of the logits inside M, and it gives no signal that
    redistributes probability among background and unannotated classes.

Exclusion loss
    Organs do not overlap: every voxel that the partial label marks as an annotated foreground
    class c is known *not* to be any other class. For an unannotated foreground class k the
    exclusion set is ``e_k = union of the annotated foreground masks = (label > 0)`` (annotated
    classes' own overlaps are already penalised by the marginal terms). Terms, per case:

    * exclusion Dice: ``sum_k 2 <e_k, p_k> / (|e_k| + sum p_k + eps)`` averaged over unannotated
      k -- a Dice *coefficient* to be minimised (0 when the prediction of k avoids e_k). No
      numerator smoothing, so an empty e_k or an empty prediction gives exactly 0.
    * exclusion CE: ``mean_voxels sum_k e_k * -log(1 - p_k)``, with ``log(1 - p_k)`` computed
      as ``logsumexp_{j != k} z_j - logsumexp_j z_j`` (finite for any logits).

    Interpretation notes: the paper's exact normalisation of the exclusion terms is not
    reproduced from its text here; the forms above are bounded, zero without overlap, and
    decrease monotonically as the overlap of p_k with e_k is removed (tested). As with any Dice
    coefficient, while some overlap remains the exclusion Dice can also be lowered by raising
    p_k outside e_k (its denominator); the pressure vanishes with the overlap.
    A class that no case in the training set annotates cannot be told apart from background
    by the marginal loss (both only ever appear merged).

Deep supervision: ``forward`` accepts one logits tensor (B, C, *S), a DynUNet training stack
(B, L, C, *S), or a list/tuple of tensors at any resolutions; lower-resolution heads get the
label resized with ``nearest-exact`` and weights from :class:`monai.losses.DeepSupervisionLoss`
(``weight_mode``). The ``annotated`` mask may also be packed into the target (see
:func:`pack_target`) so the loss works with two-argument callers such as MONAI's
``SupervisedTrainer`` and ``DeepSupervisionLoss``.

Also here (seed 000's loss option): :class:`SigmoidDiceBCELoss` (per-class sigmoid, BCE + Dice,
on MONAI ``DiceLoss(sigmoid=True)`` and ``DeepSupervisionLoss``), :func:`labels_to_multichannel`
(class ids -> one binary channel per foreground class) and :func:`sigmoid_logits_to_labels`
(the matching decode: best foreground class above a probability threshold, else background).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from monai.losses import DeepSupervisionLoss, DiceLoss
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from torch import nn

from abdoseg.labels import NUM_CLASSES

__all__ = [
    "MarginalExclusionLoss",
    "PackedTargetPrepareBatch",
    "pack_target",
    "unpack_target",
    "marginal_log_probs",
    "SigmoidDiceBCELoss",
    "labels_to_multichannel",
    "sigmoid_logits_to_labels",
]


def pack_target(label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Pack ``label`` (B, 1, *S) and ``annotated`` (B, C) bool into one float tensor (B, 1+C, *S).

    Channel 0 is the label, channels 1..C the annotated flags broadcast over space; nearest
    resizing (MONAI DeepSupervisionLoss) keeps it valid. Costs C extra label-sized channels.
    """
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, *spatial), got {tuple(label.shape)}")
    if annotated.ndim != 2 or annotated.shape[0] != label.shape[0]:
        raise ValueError(f"annotated must have shape (B, C) with B={label.shape[0]}, got {tuple(annotated.shape)}")
    spatial = label.shape[2:]
    flags = annotated.to(dtype=torch.float32, device=label.device).reshape(*annotated.shape, *([1] * len(spatial)))
    return torch.cat([label.float(), flags.expand(-1, -1, *spatial)], dim=1)


def unpack_target(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_target`: ``(label (B,1,*S) long, annotated (B,C) bool)``."""
    if target.shape[1] != 1 + num_classes:
        raise ValueError(f"packed target must have 1+{num_classes} channels, got {target.shape[1]}")
    label = target[:, :1].round().long()
    flat = target[:, 1:].reshape(target.shape[0], num_classes, -1)
    return label, flat[..., 0] > 0.5


class PackedTargetPrepareBatch(PrepareBatch):
    """``prepare_batch`` for MONAI ``SupervisedTrainer``: returns ``(image, packed target)``.

    The trainer calls ``loss_function(pred, target)`` with two arguments; packing the batch's
    (B, C) ``annotated`` mask (from :class:`abdoseg.data.transforms.AnnotatedClassesd`) into the
    target lets :class:`MarginalExclusionLoss` see it. A batch without ``annotated_key`` counts
    as fully annotated. Note: handlers that read the trainer's label (train-time metrics)
    would see the packed (B, 1+C, *S) target; take channel 0 there.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label",
                 annotated_key: str = "annotated", num_classes: int = NUM_CLASSES) -> None:
        self.image_key = image_key
        self.label_key = label_key
        self.annotated_key = annotated_key
        self.num_classes = int(num_classes)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):  # type: ignore[override]
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = convert_to_tensor(batchdata[self.label_key], track_meta=False)
        label = label.to(device=device, non_blocking=non_blocking)
        annotated = batchdata.get(self.annotated_key)
        if annotated is None:
            annotated = torch.ones(label.shape[0], self.num_classes, dtype=torch.bool)
        annotated = convert_to_tensor(annotated, track_meta=False).to(device=device, dtype=torch.bool)
        return image, pack_target(label, annotated)


def marginal_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log of the marginal distribution q, shape (B, C, *S).

    Channel 0 = ``log sum_{j in M} p_j`` (background + unannotated classes), annotated channels
    = ``log p_c``, unannotated channels = -inf (merged into channel 0).
    ``annotated``: (B, C) bool; its channel 0 is ignored (background is always merged).
    """
    b, c = logits.shape[:2]
    log_p = torch.log_softmax(logits, dim=1)
    ann = annotated.to(device=logits.device, dtype=torch.bool).clone()
    ann[:, 0] = False
    view = (b, c) + (1,) * (logits.ndim - 2)
    merged = (~ann).view(view)
    neg_inf = torch.finfo(log_p.dtype).min
    log_bg = torch.logsumexp(log_p.masked_fill(~merged, neg_inf), dim=1, keepdim=True)
    out = log_p.masked_fill(merged, neg_inf)
    return torch.cat([log_bg, out[:, 1:]], dim=1)


class MarginalExclusionLoss(nn.Module):
    """Marginal (CE + Dice) + exclusion (Dice + CE) loss for partial labels (Shi et al. 2021).

    Args:
        num_classes: C, including background (FLARE23: 15).
        lambda_ce, lambda_dice: weights of the marginal CE and marginal Dice terms.
        lambda_exclusion_dice, lambda_exclusion_ce: weights of the exclusion terms (0 disables).
        smooth_nr, smooth_dr: marginal Dice smoothing, as MONAI DiceLoss.
        weight_mode, weights: deep-supervision level weights, as MONAI DeepSupervisionLoss.

    ``forward(logits, label, annotated=None)``:
        logits: (B, C, *S) float; or (B, L, C, *S) (DynUNet deep-supervision stack); or a
            list/tuple of (B, C, *S_l) tensors, first = full resolution.
        label: (B, 1, *S) integer class ids (partial label); or a packed target (B, 1+C, *S)
            from :func:`pack_target` when ``annotated`` is None.
        annotated: (B, C) bool, True for classes annotated in that case (channel 0 ignored);
            None = all classes annotated (then the loss equals DiceCE).
        Returns a scalar tensor. A label voxel of a class not flagged annotated raises
        ValueError (the datalist's annotated_classes and the label disagree).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_exclusion_dice: float = 1.0,
        lambda_exclusion_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        exclusion_eps: float = 1e-5,
        weight_mode: str = "exp",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if min(lambda_ce, lambda_dice, lambda_exclusion_dice, lambda_exclusion_ce) < 0:
            raise ValueError("loss weights must be >= 0")
        self.num_classes = int(num_classes)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)
        self.lambda_exclusion_dice = float(lambda_exclusion_dice)
        self.lambda_exclusion_ce = float(lambda_exclusion_ce)
        self.exclusion_eps = float(exclusion_eps)
        self.dice = DiceLoss(
            include_background=True, to_onehot_y=False, softmax=False, reduction="none",
            smooth_nr=smooth_nr, smooth_dr=smooth_dr,
        )
        # only used for its level weights (MONAI's deep-supervision schedule)
        self._ds = DeepSupervisionLoss(self.dice, weight_mode=weight_mode, weights=list(weights) if weights else None)

    # ------------------------------------------------------------------ single level
    def _check(self, logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor) -> None:
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}, *spatial), got {tuple(logits.shape)}")
        if label.shape[0] != logits.shape[0] or label.shape[1] != 1 or label.shape[2:] != logits.shape[2:]:
            raise ValueError(f"label shape {tuple(label.shape)} does not match logits {tuple(logits.shape)} as (B, 1, *spatial)")
        if annotated.shape != (logits.shape[0], self.num_classes):
            raise ValueError(f"annotated must have shape (B, C)=({logits.shape[0]}, {self.num_classes}), got {tuple(annotated.shape)}")
        if label.numel():
            lo, hi = int(label.min()), int(label.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"label class ids must lie in 0..{self.num_classes - 1}, found {lo}..{hi}")

    @staticmethod
    def _check_annotated(onehot: torch.Tensor, annotated: torch.Tensor) -> None:
        present = onehot.flatten(2).amax(dim=2) > 0  # (B, C)
        bad = present & ~annotated
        bad[:, 0] = False
        if bool(bad.any()):
            b, c = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"batch item {b}: label contains class {c}, which is not flagged annotated")

    def components(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        annotated: torch.Tensor | None = None,
        exclusion: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Unweighted terms for one resolution level: marginal_ce, marginal_dice,
        exclusion_dice, exclusion_ce (scalars). Shapes as in ``forward`` (single tensor).
        ``exclusion=False`` skips the exclusion terms (returned as 0)."""
        label = label.long()
        b, c = logits.shape[:2]
        if annotated is None:
            annotated = torch.ones(b, c, dtype=torch.bool, device=logits.device)
        annotated = annotated.to(device=logits.device, dtype=torch.bool).clone()
        annotated[:, 0] = True
        self._check(logits, label, annotated)
        y = one_hot(label, c, dim=1)
        self._check_annotated(y, annotated)
        logits = logits.float()

        # marginal cross entropy
        log_q = marginal_log_probs(logits, annotated)
        ce = -torch.gather(log_q, 1, label).mean()

        # marginal Dice over channels {0} ∪ annotated
        q = torch.exp(log_q)  # unannotated channels underflow to exactly 0
        per = self.dice(q, y).reshape(b, c)
        w = annotated.to(per.dtype)
        dice = (per * w).sum() / w.sum()

        # exclusion terms over unannotated foreground classes
        unann = ~annotated
        unann[:, 0] = False
        zero = logits.sum() * 0.0
        if not exclusion or not bool(unann.any()):
            return {"marginal_ce": ce, "marginal_dice": dice, "exclusion_dice": zero, "exclusion_ce": zero}
        p = torch.softmax(logits, dim=1).flatten(2)  # (B, C, N)
        e = (label.flatten(2) > 0).to(p.dtype)  # (B, 1, N)
        inter = (p * e).sum(dim=2)  # (B, C)
        denom = e.sum(dim=2) + p.sum(dim=2) + self.exclusion_eps
        excl_dice_bc = 2.0 * inter / denom
        wu = unann.to(p.dtype)
        excl_dice = (excl_dice_bc * wu).sum() / wu.sum()

        # -log(1 - p_k), exact and finite: where k is not the arg-max, p_k <= 1/2 and log1p(-p_k)
        # is accurate; at the arg-max channel use logsumexp_{j != k} z_j - logsumexp_j z_j.
        flat = logits.flatten(2)  # (B, C, N)
        top = flat.argmax(dim=1, keepdim=True)  # (B, 1, N)
        is_top = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
        lse_all = torch.logsumexp(flat, dim=1, keepdim=True)
        lse_rest = torch.logsumexp(flat.masked_fill(is_top, torch.finfo(flat.dtype).min), dim=1, keepdim=True)
        log_not = torch.where(is_top, lse_rest - lse_all, torch.log1p(-p.clamp(max=0.5)))
        excl_ce = -(log_not * e * wu.unsqueeze(-1)).sum(dim=1).mean()
        return {"marginal_ce": ce, "marginal_dice": dice, "exclusion_dice": excl_dice, "exclusion_ce": excl_ce}

    def _single(self, logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor | None) -> torch.Tensor:
        t = self.components(logits, label, annotated, exclusion=bool(self.lambda_exclusion_dice or self.lambda_exclusion_ce))
        total = self.lambda_ce * t["marginal_ce"] + self.lambda_dice * t["marginal_dice"]
        if self.lambda_exclusion_dice:
            total = total + self.lambda_exclusion_dice * t["exclusion_dice"]
        if self.lambda_exclusion_ce:
            total = total + self.lambda_exclusion_ce * t["exclusion_ce"]
        return total

    # ------------------------------------------------------------------ public
    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        label: torch.Tensor,
        annotated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if annotated is None and label.ndim >= 3 and label.shape[1] == 1 + self.num_classes:
            label, annotated = unpack_target(label, self.num_classes)
        if isinstance(logits, torch.Tensor) and logits.ndim == label.ndim + 1:
            logits = list(torch.unbind(logits, dim=1))  # DynUNet (B, L, C, *S) stack
        if isinstance(logits, torch.Tensor):
            return self._single(logits, label, annotated)
        levels = list(logits)
        if not levels:
            raise ValueError("logits: empty list")
        weights = self._ds.get_weights(len(levels))
        total = logits[0].new_zeros(())
        for w, lg in zip(weights, levels):
            lab = label
            if lg.shape[2:] != label.shape[2:]:
                lab = F.interpolate(label.float(), size=lg.shape[2:], mode="nearest-exact")
            total = total + w * self._single(lg, lab, annotated)
        return total


# ---------------------------------------------------------------------------------------------
# Seed 000: sigmoid outputs, BCE + Dice
# ---------------------------------------------------------------------------------------------
def labels_to_multichannel(label: torch.Tensor, num_classes: int = NUM_CLASSES,
                           include_background: bool = False) -> torch.Tensor:
    """Integer class ids ``(B, 1, *S)`` -> binary float targets, one channel per class.

    Returns ``(B, num_classes, *S)`` (``include_background``) or ``(B, num_classes - 1, *S)``
    (channel k = class k + 1; background has no channel, a background voxel is all zeros).
    Uses :func:`monai.networks.utils.one_hot`; ids outside ``0..num_classes-1`` raise ValueError.
    """
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, *spatial), got {tuple(label.shape)}")
    if label.numel():
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"label class ids must lie in 0..{num_classes - 1}, found {lo}..{hi}")
    y = one_hot(label.long(), num_classes, dim=1, dtype=torch.float32)
    return y if include_background else y[:, 1:]


class SigmoidDiceBCELoss(nn.Module):
    """Seed 000's loss: per-class sigmoid, ``L = lambda_bce * BCE + lambda_dice * Dice``.

    Each output channel is an independent binary map (sigmoid), as in seed 000 ("a segmented
    probability map utilizing a sigmoid function", ``L_total = L_BCE + L_Dice``).

    * BCE: :func:`torch.nn.functional.binary_cross_entropy_with_logits` (mean over batch,
      channels and voxels).
    * Dice: :class:`monai.losses.DiceLoss` with ``sigmoid=True`` (mean over batch and channels;
      ``batch=True`` pools the batch first, as MONAI).
    * Deep supervision: :class:`monai.losses.DeepSupervisionLoss` (level weights, nearest-exact
      resizing of the target).

    Why not ``monai.losses.DiceCELoss(sigmoid=True)``: in MONAI 1.6 it uses BCE only for a
    single-channel output; with several channels it applies *softmax* cross entropy, which is
    not the paper's per-class BCE. For one foreground channel the two are equal (tested).

    Args:
        num_classes: C, class ids in the label including background (FLARE23: 15).
        include_background: False (default): the loss covers the foreground classes 1..C-1 only;
            the logits may have C channels (channel 0 is then ignored) or C-1 channels
            (foreground only); decode with :func:`sigmoid_logits_to_labels`. True: C channels,
            background is a class of its own (then the argmax of the logits, as used for softmax
            nets, is also a valid decode).
        lambda_dice, lambda_bce: term weights (>= 0).
        smooth_nr, smooth_dr, batch: as :class:`monai.losses.DiceLoss`.
        pos_weight: optional per-channel positive weight of the BCE (length = channels used).
        weight_mode, weights: deep-supervision level weights, as
            :class:`monai.losses.DeepSupervisionLoss`.

    ``forward(logits, target)``:
        logits: ``(B, K, *S)``; or a DynUNet training stack ``(B, L, K, *S)``; or a list/tuple of
            ``(B, K, *S_l)`` tensors (first = full resolution). K = C or C-1 (see above).
        target: integer ids ``(B, 1, *S)`` (converted by :func:`labels_to_multichannel`), or a
            binary (or soft) target with one channel per class the loss uses (with a single
            class, ``num_classes=2`` without background, the two forms coincide).
        Returns a scalar tensor.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        include_background: bool = False,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        pos_weight: Sequence[float] | torch.Tensor | None = None,
        weight_mode: str = "exp",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_bce < 0:
            raise ValueError("lambda_dice and lambda_bce must be >= 0")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.include_background = bool(include_background)
        self.lambda_dice = float(lambda_dice)
        self.lambda_bce = float(lambda_bce)
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, sigmoid=True, reduction="mean",
                             smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)
        self.pos_weight: torch.Tensor | None
        if pos_weight is not None:
            pw = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
            if pw.numel() != self.n_channels:
                raise ValueError(f"pos_weight needs {self.n_channels} values, got {pw.numel()}")
            self.register_buffer("pos_weight", pw)
        else:
            self.pos_weight = None
        self._ds = DeepSupervisionLoss(self._single, weight_mode=weight_mode,
                                       weights=list(weights) if weights else None)

    @property
    def n_channels(self) -> int:
        """Channels the loss is computed on: C with background, else C-1."""
        return self.num_classes if self.include_background else self.num_classes - 1

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if k == self.n_channels:
            return logits
        if not self.include_background and k == self.num_classes:
            return logits[:, 1:]
        allowed = [self.n_channels] if self.include_background else [self.num_classes, self.num_classes - 1]
        raise ValueError(f"logits have {k} channels; expected one of {allowed} "
                         f"(num_classes={self.num_classes}, include_background={self.include_background})")

    def _target(self, target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if target.shape[1] == self.n_channels:  # already one channel per class (binary or soft)
            return target.to(device=like.device, dtype=torch.float32)
        if target.shape[1] == 1:  # class ids
            return labels_to_multichannel(target, self.num_classes, self.include_background).to(like.device)
        raise ValueError(f"target has {target.shape[1]} channels; expected 1 (class ids) or {self.n_channels}")

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one resolution level: logits ``(B, K, *S)``, target ``(B, 1 or K', *S)``."""
        z = self._select(logits).float()
        if target.ndim != z.ndim or target.shape[2:] != z.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(z.shape)}")
        y = self._target(target, z)
        total = z.new_zeros(())
        if self.lambda_bce:
            pw = None
            if self.pos_weight is not None:
                pw = self.pos_weight.to(z.device).reshape(-1, *([1] * (z.ndim - 2)))
            total = total + self.lambda_bce * F.binary_cross_entropy_with_logits(z, y, pos_weight=pw)
        if self.lambda_dice:
            total = total + self.lambda_dice * self.dice(z, y)
        return total

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor) and logits.ndim == target.ndim + 1:
            logits = list(torch.unbind(logits, dim=1))  # DynUNet (B, L, K, *S) stack
        if isinstance(logits, (list, tuple)):
            if not logits:
                raise ValueError("logits: empty list")
            # MONAI resizes the target with nearest-exact: integer ids stay valid ids
            return self._ds(list(logits), target if torch.is_floating_point(target) else target.float())
        return self._single(logits, target)


def sigmoid_logits_to_labels(logits: torch.Tensor, threshold: float = 0.5, has_background_channel: bool = True,
                             dim: int = 1) -> torch.Tensor:
    """Decode per-class sigmoid outputs into integer class ids (inverse of the target encoding of
    :class:`SigmoidDiceBCELoss` with ``include_background=False``).

    A voxel gets the foreground class with the highest logit when that class's probability
    exceeds ``threshold``, else background (0). Works on logits (sigmoid is monotone: the test is
    ``z > log(t / (1 - t))``), so no probabilities are materialised.

    Args:
        logits: channel axis ``dim``; e.g. ``(B, C, *S)`` (``dim=1``) or ``(C, *S)`` (``dim=0``).
        threshold: probability threshold in (0, 1).
        has_background_channel: True: channel 0 is background and is ignored (C channels for
            classes 0..C-1); False: channel k is class k + 1 (C-1 foreground channels).
        dim: the channel axis.
    Returns:
        int64 class ids with the channel axis kept (size 1), e.g. ``(B, 1, *S)``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    fg = logits.narrow(dim, 1, logits.shape[dim] - 1) if has_background_channel else logits
    if fg.shape[dim] < 1:
        raise ValueError("logits need at least one foreground channel")
    best, idx = fg.max(dim=dim, keepdim=True)
    cut = math.log(threshold / (1.0 - threshold))
    return torch.where(best > cut, idx + 1, torch.zeros_like(idx))
