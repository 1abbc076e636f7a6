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
