"""Baseline methods, registered on import."""

from baselines import joint, mcr, mla, ogm_ge, unimodal  # noqa: F401
