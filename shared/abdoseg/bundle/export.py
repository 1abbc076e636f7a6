"""Export the bundles' networks to TorchScript and ONNX, and run the same cascade with ONNX Runtime.

:func:`export` exports every network a bundle's ``configs/inference.json`` defines:

- ``network_def`` with ``models/model.pt`` -> ``model.ts`` / ``model.onnx``;
- in a cascade bundle (``fine_organ_tumor``) also ``coarse_network_def`` with the checkpoint of
  ``coarse_checkpoint`` (``models/coarse_model.pt``) -> ``coarse_model.ts`` / ``coarse_model.onnx``.

The conversion is MONAI's: ``python -m monai.bundle ckpt_export`` (``torch.jit.trace`` in eval mode,
see :func:`_verb_args`; the bundle's metadata and inference config are stored inside the ``.ts``) and ``python -m monai.bundle
onnx_export`` (``torch.onnx.export`` through ``monai.networks.utils.convert_to_onnx``; opset
:data:`DEFAULT_OPSET`, input ``image`` / output ``pred``, batch and the three spatial axes dynamic,
the TorchScript-based exporter ``dynamo=False`` which needs no ``onnxscript``). ``runner="cli"``
runs those verbs as subprocesses, exactly as the model zoo does; ``runner="inprocess"`` calls the
same functions (``monai.bundle.ckpt_export`` / ``onnx_export``, which the verbs dispatch to) in
this process, which saves the interpreter start-up (used by the tests).

Every exported file is checked before anything is written to ``out_dir``: the TorchScript module
(``torch.jit.load``) and the ONNX model (onnxruntime, CPU) must reproduce the eager network's
logits within ``atol`` on two seeded random inputs of different shapes (the second one proves
that the dynamic spatial axes work). Files are produced in a hidden temporary folder inside
``out_dir`` and renamed into place only after all checks passed; ``export.json`` records the
differences, shapes, opset, versions and the equivalent command lines.

:class:`OnnxNetwork` is an ``nn.Module`` whose ``forward`` runs an ONNX Runtime session, so the
unchanged inference config (coarse ROI crop -> fine sliding window -> scores to labels) runs with
ORT: :func:`onnx_cascade` builds the bundle's own segmenter from ``inference.json`` with ORT
networks, :func:`torch_cascade` the PyTorch one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abdoseg.io import InputError, save_json

#: ONNX opset of the exported models (InstanceNormalization, ConvTranspose, Concat: all in opset 17).
DEFAULT_OPSET: int = 17
#: Largest |exported - eager| logit difference accepted by the export check.
DEFAULT_ATOL: float = 1e-4
ONNX_INPUT_NAME: str = "image"
ONNX_OUTPUT_NAME: str = "pred"
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}
_VERB = {"torchscript": "ckpt_export", "onnx": "onnx_export"}
_META_PREFIX = "abdoseg."


@dataclass
class NetSpec:
    """One network of a bundle: config id, checkpoint, output file stem and I/O geometry."""

    net_id: str  #: config id in inference.json (``network_def`` / ``coarse_network_def``)
    stem: str  #: output file stem (``model`` / ``coarse_model``)
    checkpoint: Path  #: plain state dict
    in_channels: int
    out_channels: int
    strides: list[list[int]]  #: per-stage strides (X, Y, Z)
    divisor: tuple[int, int, int] = field(default=(16, 16, 16))  #: required divisor of each spatial size

    def example_shapes(self) -> list[tuple[int, ...]]:
        """Two (1, C, X, Y, Z) check inputs: 2 x divisor per axis (also the export trace shape),
        then an anisotropic (3, 2, 1) x divisor one."""
        d = self.divisor
        return [(1, self.in_channels, 2 * d[0], 2 * d[1], 2 * d[2]),
                (1, self.in_channels, 3 * d[0], 2 * d[1], 1 * d[2])]


# ----------------------------------------------------------------------------------------------
# bundle inspection
# ----------------------------------------------------------------------------------------------
def _parser(bundle_dir: Path, config: str = "configs/inference.json"):
    from abdoseg.bundle.config import load_bundle_config

    return load_bundle_config(bundle_dir, config)


def _strides_of(net: Any) -> list[list[int]]:
    strides = getattr(net, "strides", None) or [[1, 1, 1]] + [[2, 2, 2]] * 4
    return [[int(s)] * 3 if isinstance(s, int) else [int(v) for v in s] for s in strides]


def _check_data_format(bundle: Path, meta: dict, key: str, net_id: str, net: Any) -> None:
    """The channel counts ``metadata.json`` declares for ``net_id`` (under ``key``) must be the network's."""
    fmt = meta.get(key)
    if not isinstance(fmt, dict):
        return
    for side, io_key, attr in (("inputs", "image", "in_channels"), ("outputs", "pred", "out_channels")):
        declared = fmt.get(side, {}).get(io_key, {}).get("num_channels")
        actual = getattr(net, attr, None)
        if declared is not None and actual is not None and int(declared) != int(actual):
            raise InputError(bundle / "configs" / "metadata.json",
                             f"{key}.{side}.{io_key}.num_channels is {declared} but {net_id} has {attr}={actual}")


def bundle_networks(bundle_dir: str | os.PathLike) -> list[NetSpec]:
    """The networks of ``bundle_dir/configs/inference.json`` to export (see module docstring).

    Raises :class:`InputError` naming a missing bundle folder or checkpoint."""
    bundle = Path(bundle_dir).resolve()
    if not bundle.is_dir():
        raise InputError(bundle, "bundle folder not found")
    parser = _parser(bundle)
    cfg = parser.get()
    specs: list[NetSpec] = []
    for net_id, stem, ckpt_id, default_ckpt, fmt_key in (
            ("network_def", "model", None, "models/model.pt", "network_data_format"),
            ("coarse_network_def", "coarse_model", "coarse_checkpoint", "models/coarse_model.pt", "coarse_data_format")):
        if net_id not in cfg:
            continue
        ckpt = bundle / default_ckpt
        if ckpt_id is not None and ckpt_id in cfg and cfg[ckpt_id]:
            ckpt = Path(str(parser.get_parsed_content(ckpt_id)))
        if not ckpt.is_file():
            raise InputError(ckpt, f"checkpoint of {net_id} not found (train the bundle or copy the weights first)")
        net = parser.get_parsed_content(net_id, instantiate=True)
        _check_data_format(bundle, cfg.get("_meta_", {}), fmt_key, net_id, net)
        strides = _strides_of(net)
        divisor = tuple(int(np.prod([s[d] for s in strides])) for d in range(3))
        specs.append(NetSpec(net_id=net_id, stem=stem, checkpoint=ckpt.resolve(),
                             in_channels=int(getattr(net, "in_channels", 1)),
                             out_channels=int(getattr(net, "out_channels", 0)),
                             strides=strides, divisor=divisor))  # type: ignore[arg-type]
    if not specs:
        raise InputError(bundle / "configs" / "inference.json", "defines no network_def")
    return specs


def _eager_network(bundle: Path, spec: NetSpec) -> torch.nn.Module:
    from abdoseg.networks.checkpoints import load_weights

    net = _parser(bundle).get_parsed_content(spec.net_id, instantiate=True)
    return load_weights(net, spec.checkpoint, what=spec.net_id).eval()


# ----------------------------------------------------------------------------------------------
# the monai.bundle verbs
# ----------------------------------------------------------------------------------------------
def _verb_kwargs(bundle: Path, spec: NetSpec, fmt: str, filepath: Path, args_file: Path | None) -> dict[str, str]:
    kw = {
        "filepath": str(filepath),
        "ckpt_file": str(spec.checkpoint),
        "meta_file": str(bundle / "configs" / "metadata.json"),
        "config_file": str(bundle / "configs" / "inference.json"),
        "bundle_root": str(bundle),
    }
    kw["args_file"] = str(args_file)
    return kw


def _verb_args(spec: NetSpec, fmt: str, opset: int) -> dict[str, Any]:
    """``--args_file`` content: trace shape, ``use_trace`` and for ONNX the ``convert_to_onnx`` arguments.

    Both formats are traced (``torch.jit.trace`` / ``torch.onnx.export``) in eval mode: MONAI's
    DynUNet with ``deep_supervision=True`` does not compile with ``torch.jit.script`` (its skip
    layers assign into an ``Optional[List[Tensor]]``), and in eval mode its forward has no
    shape-dependent Python branches, so the trace is valid for every input size (checked on a second
    shape by :func:`export`)."""
    if fmt == "torchscript":
        # check_trace off: the trace is checked against the eager network by export() itself
        return {"input_shape": list(spec.example_shapes()[0]), "use_trace": True,
                "converter_kwargs": {"check_trace": False}}
    dyn = [0, 2, 3, 4]
    return {
        "input_shape": list(spec.example_shapes()[0]),
        "use_trace": True,
        "converter_kwargs": {
            "input_names": [ONNX_INPUT_NAME],
            "output_names": [ONNX_OUTPUT_NAME],
            "opset_version": int(opset),
            "dynamic_axes": {ONNX_INPUT_NAME: dyn, ONNX_OUTPUT_NAME: dyn},
            "do_constant_folding": True,
            "dynamo": False,
        },
    }


def _command(spec: NetSpec, fmt: str, kwargs: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", _VERB[fmt], spec.net_id]
    for k, v in kwargs.items():
        cmd += [f"--{k}", v]
    return cmd


def _run_verb(spec: NetSpec, fmt: str, kwargs: dict[str, str], runner: str) -> None:
    if runner == "cli":
        proc = subprocess.run(_command(spec, fmt, kwargs), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"monai.bundle {_VERB[fmt]} {spec.net_id} failed (exit {proc.returncode}):\n{tail}")
    else:
        import warnings

        import monai.bundle

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter / instance-norm notices
            getattr(monai.bundle, _VERB[fmt])(net_id=spec.net_id, **kwargs)
    if not Path(kwargs["filepath"]).is_file():
        raise RuntimeError(f"monai.bundle {_VERB[fmt]} {spec.net_id} wrote no {kwargs['filepath']}")


def _tag_onnx(path: Path, spec: NetSpec, bundle: Path) -> None:
    """Store the network's strides/divisor (needed for padding) and origin in the ONNX metadata."""
    import onnx

    model = onnx.load(str(path))
    props = {"strides": json.dumps(spec.strides), "divisor": json.dumps(list(spec.divisor)),
             "net_id": spec.net_id, "bundle": bundle.name, "out_channels": str(spec.out_channels)}
    keep = [p for p in model.metadata_props if not p.key.startswith(_META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = _META_PREFIX + k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _check(eager: torch.nn.Module, fmt: str, path: Path, spec: NetSpec, atol: float, seed: int) -> list[dict]:
    """Max |exported - eager| on the two example inputs; raises RuntimeError beyond ``atol``."""
    if fmt == "torchscript":
        exported = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.jit.optimized_execution(False):  # numerics only; skips the JIT's profiling runs
                return exported(x)
    else:
        net = OnnxNetwork(path)
        run = lambda x: net(x)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for shape in spec.example_shapes():
            x = torch.rand(shape, generator=gen)
            ref = eager(x)
            out = run(x)
            if tuple(out.shape) != tuple(ref.shape):
                raise RuntimeError(f"{path.name}: output shape {tuple(out.shape)} != eager {tuple(ref.shape)} "
                                   f"for input {shape}")
            diff = float((out - ref).abs().max())
            rows.append({"input_shape": list(shape), "max_abs_diff": diff})
            if not diff <= atol:
                raise RuntimeError(f"{path.name}: max |{fmt} - torch| = {diff:.3g} > atol {atol:g} for input {shape}")
    return rows


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def export(bundle_dir: str, out_dir: str | None = None, formats: Sequence[str] | str = FORMATS,
           opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL, runner: str = "cli", seed: int = 0) -> dict:
    """Export the networks of ``bundle_dir`` to TorchScript and/or ONNX, checked against PyTorch.

    Args:
        bundle_dir: MONAI bundle folder (``configs/inference.json``, ``models/*.pt``).
        out_dir: destination folder; default ``<bundle_dir>/models`` (where ``abdoseg pack`` picks
            up ``model.ts`` / ``model.onnx``).
        formats: ``"torchscript"`` and/or ``"onnx"`` (tuple, or a comma separated string).
        opset: ONNX opset version.
        atol: largest accepted |exported - eager| logit difference (else nothing is written).
        runner: ``"cli"``: ``python -m monai.bundle ckpt_export|onnx_export`` subprocesses;
            ``"inprocess"``: the same MONAI functions called in this process.
        seed: seed of the random check inputs.

    Returns the report also written to ``<out_dir>/export.json``: per network and format the file,
    the max abs difference per check input, and the equivalent ``python -m monai.bundle`` command.
    Files written: ``<stem>.ts`` / ``<stem>.onnx`` with stem ``model`` (``network_def``) and
    ``coarse_model`` (``coarse_network_def``, cascade bundles), plus ``export.json``.
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(str(f).lower() for f in formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    if runner not in ("cli", "inprocess"):
        raise ValueError(f"runner must be 'cli' or 'inprocess', got {runner!r}")
    bundle = Path(bundle_dir).resolve()
    specs = bundle_networks(bundle)
    out = Path(out_dir).resolve() if out_dir else bundle / "models"
    out.mkdir(parents=True, exist_ok=True)

    import onnx
    import onnxruntime
    from tqdm import tqdm

    import monai

    report: dict[str, Any] = {
        "bundle": str(bundle), "opset": int(opset), "atol": float(atol), "runner": runner,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "onnx_io": {"input": ONNX_INPUT_NAME, "output": ONNX_OUTPUT_NAME, "dynamic_axes": [0, 2, 3, 4]},
        "networks": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        jobs = [(s, f) for s in specs for f in formats]
        eager: dict[str, torch.nn.Module] = {}
        for spec, fmt in tqdm(jobs, desc="export", unit="file", disable=None):
            path = tmp / f"{spec.stem}{_SUFFIX[fmt]}"
            verb_args = _verb_args(spec, fmt, opset)
            args_file = tmp / f"{spec.stem}.{fmt}_args.json"
            args_file.write_text(json.dumps(verb_args, indent=1))
            kwargs = _verb_kwargs(bundle, spec, fmt, path, args_file)
            _run_verb(spec, fmt, kwargs, runner)
            if fmt == "onnx":
                _tag_onnx(path, spec, bundle)
            if spec.net_id not in eager:
                eager[spec.net_id] = _eager_network(bundle, spec)
            checks = _check(eager[spec.net_id], fmt, path, spec, atol, seed)
            shown = dict(kwargs, filepath=str(out / path.name))
            shown["args_file"] = f"{spec.stem}.{fmt}_args.json"
            entry = report["networks"].setdefault(spec.net_id, {
                "checkpoint": str(spec.checkpoint), "in_channels": spec.in_channels,
                "out_channels": spec.out_channels, "divisor": list(spec.divisor), "files": {}})
            entry["files"][fmt] = {"file": path.name, "checks": checks, "args_file_content": verb_args,
                                   "command": " ".join(_command(spec, fmt, shown)[1:])}
        for spec, fmt in jobs:
            name = f"{spec.stem}{_SUFFIX[fmt]}"
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_json(report, out / "export.json")
    return report


# ----------------------------------------------------------------------------------------------
# ONNX Runtime as a network
# ----------------------------------------------------------------------------------------------
class OnnxNetwork(torch.nn.Module):
    """An exported network run by ONNX Runtime behind the ``nn.Module`` call interface.

    ``forward(x)`` takes a float tensor (B, C, X, Y, Z) and returns the logits as a float32 tensor
    on ``x``'s device. It has no parameters (so the coarse stage and the inferer take the
    CPU device) and exposes ``strides`` / ``divisor`` from the file's metadata (written by
    :func:`export`) so the cascade pads inputs exactly as for the torch network.

    Args:
        path: ``.onnx`` file.
        intra_op_threads: ORT intra-op threads; default ``torch.get_num_threads()`` so both
            runtimes use the same number of cores.
        providers: ORT execution providers (default CPU).
    """

    def __init__(self, path: str | os.PathLike, intra_op_threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "ONNX model not found (run `abdoseg export` first)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(self.path, f"not a loadable ONNX model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.strides = json.loads(meta[_META_PREFIX + "strides"]) if _META_PREFIX + "strides" in meta else None
        self.divisor = json.loads(meta[_META_PREFIX + "divisor"]) if _META_PREFIX + "divisor" in meta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


def torch_cascade(bundle_dir: str | os.PathLike, device: str = "cpu",
                  overrides: Mapping[str, Any] | None = None) -> Any:
    """The bundle's inference (:func:`abdoseg.inference.segmenter.segmenter_from_bundle`) with its
    PyTorch weights: ``segmenter({"image": path}) -> (mask, affine)``. ``overrides``: config id ->
    value (e.g. ``{"fine_spacing_mm": [4, 4, 4]}``)."""
    from abdoseg.inference.segmenter import segmenter_from_bundle

    return segmenter_from_bundle(bundle_dir, device=device, overrides=overrides)


def onnx_cascade(bundle_dir: str | os.PathLike, onnx_dir: str | os.PathLike | None = None,
                 intra_op_threads: int | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """Like :func:`torch_cascade` - the same config, transforms and inferers - with both networks
    replaced by :class:`OnnxNetwork` sessions on ``<onnx_dir>/coarse_model.onnx`` and
    ``model.onnx`` (default ``onnx_dir``: ``<bundle_dir>/models``). Runs on CPU."""
    from abdoseg.bundle.config import load_bundle_config
    from abdoseg.inference.segmenter import segmenter_from_bundle

    bundle = Path(bundle_dir).resolve()
    folder = Path(onnx_dir).resolve() if onnx_dir else bundle / "models"
    if "coarse_network_def" not in load_bundle_config(bundle).get():
        raise InputError(bundle / "configs" / "inference.json", "defines no coarse_network_def (not a cascade bundle)")
    onnx_overrides = {"coarse_network_def": {"_target_": "abdoseg.bundle.export.OnnxNetwork",
                                             "path": str(folder / "coarse_model.onnx"),
                                             "intra_op_threads": intra_op_threads},
                      "coarse_checkpoint": None, **dict(overrides or {})}
    network = OnnxNetwork(folder / "model.onnx", intra_op_threads=intra_op_threads)
    return segmenter_from_bundle(bundle, device="cpu", overrides=onnx_overrides, network=network)


__all__ = ["export", "bundle_networks", "NetSpec", "OnnxNetwork", "onnx_cascade", "torch_cascade",
           "DEFAULT_OPSET", "DEFAULT_ATOL", "FORMATS"]
