"""``abdoseg segment`` imports only what the step at hand needs (issue 20, item 5).

Everything ``abdoseg segment`` does before it loads the cascade (finding the cases, laying out
the outputs, checking the bundle folder, ``--help``, an input error) runs without torch or MONAI,
and so without what ``import monai`` drags in (ignite and ``torch.distributed``, matplotlib,
scikit-image, ``scipy.signal``). Loading the cascade itself imports MONAI, whose ``__init__``
loads all its sub-packages and, with them, these modules: that part is MONAI's, not ours.

Each check runs in a fresh interpreter (``sys.executable -c``), so what the test process has
imported already does not count; no wall times are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

#: Modules the segment command must not import before it loads the cascade.
HEAVY_MODULES: tuple[str, ...] = (
    "torch",
    "torch.distributed",
    "monai",
    "ignite",
    "matplotlib",
    "skimage",
    "scipy.signal",
    "scipy.ndimage",
    "itk",
)

_REPORT = "HEAVY_LOADED="


def heavy_modules_loaded(code: str) -> tuple[list[str], str]:
    """``(the HEAVY_MODULES in sys.modules, stderr)`` after running ``code`` in a fresh interpreter
    (a ``SystemExit`` of ``code`` is caught, so a CLI call that ends in an error still reports)."""
    script = "\n".join([
        "import json, sys",
        "try:",
        *(f"    {line}" for line in code.strip().splitlines()),
        "except SystemExit:",
        "    pass",
        f"print({_REPORT!r} + json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_REPORT)]
    assert lines, f"no report in the output:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len(_REPORT):]), proc.stderr


def small_ct(path: Path) -> Path:
    """A tiny NIfTI CT at ``path`` (its content does not matter: no case is segmented)."""
    from abdoseg.io import save_nifti

    return save_nifti(np.full((4, 4, 4), -1000, dtype=np.int16), np.diag([2.0, 2.0, 3.0, 1.0]), path)


def test_the_check_sees_an_eager_import():
    """The subprocess check itself: a heavy module imported next to ``abdoseg.segment`` is reported."""
    loaded, _ = heavy_modules_loaded("import abdoseg.segment\nimport scipy.signal")
    assert "scipy.signal" in loaded and "torch" not in loaded


def test_import_segment_is_light():
    """``import abdoseg.segment`` and what ``segment()`` imports before its first step."""
    code = """
import abdoseg.segment
import abdoseg.inference.batch
from tqdm.auto import tqdm
"""
    assert heavy_modules_loaded(code) == ([], "")


def test_segment_help_is_light():
    loaded, _ = heavy_modules_loaded("from abdoseg.cli import main\nmain(['segment', '--help'])")
    assert loaded == []


def test_segment_up_to_the_cascade_is_light(tmp_path):
    """The real command through the CLI, stopped where it would load the cascade (a bundle folder
    without configs): cases found, outputs laid out, bundle checked, without torch or MONAI."""
    ct = small_ct(tmp_path / "in" / "CASE_0001_0000.nii.gz")
    not_a_bundle = tmp_path / "not_a_bundle"
    not_a_bundle.mkdir()
    code = f"""
from abdoseg.cli import main
main(['segment', '-i', {str(ct.parent)!r}, '-o', {str(tmp_path / 'out')!r}, '--bundle_dir', {str(not_a_bundle)!r}])
"""
    loaded, stderr = heavy_modules_loaded(code)
    assert "not a bundle folder" in stderr, stderr[-2000:]  # it got as far as loading the cascade
    assert loaded == []


def test_input_error_is_light(tmp_path):
    """A missing input is reported before anything heavy is imported."""
    code = f"""
from abdoseg.cli import main
main(['segment', '-i', {str(tmp_path / 'missing.nii.gz')!r}, '-o', {str(tmp_path / 'out')!r}])
"""
    loaded, stderr = heavy_modules_loaded(code)
    assert "input not found" in stderr, stderr[-2000:]
    assert loaded == []
