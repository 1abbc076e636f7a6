"""Inference stages of the cascade (see the module docstrings)."""
