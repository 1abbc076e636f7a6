import numpy as np
import pytest

from abdoseg.io import InputError, case_id_from_image, load_nifti, save_nifti


def test_save_load_roundtrip_keeps_affine_dtype_and_leaves_no_temp(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    aff = np.diag([-0.7, -0.7, 2.5, 1.0])
    aff[:3, 3] = [10, -20, 30]
    out = save_nifti(arr, aff, tmp_path / "x.nii.gz")
    back, back_aff, hdr = load_nifti(out)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(back_aff, aff)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.nii.gz: not a readable NIfTI"):
        load_nifti(bad)
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        load_nifti(tmp_path / "missing.nii.gz")


def test_case_id():
    assert case_id_from_image("a/FLARE23_0001_0000.nii.gz") == "FLARE23_0001"
    assert case_id_from_image("ct.nii") == "ct"
