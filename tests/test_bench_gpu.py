"""scripts/bench_gpu.py without a GPU: the no-CUDA exit message (nothing run, nothing written) and
FLARE's memory figures from a fake (total - free) reader: the sampling thread, max, AUC, report."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cuda_exits_with_a_clear_message(bench, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as info:
        bench.main(["--out_dir", str(out), "--slices", "55"])
    msg = str(info.value.code)
    assert msg.startswith("bench_gpu.py: no CUDA device available") and "nothing was run" in msg
    assert torch.__version__ in msg
    assert not out.exists()  # no phantom generated, no report


def test_memory_sampler_flare_figures(bench, tmp_path):
    assert bench.memory_stats([100.0, 300.0, 200.0], 0.1) == {"gpu_max_mb": 300.0, "gpu_auc_mb_s": 60.0,
                                                              "n_samples": 3}
    assert bench.memory_stats([], 0.1)["gpu_auc_mb_s"] == 0.0
    readings = iter(range(10, 100000, 10))  # a fake (total - free) that grows by 10 MB per read
    sampler = bench.MemorySampler(lambda: float(next(readings)), period_s=0.01).start()
    time.sleep(0.15)
    stats = sampler.stop()
    s = sampler.samples
    assert s[0] == 10.0 and s == [10.0 * (i + 1) for i in range(len(s))]  # every read kept, in order
    assert 4 <= len(s) <= 20 and stats["n_samples"] == len(s)  # start + ~period-spaced reads + stop
    assert stats["gpu_max_mb"] == s[-1] and stats["gpu_auc_mb_s"] == pytest.approx(round(sum(s) * 0.01, 1))
    # a failing reader is reported, not swallowed by the thread
    calls = iter([1.0])
    broken = bench.MemorySampler(lambda: next(calls), period_s=0.01).start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="GPU memory sampling failed"):
        broken.stop()
    # report: Markdown table + JSON
    row = {"case": "BENCH_055", "shape": [512, 512, 55], "spacing_mm": [0.7, 0.7, 5.0], "wall_s": 1.5,
           **bench.memory_stats([1000.0, 3000.0], 0.1), "torch_max_allocated_mb": 900.0, "foreground_fraction": 0.1}
    json_p, md_p = bench.write_report(tmp_path, [row], {"gpu": "fake", "period_s": 0.1})
    table = md_p.read_text(encoding="utf-8")
    assert "| BENCH_055 | 512x512x55 | 0.70x0.70x5.00 | 1.50 | 3000 | 400 | 900 | 0.100 |" in table
    assert "GPU AUC (MB·s)" in table and json_p.is_file()
