"""Suite-wide fixtures."""

from __future__ import annotations

import locale

import pytest


@pytest.fixture(autouse=True)
def _restore_process_locale():
    """ITK's GDCM writer (the tests' DICOM series writer) switches the process locale to "C";
    without this a later test of the same worker decodes UTF-8 subprocess output as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def stop_process_group(proc) -> None:
    """End a server started with ``start_new_session=True`` (its whole process group): SIGTERM,
    then SIGKILL after 30 s."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
