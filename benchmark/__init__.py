"""Balanced multimodal learning benchmark: the core (data, models, trainer, runner, command line)."""

__version__ = "0.1.0"
