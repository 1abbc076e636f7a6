import nibabel as nib
import numpy as np

from abdoseg.evaluation.viz import overlay_png, to_ras


def test_to_ras_reorients_lps_and_keeps_spacing():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    aff = np.diag([-0.7, -0.8, 2.5, 1.0])  # LPS
    ras, sp = to_ras(arr, aff)
    assert ras.shape == (2, 3, 4) and sp == (0.7, 0.8, 2.5)
    np.testing.assert_array_equal(ras, arr[::-1, ::-1, :])
    assert nib.aff2axcodes(aff) == ("L", "P", "S")


def test_overlay_png_written_atomically(tmp_path):
    img = np.random.default_rng(0).normal(0, 50, (20, 22, 9)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[5:10, 6:12, 3:6] = 1
    lab[12:14, 6:8, 4] = 14
    out = overlay_png(img, lab, np.diag([1.5, 1.5, 3.0, 1]), tmp_path / "o.png", title="t", extra_label=lab)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
