"""FLARE23 DSC/NSD: cross-checked against DeepMind's surface-distance package and hand-made cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from abdoseg.labels import NSD_TOLERANCE_MM
from abdoseg.evaluation.metrics import (dice, evaluate_case, normalized_surface_dice, surface_distances,
                             surfel_area_table)

import surface_distance as sd  # a test dependency (pyproject [test]): missing must fail, not skip


def _ref_nsd(gt: np.ndarray, pred: np.ndarray, spacing, tol: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        d = sd.compute_surface_distances(gt.astype(bool), pred.astype(bool), spacing)
    return float(sd.compute_surface_dice_at_tolerance(d, tol))


def _blob(rng, shape, sigma=1.5, level=0.5) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def _ball(shape, center, radius_mm, spacing) -> np.ndarray:
    grid = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)], indexing="ij")
    return sum(g ** 2 for g in grid) <= radius_mm ** 2


def test_lookup_table_matches_package():
    from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

    for spacing in [(1.0, 1.0, 1.0), (0.7, 0.8, 2.5), (0.8, 0.8, 2.5), (3.0, 2.0, 1.0), (0.57, 0.57, 1.6)]:
        np.testing.assert_array_equal(surfel_area_table(spacing), create_table_neighbour_code_to_surface_area(spacing))


def test_nsd_matches_package_on_random_blobs():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(25):
        shape = tuple(int(s) for s in rng.integers(6, 24, 3))
        gt, pred = _blob(rng, shape), _blob(rng, shape)
        if not gt.any() or not pred.any():
            continue
        spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, 3))
        for tol in (0.5, 1.0, 2.0, 3.0, 7.0):
            ref = _ref_nsd(gt, pred, spacing, tol)
            for method in ("edt", "kdtree", "auto"):
                assert normalized_surface_dice(gt, pred, spacing, tol, method=method) == pytest.approx(ref, abs=1e-6)
            checked += 1
    assert checked >= 60


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (2.0, 1.0, 0.5)])
def test_nsd_matches_package_on_spheres_and_cubes(spacing):
    shape = (40, 40, 24)
    gt = _ball(shape, (19, 20, 11), 9.0, spacing)
    pred = _ball(shape, (21, 19, 12), 10.5, spacing)
    cube_a = np.zeros(shape, bool)
    cube_a[5:25, 8:30, 4:16] = True
    cube_b = np.zeros(shape, bool)
    cube_b[7:27, 8:31, 3:15] = True
    for a, b in [(gt, pred), (cube_a, cube_b), (gt, cube_b)]:
        for tol in (1.0, 2.0, 3.0, 5.0):
            ref = _ref_nsd(a, b, spacing, tol)
            for method in ("edt", "kdtree"):
                ours = normalized_surface_dice(a, b, spacing, tol, method=method)
                assert ours == pytest.approx(ref, abs=1e-6)
                assert 0.0 <= ours <= 1.0
    # distances to the other surface match the package (as multisets); the k-d tree may pick a
    # different one of several equally near points, whose distance can differ in the last bit
    ref = sd.compute_surface_distances(gt, pred, spacing)
    for method in ("edt", "kdtree"):
        ours = surface_distances(gt, pred, spacing, method=method)
        for key in ref:
            np.testing.assert_allclose(np.sort(ours[key]), np.sort(ref[key]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (0.7, 0.7, 2.5)])
def test_box_surface_area_is_analytic(spacing):
    """Marching-cubes surface of an n0 x n1 x n2 voxel box: faces inset by half a voxel,
    a chamfer strip along each of the 12 edges and a triangle at each of the 8 corners."""
    n = (7, 9, 11)
    box = np.zeros((10, 12, 14), bool)
    box[1:8, 1:10, 1:12] = True
    s0, s1, s2 = spacing
    l0, l1, l2 = ((k - 1) * s for k, s in zip(n, spacing))
    faces = 2 * (l1 * l2 + l0 * l2 + l0 * l1)
    edges = 4 * (l0 * math.hypot(s1, s2) + l1 * math.hypot(s0, s2) + l2 * math.hypot(s0, s1)) / 2
    corners = 8 * math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8
    area = surface_distances(box, box, spacing)["surfel_areas_gt"].sum()
    assert area == pytest.approx(faces + edges + corners, rel=1e-12)


def test_nsd_identical_far_and_tolerance():
    shape = (30, 30, 30)
    a = np.zeros(shape, bool)
    a[5:12, 5:12, 5:12] = True
    assert normalized_surface_dice(a, a, (1, 1, 1), 0.0) == pytest.approx(1.0)
    far = np.zeros(shape, bool)
    far[20:27, 20:27, 20:27] = True
    assert normalized_surface_dice(a, far, (1, 1, 1), 5.0) == 0.0
    assert normalized_surface_dice(a, far, (1, 1, 1), 100.0) == pytest.approx(1.0)
    # shift by 3 voxels along x: every surfel is within 3 mm at 1 mm spacing, not at 3 mm spacing
    b = np.roll(a, 3, axis=0)
    assert normalized_surface_dice(a, b, (1, 1, 1), 3.0) == pytest.approx(1.0)
    assert normalized_surface_dice(a, b, (1, 1, 1), 2.0) < 1.0
    assert normalized_surface_dice(a, b, (3, 1, 1), 3.0) < 1.0  # anisotropic spacing is used


def test_dice_and_empty_conventions():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert dice(a, b) == 1.0
    assert normalized_surface_dice(a, b, (1, 1, 1), 2.0) == 1.0
    a[0, 0, :3] = True  # 3 voxels
    assert dice(a, b) == 0.0 and normalized_surface_dice(a, b, (1, 1, 1), 2.0) == 0.0
    assert dice(b, a) == 0.0 and normalized_surface_dice(b, a, (1, 1, 1), 2.0) == 0.0
    b[0, 0, 2:4] = True  # 2 voxels, 1 shared
    assert dice(a, b) == pytest.approx(2 * 1 / 5)


def test_evaluate_case_empty_rules():
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = np.zeros((8, 8, 8), np.uint8)
    gt[1:4, 1:4, 1:4] = 1  # liver only in GT
    pred[4:7, 4:7, 4:7] = 3  # spleen only in prediction
    res = evaluate_case(gt, pred, (1, 1, 1))
    assert set(res) == set(range(1, 15))
    assert res[1] == (0.0, 0.0)  # GT only
    assert res[3] == (0.0, 0.0)  # prediction only
    for c in (2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14):
        assert res[c] == (1.0, 1.0)  # both empty
    res = evaluate_case(gt, gt, (1, 1, 1))
    assert res[1] == (1.0, 1.0)


def test_dsc_threshold_sets_nsd_to_zero():
    gt = np.zeros((40, 3, 3), np.uint8)
    pred = np.zeros((40, 3, 3), np.uint8)
    gt[0:20, 1, 1] = 1
    pred[17:37, 1, 1] = 1  # 3 of 20 voxels shared -> DSC = 6/40 = 0.15
    res02 = evaluate_case(gt, pred, (1, 1, 1), nsd_dsc_threshold=0.2, classes=[1])
    res01 = evaluate_case(gt, pred, (1, 1, 1), nsd_dsc_threshold=0.1, classes=[1])
    assert res02[1][0] == pytest.approx(0.15) and res01[1][0] == pytest.approx(0.15)
    assert res02[1][1] == 0.0
    expected = _ref_nsd(gt == 1, pred == 1, (1, 1, 1), NSD_TOLERANCE_MM[1])
    assert 0.0 < expected < 1.0
    assert res01[1][1] == pytest.approx(expected, abs=1e-9)
    assert evaluate_case(gt, pred, (1, 1, 1), classes=[1])[1][1] == 0.0  # default threshold 0.2


def test_z_range_rule_drops_last_gt_slice():
    gt = np.zeros((6, 6, 10), np.uint8)
    gt[1:4, 1:4, 2:6] = 5  # aorta on slices 2..5 (9 voxels each)
    pred = gt.copy()
    pred[:, :, 5] = 0  # misses the last GT slice ...
    pred[1:4, 1:4, 7:9] = 5  # ... and has extra slices above and below the GT range
    pred[1:4, 1:4, 0] = 5
    res = evaluate_case(gt, pred, (1, 1, 1), classes=[5])
    assert res[5] == (pytest.approx(1.0), pytest.approx(1.0))  # scored on z in [2, 5) only
    # the same masks as liver (no z rule): the whole volume counts
    liver_gt = np.where(gt == 5, 1, 0).astype(np.uint8)
    liver_pred = np.where(pred == 5, 1, 0).astype(np.uint8)
    dsc_liver = evaluate_case(liver_gt, liver_pred, (1, 1, 1), classes=[1])[1][0]
    assert dsc_liver == pytest.approx(2 * 27 / (36 + 54))  # pred: slices 0, 2-4, 7-8
    # a z-range miss inside [z_min, z_max) is counted
    pred2 = gt.copy()
    pred2[:, :, 3] = 0
    assert evaluate_case(gt, pred2, (1, 1, 1), classes=[5])[5][0] == pytest.approx(2 * 18 / (27 + 18))
    # IVC and esophagus follow the same rule
    for c in (6, 10):
        assert evaluate_case(np.where(gt > 0, c, 0), np.where(pred > 0, c, 0), (1, 1, 1), classes=[c])[c][0] == 1.0


def test_z_range_single_slice_gt_scores_that_slice():
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:4, 1:4, 2] = 6
    pred = np.zeros_like(gt)
    pred[1:4, 1:3, 2] = 6
    pred[1:4, 1:4, 4] = 6  # outside the single GT slice: ignored
    dsc, nsd = evaluate_case(gt, pred, (1, 1, 1), classes=[6])[6]
    assert dsc == pytest.approx(2 * 6 / 15)
    assert 0.0 < nsd <= 1.0


def test_tolerance_per_class():
    gt = np.zeros((20, 12, 12), np.uint8)
    gt[3:10, 3:9, 3:9] = 1
    pred = np.roll(gt, 3, axis=0)  # 3 mm shift along x at 1 mm spacing
    out = {}
    for c in (7, 2, 12):  # tolerances 2, 3, 7 mm; none has the z rule
        out[c] = evaluate_case(gt * c, pred * c, (1.0, 1.0, 1.0), classes=[c])[c]
    assert out[7][0] == out[2][0] == out[12][0]  # same DSC
    assert out[7][1] < 1.0
    assert out[2][1] == pytest.approx(1.0) and out[12][1] == pytest.approx(1.0)
    assert out[7][1] == pytest.approx(_ref_nsd(gt > 0, pred > 0, (1, 1, 1), 2.0), abs=1e-9)


def test_evaluate_case_subset_and_float_labels():
    gt = np.zeros((8, 8, 8), np.float32)
    gt[1:5, 1:5, 1:5] = 1.0
    gt[5:7, 5:7, 5:7] = 14.0
    res = evaluate_case(gt, gt.astype(np.int16), (1, 1, 1), classes=(1, 14))
    assert res == {1: (1.0, 1.0), 14: (1.0, 1.0)}


def _official_case(gt, pred, spacing, threshold):
    """The official per-case loop, on full-size masks, with the surface-distance package."""
    out = {}
    for c in range(1, 15):
        g_all, p_all = gt == c, pred == c
        if not g_all.any() and not p_all.any():
            out[c] = (1.0, 1.0)
        elif not g_all.any() or not p_all.any():
            out[c] = (0.0, 0.0)
        else:
            if c in (5, 6, 10):
                z = np.where(g_all)[2]
                z_max = max(z.max(), z.min() + 1)  # single-slice GT: official gives NaN, we score that slice
                g, p = gt[:, :, z.min():z_max] == c, pred[:, :, z.min():z_max] == c
            else:
                g, p = g_all, p_all
            d = sd.compute_dice_coefficient(g, p)
            n = 0.0 if d < threshold else _ref_nsd(g, p, spacing, NSD_TOLERANCE_MM[c])
            out[c] = (float(d), n)
    return out


def _label_pair(rng, shape, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """GT = argmax of 15 smooth random fields (0 = background); prediction = argmax after
    adding noise of amplitude ``noise`` (0.3 -> DSC ~0.4, 1.0 -> DSC ~0.15 per class)."""
    fields = np.stack([ndimage.gaussian_filter(rng.random(shape), 2.0) for _ in range(15)])
    fields[0] += 0.02
    gt = fields.argmax(0).astype(np.uint8)
    noisy = fields + noise * np.stack([ndimage.gaussian_filter(rng.random(shape), 1.0) for _ in range(15)])
    return gt, noisy.argmax(0).astype(np.uint8)


@pytest.mark.parametrize("threshold", [0.2, 0.1])
def test_evaluate_case_matches_official_loop_on_random_label_maps(threshold):
    rng = np.random.default_rng(1)
    shape = (32, 28, 20)
    spacing = (0.9, 0.9, 2.5)
    dscs = []
    for noise in (0.3, 1.0):
        gt, pred = _label_pair(rng, shape, noise)
        pred[pred == 3] = 0  # GT only
        gt[gt == 9] = 0  # prediction only
        gt[gt == 11] = 0  # both empty
        pred[pred == 11] = 0
        ours = evaluate_case(gt, pred, spacing, nsd_dsc_threshold=threshold)
        ref = _official_case(gt, pred, spacing, threshold)
        for c in range(1, 15):
            assert ours[c][0] == pytest.approx(ref[c][0], abs=1e-12), c
            assert ours[c][1] == pytest.approx(ref[c][1], abs=1e-6), c
        dscs += [ours[c][0] for c in range(1, 15)]
    assert any(0.1 <= d < 0.2 for d in dscs) and any(d > 0.3 for d in dscs)  # both branches used


def test_auto_distance_method_picks_kdtree_for_sparse_surfaces(monkeypatch):
    import abdoseg.evaluation.metrics as metrics

    calls = []
    real = metrics._nearest_distances

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "_nearest_distances", counting)
    spacing = (0.8, 0.8, 2.0)
    shape = (120, 120, 50)
    gt = _ball(shape, (60, 60, 25), 45.0, spacing)  # smooth, large: few surface points per voxel
    pred = _ball(shape, (62, 59, 25), 44.0, spacing)
    for tol in (1.0, 2.0):
        assert metrics.normalized_surface_dice(gt, pred, spacing, tol) == pytest.approx(
            _ref_nsd(gt, pred, spacing, tol), abs=1e-6)
    assert len(calls) == 4  # both directions, both tolerances
    calls.clear()
    rng = np.random.default_rng(3)
    noisy = gt & (rng.random(shape) < 0.7)  # speckled prediction: surface everywhere -> EDT
    assert metrics.normalized_surface_dice(gt, noisy, spacing, 2.0) == pytest.approx(
        _ref_nsd(gt, noisy, spacing, 2.0), abs=1e-6)
    assert len(calls) == 0


def test_evaluate_case_rejects_background_and_unknown_classes():
    lab = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="no NSD tolerance"):
        evaluate_case(lab, lab, (1, 1, 1), classes=[0, 1])
    with pytest.raises(ValueError, match="no NSD tolerance"):
        evaluate_case(lab, lab, (1, 1, 1), classes=[15])
    with pytest.raises(ValueError, match="same shape"):
        evaluate_case(lab, lab[:3], (1, 1, 1))
