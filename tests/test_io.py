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


def test_nifti_cases_one_discovery_for_every_stage(tmp_path):
    from abdoseg.io import clash_reason, nifti_cases, nifti_stem

    for name in ("B_0000.nii.gz", "A.NII.GZ", "C.nii", "C_0000.nii.gz", ".hidden.nii.gz", "D.nii.gz.partial",
                 "notes.txt", "E_0000.nii.gz~"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "F.nii.gz").mkdir()  # a folder is not a file
    cases, clashes = nifti_cases(tmp_path)
    assert list(cases) == ["A", "B", "C"] and cases["B"].name == "B_0000.nii.gz"
    assert [p.name for p in clashes["C"]] == ["C.nii", "C_0000.nii.gz"]
    assert clash_reason("C", clashes["C"]).startswith("C.nii and C_0000.nii.gz in ")
    by_stem, stem_clashes = nifti_cases(tmp_path, case_id=nifti_stem)  # labels, masks, predictions
    assert sorted(by_stem) == ["A", "B_0000", "C", "C_0000"] and not stem_clashes
    assert nifti_cases(tmp_path / "missing") == ({}, {})
