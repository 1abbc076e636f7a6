"""``abdoseg segment``: file -> file, folder -> folder (resume, force), DICOM series round trip,
statistics against hand computations, bad inputs (batch continues, non-zero exit, file named,
nothing half-written), missing weights.

Runs on a copy of the fine bundle with a tiny network and freshly initialized weights, on small
phantoms (48 x 40 x 24 voxels of 6 x 6 x 8 mm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from abdoseg.io import load_nifti, save_nifti
from abdoseg.labels import LABELS, LESION_ID
from abdoseg.evaluation.statistics import label_statistics, voxel_volume_ml

REPO = Path(__file__).resolve().parents[1]
FINE = REPO / "bundles" / "fine_organ_tumor"
TINY_NET = {"channels": 4, "kernel_size": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
SHAPE, SPACING_MM = (48, 40, 24), (6.0, 6.0, 8.0)


# ----------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------
def _tiny_bundle(dst: Path, with_weights: bool = True) -> Path:
    """Copy of the fine bundle whose inference config uses a tiny network (random weights)."""
    from monai.bundle import ConfigParser

    shutil.copytree(FINE, dst, ignore=shutil.ignore_patterns("eval", "models", "__pycache__"))
    cfg_file = dst / "configs" / "inference.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["network_def"].update(TINY_NET, deep_supr_num=1)
    cfg["coarse_network_def"].update(TINY_NET)
    cfg["fine_spacing_mm"] = [4.0, 4.0, 6.0]
    cfg_file.write_text(json.dumps(cfg, indent=1))
    (dst / "models").mkdir()
    if with_weights:
        parser = ConfigParser()
        parser.read_config(str(cfg_file))
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), dst / "models" / "model.pt")
        torch.save(parser.get_parsed_content("coarse_network_def").state_dict(), dst / "models" / "coarse_model.pt")
    return dst


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _tiny_bundle(tmp_path_factory.mktemp("bundle") / "fine_organ_tumor")


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from abdoseg.data.phantom import make_case

    return [make_case(i, shape=SHAPE, spacing_mm=SPACING_MM, axcodes=ax) for i, ax in enumerate(["LPS", "RAS"])]


def _write_dicom_series(hu: np.ndarray, affine: np.ndarray, folder: Path, series: int = 1) -> None:
    """Write an (X, Y, Z) int16 volume with a RAS affine as one DICOM CT series (one file per slice),
    leaving the process locale as it was (ITK's GDCM writer switches it to "C")."""
    import itk

    from conftest import keep_process_locale

    with keep_process_locale():
        folder.mkdir(parents=True, exist_ok=True)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        zyx = np.ascontiguousarray(hu.transpose(2, 1, 0))
        for k in range(zyx.shape[0]):
            sl = itk.image_from_array(np.ascontiguousarray(zyx[k:k + 1]))
            sl.SetSpacing([float(s) for s in spacing])
            md = sl.GetMetaDataDictionary()
            pos = lps[:3, 3] + lps[:3, 2] * k
            tags = {
                "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": "1.2.826.0.1.3680043.2.1",
                "0020|000e": f"1.2.826.0.1.3680043.2.1.{series}",
                "0008|0018": f"1.2.826.0.1.3680043.2.1.{series}.{k + 1}",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
                "0020|0037": "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]]),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
                "0028|1052": "0", "0028|1053": "1",
            }
            for tag, value in tags.items():
                md[tag] = value
            io = itk.GDCMImageIO.New()
            io.KeepOriginalUIDOn()
            itk.imwrite(sl, str(folder / f"S{series}_IM{k:04d}.dcm"), imageio=io)


def _cli(args: list[str], capsys) -> tuple[object, str]:
    """Run ``abdoseg <args>`` in process; returns (exit code, stderr + exit message)."""
    from abdoseg.cli import main

    code: object = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err + (code if isinstance(code, str) else "")


def _nonzero(code: object) -> bool:
    return code not in (0, None)  # a string code exits with status 1


# ----------------------------------------------------------------------------------------------
# statistics (pure function, hand-made arrays)
# ----------------------------------------------------------------------------------------------
def test_label_statistics_hand_computed():
    lab = np.zeros((6, 5, 4), np.uint8)
    img = np.arange(lab.size, dtype=np.int16).reshape(lab.shape)
    lab[0:2, 0:2, 0:2] = 1  # liver: 8 voxels
    lab[5, 4, 3] = 3  # spleen: 1 voxel
    # lesions: a 3-voxel bar, a single voxel touching it only diagonally (corner), one far away
    lab[3, 0:3, 0] = LESION_ID
    lab[4, 3, 1] = LESION_ID
    lab[0, 4, 3] = LESION_ID
    sp = (0.5, 2.0, 3.0)
    vox_ml = 0.5 * 2.0 * 3.0 / 1000.0
    s = label_statistics(lab, img, sp)
    assert s["voxel_volume_mL"] == pytest.approx(vox_ml) == voxel_volume_ml(sp)
    liver = s["classes"]["liver"]
    assert liver["voxels"] == 8 and liver["volume_mL"] == pytest.approx(8 * vox_ml)
    assert liver["mean_HU"] == pytest.approx(img[0:2, 0:2, 0:2].mean())
    assert s["classes"]["spleen"]["mean_HU"] == pytest.approx(float(img[5, 4, 3]))
    assert s["classes"]["pancreas"] == {"id": 4, "voxels": 0, "volume_mL": 0.0, "mean_HU": None}
    assert set(s["classes"]) == {LABELS[k] for k in range(1, 15)}
    les = s["lesions"]
    # 26-connectivity: the corner-touching voxel joins the bar -> 2 lesions of 4 and 1 voxels
    assert les["count"] == 2
    assert [d["voxels"] for d in les["lesions"]] == [4, 1]
    assert les["lesions"][0]["volume_mL"] == pytest.approx(4 * vox_ml)
    assert les["total_volume_mL"] == pytest.approx(5 * vox_ml)
    bar = [(3, 0, 0), (3, 1, 0), (3, 2, 0), (4, 3, 1)]
    assert les["lesions"][0]["mean_HU"] == pytest.approx(np.mean([img[v] for v in bar]))
    assert les["lesions"][0]["centroid_voxel"] == pytest.approx(np.mean(bar, axis=0).tolist())
    assert les["lesions"][1]["centroid_voxel"] == [0.0, 4.0, 3.0]
    # 6-connectivity: three separate lesions
    s6 = label_statistics(lab, img, sp, connectivity=6)
    assert s6["lesions"]["count"] == 3 and [d["voxels"] for d in s6["lesions"]["lesions"]] == [3, 1, 1]
    # no image -> volumes only
    assert label_statistics(lab, None, sp)["classes"]["liver"]["mean_HU"] is None


def test_label_statistics_rejects_bad_arguments():
    lab = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        label_statistics(lab, np.zeros((3, 3, 2)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        label_statistics(lab, None, (1, 0, 1))
    with pytest.raises(ValueError, match="0..14"):
        label_statistics(lab + 15, None, (1, 1, 1))
    empty = label_statistics(lab, None, (1, 1, 1))
    assert empty["lesions"] == {"count": 0, "total_volume_mL": 0.0, "lesions": []}


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_weights_come_from_the_bundle(bundle):
    from abdoseg.segment import load_cascade

    seg = load_cascade(bundle, device="cpu")
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    got = seg.network.state_dict()
    assert set(saved) == set(got) and all(torch.equal(saved[k], got[k].cpu()) for k in saved)
    from abdoseg.inference.coarse_roi import CoarseRoiCropd

    coarse = [t for t in seg.preprocessing.transforms if isinstance(t, CoarseRoiCropd)][0]
    assert Path(coarse.checkpoint) == bundle / "models" / "coarse_model.pt"


def test_file_to_file_with_statistics_and_preview(bundle, phantoms, tmp_path, capsys):
    from abdoseg.segment import segment

    hu, _, affine = phantoms[0]
    src = save_nifti(hu, affine, tmp_path / "in" / "ct_0000.nii.gz")
    out = tmp_path / "res" / "my_mask.nii.gz"
    segment(str(src), str(out), bundle_dir=str(bundle), device="cpu", statistics=True, preview=True)
    mask, maff, _ = load_nifti(out)
    assert mask.dtype == np.uint8 and mask.shape == hu.shape and np.allclose(maff, affine, atol=1e-4)
    assert mask.max() <= 14
    stats = json.loads((tmp_path / "res" / "my_mask_statistics.json").read_text())
    expected = label_statistics(mask, hu, SPACING_MM)
    for name, d in expected["classes"].items():
        assert stats["classes"][name]["voxels"] == d["voxels"]
        assert stats["classes"][name]["volume_mL"] == pytest.approx(d["voxels"] * np.prod(SPACING_MM) / 1000)
        if d["voxels"]:
            assert stats["classes"][name]["mean_HU"] == pytest.approx(hu[mask == d["id"]].mean())
    assert stats["lesions"]["count"] == expected["lesions"]["count"]
    png = tmp_path / "res" / "my_mask_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "my_mask.nii.gz", "my_mask_preview.png", "my_mask_statistics.json"]


def test_folder_to_folder_resume_and_force(bundle, phantoms, tmp_path, capsys):
    inp = tmp_path / "in"
    for i, (hu, _, aff) in enumerate(phantoms):
        save_nifti(hu, aff, inp / f"P{i}_0000.nii.gz")
    out = tmp_path / "out"
    code, _ = _cli(["segment", "-i", str(inp), "-o", str(out), "--bundle_dir", str(bundle), "--device", "cpu"],
                   capsys)
    assert code in (0, None)
    assert sorted(p.name for p in out.iterdir()) == ["P0.nii.gz", "P1.nii.gz"]
    for i, (hu, _, aff) in enumerate(phantoms):
        img = nib.load(str(out / f"P{i}.nii.gz"))
        assert img.shape == hu.shape and np.allclose(img.affine, aff, atol=1e-4)
    first = np.asarray(nib.load(str(out / "P0.nii.gz")).dataobj).copy()
    mtime = (out / "P0.nii.gz").stat().st_mtime_ns
    # resume: existing masks are kept; --statistics adds the missing JSON from the kept masks
    code, err = _cli(["segment", "-i", str(inp), "-o", str(out), "--bundle_dir", str(bundle), "--device", "cpu",
                      "-s"], capsys)
    assert code in (0, None) and "2 kept from before" in err
    assert (out / "P0.nii.gz").stat().st_mtime_ns == mtime
    assert (out / "P0_statistics.json").is_file() and (out / "P1_statistics.json").is_file()
    # --force recomputes, deterministically
    code, err = _cli(["segment", "-i", str(inp), "-o", str(out), "--bundle_dir", str(bundle), "--device", "cpu",
                      "--force"], capsys)
    assert code in (0, None) and ": 2 new, 0 kept from before" in err
    assert (out / "P0.nii.gz").stat().st_mtime_ns != mtime
    assert np.array_equal(np.asarray(nib.load(str(out / "P0.nii.gz")).dataobj), first)


def test_dicom_series_round_trip(bundle, phantoms, tmp_path, capsys):
    from abdoseg.dicom.series import read_dicom_series
    from abdoseg.segment import segment

    import itk

    for i, (hu, _, affine) in enumerate(phantoms):  # LPS and RAS voxel orientations
        series = tmp_path / f"series_{i}"
        _write_dicom_series(hu, affine, series)
        arr, aff = read_dicom_series(series)
        assert arr.dtype == np.int16 and np.array_equal(arr, hu)
        assert np.allclose(aff, affine, atol=1e-4)
        # independent LPS -> RAS conversion: ITK's own NIfTI writer on the series ITK reads
        itk.imwrite(itk.imread(str(series)), str(tmp_path / f"itk_{i}.nii.gz"))
        ref = nib.load(str(tmp_path / f"itk_{i}.nii.gz"))
        assert np.allclose(ref.affine, aff, atol=1e-3) and np.array_equal(np.asarray(ref.dataobj), arr)
    # two series in one folder: the larger one is read, with a warning
    hu1, _, aff1 = phantoms[1]
    _write_dicom_series(hu1[:, :, :6], aff1, tmp_path / "series_0", series=2)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        arr, aff = read_dicom_series(tmp_path / "series_0")
    assert np.array_equal(arr, phantoms[0][0])
    hu, _, affine = phantoms[0]
    series = tmp_path / "patient_A"
    series_0 = tmp_path / "series_0"
    series_0.rename(series)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="2 DICOM series"):  # segment reads the same folder
        segment(str(series), str(out), bundle_dir=str(bundle), device="cpu")
    mask_img = nib.load(str(out / "patient_A.nii.gz"))
    assert mask_img.shape == hu.shape and np.allclose(mask_img.affine, affine, atol=1e-4)
    # same result as the NIfTI of the same volume
    save_nifti(hu, affine, tmp_path / "nifti" / "patient_A.nii.gz")
    segment(str(tmp_path / "nifti" / "patient_A.nii.gz"), str(tmp_path / "ref.nii.gz"), bundle_dir=str(bundle),
            device="cpu")
    assert np.array_equal(np.asarray(mask_img.dataobj), np.asarray(nib.load(str(tmp_path / "ref.nii.gz")).dataobj))
    assert not list(series.glob("*.nii*"))  # the input folder is left alone


def test_bad_inputs_reported_batch_continues(bundle, phantoms, tmp_path, capsys):
    hu, _, aff = phantoms[1]
    inp = tmp_path / "in"
    save_nifti(hu, aff, inp / "good_0000.nii.gz")
    save_nifti(hu[:, :, 10], aff, inp / "flat2d.nii.gz")
    save_nifti(np.stack([hu, hu], -1), aff, inp / "fourd.nii.gz")
    save_nifti(((hu + 1024) / 3000.0).astype(np.float32), aff, inp / "normalised.nii.gz")
    nan = hu.astype(np.float32)
    nan[3, 3, 3] = np.nan
    save_nifti(nan, aff, inp / "withnan.nii.gz")
    save_nifti(hu[:, :, 5:6], aff, inp / "oneslice.nii.gz")
    (inp / "garbage.nii.gz").write_bytes(b"this is not an image" * 10)
    (inp / "notes.txt").write_text("hello")
    (inp / "emptydicom").mkdir()
    _write_dicom_series(hu[:, :, 5:6], aff, inp / "onedicomslice")
    before = {p.name: p.stat().st_mtime_ns for p in inp.rglob("*")}
    out = tmp_path / "out"
    code, msg = _cli(["segment", "-i", str(inp), "-o", str(out), "--bundle_dir", str(bundle), "--device", "cpu",
                      "--statistics", "--preview"], capsys)
    assert _nonzero(code)
    assert "9 problem(s)" in msg and "1 of 10 case(s) segmented" in msg
    for name, why in [("flat2d.nii.gz", "2D"), ("fourd.nii.gz", "4D"), ("normalised.nii.gz", "Hounsfield"),
                      ("withnan.nii.gz", "NaN"), ("oneslice.nii.gz", "single slice"), ("garbage.nii.gz", "read"),
                      ("notes.txt", "not a NIfTI"), ("emptydicom", "empty folder"), ("onedicomslice", "single slice")]:
        lines = [ln for ln in msg.splitlines() if str(inp / name) + ":" in ln]
        assert lines and why in " ".join(lines), (name, msg)
    # only the good case has outputs; nothing half-written; inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "good_preview.png", "good_statistics.json"]
    assert {p.name: p.stat().st_mtime_ns for p in inp.rglob("*")} == before


def test_missing_weights_and_bad_arguments(bundle, phantoms, tmp_path, capsys):
    hu, _, aff = phantoms[1]
    src = save_nifti(hu, aff, tmp_path / "in" / "a.nii.gz")
    save_nifti(hu, aff, tmp_path / "in" / "b.nii.gz")
    empty = _tiny_bundle(tmp_path / "noweights", with_weights=False)
    out = tmp_path / "out"
    code, msg = _cli(["segment", "-i", str(src), "-o", str(out), "--bundle_dir", str(empty)], capsys)
    assert _nonzero(code) and "trained weights not found" in msg and "model.pt" in msg and "abdoseg demo" in msg
    assert not out.exists()
    cases = [
        ([str(tmp_path / "missing.nii.gz"), str(out)], "missing.nii.gz: input not found"),
        ([str(tmp_path / "in"), str(tmp_path / "x.nii.gz")], "give an output folder"),
        ([str(src), str(tmp_path / "in" / "a.nii.gz")], "would overwrite this input"),
        ([str(tmp_path / "in"), str(tmp_path / "in")], "another folder than the input"),
    ]
    (tmp_path / "hollow").mkdir()
    cases.append(([str(tmp_path / "hollow"), str(out)], "hollow: empty folder"))
    for (i, o), expected in cases:
        code, msg = _cli(["segment", "-i", i, "-o", o, "--bundle_dir", str(bundle)], capsys)
        assert _nonzero(code) and expected in msg, (i, o, msg)
    code, msg = _cli(["segment", "-i", str(src), "-o", str(out), "--bundle_dir", str(bundle), "--device", "tpu"],
                     capsys)
    assert _nonzero(code) and "unknown device" in msg
    assert not out.exists()
