"""abdoseg: cascaded abdominal CT segmentation (13 organs + pan-cancer lesion) for MONAI bundles."""

__version__ = "0.1.0"
