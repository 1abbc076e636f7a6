"""Bundles: reading bundle configs, packing the zips and exporting TorchScript/ONNX."""
