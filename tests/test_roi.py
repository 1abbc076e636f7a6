"""abdoseg.inference.roi: boxes from masks, margins in mm, largest component, grid mapping (pure functions)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from abdoseg.inference.roi import (EmptyRoiWarning, RoiBox, largest_component, map_box_between_grids, margin_voxels,
                         roi_from_mask, scale_box)


def _blob_mask() -> np.ndarray:
    m = np.zeros((20, 20, 10), dtype=np.uint8)
    m[5:9, 6:12, 3:5] = 3  # big component: 4*6*2 = 48 voxels, any nonzero label counts
    m[17, 1, 8] = 1  # isolated voxel, must not widen the box
    return m


def test_largest_component_box_with_margin_in_mm():
    box = roi_from_mask(_blob_mask(), spacing_mm=(1.0, 2.0, 5.0), margin_mm=4.0)
    # margins: ceil(4/1)=4, ceil(4/2)=2, ceil(4/5)=1 voxels
    assert box.start == (1, 4, 2) and box.stop == (13, 14, 6)
    assert box.shape == (20, 20, 10) and not box.is_whole_volume
    assert box.size == (12, 10, 4)
    crop = _blob_mask()[box.slices]
    assert crop.shape == (12, 10, 4) and (crop == 3).sum() == 48


def test_all_components_when_not_largest_only():
    box = roi_from_mask(_blob_mask(), (1, 1, 1), 0.0, largest_only=False)
    assert box.start == (5, 1, 3) and box.stop == (18, 12, 9)


def test_min_component_fraction_keeps_big_second_component():
    m = np.zeros((30, 10, 10), bool)
    m[2:6, 2:6, 2:6] = True  # 64 voxels
    m[20:23, 2:6, 2:6] = True  # 48 voxels (75 % of the largest)
    assert roi_from_mask(m, (1, 1, 1), 0).stop[0] == 6
    assert roi_from_mask(m, (1, 1, 1), 0, min_component_fraction=0.5).stop[0] == 23
    assert largest_component(m, min_fraction=0.8).sum() == 64


def test_largest_component_connectivity_2d_and_empty():
    m = np.zeros((6, 6, 6), np.uint8)
    m[0:2, 0:2, 0:2] = 7  # 8 voxels
    m[2, 2, 2] = 7  # touches the cube at a corner only: one component with 26-connectivity
    m[5, 5, 0:4] = 2  # 4 voxels apart
    assert largest_component(m).sum() == 9
    assert largest_component(m, connectivity=6).sum() == 8
    assert largest_component(torch.as_tensor(m)).dtype == bool
    flat = np.zeros((5, 5), bool)
    flat[0:2, 0:2] = True
    flat[2, 2] = True  # diagonal neighbour: joined with 8-connectivity (the 2-D default)
    flat[4, 0] = True
    assert largest_component(flat).sum() == 5 and largest_component(flat, connectivity=4).sum() == 4
    assert not largest_component(np.zeros((3, 3, 3))).any()


def test_margin_clipped_to_volume_and_asymmetric_margins():
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 4:6, 8:10] = True
    box = roi_from_mask(m, (1, 1, 1), margin_mm=3)
    assert box.start == (0, 1, 5) and box.stop == (5, 9, 10)
    box = roi_from_mask(m, (1, 1, 1), margin_lower_mm=(0, 1, 2), margin_upper_mm=(1, 2, 0))
    assert box.start == (0, 3, 6) and box.stop == (3, 8, 10)


def test_margin_voxels_rounds_up_and_validates():
    assert margin_voxels(20.0, (0.8, 0.8, 2.5)) == (25, 25, 8)
    assert margin_voxels((4.0, 4.0, 8.0), (4.0, 4.0, 4.0)) == (1, 1, 2)
    with pytest.raises(ValueError):
        margin_voxels(-1.0, (1, 1, 1))
    with pytest.raises(ValueError):
        margin_voxels(1.0, (1, 0, 1))


def test_empty_mask_gives_whole_volume_and_warning():
    with pytest.warns(EmptyRoiWarning, match="whole volume"):
        box = roi_from_mask(np.zeros((4, 5, 6), np.int16), (1, 1, 1), 20)
    assert box.is_whole_volume and box.start == (0, 0, 0) and box.stop == (4, 5, 6)
    assert box.volume_fraction == 1.0


def test_torch_and_channel_first_input():
    m = torch.zeros(1, 8, 8, 8)
    m[0, 2:4, 2:4, 2:4] = 1
    box = roi_from_mask(m, (2.0, 2.0, 2.0), 2.0)
    assert box.start == (1, 1, 1) and box.stop == (5, 5, 5)


def test_to_json_world_corners_and_roundtrip():
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 100.0]
    box = RoiBox((1, 2, 3), (4, 6, 8), (10, 10, 10))
    d = json.loads(json.dumps(box.to_json(affine)))
    assert d["start"] == [1, 2, 3] and d["stop"] == [4, 6, 8]
    assert d["world_first_voxel_mm"] == [12.0, -14.0, 115.0]
    assert d["world_last_voxel_mm"] == [16.0, -5.0, 135.0]
    assert d["world_min_mm"] == [11.0, -15.5, 112.5]
    assert d["world_max_mm"] == [17.0, -3.5, 137.5]
    assert RoiBox.from_json(d) == box
    assert box.volume_fraction == pytest.approx(3 * 4 * 5 / 1000)


def test_invalid_box_rejected():
    with pytest.raises(ValueError):
        RoiBox((0, 0, 0), (0, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError):
        RoiBox((0, 0, 0), (3, 1, 1), (2, 2, 2))


def test_map_box_from_low_res_grid_to_original():
    # 4 mm grid whose voxel 0 covers original 1 mm voxels 0..3 (centre at 1.5 mm)
    low = np.diag([4.0, 4.0, 4.0, 1.0])
    low[:3, 3] = 1.5
    box = RoiBox((1, 2, 0), (3, 3, 1), (10, 10, 10))
    out = map_box_between_grids(box, low, np.eye(4), (40, 40, 40))
    assert out.start == (4, 8, 0) and out.stop == (12, 12, 4)
    # a low-res mask mapped to the original grid lies inside the mapped box
    low_mask = np.zeros((10, 10, 10), bool)
    low_mask[box.slices] = True
    orig_mask = np.repeat(np.repeat(np.repeat(low_mask, 4, 0), 4, 1), 4, 2)
    assert out.contains_fraction(orig_mask) == 1.0
    assert map_box_between_grids(RoiBox.whole((10, 10, 10)), low, np.eye(4), (40, 40, 40)).is_whole_volume


def test_map_box_through_flip_and_clip():
    # source grid is the destination flipped along X (like an LPS <-> RAS reorientation)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 9.0
    box = RoiBox((0, 0, 0), (3, 5, 5), (10, 5, 5))
    out = map_box_between_grids(box, flip, np.eye(4), (10, 5, 5))
    assert out.start == (7, 0, 0) and out.stop == (10, 5, 5)
    # a box that extends beyond the destination grid is clipped
    shift = np.eye(4)
    shift[0, 3] = 8.0
    out = map_box_between_grids(RoiBox((0, 0, 0), (5, 5, 5), (10, 5, 5)), shift, np.eye(4), (10, 5, 5))
    assert out.start == (8, 0, 0) and out.stop == (10, 5, 5)


def test_scale_box_for_resized_grid():
    box = RoiBox((1, 0, 2), (2, 4, 3), (4, 4, 4))
    out = scale_box(box, (8, 2, 12))
    assert out.start == (2, 0, 6) and out.stop == (4, 2, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # non-empty input: no warning
        roi_from_mask(np.ones((2, 2, 2)), (1, 1, 1), 0)
