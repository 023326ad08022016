"""``joint``: late fusion trained with one cross-entropy on the fused logits, and
``multi_loss``: the same plus λ_uni Σ_m CE(z_m, y) through a separate linear head per modality."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.errors import UsageError
from benchmark.method import Batch, EvalOutput, Method, StepContext, shared_search_space
from benchmark.registry import register_method


class FusedModel(nn.Module):
    """Encoders per modality and one fusion head."""

    def __init__(self, encoders: nn.ModuleDict, head: nn.Module) -> None:
        super().__init__()
        self.encoders = encoders
        self.head = head


@register_method("joint")
class Joint(Method):
    summary = "late fusion, one cross-entropy on the fused logits"
    min_modalities = 2
    reference = True  # every table's paired gaps and perf's step ratios are taken against joint
    table_order = 0
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MCR reruns (3 folds, val-selected)": (62.6, 5.8),
                    "BalanceBenchmark (1 run, test-selected)": (65.50, None),
                    "MMPareto paper (Tab. 1)": (66.13, None), "DGL paper (Tab. 1)": (65.1, None),
                    "InfoReg paper (Tab. 2)": (66.61, None), "D&R paper (Tab. 1)": (67.47, None)},
        "kinetics-sounds": {"MMPareto paper (Tab. 1)": (64.61, None), "DGL paper (Tab. 1)": (64.45, None),
                            "InfoReg paper (Tab. 2)": (65.67, None), "D&R paper (Tab. 1)": (65.04, None)},
    }

    def build(self) -> nn.Module:
        encoders = self.make_encoders()
        self.model = FusedModel(encoders, self.make_fusion(encoders))
        return self.model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.encode(batch)
        return self.model.head(feats), feats

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, _ = self.forward(batch)
        return {"loss": F.cross_entropy(logits, batch["label"])}

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.forward(batch)[0]

    def eval_forward(self, batch: Batch) -> EvalOutput:
        logits, feats = self.forward(batch)
        return EvalOutput(logits, self.model.head.unimodal_logits(feats), feats)


@dataclass
class MultiLossOptions:
    lambda_uni: float = opt(1.0, "weight of the sum of unimodal cross-entropies")

    def validate(self) -> None:
        if self.lambda_uni < 0:
            raise UsageError(f"method.lambda_uni must be >= 0, got {self.lambda_uni}")


@register_method("multi_loss")
class MultiLoss(Joint):
    summary = "joint cross-entropy + λ_uni × unimodal cross-entropies (separate heads)"
    Options = MultiLossOptions
    table_order = 1
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {  # the "uniform baseline"
        "crema-d": {"MMPareto paper (Tab. 1)": (71.10, None)},
        "kinetics-sounds": {"MMPareto paper (Tab. 1)": (68.31, None)},
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.lambda_uni": trial.suggest_float("method.lambda_uni", 0.1, 3.0, log=True)}

    def build(self) -> nn.Module:
        super().build()
        self.model.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(enc.out_dim, self.info.num_classes) for m, enc in self.model.encoders.items()}
        )
        return self.model

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, feats = self.forward(batch)
        y = batch["label"]
        joint = F.cross_entropy(logits, y)
        unimodal = sum(F.cross_entropy(self.model.unimodal_heads[m](f), y) for m, f in feats.items())
        return {"loss": joint + self.options.lambda_uni * unimodal, "joint_ce": joint, "unimodal_ce": unimodal}

    def eval_forward(self, batch: Batch) -> EvalOutput:
        logits, feats = self.forward(batch)
        unimodal = {m: self.model.unimodal_heads[m](f) for m, f in feats.items()}
        return EvalOutput(logits, unimodal, feats)
