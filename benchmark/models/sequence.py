"""Encoders of sequences: token ids (``text_transformer`` trained from scratch, ``bert`` read from a
local Hugging Face folder; ``hf``, any Hugging Face text model from the folder given as
``encoder_weights.<modality>``) and feature sequences T×D (``seq_transformer``, for CMU-MOSEI).

Nothing is downloaded: ``bert`` loads with ``local_files_only``; ``transformers`` is an optional
dependency (the ``text`` extra) imported only when ``bert`` or ``hf`` is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.data.base import ModalitySpec
from benchmark.errors import UsageError
from benchmark.registry import register_encoder


def _transformer(dim: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def project_to(spec: ModalitySpec, width: int) -> tuple[nn.Module, int]:
    """A linear map to the spec's ``features`` when it asks for another size than ``width`` (so that
    the text features match the image encoder's, as methods sharing a head need)."""
    features = getattr(spec, "features", 0) or width
    return (nn.Identity() if features == width else nn.Linear(width, features)), features


def padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """True where a position is padding; the first position is always kept, so that an all-padding
    input (a modality zeroed out as absent) still gives finite features."""
    pad = ids == pad_id
    pad[:, 0] = False
    return pad


class TextTransformer(nn.Module):
    """Token embedding + learned positions + a small Transformer encoder, mean-pooled over the
    non-padding tokens; trained from scratch."""

    def __init__(self, spec: ModalitySpec, dim: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        vocab = getattr(spec, "vocab_size", 0)
        if not vocab or len(spec.shape) != 1:
            raise UsageError(f"text_transformer reads token ids; modality {spec.name!r} is {spec.kind} "
                             f"{spec.shape}: choose another encoder for it")
        self.pad_id = getattr(spec, "pad_id", 0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=self.pad_id)
        self.pos = nn.Parameter(torch.randn(1, spec.shape[0], dim) * 0.02)
        self.encoder = _transformer(dim, heads, layers, dropout=0.1)
        self.norm = nn.LayerNorm(dim)
        self.head, self.out_dim = project_to(spec, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        pad = padding_mask(ids, self.pad_id)
        x = self.encoder(self.embed(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head(self.norm((x * keep).sum(dim=1) / keep.sum(dim=1)))


def require_transformers(name: str = "bert") -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"encoder {name} needs the package transformers; pip install "
                         "'balanced-mm-bench[text]' (or transformers>=4.40)") from None
    transformers.logging.set_verbosity_error()
    return transformers


class HFTextEncoder(nn.Module):
    """A pretrained Hugging Face text model from a local folder (config, weights, tokenizer files,
    as ``save_pretrained`` writes them), loaded with ``AutoModel`` and ``local_files_only``: the
    final hidden state of the first token ([CLS] for BERT), linearly mapped to the spec's
    ``features`` when that differs from the model's width. The whole model is fine-tuned.

    The folder is ``encoder_weights.<modality>`` or, without it, the one the dataset names (its
    tokenizer made the ids: Food-101's ``dataset.bert_dir``). The token ids must come from that
    model's tokenizer; ids beyond its vocabulary are refused."""

    takes_weights = True
    family = "hf"

    def __init__(self, spec: ModalitySpec, weights: str = "") -> None:
        super().__init__()
        name = self.family
        folder = weights or getattr(spec, "pretrained", "")
        if not folder:
            raise UsageError(f"encoder {name} needs a local BERT folder for modality {spec.name!r}: set "
                             f"encoder_weights.{spec.name}=<folder> or dataset.bert_dir=<folder with config.json, "
                             "the weights and the tokenizer files> (its tokenizer then makes the token ids)")
        if len(spec.shape) != 1 or spec.kind != "tokens":
            raise UsageError(f"encoder {name} reads token ids; modality {spec.name!r} is {spec.kind} "
                             f"{tuple(spec.shape)}: choose another encoder for it")
        if not Path(folder).expanduser().is_dir():
            raise UsageError(f"encoder {name}: {folder} is not a folder; give the folder a Hugging Face model "
                             "was saved to with save_pretrained")
        transformers = require_transformers(name)
        try:
            self.bert = transformers.AutoModel.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot load a Hugging Face model from {folder} ({reason}); point "
                             f"encoder_weights.{spec.name} (or dataset.bert_dir) at a folder saved with "
                             "save_pretrained") from None
        vocab = int(getattr(self.bert.config, "vocab_size", 0) or 0)
        if vocab and getattr(spec, "vocab_size", 0) > vocab:
            raise UsageError(f"modality {spec.name!r} has token ids up to {spec.vocab_size - 1}, the model in "
                             f"{folder} knows {vocab}; make the ids with that model's tokenizer")
        self.pad_id = getattr(spec, "pad_id", 0)
        self.head, self.out_dim = project_to(spec, int(self.bert.config.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        mask = (~padding_mask(ids, self.pad_id)).long()
        return self.head(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])


class BertEncoder(HFTextEncoder):
    """``bert``: the Hugging Face encoder under the name Food-101's ``dataset.bert_dir`` selects."""

    family = "bert"


class SeqTransformer(nn.Module):
    """Feature sequences T×D (CMU-MOSEI's aligned GloVe, COVAREP and Facet features): per-step layer
    norm, a linear projection, learned positions, a small Transformer encoder, mean over time."""

    def __init__(self, spec: ModalitySpec, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        if len(spec.shape) != 2:
            raise UsageError(f"seq_transformer reads feature sequences T×D; modality {spec.name!r} has shape "
                             f"{spec.shape}: choose another encoder for it")
        steps, features = spec.shape
        self.inorm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(1, steps, dim) * 0.02)
        self.encoder = _transformer(dim, heads, layers, dropout=0.1)
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.inorm(x.float())) + self.pos[:, : x.shape[1]]
        return self.norm(self.encoder(x).mean(dim=1))


register_encoder("text_transformer")(TextTransformer)
register_encoder("bert")(BertEncoder)
register_encoder("hf")(HFTextEncoder)
register_encoder("seq_transformer")(SeqTransformer)
