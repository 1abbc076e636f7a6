"""Resumable named steps for long command-line jobs (the demo, experiment scripts).

A step ``name`` runs once: when it finishes, ``<work_dir>/steps/<name>.done`` is written and its
wall time (s) is added to ``<work_dir>/timings.json``; a rerun skips every step that has a
marker, so an interrupted job goes on where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from abdoseg.io import save_json

__all__ = ["MarkedSteps"]


class MarkedSteps:
    """Run named steps once each, with a marker file and a recorded wall time per step.

    Args:
        work_dir: job folder; markers go to ``work_dir/steps``, timings to ``work_dir/timings.json``
            (read back on a rerun, so the timings of skipped steps are kept).
        tag: prefix of the messages on stderr, e.g. ``"demo"``.
    """

    def __init__(self, work_dir: str | Path, tag: str) -> None:
        work_dir = Path(work_dir)
        self.dir = work_dir / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.timings_file = work_dir / "timings.json"
        self.timings: dict[str, float] = (json.loads(self.timings_file.read_text())
                                          if self.timings_file.exists() else {})

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` unless step ``name`` finished in an earlier invocation."""
        marker = self.dir / f"{name}.done"
        if marker.exists():
            print(f"[{self.tag}] {name}: done earlier, skipped", file=sys.stderr)
            return
        print(f"\n=== [{self.tag}] step {name} ===", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t0
        save_json(self.timings, self.timings_file)
        marker.write_text("ok\n")
