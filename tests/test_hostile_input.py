"""Hostile but fair input (issue 13): every case here once gave wrong geometry, left files behind or
ended in a traceback. Now each is an error (exit 1, one line naming the file and the reason, no
partial output, inputs untouched) or, for implausible but usable input, a one-line warning.

Small synthetic volumes (40 x 40 x 30 voxels of 6 mm); ``abdoseg segment`` runs with a stand-in
segmenter (the head of the real inference chain up to its input check ``ValidateCTd``, built from
the fine bundle's ``inference.json``, then a threshold), so these tests do not depend on trained
weights or on the cascade.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from abdoseg.io import (InputError, atomic_path, check_items_exist, is_hidden_or_partial, partial_path,
                        remove_stale_partials, save_nifti)

#: implausible CTs are this file's subject: their ImplausibleCTWarning is shown (the CLI prints it,
#: the tests assert on stderr); any other abdoseg warning is an error (pyproject.toml)
pytestmark = pytest.mark.filterwarnings("always::abdoseg.inference.ct_checks.ImplausibleCTWarning")

SHAPE = (40, 40, 30)
SPACING = (6.0, 6.0, 6.0)
AFFINE = np.diag([-6.0, -6.0, 6.0, 1.0])  # LPS-like voxel axes
AFFINE[:3, 3] = (120.0, 120.0, -90.0)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _ct(shape=SHAPE) -> np.ndarray:
    """Air around a soft-tissue ellipsoid with a bright 'bone' core (int16 HU)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.full(shape, -1000, np.int16)
    hu[x ** 2 + y ** 2 < 0.6] = 40
    hu[x ** 2 + y ** 2 < 0.05] = 700
    return hu + (np.arange(shape[2], dtype=np.int16)[None, None, :] % 3)  # slices differ


@functools.lru_cache(maxsize=1)
def _inference_head() -> tuple:
    """The fine bundle's inference chain up to and including its input check (``ValidateCTd``),
    built from ``configs/inference.json`` itself (``roi_transforms``), so it cannot drift."""
    from monai.bundle import ConfigParser

    from abdoseg.segment import DEFAULT_BUNDLE

    parser = ConfigParser()
    parser.read_config(str(DEFAULT_BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(DEFAULT_BUNDLE)
    raw = parser["roi_transforms"]
    n = 1 + next(i for i, t in enumerate(raw) if str(t.get("_target_", "")).endswith("ct_checks.ValidateCTd"))
    head = tuple(parser.get_parsed_content(f"roi_transforms#{i}") for i in range(n))
    assert type(head[0]).__name__ == "LoadImaged" and type(head[-1]).__name__ == "ValidateCTd", head
    return head


class _StandInSegmenter:
    """The head of the real inference chain (reader + input checks, from the bundle's config),
    then a threshold."""

    calls: list[str] = []

    def __call__(self, item: dict):
        d = dict(item)
        for t in _inference_head():
            d = t(d)
        self.calls.append(item["image"])
        arr = np.asarray(d["image"][0])
        return (arr > 0).astype(np.uint8), nib.load(item["image"]).affine


@pytest.fixture
def stand_in(monkeypatch):
    import abdoseg.segment

    _StandInSegmenter.calls = []
    monkeypatch.setattr(abdoseg.segment, "load_cascade", lambda *a, **k: _StandInSegmenter())
    return _StandInSegmenter


def _cli(args: list[str], capsys, caplog=None) -> tuple[int, str]:
    """``abdoseg <args>`` in process: (exit status as the shell sees it, stderr + logged text)."""
    from abdoseg.cli import main

    code: object = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    if caplog is not None:
        err += "\n" + caplog.text
        caplog.clear()
    status = 0 if code in (0, None) else (1 if isinstance(code, str) else int(code))
    return status, err


def _segment(inp, out, capsys, caplog=None, *extra):
    return _cli(["segment", "-i", str(inp), "-o", str(out), "--device", "cpu", *extra], capsys, caplog)


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _write_series(folder: Path, hu=None, affine=AFFINE) -> list[Path]:
    from test_segment import _write_dicom_series

    hu = _ct((40, 40, 12)) if hu is None else hu
    _write_dicom_series(hu, affine, folder)
    return sorted(folder.iterdir())


# ----------------------------------------------------------------------------------------------
# 1. DICOM series with a missing, unreadable, duplicate or displaced slice
# ----------------------------------------------------------------------------------------------
def test_intact_dicom_series_reads_with_exact_geometry(tmp_path):
    from abdoseg.dicom.series import check_dicom_series, read_dicom_series

    hu = _ct((40, 40, 12))
    files = _write_series(tmp_path / "s", hu)
    arr, aff = read_dicom_series(tmp_path / "s")
    assert np.array_equal(arr, hu) and np.allclose(aff, AFFINE, atol=1e-4)
    # the checked order is along the slice normal (here +z in RAS = slice index)
    assert [Path(f).name for f in check_dicom_series(tmp_path / "s")] == [f.name for f in files]


def _expect_series_error(folder: Path, *fragments: str) -> str:
    from abdoseg.dicom.series import read_dicom_series

    with pytest.raises(InputError) as err:
        read_dicom_series(folder)
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_missing_slice_is_an_error_not_an_averaged_spacing(tmp_path, stand_in, capsys, caplog):
    series = tmp_path / "series"
    files = _write_series(series)
    files[5].unlink()  # slice 6 of 12 gone: the other 11 must not be read at an averaged spacing
    _expect_series_error(series, str(series), files[4].name, files[6].name, "gap of 12.000 mm",
                         "series spacing is 6.000 mm", "1 slice(s) missing")
    before = _tree(series)
    code, err = _segment(series, tmp_path / "out", capsys, caplog)
    assert code == 1 and "gap of 12.000 mm" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii.gz")) and _tree(series) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_slice_is_named(tmp_path, damage):
    series = tmp_path / "series"
    files = _write_series(series)
    bad = files[3]
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"not a dicom file " * 50, "truncated": data[: len(data) - 1500],
                     "empty": b""}[damage])
    msg = _expect_series_error(series, str(bad), f"in DICOM series folder {series}")
    assert ("truncated" in msg) if damage == "truncated" else ("DICOM" in msg)


def test_duplicate_uneven_and_mixed_slices_are_errors(tmp_path):
    import pydicom

    def fresh(name):
        folder = tmp_path / name
        return folder, _write_series(folder)

    folder, files = fresh("duplicate")
    shutil.copy(files[2], folder / "copy_of_slice.dcm")
    _expect_series_error(folder, "duplicate slice position", "copy_of_slice.dcm", files[2].name)

    folder, files = fresh("uneven")
    ds = pydicom.dcmread(files[7])
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + 1.5]
    ds.save_as(files[7])
    _expect_series_error(folder, "uneven slice spacing", files[7].name, "series spacing is 6.000 mm")

    folder, files = fresh("orientation")
    ds = pydicom.dcmread(files[4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.2]
    ds.save_as(files[4])
    _expect_series_error(folder, "mixed orientations", files[4].name)

    folder, files = fresh("size")
    ds = pydicom.dcmread(files[4])
    ds.Rows = 20
    ds.PixelData = np.asarray(ds.pixel_array)[:20].tobytes()
    ds.save_as(files[4])
    _expect_series_error(folder, "mixed slice sizes", files[4].name, "20x40")

    folder, files = fresh("tilt")
    for k, f in enumerate(files):  # each slice shifted 2 mm in plane per slice: a sheared stack
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 2.0 * k, z]
        ds.save_as(f)
    _expect_series_error(folder, "shifted 2.000 mm in plane", "gantry tilt")

    folder, files = fresh("noposition")
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(InputError, match="ImagePositionPatient") as err:
        from abdoseg.dicom.series import read_dicom_series

        read_dicom_series(folder)
    assert err.value.path == str(files[1])


def test_non_slice_files_in_a_series_folder_are_left_alone(tmp_path):
    """Our own outputs and notes next to the slices are not slices (and not errors)."""
    from abdoseg.dicom.series import read_dicom_series

    hu = _ct((40, 40, 12))
    series = tmp_path / "series"
    _write_series(series, hu)
    save_nifti(np.zeros((40, 40, 12), np.uint8), AFFINE, series / "series.nii.gz")
    (series / "README.txt").write_text("exported by the PACS")
    (series / ".DS_Store").write_bytes(b"\x00\x01")
    arr, _ = read_dicom_series(series)
    assert np.array_equal(arr, hu)


# ----------------------------------------------------------------------------------------------
# 2. temporary files of killed runs: never read as data, removed by the next run
# ----------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_names_and_stale_leftovers(tmp_path):
    target = tmp_path / "CASE.nii.gz"
    tmp = partial_path(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(".CASE.nii.gz.") and tmp.name.endswith(".partial.nii.gz")
    assert partial_path(target) == tmp  # fixed per target and process: a rerun reuses the name
    assert is_hidden_or_partial(tmp) and not is_hidden_or_partial(target)
    # what earlier runs left: the old random names (0-byte placeholder, truncated gzip) and a
    # partial file of a writer that is dead; a live writer's file (our parent) must survive
    legacy = [tmp_path / ".CASE.nii.gz.k2j4_x9q.nii.gz.tmp", tmp_path / ".CASE.nii.gz.k2j4_x9q.nii.gz"]
    legacy[0].write_bytes(b"")
    legacy[1].write_bytes(b"\x1f\x8b\x08\x00truncated")
    dead = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    live = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    other = tmp_path / ".OTHER.nii.gz.k2j4_x9q.nii.gz"  # another target: left to its own writer
    for p in (dead, live, other):
        p.write_bytes(b"\x1f\x8b\x08\x00truncated")
    user_hidden = tmp_path / ".notes.abcdefgh"
    user_hidden.write_text("not ours")
    save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name,
                                                                 user_hidden.name])
    assert nib.load(str(target)).shape == (4, 4, 4)
    # a folder-wide sweep (run_batch does one) also takes the other target's leftover
    assert remove_stale_partials(tmp_path) == [other]
    # a failing writer leaves nothing
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as p:
            p.write_text("{")
            raise RuntimeError("killed")
    assert not (tmp_path / "x.json").exists() and not p.exists()


def test_killed_writer_leftover_is_ignored_then_removed(tmp_path, stand_in, capsys, caplog):
    """A writer SIGKILLed mid-write leaves a hidden partial file; no command reads it as data, and
    the next segment run into that folder removes it."""
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys, time; from abdoseg.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'\\x1f\\x8b\\x08\\x00' + b'x' * 1000)\n"
            "    print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out / "A.nii.gz")], stdout=subprocess.PIPE, text=True)
    leftover = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert leftover.is_file() and leftover.parent == out and not (out / "A.nii.gz").exists()
    # evaluate: the leftover in the prediction (and ground-truth) folder is not a case
    from abdoseg.evaluation.evaluate import evaluate

    gt = tmp_path / "gt"
    save_nifti(np.zeros(SHAPE, np.uint8) + (_ct() > 0), AFFINE, gt / "A.nii.gz")
    shutil.copy(leftover, gt / leftover.name)
    save_nifti(np.zeros(SHAPE, np.uint8) + (_ct() > 0), AFFINE, out / "B.nii.gz")
    shutil.copy(out / "B.nii.gz", out / "A.nii.gz.tmp")
    with pytest.raises(InputError, match="none of its 1 prediction"):
        evaluate(str(out), str(gt), str(tmp_path / "ev0"), workers=1)
    shutil.copy(out / "B.nii.gz", out / "A.nii.gz")
    s = evaluate(str(out), str(gt), str(tmp_path / "ev"), workers=1, classes="1")
    assert s["n_cases"] == 1 and s["unmatched_predictions"] == ["B"] and s["per_class"]["1"]["dsc"] == 1.0
    (out / "A.nii.gz").unlink()
    # segment and prepare do not list it either
    from abdoseg.io import nifti_cases
    from abdoseg.segment import find_cases

    assert set(nifti_cases(out)[0]) == {"B"} and set(nifti_cases(gt)[0]) == {"A"}
    assert [c["case_id"] for c in find_cases(out)] == ["B"]
    # the next run writing into the folder removes the leftover and writes the complete mask
    inp = tmp_path / "in"
    save_nifti(_ct(), AFFINE, inp / "A_0000.nii.gz")
    code, err = _segment(inp, out, capsys, caplog)
    assert code == 0, err
    assert not leftover.exists()
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "A.nii.gz.tmp", "B.nii.gz"]
    assert nib.load(str(out / "A.nii.gz")).shape == SHAPE


# ----------------------------------------------------------------------------------------------
# 3. output folder inside the input folder: resume works
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["masks", "results/masks"])
def test_output_inside_input_resumes(tmp_path, stand_in, capsys, caplog, sub):
    nest = tmp_path / "nest"
    save_nifti(_ct(), AFFINE, nest / "A_0000.nii.gz")
    save_nifti(_ct()[::-1], AFFINE, nest / "B_0000.nii.gz")
    out = nest / sub
    code, err = _segment(nest, out, capsys, caplog)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.nii.gz"]
    mtimes = _tree(out)
    code, err = _segment(nest, out, capsys, caplog)
    assert code == 0, err
    assert "2 kept from before" in err and "no readable DICOM" not in err
    assert _tree(out) == mtimes and len(stand_in.calls) == 2


# ----------------------------------------------------------------------------------------------
# 4. a symbolic link loop is one failed case, not the end of the folder
# ----------------------------------------------------------------------------------------------
def test_symlink_loop_fails_alone(tmp_path, stand_in, capsys, caplog):
    inp = tmp_path / "in"
    save_nifti(_ct(), AFFINE, inp / "good_0000.nii.gz")
    (inp / "loop.nii.gz").symlink_to("loop.nii.gz")
    (inp / "ring_a").symlink_to("ring_b")
    (inp / "ring_b").symlink_to("ring_a")
    (inp / "dangling.nii.gz").symlink_to("gone.nii.gz")
    out = tmp_path / "out"
    code, err = _segment(inp, out, capsys, caplog)
    assert code == 1 and "Traceback" not in err and "RuntimeError" not in err
    assert "4 problem(s) (1 of 5 case(s) segmented)" in err
    for name in ("loop.nii.gz", "ring_a", "ring_b"):
        assert f"{inp / name}: symbolic link loop" in err, (name, err)
    assert f"{inp / 'dangling.nii.gz'}: broken symbolic link" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]


# ----------------------------------------------------------------------------------------------
# 5. NaN or singular affine
# ----------------------------------------------------------------------------------------------
def _with_affine(path: Path, affine: np.ndarray) -> Path:
    """A NIfTI whose sform is ``affine`` verbatim (qform off), as a broken exporter writes it."""
    img = nib.Nifti1Image(_ct(), None)  # no affine of its own: nibabel keeps the header's sform on save
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def test_nan_and_singular_affines_are_rejected(tmp_path, stand_in, capsys, caplog):
    nan = AFFINE.copy()
    nan[1, 3] = np.nan
    singular = AFFINE.copy()
    singular[:3, 1] = singular[:3, 0]  # two voxel axes along the same world direction
    inp = tmp_path / "in"
    _with_affine(inp / "nanaff.nii.gz", nan)
    _with_affine(inp / "singular.nii.gz", singular)
    save_nifti(_ct(), AFFINE, inp / "good.nii.gz")
    assert np.isnan(nib.load(str(inp / "nanaff.nii.gz")).affine).any()  # the file really is broken
    out = tmp_path / "out"
    code, err = _segment(inp, out, capsys, caplog)
    assert code == 1 and "Traceback" not in err
    assert f"{inp / 'nanaff.nii.gz'}: the affine (voxel -> world matrix) has NaN/infinite entries at [1,3]" in err
    assert f"{inp / 'singular.nii.gz'}: the affine (voxel -> world matrix) is singular" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]
    assert np.all(np.isfinite(nib.load(str(out / "good.nii.gz")).affine))


def test_validate_ctd_checks_the_metatensor_affine():
    import torch
    from monai.data import MetaTensor

    from abdoseg.inference.ct_checks import ValidateCTd

    img = torch.as_tensor(_ct()[None].astype(np.float32))
    ok = ValidateCTd("image")({"image": MetaTensor(img, affine=torch.as_tensor(AFFINE),
                                                   meta={"filename_or_obj": "ok.nii.gz"})})
    assert ok["image"].shape == (1, *SHAPE)
    for bad, why in [(np.diag([6.0, 6.0, np.inf, 1.0]), "NaN/infinite entries at [2,2]"),
                     (np.diag([6.0, 0.0, 6.0, 1.0]), "singular")]:
        with pytest.raises(InputError, match=r"^ct\.nii\.gz: .*" + why.replace("[", r"\[").replace("]", r"\]")):
            ValidateCTd("image")({"image": MetaTensor(img, affine=torch.as_tensor(bad),
                                                      meta={"filename_or_obj": "ct.nii.gz"})})


# ----------------------------------------------------------------------------------------------
# 6. evaluate does not trust its inputs
# ----------------------------------------------------------------------------------------------
def _eval_case(root: Path, name="CASE_A", pred_affine=AFFINE, pred_values=None, gt_values=None):
    gt = np.zeros(SHAPE, np.int16)
    gt[10:30, 10:30, 5:25] = 1
    gt[15:20, 15:20, 10:15] = 14
    pred = gt.copy()
    if pred_values is not None:
        pred[0, 0, : len(pred_values)] = pred_values
    if gt_values is not None:
        gt[0, 0, : len(gt_values)] = gt_values
    save_nifti(gt, AFFINE, root / "gt" / f"{name}.nii.gz")
    save_nifti(pred, pred_affine, root / "pred" / f"{name}.nii.gz")
    return root / "pred" / f"{name}.nii.gz", root / "gt" / f"{name}.nii.gz"


def test_evaluate_rejects_unknown_label_values(tmp_path):
    from abdoseg.evaluation.evaluate import evaluate

    pred, gt = _eval_case(tmp_path / "p", pred_values=[200, -5])
    with pytest.raises(InputError) as err:
        evaluate(str(pred.parent), str(gt.parent), str(tmp_path / "o1"), workers=1)
    assert err.value.path == str(pred) and "outside 0..14" in str(err.value) and "-5, 200" in str(err.value)
    pred, gt = _eval_case(tmp_path / "g", gt_values=[15])
    with pytest.raises(InputError) as err:
        evaluate(str(pred.parent), str(gt.parent), str(tmp_path / "o2"), workers=2)
    assert err.value.path == str(gt) and "15" in str(err.value)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # a clean pair scores 1.0 (the check can pass)
    pred, gt = _eval_case(tmp_path / "c")
    s = evaluate(str(pred.parent), str(gt.parent), str(tmp_path / "o3"), workers=1, classes="1,14")
    assert s["per_class"]["1"]["dsc"] == 1.0 and s["per_class"]["14"]["dsc"] == 1.0


def test_evaluate_rejects_a_prediction_on_another_grid(tmp_path, capsys):
    from abdoseg.evaluation.evaluate import evaluate

    twice = AFFINE.copy()
    twice[:3, :3] *= 2  # 2x spacing: same array, identical scores, wrong anatomy
    pred, gt = _eval_case(tmp_path, pred_affine=twice)
    with pytest.raises(InputError) as err:
        evaluate(str(pred.parent), str(gt.parent), str(tmp_path / "o"), workers=1)
    msg = str(err.value)
    assert msg.startswith(f"{pred}: voxel grid differs from ground truth {gt}") and "\n" not in msg
    assert "spacing (12, 12, 12) vs (6, 6, 6) mm" in msg
    shifted = AFFINE.copy()
    shifted[2, 3] += 3.0  # half a slice
    pred, gt = _eval_case(tmp_path / "s", pred_affine=shifted)
    code, err = _cli(["evaluate", "--pred_dir", str(pred.parent), "--gt_dir", str(gt.parent), "--out_dir",
                      str(tmp_path / "o2")], capsys)
    assert code == 1 and "origin (120, 120, -87) vs (120, 120, -90) mm" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_evaluate_empty_or_unmatched_prediction_folder_is_an_error(tmp_path, capsys):
    pred, gt = _eval_case(tmp_path)
    pred.unlink()
    code, err = _cli(["evaluate", "--pred_dir", str(pred.parent), "--gt_dir", str(gt.parent), "--out_dir",
                      str(tmp_path / "o")], capsys)
    assert code == 1 and f"{pred.parent}: no *.nii.gz prediction files" in err
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, pred.parent / "case_a_pred.nii.gz")
    code, err = _cli(["evaluate", "--pred_dir", str(pred.parent), "--gt_dir", str(gt.parent), "--out_dir",
                      str(tmp_path / "o")], capsys)
    assert code == 1 and "none of its 1 prediction file(s) matches" in err and "case_a_pred vs CASE_A" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# 7. messages: read-only output, generate arguments, datalists, implausible input
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A folder nobody may write into: chmod for a normal user; for root (who ignores modes) a
    read-only tmpfs when mounting is allowed, else a write probe that fails like one."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True,
        timeout=30).returncode == 0
    if not mounted:
        import abdoseg.io

        real_open = os.open

        def fake_open(path, flags, *a, **k):
            if Path(path).parent == folder and flags & os.O_CREAT:
                raise OSError(30, "Read-only file system", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(abdoseg.io.os, "open", fake_open)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False, timeout=30)


def test_readonly_output_folder_is_one_error(tmp_path, readonly_dir, stand_in, capsys, caplog):
    inp = tmp_path / "in"
    save_nifti(_ct(), AFFINE, inp / "A_0000.nii.gz")
    save_nifti(_ct(), AFFINE, inp / "B_0000.nii.gz")
    before = _tree(inp)
    code, err = _segment(inp, readonly_dir, capsys, caplog)
    assert code == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert lines == [f"abdoseg segment: error: {readonly_dir}: output folder is not writable "
                     "(Read-only file system)"] or lines == [
        f"abdoseg segment: error: {readonly_dir}: output folder is not writable (Permission denied)"], err
    assert stand_in.calls == [] and list(readonly_dir.iterdir()) == [] and _tree(inp) == before


def test_generate_bad_arguments_leave_nothing(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--out_dir", str(a_file)], f"{a_file}: exists and is not a folder"),
        (["--out_dir", str(a_file / "sub")], f"{a_file / 'sub'}: cannot create the output folder (Not a directory)"),
        (["--out_dir", str(tmp_path / "ph"), "--slices", "-3"], "--slices: must be between 4 and 2000, got -3"),
        (["--out_dir", str(tmp_path / "ph"), "--slices", "2.5"], "--slices: must be an integer, got 2.5"),
        (["--out_dir", str(tmp_path / "ph"), "--workers", "0"], "--workers: must be >= 1, got 0"),
    ]
    for args, expected in cases:
        code, err = _cli(["generate", *args], capsys)
        assert code == 1 and err.strip() == f"abdoseg generate: error: {expected}", (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and a_file.read_text() == "x"


def test_check_items_exist_names_the_missing_file(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    items = [{"image": str(tmp_path / "a.nii.gz")}, {"image": str(tmp_path / "b.nii.gz"), "label": None}]
    with pytest.raises(InputError) as err:
        check_items_exist(items, "image", source=tmp_path / "datalist.json")
    assert str(err.value) == f"{tmp_path / 'b.nii.gz'}: file not found (item 1 'image' (listed in " \
                             f"{tmp_path / 'datalist.json'}))"
    assert check_items_exist(items[:1], ["image", "label"]) == items[:1]
    with pytest.raises(InputError, match="c.nii.gz: file not found"):
        check_items_exist([{"image": [str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii.gz")]}])
    with pytest.raises(InputError, match="d.nii.gz"):
        check_items_exist([str(tmp_path / "d.nii.gz")])


@pytest.mark.parametrize("spacing, scale, expected", [
    ((6.0, 6.0, 6.0), 1, None),
    ((10.0, 10.0, 10.0), 1, "voxel size 10 x 10 x 10 mm is above 8 mm"),
    ((0.1, 0.1, 0.1), 1, "voxel size 0.1 x 0.1 x 0.1 mm is below 0.3 mm"),
    ((2.0, 2.0, 2.0), 1, "field of view 80 x 80 x 60 mm cannot hold an abdomen"),
    ((6.0, 6.0, 6.0), 1000, "values [-1e+06, 702000] lie beyond any Hounsfield scale"),
    ((6.0, 6.0, 6.0), 10, "of the voxels lie in [-1100, 3100] HU"),
])
def test_implausible_input_warns_once_and_names_the_file(spacing, scale, expected):
    from abdoseg.inference.ct_checks import ImplausibleCTWarning, check_ct_volume

    arr = _ct().astype(np.float32) * scale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_ct_volume(arr, spacing, "odd.nii.gz", affine=np.diag([*spacing, 1.0]))
    ours = [w for w in caught if issubclass(w.category, ImplausibleCTWarning)]
    if expected is None:
        assert ours == []
    else:
        assert len(ours) == 1, [str(w.message) for w in ours]
        msg = str(ours[0].message)
        assert msg.startswith("odd.nii.gz: unusual for an abdominal CT: ") and expected in msg and "\n" not in msg


def test_implausible_input_runs_with_a_one_line_warning(tmp_path, stand_in, capsys, caplog):
    inp = tmp_path / "in"
    big = np.diag([10.0, 10.0, 10.0, 1.0])
    save_nifti(_ct(), big, inp / "coarse_0000.nii.gz")
    save_nifti(_ct(), AFFINE, inp / "normal_0000.nii.gz")
    hu = _ct((40, 40, 12))
    from test_segment import _write_dicom_series

    _write_dicom_series(hu, np.diag([0.1, 0.1, 6.0, 1.0]), inp / "tiny_dicom")
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if ln.startswith("abdoseg segment: warning:")]
    assert len(warn) == 2, err
    assert any(f"{inp / 'coarse_0000.nii.gz'}: unusual for an abdominal CT: voxel size 10 x 10 x 10 mm" in w
               for w in warn), warn
    # the DICOM case is named by its folder, not by the temporary NIfTI it was converted to
    assert any(f"{inp / 'tiny_dicom'}: unusual for an abdominal CT: voxel size 0.1 x 0.1 x 6 mm" in w
               for w in warn), warn
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["coarse.nii.gz", "normal.nii.gz",
                                                                   "tiny_dicom.nii.gz"]


def test_prepare_skips_temporary_files(tmp_path):
    from abdoseg.data.prepare import prepare

    root = tmp_path / "data"
    lab = np.zeros(SHAPE, np.uint8)
    lab[10:20, 10:20, 10:20] = 1
    save_nifti(_ct(), AFFINE, root / "imagesTr" / "X_0000.nii.gz")
    save_nifti(lab, AFFINE, root / "labelsTr" / "X.nii.gz")
    (root / "imagesTr" / ".Y_0000.nii.gz.0a1b2c3d-1-1.partial.nii.gz").write_bytes(b"\x1f\x8b")
    (root / "imagesTr" / "Z_0000.nii.gz.tmp").write_bytes(b"")
    (root / "labelsTr" / ".X.nii.gz.k2j4_x9q.nii.gz").write_bytes(b"\x1f\x8b")
    datalist = json.loads(Path(prepare(str(root), strict=True, workers=1, quiet=True, dataset_json=False)).read_text())
    assert [Path(d["image"]).name for d in datalist["training"]] == ["X_0000.nii.gz"]


def test_dicom_positions_rounded_by_the_scanner_are_accepted_gaps_still_found(tmp_path):
    """Positions written with one decimal (0.625 mm slices: steps of 0.6 and 0.7 mm) are not
    'uneven'; a missing slice in such a series still is an error."""
    import pydicom

    from abdoseg.dicom.series import read_dicom_series

    hu = _ct((40, 40, 12))
    aff = np.diag([-0.8, -0.8, 0.625, 1.0])
    aff[:3, 3] = (100.0, 100.0, -50.03)
    for name in ("rounded", "rounded_gap"):
        files = _write_series(tmp_path / name, hu, aff)
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = [f"{float(v):.1f}" for v in ds.ImagePositionPatient]
            ds.save_as(f)
    arr, got = read_dicom_series(tmp_path / "rounded")
    assert np.array_equal(arr, hu)
    assert got[2, 2] == pytest.approx((-43.2 + 50.0) / 11, abs=1e-4)  # first to last / (n - 1)
    assert abs(got[2, 2] - 0.625) < 0.01
    files = sorted((tmp_path / "rounded_gap").iterdir())
    files[6].unlink()
    _expect_series_error(tmp_path / "rounded_gap", files[5].name, files[7].name, "1 slice(s) missing")


# ----------------------------------------------------------------------------------------------
# issue 23: no silent wrong answer
# ----------------------------------------------------------------------------------------------
def _in_fov(shape=SHAPE) -> np.ndarray:
    """In-plane disc of a scanner's reconstruction field of view (inscribed in the slice)."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    return np.broadcast_to((x ** 2 + y ** 2 <= 1.0)[:, :, None], shape)


def _offset_ct_padded() -> np.ndarray:
    """The CT stored with +1024 (air at ~0 inside the scan) and -1024 outside the circular FOV."""
    ct = (_ct() + 1024).astype(np.int16)
    ct[~_in_fov()] = -1024
    return ct


def test_offset_ct_with_fov_padding_is_refused_like_without_it(tmp_path, stand_in, capsys, caplog):
    """+1024-offset data used to pass the value check through its -1024 padding (issue 23)."""
    from abdoseg.inference.ct_checks import check_ct_volume, fov_padding_value

    padded = _offset_ct_padded()
    assert padded.min() == -1024 and padded.max() >= 100  # the whole array's range passes the old test
    assert fov_padding_value(padded) == -1024.0
    with pytest.raises(InputError, match=r"^off\.nii\.gz: value range \[24, 1726\] inside the scan field of view "
                                         r"\(74% of the voxels; padding value -1024 outside it left out\) does not "
                                         r"look like CT.*stored with an offset \(e\.g\. \+1024: air at 24\)"):
        check_ct_volume(padded, SPACING, "off.nii.gz")
    inp = tmp_path / "in"
    save_nifti(padded, AFFINE, inp / "offset_0000.nii.gz")
    save_nifti((_ct() + 1024).astype(np.int16), AFFINE, inp / "offset_nopad_0000.nii.gz")
    save_nifti(_ct(), AFFINE, inp / "good_0000.nii.gz")
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 1 and "Traceback" not in err
    assert f"{inp / 'offset_0000.nii.gz'}: value range" in err and "stored with an offset" in err
    assert f"{inp / 'offset_nopad_0000.nii.gz'}: value range" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


@pytest.mark.parametrize("pad", [-1024, -2048, -3024])
def test_hu_ct_with_fov_padding_is_accepted_and_padding_found(pad):
    from abdoseg.inference.ct_checks import ImplausibleCTWarning, check_ct_volume, fov_padding_value

    ct = _ct() - 24  # air at -1024..-1022 inside the FOV, as scanners clip it
    ct[~_in_fov()] = pad
    assert fov_padding_value(ct) == float(min(pad, -1024))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleCTWarning)
        check_ct_volume(ct, SPACING, "padded.nii.gz")


def test_constant_air_around_a_body_is_not_padding():
    """Air of one value around a body that stays inside the slice is air, not FOV padding: the
    synthetic CTs of this suite (air exactly -1000 outside an ellipse) must stay accepted."""
    from abdoseg.inference.ct_checks import check_ct_volume, fov_padding_value

    flat_air = np.where(_ct() > -900, _ct(), -1000).astype(np.int16)
    assert fov_padding_value(flat_air) is None
    check_ct_volume(flat_air, SPACING, "flat_air.nii.gz")
    assert fov_padding_value(np.full(SHAPE, -1000, np.int16)) is None


def test_air_painted_classes_finds_organs_on_air():
    from abdoseg.inference.ct_checks import air_painted_classes

    ct = _ct()
    mask = np.zeros(SHAPE, np.uint8)
    mask[18:22, 18:22, 10:20] = 1  # liver on tissue / bone: fine
    mask[0:10, 0:10, 0:10] = 3  # spleen on air
    mask[0:1, 0:1, 0:1] = 5  # a 0.2 mL speck of aorta on air: below min_ml
    found = air_painted_classes(mask, ct, SPACING)
    assert found == [(3, round(999 * 0.216, 1), round(float(ct[mask == 3].mean()), 1))]
    assert found[0][2] < -980
    assert air_painted_classes(mask, ct, SPACING, min_ml=0.1)[0][0] == 3
    assert [c for c, _, _ in air_painted_classes(mask, ct, SPACING, min_ml=0.1)] == [3, 5]
    assert air_painted_classes(np.zeros(SHAPE, np.uint8), ct, SPACING) == []
    gas = np.zeros(SHAPE, np.uint8)
    gas[0:10, 0:10, 0:10] = 11  # a gas-filled stomach (esophagus, duodenum) is anatomy, not a wrong answer
    assert air_painted_classes(gas, ct, SPACING) == []
    assert air_painted_classes(gas, ct, SPACING, classes=(11,))[0][0] == 11
    with pytest.raises(ValueError, match="voxels"):
        air_painted_classes(mask[:-1], ct, SPACING)


def test_organs_painted_on_air_warn_naming_file_class_and_remedy(tmp_path, monkeypatch, capsys, caplog):
    """A small body in a large FOV: the mask is written (exit 0) with a one-line warning."""
    import abdoseg.segment

    class OnAir(_StandInSegmenter):
        def __call__(self, item):
            mask, affine = super().__call__(item)
            mask[:8, :8, :] = 3  # "spleen" in the air corner
            return mask, affine

    monkeypatch.setattr(abdoseg.segment, "load_cascade", lambda *a, **k: OnAir())
    inp = tmp_path / "small_body_0000.nii.gz"
    save_nifti(_ct(), AFFINE, inp)
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if ln.startswith("abdoseg segment: warning:")]
    assert len(warn) == 1, err
    assert warn[0].startswith(f"abdoseg segment: warning: {inp}: organs predicted on air (spleen ")
    assert "(spleen 414.7 mL at a mean of -999 HU)" in warn[0] and "crop the CT to the body" in warn[0]
    assert (tmp_path / "out" / "small_body.nii.gz").is_file()
    # a mask on tissue only: no warning
    monkeypatch.setattr(abdoseg.segment, "load_cascade", lambda *a, **k: _StandInSegmenter())
    code, err = _segment(inp, tmp_path / "out3", capsys, caplog)
    assert code == 0 and "warning" not in err, err


def _prepare_case(root: Path, name: str, image_name: str, ct=None) -> None:
    lab = np.zeros(SHAPE, np.uint8)
    lab[10:20, 10:20, 10:20] = 1
    save_nifti(_ct() if ct is None else ct, AFFINE, root / "imagesTr" / image_name)
    save_nifti(lab, AFFINE, root / "labelsTr" / f"{name}.nii.gz")


@pytest.mark.parametrize("other_shape", [False, True])
def test_prepare_two_images_of_one_case_is_a_problem(tmp_path, capsys, other_shape):
    """PHANTOM_0002.nii.gz and PHANTOM_0002_0000.nii.gz are both case PHANTOM_0002: never guess."""
    from abdoseg.data.prepare import prepare

    root = tmp_path / "data"
    _prepare_case(root, "PHANTOM_0001", "PHANTOM_0001_0000.nii.gz")
    _prepare_case(root, "PHANTOM_0002", "PHANTOM_0002_0000.nii.gz")
    save_nifti(_ct((40, 40, 20)) if other_shape else _ct()[::-1].copy(), AFFINE,
               root / "imagesTr" / "PHANTOM_0002.nii.gz")
    out = Path(prepare(str(root), workers=1, quiet=True, dataset_json=False))
    report = json.loads(out.with_name("datalist_report.json").read_text())
    assert [p["case"] for p in report["problems"]] == ["PHANTOM_0002"]
    reason = report["problems"][0]["reason"]
    assert reason == ("PHANTOM_0002.nii.gz and PHANTOM_0002_0000.nii.gz in imagesTr/ all map to case PHANTOM_0002; "
                      "rename or remove all but one"), reason
    assert [d["image"] for d in json.loads(out.read_text())["training"]] == ["imagesTr/PHANTOM_0001_0000.nii.gz"]
    for p in out.parent.glob("datalist*"):
        p.unlink()
    code, err = _cli(["prepare", "--data_dir", str(root), "--strict", "--workers", "1"], capsys)
    assert code == 1 and "all map to case PHANTOM_0002" in err and "shape" not in err
    assert err.strip().splitlines()[-1].startswith("abdoseg prepare: error: ")
    assert not (root / "datalist.json").exists()


def test_uppercase_nifti_extension_is_one_case_in_segment_and_prepare(tmp_path, stand_in, capsys, caplog):
    from abdoseg.data.prepare import prepare
    from abdoseg.io import case_id_from_image

    assert case_id_from_image("UPPER.NII.GZ") == "UPPER" and case_id_from_image("X_0000.Nii") == "X"
    inp = tmp_path / "in"
    save_nifti(_ct(), AFFINE, inp / "UPPER.nii.gz")
    (inp / "UPPER.nii.gz").rename(inp / "UPPER.NII.GZ")
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["UPPER.nii.gz"]
    root = tmp_path / "data"
    _prepare_case(root, "CASE", "CASE_0000.nii.gz")
    (root / "imagesTr" / "CASE_0000.nii.gz").rename(root / "imagesTr" / "CASE_0000.NII.GZ")
    dl = json.loads(Path(prepare(str(root), strict=True, workers=1, quiet=True, dataset_json=False)).read_text())
    assert [d["image"] for d in dl["training"]] == ["imagesTr/CASE_0000.NII.GZ"]


def _bundle_copy(tmp_path: Path) -> Path:
    from abdoseg.segment import DEFAULT_BUNDLE

    b = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, b, ignore=shutil.ignore_patterns("docs", "eval"))
    return b


def _malicious_pickle(path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "PWNED"),))

    path.write_bytes(pickle.dumps(Boom(), protocol=4))


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "models/coarse_model.pt: truncated or corrupt checkpoint (PytorchStreamReader failed reading zip "
                  "archive: failed finding central directory); copy or download it again"),
    ("empty", "models/coarse_model.pt: truncated or corrupt checkpoint (EOFError); copy or download it again"),
    ("fine_weights", "models/coarse_model.pt: weights do not fit the coarse network (coarse_network_def): "),
    ("pickle", "models/coarse_model.pt: not a plain PyTorch state dict: it holds Python objects that the safe "
               "loader refuses"),
    ("metadata", "configs/metadata.json: not valid JSON: Expecting value at line 1 column 13"),
    ("inference", "configs/inference.json: not valid JSON: Expecting property name enclosed in double quotes at "
                  "line 1 column 9"),
])
def test_broken_bundle_is_one_line_not_a_traceback(tmp_path, capsys, damage, expected):
    """A truncated or foreign checkpoint, or a config that is not JSON: one line naming the file
    (no MONAI 'Failed to instantiate component', no PyTorch weights_only=False advice), exit 1."""
    b = _bundle_copy(tmp_path)
    coarse = b / "models" / "coarse_model.pt"
    if damage == "truncated":
        coarse.write_bytes(coarse.read_bytes()[:100_000])
    elif damage == "empty":
        coarse.write_bytes(b"")
    elif damage == "fine_weights":
        shutil.copy(b / "models" / "model.pt", coarse)
    elif damage == "pickle":
        _malicious_pickle(coarse)
    elif damage == "metadata":
        (b / "configs" / "metadata.json").write_text('{"version": ')
    else:
        (b / "configs" / "inference.json").write_text('{"a": 1,}')
    ct = tmp_path / "ct.nii.gz"
    save_nifti(_ct(), AFFINE, ct)
    code, err = _cli(["segment", "-i", str(ct), "-o", str(tmp_path / "out"), "--device", "cpu",
                      "--bundle_dir", str(b)], capsys)
    assert code == 1
    ours = [ln for ln in err.splitlines() if ln.startswith("abdoseg segment: error: ")]
    assert len(ours) == 1 and "Traceback" not in err and "Failed to instantiate" not in err, err
    assert ours[0].startswith(f"abdoseg segment: error: {b}/") and expected in ours[0], ours[0]
    assert "weights_only" not in err and "will likely succeed" not in err and "pickle protocol" not in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_file_name_starting_with_a_dash(tmp_path, stand_in, capsys, caplog, monkeypatch):
    """``-i -x.nii.gz`` is the file -x.nii.gz, not fire's flag -x (it gave a TypeError traceback)."""
    from abdoseg.cli import join_dash_values
    from abdoseg.segment import segment

    assert join_dash_values(segment, ["-i", "-x.nii.gz", "-o", "out", "--force"]) == [
        "--input=-x.nii.gz", "-o", "out", "--force"]
    assert join_dash_values(segment, ["-i", "a.nii.gz", "--output", "--force"]) == [
        "-i", "a.nii.gz", "--output", "--force"]  # a flag is never eaten as a value
    monkeypatch.chdir(tmp_path)
    save_nifti(_ct(), AFFINE, tmp_path / "-x.nii.gz")
    code, err = _cli(["segment", "-i", "-x.nii.gz", "-o", "-masks", "--device", "cpu"], capsys, caplog)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "-masks").iterdir()) == ["-x.nii.gz"]
    code, err = _cli(["segment", "-o", "masks", "--device", "cpu", "-i"], capsys, caplog)
    assert code == 1 and "Traceback" not in err
    assert "abdoseg segment: error: --input: needs a path (for a file name starting with '-', write ./-x.nii.gz)" in err


def test_dcm2niix_sidecars_are_skipped_other_files_still_fail_once(tmp_path, stand_in, capsys, caplog):
    """``ct.nii.gz`` + ``ct.json`` (dcm2niix) is one case; a stray file is one failure, its reason
    printed once (it was printed three times: log, batch summary, final list)."""
    inp = tmp_path / "in"
    save_nifti(_ct(), AFFINE, inp / "ct.nii.gz")
    (inp / "ct.json").write_text('{"Modality": "CT"}')
    save_nifti(_ct(), AFFINE, inp / "B_0000.nii.gz")
    (inp / "B_0000.json").write_text("{}")
    (inp / "orphan.json").write_text("{}")  # no NIfTI of that name: not a sidecar
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["B.nii.gz", "ct.nii.gz"]
    assert "ct.json" not in err and "B_0000.json" not in err
    assert "1 problem(s) (2 of 3 case(s) segmented)" in err
    assert err.count(f"{inp / 'orphan.json'}: not a NIfTI file") == 1, err
    assert "FAILED" not in err and "written, " not in err  # no second per-batch summary


def test_library_noise_is_silenced_our_warnings_are_not(tmp_path):
    """A real ``abdoseg segment`` run prints only its own lines (no nvImageCodec, Orientationd or
    'Setting affine' lines from the libraries); the filters are targeted, not wholesale."""
    from abdoseg.cli import LIBRARY_NOISE, quiet_library_noise

    ct = tmp_path / "ct.nii.gz"
    save_nifti(_ct(), np.diag([10.0, 10.0, 10.0, 1.0]), ct)  # 10 mm voxels: our own warning must show
    proc = subprocess.run([sys.executable, "-m", "abdoseg.cli", "segment", "-i", str(ct), "-o",
                           str(tmp_path / "m.nii.gz"), "--device", "cpu"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": ""})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(("abdoseg segment: warning:", "masks in "))]
    assert lines == ours, proc.stderr
    assert any("voxel size 10 x 10 x 10 mm is above 8 mm" in ln for ln in lines), proc.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        warnings.warn("Setting affine, but the applied meta contains an affine. This will be overwritten.")
        warnings.warn("Setting something else")
        warnings.warn("abdoseg: a warning of ours", UserWarning)
    assert [str(w.message) for w in caught] == ["Setting something else", "abdoseg: a warning of ours"]
    assert len(LIBRARY_NOISE) == 3


def test_two_series_warning_names_the_series_used(tmp_path):
    from test_segment import _write_dicom_series

    from abdoseg.dicom.series import read_dicom_series

    series = tmp_path / "two"
    _write_dicom_series(_ct((40, 40, 12)), AFFINE, series, series=1)
    _write_dicom_series(_ct((40, 40, 6)), AFFINE, series, series=2)
    with pytest.warns(UserWarning) as rec:
        arr, _ = read_dicom_series(series)
    assert arr.shape == (40, 40, 12)
    msg = [str(w.message) for w in rec if "DICOM series found" in str(w.message)]
    assert msg == [f"{series}: 2 DICOM series found; segmenting the largest, (UID 1.2.826.0.1.3680043.2.1.1, "
                   "12 files); not segmented: (UID 1.2.826.0.1.3680043.2.1.2, 6 files) (put each series in its own "
                   "folder to segment it)"], msg


def test_many_junk_files_in_a_series_folder_name_five_and_count(tmp_path):
    series = tmp_path / "series"
    _write_series(series)
    for i in range(12):
        (series / f"junk{i:02d}.dcm").write_bytes(b"not dicom at all" * 4)
    from abdoseg.dicom.series import read_dicom_series

    with pytest.raises(InputError) as ei:
        read_dicom_series(series)
    msg = str(ei.value)
    assert msg.startswith(f"{series / 'junk00.dcm'}: not a DICOM file") and "\n" not in msg
    assert ("12 files there are not readable DICOM slices: junk00.dcm, junk01.dcm, junk02.dcm, junk03.dcm, "
            "junk04.dcm and 7 more; move them out of the series folder") in msg


def test_full_disk_while_writing_the_preview_names_the_preview(tmp_path, stand_in, capsys, caplog, monkeypatch):
    import errno

    import matplotlib.figure

    def full_disk(self, fname, *a, **k):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    inp = tmp_path / "ct_0000.nii.gz"
    save_nifti(_ct(), AFFINE, inp)
    out = tmp_path / "out"
    code, err = _segment(inp, out, capsys, caplog, "--preview", "--statistics")
    assert code == 1
    line = [ln for ln in err.splitlines() if "preview" in ln]
    assert line == [f"  {out / 'ct_preview.png'}: not written (No space left on device); the mask ct.nii.gz is "
                    "complete, free space and rerun to add it"], err
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "ct_statistics.json"]  # no half-written PNG


def test_all_background_ground_truth_warns_in_evaluate(tmp_path, capsys):
    from abdoseg.evaluation.evaluate import EmptyGroundTruthWarning, evaluate

    pred, gt = _eval_case(tmp_path, "GOOD")
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, tmp_path / "gt" / "EMPTY.nii.gz")
    shutil.copy(pred, tmp_path / "pred" / "EMPTY.nii.gz")
    with pytest.warns(EmptyGroundTruthWarning) as rec:
        s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "ev"), workers=1, classes="1,14")
    assert s["empty_ground_truth"] == ["EMPTY"]
    assert len(rec) == 1 and str(rec[0].message).startswith(f"{tmp_path / 'gt' / 'EMPTY.nii.gz'}: ground truth is "
                                                            "all background")
    assert s["per_class"]["1"]["dsc"] == 0.5  # GOOD scores 1, EMPTY 0: the warning explains the drop
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyGroundTruthWarning)
        (tmp_path / "gt" / "EMPTY.nii.gz").unlink()
        (tmp_path / "pred" / "EMPTY.nii.gz").unlink()
        assert evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "ev2"),
                        workers=1)["empty_ground_truth"] == []


@pytest.mark.slow
def test_committed_cascade_never_paints_organs_on_air_silently(tmp_path, capsys, caplog):
    """The committed weights on a phantom and on the same body shrunk to 1/2.8 of a 400 mm field of
    view (air around it): every class the output puts on air (mean < -800 HU) is in a warning
    naming the file; a class on tissue is not. Checked on the written masks, whatever the model."""
    from scipy import ndimage

    from abdoseg.inference.ct_checks import air_painted_classes
    from abdoseg.labels import LABELS
    from abdoseg.data.phantom import make_case

    spacing = (3.2, 3.2, 6.0)
    hu, _, affine = make_case(3, shape=(128, 128, 40), spacing_mm=spacing, axcodes="RAS")
    small = np.round(ndimage.zoom(hu.astype(np.float32), (1 / 2.8, 1 / 2.8, 1), order=1)).astype(np.int16)
    shrunk = np.full(hu.shape, -1000, np.int16)
    x0, y0 = (hu.shape[0] - small.shape[0]) // 2, (hu.shape[1] - small.shape[1]) // 2
    shrunk[x0:x0 + small.shape[0], y0:y0 + small.shape[1]] = small
    inp = tmp_path / "in"
    save_nifti(hu, affine, inp / "normal.nii.gz")
    save_nifti(shrunk, affine, inp / "small_body.nii.gz")
    code, err = _segment(inp, tmp_path / "out", capsys, caplog)
    assert code == 0, err
    for name, ct in (("normal", hu), ("small_body", shrunk)):
        mask = np.asarray(nib.load(str(tmp_path / "out" / f"{name}.nii.gz")).dataobj)
        found = air_painted_classes(mask, ct, spacing)
        lines = [ln for ln in err.splitlines() if f"{inp / name}.nii.gz: organs predicted on air" in ln]
        assert len(lines) == (1 if found else 0), (name, found, err)
        for c, ml, mean in found:
            assert f"{LABELS[c]} {ml:g} mL at a mean of {mean:.0f} HU" in lines[0]


def test_uppercase_extension_in_evaluate_and_junk_only_folder_named(tmp_path, capsys):
    from abdoseg.evaluation.evaluate import evaluate
    from abdoseg.segment import find_cases

    pred, _ = _eval_case(tmp_path, "CASE_A")
    pred.rename(pred.with_name("CASE_A.NII.GZ"))
    s = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "ev"), workers=1, classes="1")
    assert s["missing_predictions"] == [] and s["per_class"]["1"]["dsc"] == 1.0
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(8):
        (junk / f"notes{i}.txt").write_text("x")
    with pytest.raises(InputError, match=r"no NIfTI files \(\.nii/\.nii\.gz\) and no DICOM series in this folder; it "
                                         r"holds 8 other file\(s\): notes0\.txt, notes1\.txt, notes2\.txt, "
                                         r"notes3\.txt, notes4\.txt and 3 more$"):
        find_cases(junk)


@pytest.mark.slow
def test_real_segment_killed_mid_run_resumes_to_the_clean_result(tmp_path):
    """A real ``abdoseg segment`` (committed weights) killed with SIGKILL after its first mask, in
    the middle of the next case: the rerun keeps the finished mask, computes the rest and ends with
    masks byte-identical to an uninterrupted run, and no temporary file is left."""
    from abdoseg.data.phantom import make_case

    inp = tmp_path / "in"
    for i in range(3):
        hu, _, affine = make_case(i, shape=(72, 64, 24), spacing_mm=(5.0, 5.0, 7.0), axcodes="RAS")
        save_nifti(hu, affine, inp / f"P{i}_0000.nii.gz")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "abdoseg.cli", "segment", "-i", str(inp), "-o", str(out), "--device", "cpu"]

    clean = tmp_path / "clean"
    subprocess.run(cmd(clean), check=True, capture_output=True, timeout=600)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "P0.nii.gz").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "P0.nii.gz").exists() and proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (out / "P2.nii.gz").exists()  # really interrupted mid-run
    first = (out / "P0.nii.gz").stat().st_mtime_ns
    res = subprocess.run(cmd(out), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "kept from before" in res.stderr and (out / "P0.nii.gz").stat().st_mtime_ns == first
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir()) == [
        "P0.nii.gz", "P1.nii.gz", "P2.nii.gz"]  # no hidden leftovers
    for p in clean.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_cli_error_lines_wrapped_input_error_oserror_and_real_bugs(monkeypatch, capsys):
    """The CLI's last line of defence: an InputError wrapped by a library (MONAI's instantiate) and
    an OSError are one line each; any other exception is a bug and keeps its traceback."""
    import errno

    import abdoseg.segment

    def wrapped(**kwargs):
        try:
            raise InputError("models/x.pt", "truncated or corrupt checkpoint")
        except InputError as exc:
            raise RuntimeError("Failed to instantiate component 'X'") from exc

    def full_disk(**kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/ct.nii.gz")

    def bug(**kwargs):
        raise ZeroDivisionError("a bug")

    for fn, expected in ((wrapped, "abdoseg segment: error: models/x.pt: truncated or corrupt checkpoint"),
                         (full_disk, "abdoseg segment: error: out/ct.nii.gz: No space left on device")):
        monkeypatch.setattr(abdoseg.segment, "segment", fn)
        code, err = _cli(["segment", "-i", "a.nii.gz", "-o", "b"], capsys)
        assert code == 1 and err.strip() == expected, err
    monkeypatch.setattr(abdoseg.segment, "segment", bug)
    with pytest.raises(ZeroDivisionError):
        _cli(["segment", "-i", "a.nii.gz", "-o", "b"], capsys)
