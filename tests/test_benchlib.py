"""scripts/benchlib.py, the benchmarks' shared helpers, on their own: the no-CUDA exit of
``bench.py gpu`` (nothing run, nothing written), FLARE's memory figures from a fake (total - free)
reader (the sampling thread, max, AUC, the gpu report), child-process measurement, tables into
docs, random-weight bundles and cached phantom cases."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="module")
def lib():
    return importlib.import_module("benchlib")


@pytest.fixture(scope="module")
def gpu():
    return importlib.import_module("benchmarks.gpu")


def test_no_cuda_exits_with_a_clear_message(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as info:
        importlib.import_module("bench").main(["gpu", "--out_dir", str(out), "--slices", "55"])
    msg = str(info.value.code)
    assert msg.startswith("bench.py gpu: no CUDA device available") and "nothing was run" in msg
    assert torch.__version__ in msg
    assert not out.exists()  # no phantom generated, no report


def test_memory_sampler_flare_figures(lib, gpu, tmp_path):
    bench = lib
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
    json_p, md_p = gpu.write_report(tmp_path, [row], {"gpu": "fake", "period_s": 0.1})
    table = md_p.read_text(encoding="utf-8")
    assert "| BENCH_055 | 512x512x55 | 0.70x0.70x5.00 | 1.50 | 3000 | 400 | 900 | 0.100 |" in table
    assert "GPU AUC (MB·s)" in table and json_p.is_file()


def test_measure_process_whole_child(lib, tmp_path):
    code = "import sys; x = bytearray(200 * 2**20); print('hello'); sys.stdout.flush()"
    log = tmp_path / "logs" / "child.log"
    m = lib.measure_process([sys.executable, "-c", code], log)
    assert set(m) == {"wall_s", "cpu_s", "peak_rss_mb"} and m["wall_s"] > 0
    assert m["peak_rss_mb"] >= 200  # the child's peak, not this process's
    assert log.read_text().splitlines()[-1] == "hello" and log.read_text().startswith("$ ")
    with pytest.raises(SystemExit, match="exited 3(.|\n)*boom"):
        lib.measure_process([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


def test_put_into_docs_between_markers(lib, tmp_path):
    docs = tmp_path / "README.md"
    docs.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\nrest\n")
    lib.put_into_docs("| a |\n|---|\n", docs, "t")
    assert docs.read_text() == "intro\n<!-- t:start -->\n| a |\n|---|\n<!-- t:end -->\nrest\n"
    lib.put_into_docs("| b |", docs, "t")  # with or without a final line break: the same layout
    assert docs.read_text() == "intro\n<!-- t:start -->\n| b |\n<!-- t:end -->\nrest\n"
    with pytest.raises(SystemExit, match="no <!-- other:start -->"):
        lib.put_into_docs("x", docs, "other")


def test_random_weight_bundle(lib, tmp_path):
    import torch

    bundle, what = lib.random_weight_bundle(lib.FINE_BUNDLE, tmp_path / "a")
    assert what == "model.pt: random (seed 0); coarse_model.pt: random (seed 0)"
    fresh = torch.load(bundle / "models" / "model.pt", weights_only=True)
    committed = torch.load(lib.FINE_BUNDLE / "models" / "model.pt", weights_only=True)
    assert fresh.keys() == committed.keys()
    assert any(not torch.equal(fresh[k], committed[k]) for k in fresh)
    again, _ = lib.random_weight_bundle(lib.FINE_BUNDLE, tmp_path / "b")  # seeded: the same weights
    assert all(torch.equal(v, torch.load(again / "models" / "model.pt", weights_only=True)[k]) for k, v in fresh.items())
    kept, what = lib.random_weight_bundle(lib.FINE_BUNDLE, tmp_path / "c", keep_trained=True)
    assert what == "model.pt: bundle weights; coarse_model.pt: bundle weights"
    assert (kept / "models" / "model.pt").read_bytes() == (lib.FINE_BUNDLE / "models" / "model.pt").read_bytes()


def test_phantom_cases_written_once(lib, tmp_path):
    cases = lib.phantom_cases(tmp_path, [20, 24], seed=3, preset="small")
    assert [(i.name, l.name) for i, l in cases] == [("BENCH_small_020_0000.nii.gz", "BENCH_small_020.nii.gz"),
                                                     ("BENCH_small_024_0000.nii.gz", "BENCH_small_024.nii.gz")]
    import nibabel as nib

    assert nib.load(str(cases[1][0])).shape[2] == 24
    stamp = cases[0][0].stat().st_mtime_ns
    assert lib.phantom_cases(tmp_path, [20], seed=3, preset="small")[0][0].stat().st_mtime_ns == stamp
    assert lib.phantom_cases(tmp_path, [20], seed=3, preset="small", labels=False) == [(cases[0][0], None)]
    assert lib.parse_slices("55, 554,") == [55, 554] and lib.parse_slices([1, 2]) == [1, 2]


def test_link_files_and_segment_command(lib, tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    folder = lib.link_files(tmp_path / "run", [a])
    lib.link_files(folder, {"B.nii.gz": b})  # kept: a.nii.gz
    assert sorted(p.name for p in folder.iterdir()) == ["B.nii.gz", "a.nii.gz"]
    assert (folder / "B.nii.gz").is_symlink() and (folder / "B.nii.gz").read_bytes() == b"b"
    lib.link_files(folder, [b], fresh=True)  # only this run's cases
    assert [p.name for p in folder.iterdir()] == ["b.nii.gz"] and a.read_bytes() == b"a"
    cmd = lib.segment_command("ct.nii.gz", "mask.nii.gz", "bundle", "cpu", "--force")
    assert Path(cmd[0]).name == "abdoseg" and Path(cmd[0]).parent == Path(sys.executable).parent
    assert cmd[1:] == ["segment", "-i", "ct.nii.gz", "-o", "mask.nii.gz", "--bundle_dir", "bundle", "--device", "cpu",
                       "--force"]
