"""``unimodal``: one modality, encoder + linear head, CE; and ``ensemble``: the mean of the
softmax probabilities of independently trained unimodal models (one per modality)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from benchmark.config import opt
from benchmark.errors import UsageError
from benchmark.late_fusion import fuse
from benchmark.method import Batch, EvalOutput, Method
from benchmark.registry import register_method
from benchmark.unimodal import build_unimodal, train_unimodal, unimodal_eval


@dataclass
class UnimodalOptions:
    modality: str = opt("", "the modality trained (default: the dataset's first)")


@register_method("unimodal")
class Unimodal(Method):
    summary = "one modality alone: encoder + linear head, cross-entropy"
    Options = UnimodalOptions
    single_modality = True  # one row per modality in the tables; the encoders' shortfall is measured against it
    table_order = 2
    run_first = True  # its checkpoints serve ensemble, UDI's anchor phase and MCR's initialisation
    _checkpoint: str | None = None  # the cached checkpoint trained or loaded by run()

    def check(self) -> None:
        if not self.options.modality:
            self.options.modality = self.modalities[0]
        if self.options.modality not in self.modalities:
            raise UsageError(
                f"method.modality {self.options.modality!r} is not a modality of {self.info.name}; "
                f"choose one of {', '.join(self.modalities)}"
            )

    def build(self) -> nn.Module:
        self.model = build_unimodal(self, self.options.modality)
        return self.model

    def run(self, trainer: Any) -> dict[str, Any]:
        self.model, info = train_unimodal(trainer, self, self.options.modality)
        self._checkpoint = info.get("checkpoint")
        return {"unimodal": {self.options.modality: info}}

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.model(batch[self.options.modality])[0]

    def eval_forward(self, batch: Batch) -> EvalOutput:
        return unimodal_eval(self.model, batch)

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        if modality != self.options.modality:
            raise ValueError(f"unimodal model of {self.options.modality!r} has no head for {modality!r}")
        return self.predict(batch)

    def modalities_read(self) -> list[str]:
        return [self.options.modality]

    def frozen_checkpoint(self, modality: str) -> str | None:
        return self._checkpoint if modality == self.options.modality else None


@register_method("ensemble")
class Ensemble(Method):
    summary = "mean softmax probabilities of unimodal models trained independently"
    table_order = 3
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MCR reruns (3 folds, val-selected)": (71.7, 2.2)},
    }
    min_modalities = 2
    _checkpoints: dict[str, str | None] = {}  # per modality, set by run()

    def build(self) -> nn.Module:
        self.model = nn.ModuleDict({m: build_unimodal(self, m) for m in self.modalities})
        return self.model

    def run(self, trainer: Any) -> dict[str, Any]:
        infos = {}
        for m in self.modalities:
            self.model[m], infos[m] = train_unimodal(trainer, self, m)
        self._checkpoints = {m: info.get("checkpoint") for m, info in infos.items()}
        return {"unimodal": infos}

    def eval_forward(self, batch: Batch) -> EvalOutput:
        outs = [unimodal_eval(self.model[m], batch) for m in self.modalities]
        unimodal = {m: o.logits for m, o in zip(self.modalities, outs)}
        features = {m: o.features[m] for m, o in zip(self.modalities, outs)}
        return EvalOutput(fuse(list(unimodal.values()), "prob_mean"), unimodal, features)

    absent_rule = "head"

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        return self.model[modality](batch[modality])[0]

    def fuse_heads(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return fuse(list(logits.values()), "prob_mean")

    def frozen_checkpoint(self, modality: str) -> str | None:
        return self._checkpoints.get(modality)
