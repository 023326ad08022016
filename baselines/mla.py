"""``mla``: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

One encoder per modality and **one shared linear head** ``W``. Per batch every modality is
encoded once; then, modality by modality: ``loss_m = CE(W f_m, y)`` → backward → the head's weight
gradient is projected by an OWM-style projector ``P`` shared by all modalities → optimizer step →
zero grad. There is no joint loss; each batch makes M optimizer steps.

Projector (``P₀ = I``): with ``r`` the batch mean of ``f_m`` (1×d), ``k = P rᵀ``,
``P ← P − k kᵀ / (α_t + r k)``, ``P ← P / ‖P‖_F``, ``∇W ← ∇W Pᵀ``, ``α_t = 0.1^(b/len(loader) + 1)``;
skipped on the very first update.

Test time: per-sample entropy ``e_m = −Σ_c p_m,c log p_m,c``, ``w_m = softmax_m(max_j e_j − e_m)``,
fused logits ``Σ_m w_m (W f_m + b)`` (``entropy="sample"``); ``entropy="batch"`` is the reference
code's variant (one weight per modality per batch); ``fusion="fixed"`` averages with equal weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.losses import entropy
from benchmark.method import Batch, EvalOutput, Method, Stage, StepContext
from benchmark.registry import register_method


@dataclass
class MLAOptions:
    projection: bool = opt(True, "project the shared head's weight gradient with the OWM projector "
                                 "(false: the ablation; the released code never applies it)")
    fusion: str = opt("entropy", "test-time fusion of the unimodal logits: entropy or fixed (equal weights)")
    entropy: str = opt("sample", "entropy weights per sample (the paper) or per batch (the reference code)")

    def validate(self) -> None:
        if self.fusion not in ("entropy", "fixed"):
            raise UsageError(f"method.fusion must be entropy or fixed, got {self.fusion!r}")
        if self.entropy not in ("sample", "batch"):
            raise UsageError(f"method.entropy must be sample or batch, got {self.entropy!r}")


class OWMProjector:
    """The orthogonal-weight-modification projector shared by all modalities."""

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        self.P = torch.eye(dim, device=device, dtype=torch.float32)
        self.updates = 0  # updates seen, the first one included

    @staticmethod
    def alpha(batch_index: int, num_batches: int) -> float:
        return 0.1 ** (batch_index / num_batches + 1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, alpha: float) -> None:
        """``P ← P − k kᵀ/(α + r k)`` with ``r`` the batch mean of ``features``, then ``P /= ‖P‖_F``."""
        r = features.detach().float().mean(dim=0, keepdim=True)  # 1×d
        k = self.P @ r.t()  # d×1
        P = self.P - (k @ k.t()) / (alpha + r @ k)
        self.P = P / torch.linalg.matrix_norm(P, ord="fro")

    @torch.no_grad()
    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return (grad.float() @ self.P.t()).to(grad.dtype)

    def step(self, weight: nn.Parameter, features: torch.Tensor, batch_index: int, num_batches: int) -> bool:
        """One MLA update: skipped on the very first update; returns whether it projected."""
        first = self.updates == 0
        self.updates += 1
        if first or weight.grad is None:
            return False
        self.update(features, self.alpha(batch_index, num_batches))
        weight.grad = self.project(weight.grad)
        return True


def entropy_weights(logits: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Fusion weights per modality: shape (B, 1) for ``sample``, a scalar for ``batch``."""
    names = list(logits)
    if mode == "sample":
        ent = torch.stack([entropy(z) for z in logits.values()], dim=1)  # B×M
    else:
        # The reference code: softmax over the batch dimension, entropy summed over the batch.
        ent = torch.stack([-(z.float().softmax(dim=0) * z.float().log_softmax(dim=0)).sum()
                           for z in logits.values()]).unsqueeze(0)  # 1×M
    top = ent.max(dim=1, keepdim=True).values
    w = (top - ent).softmax(dim=1)
    if mode == "sample":
        return {m: w[:, i:i + 1] for i, m in enumerate(names)}
    return {m: w[0, i] for i, m in enumerate(names)}


class MLAModel(nn.Module):
    def __init__(self, encoders: nn.ModuleDict, head: nn.Linear) -> None:
        super().__init__()
        self.encoders = encoders
        self.head = head


@register_method("mla")
class MLA(Method):
    summary = "MLA: alternating unimodal steps through one shared head, OWM projection, entropy fusion"
    table_order = 6
    perf_bound = 1.25
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"BalanceBenchmark (1 run, test-selected)": (72.30, None)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = MLAOptions
    min_modalities = 2
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "step", "step_size": 70, "gamma": 0.1, "epochs": 100,
    }

    def check(self) -> None:
        self.require_equal_feature_sizes("shares one head across modalities",
                                         "choose encoders with equal out_dim via --set encoder.<modality>=...")

    def build(self) -> nn.Module:
        with seeded(self.cfg.seed, self.stream("build")):  # the same encoders as joint for this seed
            encoders = self.make_encoders()
            dim = next(iter(encoders.values())).out_dim
            head = nn.Linear(dim, self.info.num_classes)
        self.model = MLAModel(encoders, head)
        self.projector: OWMProjector | None = None
        self.projected_updates = 0
        return self.model

    # --- training ----------------------------------------------------------------------------
    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """M optimizer steps: one per modality, through the shared head."""
        y = batch["label"]
        head = self.model.head
        with ctx.autocast():
            feats = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            # Each loss involves only its own encoder's graph and the head's current weights.
            with ctx.autocast():
                loss = F.cross_entropy(head(feats[m]), y)
            for opt_ in ctx.optimizers:
                opt_.zero_grad(set_to_none=True)
            ctx.backward(loss)
            if self.options.projection:
                if self.projector is None:
                    self.projector = OWMProjector(head.in_features, head.weight.device)
                if self.projector.step(head.weight, feats[m], ctx.step, ctx.num_batches):
                    self.projected_updates += 1
            for opt_ in ctx.optimizers:
                ctx.optimizer_step(opt_)
            out[f"ce_{m}"] = loss.detach()
        for opt_ in ctx.optimizers:
            opt_.zero_grad(set_to_none=True)
        out["loss"] = torch.stack([out[f"ce_{m}"].float() for m in self.modalities]).mean()
        return out

    def stage(self) -> Stage:
        return Stage(name=self.name, module=self.model, step=self.step, predict=self.predict,
                     seed_key=self.stream(), manual=True, modalities=list(self.modalities))

    def record_facts(self) -> dict[str, Any]:
        return {"projected_updates": self.projected_updates,
                "projector_updates": self.projector.updates if self.projector else 0}

    # --- evaluation --------------------------------------------------------------------------
    def fuse(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.options.fusion == "fixed":
            return torch.stack([z.float() for z in logits.values()]).mean(dim=0)
        weights = entropy_weights(logits, self.options.entropy)
        return sum(weights[m] * logits[m].float() for m in logits)

    def eval_forward(self, batch: Batch) -> EvalOutput:
        feats = self.encode(batch)
        logits = {m: self.model.head(f) for m, f in feats.items()}
        return EvalOutput(self.fuse(logits), logits, feats)

    absent_rule = "head"

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        return self.model.head(self.model.encoders[modality](batch[modality]))

    def fuse_heads(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse(logits)
