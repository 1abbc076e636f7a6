"""Label fusion rules of the seed papers: pure numpy functions on integer label maps.

All functions take label arrays of any (identical) shape holding FLARE23 class ids
(0 background, 1..13 organs, 14 lesion; see :mod:`abdoseg.labels`), never modify their
inputs, and return a new array with the dtype of the first label argument.

Rules
-----
``seed003`` (Fine and Swift nnU-Nets with Label Fusion, seed 003, section "Label Fusion
Algorithm", Fig. 3):

* labeled cases -- :func:`fuse_labeled`: organs (1-13) are the union of pseudo labels A and B;
  where A and B mark *different* organs, majority voting with the partial label; if all three
  point to different organs the voxel becomes background; the partial label's tumour is
  overlaid last.
* unlabeled cases -- :func:`fuse_unlabeled`: the same with the team's own teacher output S1
  as the referee; tumour = majority vote of S1, S2, S3 (three teacher checkpoints), overlaid
  last.

``seed004`` (Two-stage training with weak labels, seed 004, "Weak Label Supplement") --
:func:`supplement_weak_label`: per organ class, if the class is present in the weak label its
voxels are kept and the teacher's prediction of it is discarded; otherwise the weak label's
background voxels predicted as that class by the teacher get the class. The tumour is never
pseudo-labeled.

``seed001`` (Semi-supervised cascaded Pocket U-Net, seed 001, "Semi-supervised learning") --
:func:`fill_from_prediction`: the round rule. A partially labeled case keeps its annotated
voxels ("the labeled portions remain unaltered") and every unannotated class -- the lesion
included -- is filled from the previous round's prediction ("the unlabeled portions within the
partially labeled data are supplemented with the generated pseudo labels"); an unlabeled case
takes the prediction entirely ("the unlabeled data are entirely assigned pseudo labels").
Unlike seed 004 the lesion is pseudo-labeled when the case does not annotate it.

Interpretations (the papers leave these open; chosen here and tested):

* "Union" of A and B: a voxel where exactly one of A, B is an organ takes that organ; where
  both mark the same organ it keeps it; where both are 0 it stays background (seed 003 states
  "all algorithmic processing was centered on the nonzero mask regions of the provided
  pseudo-labels").
* Majority voting among {A, B, referee} with A != B (both organs) has a majority only when the
  referee equals A or B. A referee value of 0 (background / not annotated) or 14 (tumour) or a
  third organ is "all three differ" -> background (the tumour overlay may then set it to 14).
* The paper does not let the partial label's annotated organs override A and B: an annotated
  organ voxel where A and B agree on another organ (or both are 0) follows A/B. Pass
  ``keep_annotated=True`` to :func:`fuse_labeled` to make every annotated organ's mask exactly
  the partial label's (extension, not in the paper; default follows the paper).
* seed 001: a voxel that the partial label leaves at 0 but the prediction marks as a class the
  case *annotates* stays 0 (the annotation says it is not that class); only predictions of
  unannotated classes fill background voxels; annotated voxels never change.
* seed 004 decides "annotated" by the class *appearing* in the weak label. Here
  ``annotated_classes`` (the datalist's list) is used when given, which also keeps an
  annotated-but-absent organ (e.g. a removed gallbladder) from being filled in; ``None`` falls
  back to the paper's "appears in the label".
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from abdoseg.labels import LABELS, LESION_ID, ORGAN_IDS

__all__ = [
    "fuse_organs",
    "fuse_labeled",
    "fuse_unlabeled",
    "majority_lesion",
    "supplement_weak_label",
    "fill_from_prediction",
    "fusion_report",
    "apply_rule",
    "RULES",
]


def _as_labels(name: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.equal(np.mod(a, 1), 0)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name}: label array must hold integer class ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > LESION_ID):
        raise ValueError(f"{name}: class ids must lie in 0..{LESION_ID}, found {int(a.min())}..{int(a.max())}")
    return a


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"label arrays differ in shape: {shapes}")


def _organ_only(name: str, a: np.ndarray) -> None:
    if a.size and a.max() > max(ORGAN_IDS):
        raise ValueError(f"{name}: an organ pseudo label must hold only classes 0..{max(ORGAN_IDS)}, found {int(a.max())}")


def _present(a: np.ndarray) -> set[int]:
    """Class ids present in a validated label array (bincount: linear time, unlike np.unique)."""
    if a.size == 0:
        return set()
    return {int(c) for c in np.flatnonzero(np.bincount(a.ravel(), minlength=LESION_ID + 1))}


def _annotated_set(partial: np.ndarray, annotated_classes: Iterable[int] | None, name: str = "partial") -> set[int]:
    present = _present(partial) - {0}
    if annotated_classes is None:
        return present
    annotated = {int(c) for c in annotated_classes} - {0}
    bad = sorted(present - annotated)
    if bad:
        raise ValueError(f"{name}: holds classes {bad} that are not in annotated_classes {sorted(annotated)}")
    return annotated


def fuse_organs(pseudo_a: np.ndarray, pseudo_b: np.ndarray, referee: np.ndarray) -> np.ndarray:
    """Organ part of seed 003's label fusion (steps 1-3), shape and dtype of ``pseudo_a``.

    1. Union of A and B: where only one is non-zero, or both agree, that value.
    2. Where A and B mark different organs, majority vote with ``referee`` (partial label for
       labeled cases, teacher output S1 for unlabeled cases): the referee decides only when it
       equals A or B.
    3. All three differ (referee 0, 14 or a third organ) -> background (0).

    Returns only organ ids 0..13 (the referee's tumour never enters here).
    """
    a = _as_labels("pseudo_a", pseudo_a)
    b = _as_labels("pseudo_b", pseudo_b)
    r = _as_labels("referee", referee)
    _same_shape(pseudo_a=a, pseudo_b=b, referee=r)
    _organ_only("pseudo_a", a)
    _organ_only("pseudo_b", b)
    out = np.where(a != 0, a, b).astype(np.asarray(pseudo_a).dtype, copy=True)
    conflict = (a != 0) & (b != 0) & (a != b)
    vote = np.where(r == a, a, np.where(r == b, b, 0))
    out[conflict] = vote[conflict]
    return out


def majority_lesion(votes: Sequence[np.ndarray], lesion_id: int = LESION_ID) -> np.ndarray:
    """Bool mask where a strict majority of ``votes`` (label maps) mark ``lesion_id``.

    With three votes (S1, S2, S3 in seed 003) this is the 2-of-3 vote.
    """
    if len(votes) == 0:
        raise ValueError("lesion_votes: need at least one label map")
    arrs = [_as_labels(f"lesion_votes[{i}]", v) for i, v in enumerate(votes)]
    _same_shape(**{f"lesion_votes[{i}]": v for i, v in enumerate(arrs)})
    count = np.zeros(arrs[0].shape, dtype=np.int32)
    for v in arrs:
        count += v == lesion_id
    return 2 * count > len(arrs)


def fuse_labeled(
    partial: np.ndarray,
    pseudo_a: np.ndarray,
    pseudo_b: np.ndarray,
    annotated_classes: Iterable[int] | None = None,
    keep_annotated: bool = False,
) -> np.ndarray:
    """Seed 003 label fusion for a labeled (partially annotated) case.

    Args:
        partial: partial label (FLARE ids; unannotated classes are 0), any shape.
        pseudo_a, pseudo_b: 13-organ pseudo labels A (aladdin5) and B (blackbean), same shape.
        annotated_classes: the case's annotated class ids; ``None`` = classes present in
            ``partial``. ``partial`` may not contain a class outside this list (ValueError).
        keep_annotated: extension (not in the paper): each annotated organ's mask is set to
            exactly the partial label's mask (fused voxels of that organ outside it become 0).

    Returns:
        fused label, dtype of ``partial``: organs from :func:`fuse_organs` with ``partial`` as the
        referee, then the partial label's lesion (14) overlaid last.
    """
    p = _as_labels("partial", partial)
    annotated = _annotated_set(p, annotated_classes)
    organs_ref = np.where(p == LESION_ID, 0, p)
    out = fuse_organs(pseudo_a, pseudo_b, organs_ref).astype(np.asarray(partial).dtype)
    if keep_annotated:
        for c in sorted(annotated & set(ORGAN_IDS)):
            out[(out == c) & (p != c)] = 0
            out[p == c] = c
    out[p == LESION_ID] = LESION_ID
    return out


def fuse_unlabeled(
    s1: np.ndarray,
    pseudo_a: np.ndarray,
    pseudo_b: np.ndarray,
    lesion_votes: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Seed 003 label fusion for an unlabeled case.

    Args:
        s1: teacher prediction S1 (the latest Fine nnU-Net checkpoint), the organ referee.
        pseudo_a, pseudo_b: 13-organ pseudo labels A and B.
        lesion_votes: teacher predictions voting on the lesion, e.g. ``(s1, s2, s3)``;
            a voxel is lesion where a strict majority (2 of 3) marks 14. ``None`` = ``(s1,)``.

    Returns:
        fused label, dtype of ``s1``: organs from :func:`fuse_organs` with S1 as referee, then
        the voted lesion overlaid.
    """
    s = _as_labels("s1", s1)
    votes = (s,) if lesion_votes is None else tuple(lesion_votes)
    lesion = majority_lesion(votes)
    if lesion.shape != s.shape:
        raise ValueError(f"lesion_votes shape {lesion.shape} differs from s1 shape {s.shape}")
    out = fuse_organs(pseudo_a, pseudo_b, np.where(s == LESION_ID, 0, s)).astype(np.asarray(s1).dtype)
    out[lesion] = LESION_ID
    return out


def supplement_weak_label(
    partial: np.ndarray,
    teacher: np.ndarray,
    annotated_classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Seed 004 weak-label supplement, dtype of ``partial``.

    For each organ class c (1..13): if c is annotated, the partial label's voxels of c are kept
    and the teacher's c is discarded; otherwise the partial label's background voxels that the
    teacher predicts as c become c. Annotated voxels (organs and lesion) are never changed; the
    lesion is never pseudo-labeled (a teacher 14 is ignored).

    Args:
        partial: weak (partial) label.
        teacher: teacher prediction (full label map), same shape.
        annotated_classes: annotated class ids; ``None`` = classes appearing in ``partial``
            (the paper's criterion).
    """
    p = _as_labels("partial", partial)
    t = _as_labels("teacher", teacher)
    _same_shape(partial=p, teacher=t)
    annotated = _annotated_set(p, annotated_classes)
    out = np.array(partial, copy=True)
    background = p == 0
    for c in ORGAN_IDS:
        if c in annotated:
            continue
        out[background & (t == c)] = c
    return out


def fill_from_prediction(
    partial: np.ndarray | None,
    prediction: np.ndarray,
    annotated_classes: Iterable[int] | None = None,
) -> np.ndarray:
    """Seed 001 round rule: fill every unannotated class (lesion included) from the prediction.

    Voxel rule: the partial label's non-zero voxels are kept; a partial-label background voxel
    takes the prediction's class when that class is *not* annotated in the case (organs 1-13 and
    the lesion 14 alike), and stays 0 otherwise (the prediction of an annotated class outside
    its annotated mask is discarded). ``partial=None`` (an unlabeled case) returns a copy of the
    prediction: nothing is annotated.

    Args:
        partial: partial label (FLARE ids, unannotated classes are 0), or None for an unlabeled
            case.
        prediction: the previous round's prediction (full label map 0..14), same shape.
        annotated_classes: the case's annotated class ids (datalist ``annotated_classes``);
            ``None`` = classes present in ``partial``. ``partial`` may not hold a class outside
            this list (ValueError).
    Returns:
        the filled label, dtype of ``partial`` (of ``prediction`` when ``partial`` is None).
    """
    t = _as_labels("prediction", prediction)
    if partial is None:
        return np.array(prediction, copy=True)
    p = _as_labels("partial", partial)
    _same_shape(partial=p, prediction=t)
    annotated = _annotated_set(p, annotated_classes)
    fill_ids = [c for c in (*ORGAN_IDS, LESION_ID) if c not in annotated]
    out = np.array(partial, copy=True)
    if fill_ids:
        lut = np.zeros(LESION_ID + 1, dtype=bool)
        lut[fill_ids] = True
        fill = (p == 0) & lut[t]
        out[fill] = t[fill]
    return out


def fusion_report(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Voxel changes made by a fusion rule, JSON-ready.

    Returns ``{"total_voxels", "changed_voxels", "changed_fraction", "classes": {name:
    {"id", "before", "after", "gained", "lost"}}}`` for every class present in either array;
    ``gained`` = voxels that became the class, ``lost`` = voxels that stopped being it.
    """
    b = _as_labels("before", before)
    a = _as_labels("after", after)
    _same_shape(before=b, after=a)
    changed = b != a
    n = int(b.size)
    classes: dict[str, dict[str, int]] = {}
    nb = np.bincount(b.ravel(), minlength=LESION_ID + 1)
    na = np.bincount(a.ravel(), minlength=LESION_ID + 1)
    ids = [int(c) for c in np.flatnonzero(nb + na)]
    ng = np.bincount(a[changed].ravel(), minlength=LESION_ID + 1)
    nl = np.bincount(b[changed].ravel(), minlength=LESION_ID + 1)
    for c in ids:
        classes[LABELS[c]] = {"id": c, "before": int(nb[c]), "after": int(na[c]), "gained": int(ng[c]), "lost": int(nl[c])}
    n_changed = int(changed.sum())
    return {
        "total_voxels": n,
        "changed_voxels": n_changed,
        "changed_fraction": (n_changed / n) if n else 0.0,
        "classes": classes,
    }


def _seed003(**arrays: Any) -> np.ndarray:
    if "partial" in arrays:
        return fuse_labeled(**arrays)
    if "s1" in arrays:
        return fuse_unlabeled(**arrays)
    raise ValueError("rule 'seed003' needs either 'partial' (labeled case) or 's1' (unlabeled case)")


def _seed001(**arrays: Any) -> np.ndarray:
    if "prediction" not in arrays:
        raise ValueError("rule 'seed001' needs 'prediction' (the previous round's prediction) and, for a "
                         "labeled case, 'partial'")
    arrays.setdefault("partial", None)
    return fill_from_prediction(**arrays)


RULES = {
    "seed001": _seed001,
    "seed003": _seed003,
    "seed003_labeled": fuse_labeled,
    "seed003_unlabeled": fuse_unlabeled,
    "seed004": supplement_weak_label,
}


def apply_rule(rule_name: str, **arrays: Any) -> np.ndarray:
    """Apply a fusion rule by name (for bundle JSON configs).

    ``"seed003"``: :func:`fuse_labeled` when ``partial`` is given, else :func:`fuse_unlabeled`
    (needs ``s1``); ``"seed003_labeled"`` / ``"seed003_unlabeled"`` force one;
    ``"seed004"``: :func:`supplement_weak_label` (``partial``, ``teacher``);
    ``"seed001"``: :func:`fill_from_prediction` (``prediction``, plus ``partial`` for a labeled
    case; without ``partial`` the prediction is the label). Keyword arguments
    are passed to the rule (e.g. ``annotated_classes``, ``keep_annotated``, ``lesion_votes``).
    """
    try:
        rule = RULES[rule_name]
    except KeyError:
        raise ValueError(f"unknown fusion rule {rule_name!r}; known: {sorted(RULES)}") from None
    try:
        return rule(**arrays)
    except TypeError as exc:
        raise ValueError(f"fusion rule {rule_name!r}: {exc}") from exc
