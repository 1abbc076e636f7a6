"""What the benchmarks of ``scripts/bench.py`` share, written once.

* :func:`bench_command`: the command line that runs a ``bench.py`` subcommand in a child process
  (workers of ``cascade`` and ``data``);
* :func:`phantom_cases`: phantom CTs of given slice counts (the seed papers' eight sizes), cached
  as NIfTI;
* :func:`random_weight_bundle`: a copy of a bundle with seeded random weights (the run time of a
  network does not depend on its weights);
* :func:`record_roi`: make a segmenter record the ROI box and the fine grid of its last case;
* :func:`measure_process`: wall / CPU seconds and peak RSS of one child process (``os.wait4``);
* :func:`segment_command`: ``abdoseg segment`` of this environment, as a user runs it;
* :func:`link_files`: a folder of symbolic links (the cases of one run, for ``evaluate``);
* :func:`gpu_memory_reader`, :class:`MemorySampler`, :func:`memory_stats`, :func:`require_cuda`:
  FLARE's GPU memory measure ((total - free) sampled every 0.1 s; maximum and area under the curve);
* :func:`put_into_docs`: a Markdown table into a docs file between ``<!-- name:start/end -->`` markers.

Nothing heavy is imported at module level: ``bench.py --help`` and the import timing of
``bench.py stages`` stay honest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
BUNDLES = REPO / "bundles"
FINE_BUNDLE = BUNDLES / "fine_organ_tumor"
#: the fine bundle's docs, where ``--docs`` puts the tables of ``learning`` and ``systems``
FINE_DOCS = FINE_BUNDLE / "docs" / "README.md"
#: the slice counts of the seed papers' eight CT sizes (512 x 512 x 55 ... 554)
SEED_SLICES = (55, 100, 150, 215, 334, 448, 499, 554)
#: FLARE's GPU memory sampling period (Efficiency.py)
PERIOD_S = 0.1
#: the ``abdoseg`` command of this Python environment
ABDOSEG = Path(sys.executable).with_name("abdoseg")


def bench_command(subcommand: str) -> list[str]:
    """``[python, scripts/bench.py, subcommand]``: a subcommand in a fresh process."""
    return [sys.executable, str(SCRIPTS / "bench.py"), subcommand]


def parse_slices(text: str | int | list) -> list[int]:
    """``"55,554"`` (or a list) -> ``[55, 554]``."""
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    return [int(s) for s in str(text).split(",") if s.strip()]


# ------------------------------------------------------------------------------------------------
# inputs: phantoms, bundles
# ------------------------------------------------------------------------------------------------
def phantom_cases(out: Path, slices: list[int], seed: int, preset: str = "full",
                  labels: bool = True) -> list[tuple[Path, Path | None]]:
    """``[(image, label)]``: phantom ``index`` i of dataset ``seed`` with ``slices[i]`` slices
    (``abdoseg.data.phantom.make_case``), written once to ``out/cases/BENCH_<n>_0000.nii.gz`` and
    ``out/cases_gt/BENCH_<n>.nii.gz`` (``BENCH_<preset>_<n>`` for presets other than ``full``) and
    reused by later runs; ``labels=False`` writes no label (``None`` in its place)."""
    from abdoseg.data.phantom import make_case
    from abdoseg.io import save_nifti

    cases = []
    for i, n in enumerate(slices):
        name = f"BENCH_{n:03d}" if preset == "full" else f"BENCH_{preset}_{n:03d}"
        img_p = out / "cases" / f"{name}_0000.nii.gz"
        lab_p = out / "cases_gt" / f"{name}.nii.gz" if labels else None
        if not img_p.is_file() or (lab_p is not None and not lab_p.is_file()):
            t = time.perf_counter()
            img, lab, aff = make_case(seed, preset=preset, slices=n, index=i)
            save_nifti(img, aff, img_p)
            if lab_p is not None:
                save_nifti(lab, aff, lab_p)
            print(f"generated {img_p.name} {img.shape} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cases.append((img_p, lab_p))
    return cases


def random_weight_bundle(src: Path, dst: Path, seed: int = 0, keep_trained: bool = False) -> tuple[Path, str]:
    """A copy of bundle ``src`` in ``dst/<name>`` whose ``model_path`` and ``coarse_checkpoint``
    hold seeded random weights of ``network_def`` / ``coarse_network_def`` (``keep_trained``: the
    bundle's own files where they exist). Returns ``(bundle, what the weights are)``."""
    import torch

    from abdoseg.bundle.config import load_bundle_config

    src = Path(src)
    bundle = Path(dst) / src.name
    skip = ["eval", "cache", "__pycache__", "*.ts", "*.onnx"] + ([] if keep_trained else ["*.pt"])
    shutil.copytree(src, bundle, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    parser = load_bundle_config(bundle)
    sources = []
    for net_id, path_id in (("network_def", "model_path"), ("coarse_network_def", "coarse_checkpoint")):
        path = Path(parser.get_parsed_content(path_id))
        if keep_trained and path.is_file():
            sources.append(f"{path.name}: bundle weights")
            continue
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(parser.get_parsed_content(net_id).state_dict(), str(path))
        sources.append(f"{path.name}: random (seed {seed})")
    return bundle, "; ".join(sources)


def record_roi(segmenter) -> dict:
    """Make ``segmenter`` (``abdoseg.inference.segmenter.segmenter_from_bundle``) record the ROI
    box of its last case (``seen["roi"]``, an ``abdoseg.inference.roi`` box on the oriented CT's
    grid) and the grid its fine network saw (``seen["fine_grid"]``); returns ``seen``."""
    from abdoseg.inference.coarse_roi import CoarseRoiCropd

    seen: dict = {}
    coarse = next(t for t in segmenter.preprocessing.transforms if isinstance(t, CoarseRoiCropd))
    roi_box, inferer = coarse.roi_box, segmenter.inferer

    def box(image):
        seen["roi"] = roi_box(image)
        return seen["roi"]

    def fine(x, network):
        seen["fine_grid"] = list(x.shape[2:])
        return inferer(x, network)

    coarse.roi_box, segmenter.inferer = box, fine
    return seen


def link_files(folder: Path, targets: dict[str, Path] | list[Path], fresh: bool = False) -> Path:
    """``folder`` holding a symbolic link to each target (named as the target, or by its key);
    ``fresh``: what the folder held before is removed first (only this run's cases), else links
    already there are kept."""
    folder = Path(folder)
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    items = targets.items() if isinstance(targets, dict) else ((Path(t).name, t) for t in targets)
    for name, target in items:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path(target).resolve())
    return folder


# ------------------------------------------------------------------------------------------------
# child processes
# ------------------------------------------------------------------------------------------------
def measure_process(cmd: list[str], log: Path | None = None, cwd: str | Path | None = None,
                    env: dict | None = None) -> dict[str, float]:
    """Run ``cmd`` to its end; its wall seconds, CPU seconds (user + sys) and peak RSS (MB) from
    ``os.wait4``'s rusage: the whole process, start-up included. Output goes to ``log`` (appended,
    after a ``$ cmd`` line) or, without one, to a temporary file. A non-zero exit raises
    ``SystemExit`` with the command and the last lines of its output."""
    tmp = None
    if log is None:
        fd, tmp = tempfile.mkstemp(prefix="bench_", suffix=".log")
        os.close(fd)
        log = Path(tmp)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(map(str, cmd)) + "\n")
            fh.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"{' '.join(map(str, cmd))} exited {code}" + (f" (log {log})" if tmp is None else "")
                             + f":\n{tail}")
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1)}  # Linux: ru_maxrss in KB


def segment_command(image: str | Path, output: str | Path, bundle: str | Path, device: str = "cpu",
                    *extra: str) -> list[str]:
    """``abdoseg segment -i image -o output --bundle_dir bundle --device device [extra]``: the
    user's command, this environment's ``abdoseg``."""
    return [str(ABDOSEG), "segment", "-i", str(image), "-o", str(output), "--bundle_dir", str(bundle),
            "--device", device, *extra]


# ------------------------------------------------------------------------------------------------
# GPU memory (FLARE's method)
# ------------------------------------------------------------------------------------------------
NO_CUDA_MESSAGE = ("{name}: no CUDA device available (torch {torch} {build}, torch.cuda.is_available() is "
                   "False). This benchmark measures GPU time and memory and needs an NVIDIA GPU with a CUDA build "
                   "of torch; nothing was run.")


def require_cuda(name: str = "bench.py gpu") -> None:
    """Exit with a clear message (status 1) when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        raise SystemExit(NO_CUDA_MESSAGE.format(name=name, torch=torch.__version__, build=build))


def memory_stats(samples_mb: list[float], period_s: float = PERIOD_S) -> dict[str, float]:
    """FLARE's figures from (total - free) samples taken every ``period_s``: maximum (MB) and area
    under the curve (MB*s) = sum of the samples x ``period_s``."""
    if not samples_mb:
        return {"gpu_max_mb": 0.0, "gpu_auc_mb_s": 0.0, "n_samples": 0}
    return {"gpu_max_mb": round(max(samples_mb), 1), "gpu_auc_mb_s": round(sum(samples_mb) * period_s, 1),
            "n_samples": len(samples_mb)}


class MemorySampler:
    """A thread calling ``read_mb()`` every ``period_s`` between :meth:`start` and :meth:`stop`.

    One sample is taken at start and one at stop, so a case shorter than the period still has two.
    ``read_mb`` is any ``() -> float`` (MB); see :func:`gpu_memory_reader`."""

    def __init__(self, read_mb: Callable[[], float], period_s: float = PERIOD_S) -> None:
        self.read_mb = read_mb
        self.period_s = float(period_s)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period_s):
                self.samples.append(float(self.read_mb()))
        except BaseException as exc:  # reported by stop(), not lost in the thread
            self.error = exc

    def start(self) -> "MemorySampler":
        self.samples.append(float(self.read_mb()))
        self._thread = threading.Thread(target=self._run, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"GPU memory sampling failed: {self.error}") from self.error
        self.samples.append(float(self.read_mb()))
        return memory_stats(self.samples, self.period_s)

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if not self._stop.is_set():
            self.stop()


def _nvml_index(torch_index: int) -> int:
    """NVML counts physical GPUs; torch counts those in CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and all(v.isdigit() for v in ids) and torch_index < len(ids):
        return int(ids[torch_index])
    return torch_index


def gpu_memory_reader(torch_index: int = 0) -> tuple[Callable[[], float], str, dict[str, str]]:
    """``(read_mb, source, info)``: (total - free) MB of the GPU from pynvml when importable
    (``pip install -e ".[gpu]"``, as FLARE's Efficiency.py), else from ``torch.cuda.mem_get_info``
    (the same driver figure); ``info`` has the driver version when pynvml is there. Like FLARE's,
    the figure is device-wide: it includes the CUDA context and any other process on that GPU."""
    import torch

    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(torch_index))

        def read_nvml() -> float:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return (mem.total - mem.free) / 2**20

        driver = pynvml.nvmlSystemGetDriverVersion()
        return read_nvml, "pynvml", {"driver": driver.decode() if isinstance(driver, bytes) else str(driver)}
    except Exception:
        def read_torch() -> float:
            free, total = torch.cuda.mem_get_info(torch_index)
            return (total - free) / 2**20

        return read_torch, "torch.cuda.mem_get_info", {}


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------
def put_into_docs(md: str, docs: Path, section: str) -> None:
    """Replace what lies between ``<!-- section:start -->`` and ``<!-- section:end -->`` in
    ``docs`` with ``md`` (one line break on either side); exits naming the file when a marker is
    missing."""
    docs = Path(docs)
    text = docs.read_text(encoding="utf-8")
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{docs}: no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(head + start + "\n" + md.rstrip("\n") + "\n" + end + tail, encoding="utf-8")

