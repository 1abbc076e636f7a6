"""One voxel-grid tolerance for every stage, and the spacing of an affine."""

from __future__ import annotations

import numpy as np
import pytest

import abdoseg.data.prepare as dataprep
import abdoseg.evaluation.evaluate as evaluate
import abdoseg.label_fusion.workflow as label_fusion_workflow
from abdoseg.geometry import AFFINE_TOL_MM, affine_difference_mm, affine_spacing_mm, affines_match
from abdoseg.io import InputError, save_nifti


def test_one_affine_tolerance_for_prepare_evaluate_and_label_fusion():
    assert dataprep.AFFINE_TOL_MM is AFFINE_TOL_MM
    assert evaluate.AFFINE_TOL_MM is AFFINE_TOL_MM
    assert label_fusion_workflow.AFFINE_TOL_MM is AFFINE_TOL_MM
    a = np.diag([0.8, 0.8, 2.5, 1.0])
    b = a.copy()
    b[0, 3] += 0.5 * AFFINE_TOL_MM
    assert affines_match(a, b) and affine_difference_mm(a, b) == pytest.approx(0.5 * AFFINE_TOL_MM)
    b[0, 3] += AFFINE_TOL_MM
    assert not affines_match(a, b)


@pytest.mark.parametrize("shift, ok", [(0.5, True), (2.0, False)])
def test_evaluate_grid_check_uses_the_tolerance(tmp_path, shift, ok):
    mask = np.zeros((4, 4, 3), np.uint8)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    moved = affine.copy()
    moved[1, 3] += shift * AFFINE_TOL_MM
    gt = save_nifti(mask, affine, tmp_path / "gt.nii.gz")
    pred = save_nifti(mask, moved, tmp_path / "pred.nii.gz")
    if ok:
        evaluate._check_same_grid(pred, gt)
    else:
        with pytest.raises(InputError, match="voxel grid differs"):
            evaluate._check_same_grid(pred, gt)


def test_affine_spacing_mm_rotated_2d_and_degenerate():
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = (-100.0, 20.0, 7.0)
    assert affine_spacing_mm(affine) == pytest.approx((0.8, 1.2, 2.5))
    assert affine_spacing_mm(np.diag([-4.0, 2.0, 1.0])) == pytest.approx((4.0, 2.0))  # 2-D grid
    assert affine_spacing_mm(np.diag([1.0, 0.0, 3.0, 1.0])) == (1.0, 0.0, 3.0)  # a zero axis stays visible
