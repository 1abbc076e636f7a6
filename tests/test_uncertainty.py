"""Seed 001 uncertainty score (equation 1) and case selection."""

import math

import numpy as np
import pytest

from abdoseg.label_fusion.uncertainty import pair_change_ratio, select_cases, uncertainty_score


def test_pair_ratio_counts_changes_over_later_foreground():
    prev = np.array([0, 1, 1, 2, 2, 0, 0, 0])
    cur = np.array([0, 1, 2, 2, 0, 3, 0, 0])
    # changed: idx 2 (1->2), 4 (2->0), 5 (0->3) = 3; foreground of cur: idx 1,2,3,5 = 4
    assert pair_change_ratio(prev, cur) == pytest.approx(3 / 4)
    # the denominator is the later round's foreground, so the ratio is not symmetric
    assert pair_change_ratio(np.array([1, 1, 0]), np.array([0, 1, 0])) == pytest.approx(1.0)
    assert pair_change_ratio(np.array([0, 1, 0]), np.array([1, 1, 0])) == pytest.approx(0.5)


def test_empty_denominators():
    z = np.zeros((2, 3), np.uint8)
    f = z.copy()
    f[0, 0] = 4
    assert pair_change_ratio(z, z) == 0.0
    assert pair_change_ratio(f, z) == math.inf
    assert uncertainty_score([z, z, z]) == 0.0
    assert uncertainty_score([f, z, z]) == math.inf


def test_score_is_mean_over_consecutive_pairs():
    v1 = np.array([1, 1, 1, 1, 0, 0])
    v2 = np.array([1, 1, 1, 2, 0, 0])  # 1 change / 4 fg = 0.25
    v3 = np.array([1, 1, 0, 2, 0, 0])  # 1 change / 3 fg = 1/3
    assert uncertainty_score([v1, v2, v3]) == pytest.approx((0.25 + 1 / 3) / 2)
    assert uncertainty_score([v1, v1, v1]) == 0.0
    # four maps (the equation's v_0..v_3) -> three pairs
    assert uncertainty_score([v1, v2, v3, v3]) == pytest.approx((0.25 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        uncertainty_score([v1])
    with pytest.raises(ValueError, match="differ in shape"):
        uncertainty_score([v1, v1[:-1]])


def test_select_by_threshold_and_fraction():
    scores = {"a": 0.05, "b": 0.2, "c": 0.01, "d": math.inf, "e": 0.1, "f": float("nan")}
    sel, rej = select_cases(scores, threshold=0.1)
    assert sel == ["c", "a"]  # strictly under 0.1
    assert rej == ["e", "b", "d", "f"]
    sel, rej = select_cases(scores, keep_fraction=0.5)  # floor(3.0) = 3 lowest
    assert sel == ["c", "a", "e"]
    assert set(rej) == {"b", "d", "f"}
    sel, _ = select_cases(scores, keep_fraction=1.0)
    assert sel == ["c", "a", "e", "b"]  # non-finite never selected
    sel, _ = select_cases(scores, threshold=0.08, keep_fraction=0.5)
    assert sel == ["c", "a"]
    assert select_cases({}, threshold=1.0) == ([], [])


def test_select_ties_are_deterministic_and_bad_args_rejected():
    scores = {"z": 0.1, "y": 0.1, "x": 0.1}
    assert select_cases(scores, keep_fraction=0.34)[0] == ["x"]
    with pytest.raises(ValueError):
        select_cases(scores)
    with pytest.raises(ValueError):
        select_cases(scores, keep_fraction=1.5)
