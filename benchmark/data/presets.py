"""The UDI paper's settings (its App. A.4 and A.6, see METHODS.md) for the datasets it reports,
as run assignments: the rows of the ``paper`` sweep for these datasets are these presets.

Food-101 (UPMC): pretrained ResNet18 on 256×256 images and pretrained BERT on ≤ 40 tokens, SGD
lr 1e-3 (momentum 0.9, weight decay 1e-4, batch 64), about 100 epochs; the pretrained weights are
local files the user passes (``dataset.bert_dir``, ``dataset.image_weights``), from scratch
otherwise. CMU-MOSEI: Transformers on the aligned features of all three modalities, concatenation
fusion, 20 epochs (its learning rate is not given). FSDD is not in the paper: ``av-digits`` with
its audio from FSDD is the suite's real-speech counterpart of the offline av-digits.
"""

from __future__ import annotations

from typing import Any

PAPER_OPTIMISER = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64}

UDI_PAPER: dict[str, dict[str, Any]] = {
    "food-101": {**PAPER_OPTIMISER, "lr": 1e-3, "epochs": 100, "dataset.image_size": 256,
                 "dataset.max_tokens": 40},
    "cmu-mosei": {**PAPER_OPTIMISER, "epochs": 20, "dataset.labels": "binary", "fusion": "concat"},
    "av-digits": {"dataset.audio_source": "fsdd"},
}


def preset(dataset: str) -> dict[str, Any]:
    """The UDI paper's assignments for ``dataset`` (empty when the paper has none)."""
    return dict(UDI_PAPER.get(dataset, {}))
