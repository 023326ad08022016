"""Baseline methods, registered on import."""

from baselines import joint, unimodal  # noqa: F401
