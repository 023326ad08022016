"""Modality specs that carry what an encoder needs beyond the shape: the vocabulary of token ids,
or a local file or folder of pretrained weights."""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.data.base import ModalitySpec


@dataclass(frozen=True)
class TokenSpec(ModalitySpec):
    """Token ids (shape ``(max_tokens,)``): ``vocab_size`` ids, padding ``pad_id``; ``pretrained`` is
    the local Hugging Face folder whose tokenizer made them ("" for the suite's word vocabulary);
    ``features`` the feature size the encoder ends with (0: its own width, no projection)."""

    vocab_size: int = 0
    pad_id: int = 0
    pretrained: str = ""
    features: int = 0


@dataclass(frozen=True)
class WeightsSpec(ModalitySpec):
    """A modality whose encoder starts from a local weights file (``""``: from scratch)."""

    weights: str = ""
