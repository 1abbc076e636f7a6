"""Training throughput of a bundle's network on this machine: one optimizer step (forward,
loss, backward, step) on a batch of the bundle's patch size, in float32 and under bfloat16 /
float16 autocast, the modes run alternately in one process so that load on the machine hits
them alike; medians and the ratio to float32.

The network, loss, optimizer and patch come from the bundle's own ``train.json`` (with
``--overrides``), the batch is ``batch_size * num_samples`` random patches with random labels:
time does not depend on the values.

Usage::

    .venv/bin/python scripts/bench.py training --bundle bundles/fine_organ_tumor --repeats 20
    .venv/bin/python scripts/bench.py training --bundle bundles/fine_organ_tumor \\
        --overrides '{"fine_spacing_mm": [4, 4, 6], "label_mode": "full"}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

from benchlib import FINE_BUNDLE


def build(bundle: Path, overrides: dict) -> tuple:
    import torch

    from abdoseg.bundle.config import config_files, load_bundle_config

    parser = load_bundle_config(bundle, config_files(bundle, "training"))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    parser["network"] = "$@network_def"
    loss = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer", instantiate=True)
    optimizer = type(optimizer)(network.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                         if k not in ("differentiable", "fused", "foreach")})
    patch = [int(v) for v in parser.get_parsed_content("patch_size")]
    n = int(parser.get_parsed_content("batch_size")) * int(parser.get_parsed_content("num_samples"))
    num_classes = int(parser.get_parsed_content("num_classes"))
    partial = bool(parser.get_parsed_content("partial_labels"))
    return network, loss, optimizer, patch, n, num_classes, partial


def add_arguments(ap: argparse.ArgumentParser, command: str = "training") -> None:
    ap.add_argument("--bundle", default=str(FINE_BUNDLE))
    ap.add_argument("--overrides", default="{}", help="JSON dict of train.json ids")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--modes", default="float32,bfloat16")
    ap.add_argument("--json", default="", help="write the table here as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    network, loss, optimizer, patch, n, num_classes, partial = build(Path(args.bundle), json.loads(args.overrides))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, 1, *patch, generator=g)
    label = torch.randint(0, num_classes, (n, 1, *patch), generator=g)
    if partial:
        from abdoseg.training.losses import pack_target
        label = pack_target(label, torch.ones(n, num_classes, dtype=torch.bool))
    modes = args.modes.split(",")

    def step(mode: str) -> float:
        ctx = nullcontext() if mode == "float32" else torch.autocast("cpu", dtype=getattr(torch, mode))
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with ctx:
            pred = network(image)
        out = loss(pred.float() if isinstance(pred, torch.Tensor) else [p.float() for p in pred], label)
        out.backward()
        optimizer.step()
        return time.perf_counter() - t

    network.train()
    for mode in modes:  # warm-up
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step(mode))
    base = statistics.median(times[modes[0]])
    print(f"{args.bundle}: batch {n} x 1 x {'x'.join(map(str, patch))}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (alternating)")
    print(f"{'mode':<10} {'median s/step':>14} {'ratio':>7}")
    table = []
    for mode in modes:
        med = statistics.median(times[mode])
        table.append({"mode": mode, "median_s": med, "ratio_to_first": med / base})
        print(f"{mode:<10} {med:>14.3f} {med / base:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0
