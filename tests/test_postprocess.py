"""Connected-component post-processing on small hand-made label volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from abdoseg.inference.postprocess import (FlarePostprocessd, drop_lesions_far_from_organs, keep_largest_organ_components,
                                 keep_organ_components_near_liver, postprocess_labels, remove_small_lesions)


def _vol():
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[2:8, 2:8, 2:6] = 1      # liver main (144 voxels)
    lab[15:17, 15:17, 2:4] = 1  # liver island (8)
    lab[10:13, 2:5, 2:5] = 3    # spleen (27)
    lab[10:11, 10:11, 8:9] = 3  # spleen island (1)
    lab[4:6, 4:6, 3:5] = 14     # lesion inside liver (8 voxels)
    lab[18:19, 0:1, 0:1] = 14   # single-voxel lesion far away
    return lab


def test_largest_component_per_organ():
    lab = _vol()
    out = keep_largest_organ_components(lab)
    assert (out[15:17, 15:17, 2:4] == 0).all()
    assert out[10, 10, 8] == 0
    assert (out[10:13, 2:5, 2:5] == 3).all()
    # lesions untouched; liver main kept (its voxels minus the lesion)
    assert (out == 14).sum() == (lab == 14).sum()
    assert (out == 1).sum() == (lab == 1).sum() - 8
    assert out.dtype == lab.dtype and lab[15, 15, 2] == 1  # input not modified


def test_largest_component_does_not_merge_classes():
    """Two organs touching: each class is its own component set."""
    lab = np.zeros((10, 10, 4), np.uint8)
    lab[0:5, :, :] = 1
    lab[5:6, :, :] = 2
    lab[8:10, 0:2, 0:1] = 2  # smaller right-kidney piece
    out = keep_largest_organ_components(lab)
    assert (out[0:5] == 1).all() and (out[5] == 2).all() and (out[8:10, 0:2, 0:1] == 0).all()


def test_remove_small_lesions_by_volume_mm3():
    lab = _vol()
    # spacing 2 x 2 x 2 mm -> 8 mm3 per voxel: the 1-voxel lesion is 8 mm3, the other 64 mm3
    out = remove_small_lesions(lab, (2.0, 2.0, 2.0), min_volume_mm3=10.0)
    assert out[18, 0, 0] == 0 and (out[4:6, 4:6, 3:5] == 14).all()
    out = remove_small_lesions(lab, (2.0, 2.0, 2.0), min_volume_mm3=64.0)
    assert (out[4:6, 4:6, 3:5] == 14).all()  # exactly at the threshold is kept
    out = remove_small_lesions(lab, (2.0, 2.0, 2.0), min_volume_mm3=64.1)
    assert not (out == 14).any()


def test_drop_lesions_far_from_organs():
    lab = _vol()
    out = drop_lesions_far_from_organs(lab, (1.0, 1.0, 1.0), max_distance_mm=2.0)
    assert out[18, 0, 0] == 0 and (out[4:6, 4:6, 3:5] == 14).all()
    # distances are in mm: 4 voxels at 1 mm = 4 mm; at 0.5 mm slices = 2 mm
    lab2 = np.zeros((10, 10, 10), np.uint8)
    lab2[0:3, 0:3, 0:3] = 1
    lab2[0, 0, 6] = 14  # 4 voxels above the liver (z index 2 -> 6)
    assert drop_lesions_far_from_organs(lab2, (1, 1, 1.0), 4.0)[0, 0, 6] == 14
    assert drop_lesions_far_from_organs(lab2, (1, 1, 1.0), 3.9)[0, 0, 6] == 0
    assert drop_lesions_far_from_organs(lab2, (1, 1, 0.5), 2.0)[0, 0, 6] == 14


def test_transform_keeps_meta_and_shape():
    lab = _vol()
    aff = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    mt = MetaTensor(torch.as_tensor(lab)[None], affine=aff)
    t = FlarePostprocessd("pred", min_lesion_volume_mm3=10.0)
    out = t({"pred": mt})["pred"]
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (1, *lab.shape) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out[0].numpy(), postprocess_labels(lab, (2, 2, 2), min_lesion_volume_mm3=10.0))
    assert torch.equal(out.affine, aff)


def test_keep_components_above_fraction_of_largest():
    lab = np.zeros((20, 10, 4), np.uint8)
    lab[0:8, 0:5, 0:2] = 1    # 80 voxels
    lab[12:16, 0:5, 0:2] = 1  # 40 voxels
    lab[18:19, 8:9, 3:4] = 1  # 1 voxel
    out = keep_largest_organ_components(lab, min_fraction_of_largest=0.5)
    assert (out[12:16, 0:5, 0:2] == 1).all() and out[18, 8, 3] == 0
    out = keep_largest_organ_components(lab, min_fraction_of_largest=0.51)
    assert (out[12:16] == 0).all() and (out[0:8, 0:5, 0:2] == 1).all()


# ------------------------------------------------------------------ seed 002: component nearest the liver


def _liver_and_kidney():
    """Liver main block centred at (4.5, 4.5, 3.5) + a far liver island; right kidney (2) in two
    pieces: a large one far from the liver and a smaller one next to it; a 1-voxel kidney speck
    touching nothing but close to the liver; a lesion."""
    lab = np.zeros((30, 12, 8), np.uint8)
    lab[2:8, 2:8, 2:6] = 1        # liver main, 144 voxels
    lab[27:29, 10:12, 6:8] = 1    # liver island, 8 voxels, far away
    lab[20:25, 2:5, 2:5] = 2      # kidney piece A: 45 voxels, centroid x = 22
    lab[10:12, 2:4, 2:4] = 2      # kidney piece B: 8 voxels, centroid x = 10.5 (nearer the liver)
    lab[9, 9, 7] = 2              # kidney speck: 1 voxel
    lab[3:5, 3:5, 3:4] = 14       # lesion inside the liver
    return lab


def test_near_liver_keeps_the_candidate_nearest_the_liver_centroid():
    lab = _liver_and_kidney()
    out = keep_organ_components_near_liver(lab)  # candidates: >= 10 % of 45 voxels -> A and B, not the speck
    assert (out[10:12, 2:4, 2:4] == 2).all() and (out[20:25, 2:5, 2:5] == 0).all() and out[9, 9, 7] == 0
    assert (out[2:8, 2:8, 2:6] == np.where(lab[2:8, 2:8, 2:6] == 14, 14, 1)).all()  # liver main kept
    assert (out[27:29, 10:12, 6:8] == 0).all()  # liver island removed
    assert (out == 14).sum() == (lab == 14).sum()  # lesion untouched
    assert out.dtype == lab.dtype and lab[22, 3, 3] == 2  # input not modified
    # the largest rule keeps piece A instead
    largest = keep_largest_organ_components(lab)
    assert (largest[20:25, 2:5, 2:5] == 2).all() and (largest[10:12, 2:4, 2:4] == 0).all()
    # B (8 voxels) is only 17.8 % of A: with a 20 % candidate cut only A competes
    strict = keep_organ_components_near_liver(lab, min_fraction_of_largest=0.2)
    np.testing.assert_array_equal(strict, largest)
    # fraction 0: the speck competes too, but B (6.4 voxels from the liver centroid) is nearer than it (7.3)
    loose = keep_organ_components_near_liver(lab, min_fraction_of_largest=0.0)
    assert (loose[10:12, 2:4, 2:4] == 2).all() and loose[9, 9, 7] == 0


def test_near_liver_distances_are_in_mm():
    """Two pieces of the spleen (3): one 6 voxels from the liver centroid along x, one 4 voxels
    along z. Isotropic voxels: the z piece is nearer; with 3 mm slices it is 12 mm away vs 6 mm."""
    lab = np.zeros((16, 8, 16), np.uint8)
    lab[0:3, 0:3, 0:3] = 1        # liver, centroid (1, 1, 1)
    lab[7, 1, 1] = 3              # x piece: 6 voxels from the liver centroid
    lab[1, 1, 5] = 3              # z piece: 4 voxels
    iso = keep_organ_components_near_liver(lab, (1.0, 1.0, 1.0), min_fraction_of_largest=0.0)
    assert iso[1, 1, 5] == 3 and iso[7, 1, 1] == 0
    aniso = keep_organ_components_near_liver(lab, (1.0, 1.0, 3.0), min_fraction_of_largest=0.0)
    assert aniso[7, 1, 1] == 3 and aniso[1, 1, 5] == 0


def test_near_liver_without_liver_falls_back_to_largest():
    lab = _liver_and_kidney()
    lab[lab == 1] = 0
    np.testing.assert_array_equal(keep_organ_components_near_liver(lab), keep_largest_organ_components(lab))
    with pytest.raises(ValueError, match="liver_id"):
        keep_organ_components_near_liver(lab, organ_ids=(2, 3))


def test_transform_near_liver_option_and_default_unchanged():
    lab = _liver_and_kidney()
    aff = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    data = {"pred": MetaTensor(torch.as_tensor(lab)[None], affine=aff)}
    default = FlarePostprocessd("pred")(dict(data))["pred"][0].numpy()
    np.testing.assert_array_equal(default, keep_largest_organ_components(lab))
    near = FlarePostprocessd("pred", organ_component_rule="near_liver")(dict(data))["pred"][0].numpy()
    np.testing.assert_array_equal(near, keep_organ_components_near_liver(lab))
    assert not np.array_equal(near, default)
    np.testing.assert_array_equal(postprocess_labels(lab, (1, 1, 1), organ_component_rule="near_liver"), near)
    with pytest.raises(ValueError, match="organ_component_rule"):
        FlarePostprocessd("pred", organ_component_rule="nearest")
