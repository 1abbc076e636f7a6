"""Evaluation: FLARE23 metrics, the evaluate command, statistics and plots."""
