"""A method and a dataset written outside the suite (tests/test_plugins.py imports it by name
through $BMB_PLUGINS): the README's plug-in example, plus a dataset of two vector modalities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.data.builder import DatasetBuilder
from benchmark.method import Batch, EvalOutput, Method, StepContext
from benchmark.registry import register_dataset, register_method


@dataclass
class MeanLogitsOptions:
    scale: float = opt(1.0, "multiplier of the averaged logits")


@register_method("mean_logits")
class MeanLogits(Method):
    """One linear head per modality; the prediction is the mean of their logits."""

    summary = "mean of per-modality linear heads (a plug-in)"
    Options = MeanLogitsOptions

    def build(self) -> nn.Module:
        encoders = self.make_encoders()
        heads = nn.ModuleDict({m: nn.Linear(e.out_dim, self.info.num_classes) for m, e in encoders.items()})
        self.model = nn.ModuleDict({"encoders": encoders, "heads": heads})
        return self.model

    def logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {m: self.model["heads"][m](self.model["encoders"][m](batch[m])) for m in self.modalities}

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.options.scale * torch.stack(list(self.logits(batch).values())).mean(dim=0)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.predict(batch), batch["label"])}

    def eval_forward(self, batch: Batch) -> EvalOutput:
        return EvalOutput(self.predict(batch), self.logits(batch), {})


@dataclass
class TwoBlobsOptions:
    n: int = opt(120, "samples per split")


@register_dataset("two-blobs")
class TwoBlobs(DatasetBuilder):
    Options = TwoBlobsOptions
    summary = "two Gaussian blobs seen through two noisy views (a plug-in)"

    def load(self) -> MultimodalData:
        gen = torch.Generator().manual_seed(0)

        def split() -> TensorSplit:
            y = torch.arange(self.options.n) % 2
            centre = y.float().unsqueeze(1) * 2 - 1
            views = {m: centre + noise * torch.randn(len(y), 4, generator=gen) for m, noise in (("a", 0.5), ("b", 2.0))}
            return TensorSplit(views, y)

        info = DataInfo("two-blobs", [ModalitySpec(m, "vector", (4,), "mlp") for m in ("a", "b")], 2)
        return MultimodalData(info, {s: split() for s in ("train", "val", "test")}, {"recipe": "two-blobs"})
