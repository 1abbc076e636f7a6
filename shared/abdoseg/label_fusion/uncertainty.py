"""Pseudo-label uncertainty score of seed 001 (equation 1) and case selection.

Seed 001 (cascaded Pocket U-Net) trains the detail network in rounds; each round's network
pseudo-labels the partially labeled and unlabeled cases. A case's uncertainty score measures
how much its pseudo label changes between consecutive rounds:

    us = 1/N * sum_{i=1..N} SUM(v_i != v_{i-1}) / SUM(v_i > 0)

where ``v_i`` is the pseudo label (all voxels) of round ``i``: the number of voxels whose label
changed, relative to the foreground voxel count of the *later* round. Cases with a score under a
pre-defined threshold are kept for the final training.

Interpretations:

* The paper's equation sums i = 1..3 with 1/3 (four label maps v_0..v_3) while its text says the
  score averages the pairs (round 1, round 2) and (round 2, round 3) of three rounds. Here the
  score is the mean over *all consecutive pairs of the label maps given*: three maps -> two
  pairs (the text), four maps -> three pairs (the equation).
* Empty denominators (round ``i`` has no foreground): if nothing changed either (both rounds
  empty) the pair's ratio is 0.0 (a stable, if empty, prediction); if voxels changed (the
  foreground vanished) the ratio is ``inf``, so the case's score is ``inf`` and it is never
  selected.
* A ratio can exceed 1 (changes also count voxels that left the foreground).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["pair_change_ratio", "uncertainty_score", "select_cases"]


def pair_change_ratio(previous: np.ndarray, current: np.ndarray) -> float:
    """``#(current != previous) / #(current > 0)`` for two label maps of the same shape.

    Both empty -> 0.0; ``current`` empty but labels changed -> ``inf``.
    """
    prev = np.asarray(previous)
    cur = np.asarray(current)
    if prev.shape != cur.shape:
        raise ValueError(f"pseudo labels of consecutive rounds differ in shape: {prev.shape} vs {cur.shape}")
    changed = int(np.count_nonzero(cur != prev))
    foreground = int(np.count_nonzero(cur > 0))
    if foreground == 0:
        return 0.0 if changed == 0 else math.inf
    return changed / foreground


def uncertainty_score(rounds: Sequence[np.ndarray]) -> float:
    """Seed 001 equation 1: mean of :func:`pair_change_ratio` over consecutive rounds.

    Args:
        rounds: pseudo label maps of one case in round order (at least two), same shape.

    Returns:
        the uncertainty score (0 = identical in every round; ``inf`` see module notes).
    """
    if len(rounds) < 2:
        raise ValueError(f"uncertainty score needs pseudo labels of at least 2 rounds, got {len(rounds)}")
    ratios = [pair_change_ratio(rounds[i - 1], rounds[i]) for i in range(1, len(rounds))]
    return float(sum(ratios) / len(ratios))


def select_cases(
    scores: Mapping[str, float],
    threshold: float | None = None,
    keep_fraction: float | None = None,
) -> tuple[list[str], list[str]]:
    """Split cases into (selected, rejected) by uncertainty score.

    Args:
        scores: ``{case_id: uncertainty score}``.
        threshold: keep cases with ``score < threshold`` (seed 001: "under a pre-defined
            threshold").
        keep_fraction: in [0, 1]; keep the ``floor(keep_fraction * n_cases)`` lowest-scoring
            cases (ties broken by case id). With ``threshold`` too, a case must pass both.

    Non-finite scores (``inf``, ``nan``) are always rejected. At least one of ``threshold`` and
    ``keep_fraction`` is required.

    Returns:
        ``(selected, rejected)``: case ids, each list ordered by (score, case id); nan last.
    """
    if threshold is None and keep_fraction is None:
        raise ValueError("select_cases needs threshold and/or keep_fraction")
    if keep_fraction is not None and not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")

    def key(cid: str) -> tuple[float, str]:
        s = float(scores[cid])
        return (math.inf if math.isnan(s) else s, cid)

    ranked = sorted(scores, key=key)
    n_keep = len(ranked) if keep_fraction is None else int(math.floor(keep_fraction * len(ranked) + 1e-9))
    selected, rejected = [], []
    for rank, cid in enumerate(ranked):
        s = float(scores[cid])
        ok = math.isfinite(s) and rank < n_keep and (threshold is None or s < threshold)
        (selected if ok else rejected).append(cid)
    return selected, rejected
