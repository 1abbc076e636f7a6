"""abdoseg.steps.MarkedSteps: each named step runs once; a rerun skips it and keeps its timing."""

from __future__ import annotations

import json

import pytest

from abdoseg.steps import MarkedSteps


def test_marked_steps_run_once_and_resume(tmp_path, capsys):
    calls: list[str] = []
    steps = MarkedSteps(tmp_path, "job")
    steps.run("a", lambda: calls.append("a"))
    steps.run("b", lambda: calls.append("b"))
    assert calls == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["a.done", "b.done"]
    first = json.loads((tmp_path / "timings.json").read_text())
    assert set(first) == {"a", "b"} and all(v >= 0 for v in first.values())

    again = MarkedSteps(tmp_path, "job")  # a new invocation of the same job
    again.run("a", lambda: calls.append("a2"))
    again.run("c", lambda: calls.append("c"))
    assert calls == ["a", "b", "c"]
    assert "[job] a: done earlier, skipped" in capsys.readouterr().err
    assert set(again.timings) == {"a", "b", "c"} and again.timings["a"] == first["a"]


def test_failed_step_leaves_no_marker(tmp_path):
    steps = MarkedSteps(tmp_path, "job")

    def boom() -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):  # the step's error reaches the caller
        steps.run("x", boom)
    assert not (tmp_path / "steps" / "x.done").exists()
    assert "x" not in steps.timings
    calls: list[str] = []
    MarkedSteps(tmp_path, "job").run("x", lambda: calls.append("x"))  # the rerun does the step
    assert calls == ["x"] and (tmp_path / "steps" / "x.done").is_file()
