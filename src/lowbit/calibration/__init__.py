"""Calibration text: named sources, files, and the seeded sampler."""

from lowbit.calibration.text import calibration_set, load_text, pydoc_split, tokenize

__all__ = ["calibration_set", "load_text", "pydoc_split", "tokenize"]
