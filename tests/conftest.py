"""Helpers shared by several test modules (``from conftest import ...``)."""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keep_process_locale() -> Iterator[None]:
    """Restore the process locale after ITK's GDCM DICOM writer, which switches it to "C": after
    that, text I/O of the same worker (``subprocess`` output, ``Path.read_text()``) decodes as ASCII
    and fails on UTF-8 in later tests."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
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
