"""Encoders and fusion heads (registered on import)."""

from benchmark.models import sequence  # noqa: F401  (registers the sequence encoders)
from benchmark.models.encoders import create_encoder
from benchmark.models.fusion import FusionHead, create_fusion

__all__ = ["FusionHead", "create_encoder", "create_fusion"]
