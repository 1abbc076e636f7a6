"""Where the time of one cascade inference goes, and how it compares with MONAI model-zoo's
``wholeBody_ct_segmentation`` on the same CT.

``stages``: one CT, one process, the fine bundle's own config objects called step by step
(exactly the chain ``abdoseg segment`` runs), ``--repeats`` times; per stage the median wall time
and the process's peak RSS after it. Rows: import, build (config + weights), read + decode,
orientation, coarse (resample + window / network / ROI + crop), fine resample + window, fine
network, scores -> labels + paste back, post-processing, write.

``compare``: whole processes, as FLARE times them (start-up and model load count): ``abdoseg
segment -i CT -o mask`` and the wholeBody bundle (3 mm, random weights: time does not depend on
weights) run alternately ``--repeats`` times; median wall seconds, CPU seconds (user + sys) and
peak RSS of each, and the ratio wholeBody / ours.

Usage::

    .venv/bin/python scripts/bench.py stages  --ct ../shared/data/real_ct/ircadb07/image.nii.gz --bundle B
    .venv/bin/python scripts/bench.py compare --ct ../shared/data/real_ct/ircadb07/image.nii.gz --bundle B \\
        --peer ../shared/peers/wholeBody_ct_segmentation --repeats 3

``B`` needs ``models/model.pt`` and ``models/coarse_model.pt`` (e.g. ``runs/demo/bundles/fine_organ_tumor``);
``--random_weights`` makes a temporary copy of ``--bundle`` with seeded random weights.
``--overrides '{"autocast_dtype": "bfloat16"}'`` tries a setting (any inference.json id).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import FINE_BUNDLE, REPO, measure_process, random_weight_bundle, segment_command


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0



# ------------------------------------------------------------------------------------------------
def stages(args: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import monai  # noqa: F401

    from abdoseg.inference.coarse_roi import CoarseRoiCropd
    from abdoseg.inference.segmenter import segmenter_from_bundle
    from abdoseg.io import save_nifti
    t_import = time.perf_counter() - t0
    rows: dict[str, list[float]] = {}
    rss: dict[str, float] = {"import": _rss_mb()}

    def timed(name: str, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        rows.setdefault(name, []).append(time.perf_counter() - t)
        rss.setdefault(name, _rss_mb())  # first pass: peak so far, in pipeline order
        return out

    tmp = Path(tempfile.mkdtemp())
    try:
        bundle = random_weight_bundle(Path(args.bundle), tmp)[0] if args.random_weights else Path(args.bundle)
        overrides = json.loads(args.overrides) if args.overrides else {}
        seg = timed("build (config + weights)", segmenter_from_bundle, bundle, "cpu", overrides)
        pre = seg.preprocessing.transforms
        names = [type(t).__name__ for t in pre]
        i_orient, i_coarse = names.index("Orientationd"), names.index("CoarseRoiCropd")
        for _ in range(args.repeats):
            d = timed("read + decode", lambda: pre[1](pre[0]({"image": args.ct})))
            for t in pre[2:i_orient]:
                d = timed("input checks", t, d)
            d = timed("orientation (RAS)", pre[i_orient], d)
            for t in pre[i_orient + 1:i_coarse]:
                d = timed("crop to the body", t, d)
            coarse: CoarseRoiCropd = pre[i_coarse]
            img = d["image"]
            if coarse.enabled:
                x = timed("coarse: resample to 6 mm + window", coarse.coarse_input, img)
                mask = timed("coarse: network (fitted sliding window)", coarse.coarse_mask, x)
                box = timed("coarse: ROI box", coarse.box_from_mask, mask, x.affine, img)
            else:
                box = coarse.roi_box(img)
            d = timed("crop to ROI", coarse.crop, d, box)
            for t in pre[i_coarse + 1:]:
                d = timed(f"fine: {type(t).__name__}", t, d)
            with torch.no_grad():
                pred = timed("fine: network", lambda: seg.inferer(d["image"][None], seg.network))
            d["pred"] = pred[0]
            post = seg.postprocessing.transforms
            d = timed("scores -> labels + paste back", post[0], d)
            for t in post[1:]:
                d = timed(f"post-processing ({type(t).__name__})", t, d)
            mask = d["pred"].cpu().numpy()[0].astype("uint8")
            timed("write mask (gzip NIfTI)", save_nifti, mask, d["pred"].meta.get("original_affine"),
                  tmp / "mask.nii.gz")
        table = [{"stage": "import (torch, monai, abdoseg)", "median_s": t_import, "peak_rss_mb": rss["import"]}]
        table += [{"stage": k, "median_s": statistics.median(v), "peak_rss_mb": rss[k]} for k, v in rows.items()]
        total = sum(r["median_s"] for r in table if not r["stage"].startswith("build"))
        print(f"\n{args.ct} ({'random' if args.random_weights else bundle} weights, overrides {overrides}), "
              f"median of {args.repeats}:\n")
        print("| stage | median s | peak RSS after (MB) |\n|---|---:|---:|")
        for r in table:
            print(f"| {r['stage']} | {r['median_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        print(f"| **sum (without build)** | **{total:.2f}** | |")
        return table
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
def compare(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp())
    try:
        bundle = random_weight_bundle(Path(args.bundle), tmp)[0] if args.random_weights else Path(args.bundle).resolve()
        peer = tmp / "wholeBody_ct_segmentation"
        shutil.copytree(Path(args.peer), peer)
        (peer / "sampledata" / "imagesTs").mkdir(parents=True)
        os.symlink(Path(args.ct).resolve(), peer / "sampledata" / "imagesTs" / Path(args.ct).name)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        ours = segment_command(Path(args.ct).resolve(), tmp / "ours.nii.gz", bundle, "cpu", "--force")
        theirs = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                  "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                  "--load_pretrain", "False", "--displayable_configs#highres", "False", "--evaluator#amp", "False",
                  "--bundle_root", ".", "--device", "$torch.device('cpu')"]
        res: dict[str, list[dict]] = {"abdoseg": [], "wholeBody": []}
        for r in range(args.repeats):  # alternate, so both see the same machine state
            res["abdoseg"].append(measure_process(ours, env=env))
            res["wholeBody"].append(measure_process(theirs, cwd=str(peer), env=env))
            print(f"repeat {r + 1}: abdoseg {res['abdoseg'][-1]['wall_s']:.1f} s, "
                  f"wholeBody {res['wholeBody'][-1]['wall_s']:.1f} s", file=sys.stderr)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "cpu_s", "peak_rss_mb")}
               for k, v in res.items()}
        print(f"\n{args.ct}, whole process, alternating, median of {args.repeats}, OMP threads {args.threads}:\n")
        print("| pipeline | wall s | CPU s | peak RSS MB |\n|---|---:|---:|---:|")
        for k in ("abdoseg", "wholeBody"):
            print(f"| {k} | {med[k]['wall_s']:.1f} | {med[k]['cpu_s']:.1f} | {med[k]['peak_rss_mb']:.0f} |")
        ratio = med["wholeBody"]["wall_s"] / med["abdoseg"]["wall_s"]
        print(f"| ratio wholeBody / abdoseg (wall) | {ratio:.2f}x | "
              f"{med['wholeBody']['cpu_s'] / med['abdoseg']['cpu_s']:.2f}x | "
              f"{med['wholeBody']['peak_rss_mb'] / med['abdoseg']['peak_rss_mb']:.2f}x |")
        return {"runs": res, "median": med, "ratio_wall": ratio}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(ap: argparse.ArgumentParser, command: str) -> None:
    ap.add_argument("--ct", required=True, help="NIfTI CT")
    ap.add_argument("--bundle", default=str(FINE_BUNDLE))
    ap.add_argument("--random_weights", action="store_true", help="temporary copy of --bundle with seeded random weights")
    ap.add_argument("--repeats", type=int, default=3)
    if command == "stages":
        ap.add_argument("--overrides", default="", help="JSON dict of inference.json ids")
    else:
        ap.add_argument("--peer", default=str(REPO.parent / "shared" / "peers" / "wholeBody_ct_segmentation"),
                        help="model-zoo wholeBody_ct_segmentation bundle folder")
        ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both processes")
    ap.add_argument("--out", default="", help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    out = stages(args) if args.command == "stages" else compare(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0
