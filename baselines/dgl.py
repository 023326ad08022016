"""``dgl``: Disentangled Gradient Learning (Wei et al., ICCV 2025).

The model is ``joint``'s: encoders ψ_m and one fusion head φ, which serves both the multimodal
loss and the unimodal ones. Each loss's gradient reaches a disjoint set of parameters:

- ``L_d = CE(φ(sg f_1, …, sg f_M), y)``: the features are detached, so ``L_d`` trains only φ;
- ``L_m = CE(φ(0, …, f_m, …, 0), y)`` ("modality dropout": every other feature set to 0; for
  concat ``W_m f_m + b`` with the full bias), evaluated with φ's parameters detached, so
  ``α Σ_m L_m`` trains only the encoders;
- one backward of ``L_d + α Σ_m L_m`` (the reference's two backward passes, with φ's gradient
  from the unimodal losses discarded in between, give the same gradients);
- ``clip_grad_norm_(all parameters, clip_norm)`` before the optimizer step (``clip_norm = 0``: off).

The M unimodal evaluations of φ are one call on the M zero-filled copies of the batch stacked
along the batch dimension (the suite's fusion heads act on each sample alone); for concat,
``W_m f_m + b`` from the weight's column blocks, the zero blocks skipped. Prediction: the fused
logits φ(f); the unimodal prediction of modality m is φ(0, …, f_m, …, 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from baselines.joint import Joint
from benchmark.config import opt
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import Batch, EvalOutput, StepContext, shared_search_space
from benchmark.models.fusion import ConcatFusion
from benchmark.registry import register_method

ALPHA_GRID = (1.0, 2.0, 3.0, 4.0, 5.0)  # the paper's Tab. 4 (CREMA-D)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm over every gradient, scaled by
    ``min(1, max_norm / (norm + 1e-6))``) with the foreach kernels called directly, which saves
    most of its per-call overhead on small models; returns the norm before clipping (on the device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@dataclass
class DGLOptions:
    alpha: float = opt(4.0, "α: weight of the unimodal losses that train the encoders (the paper's CREMA-D "
                            "value; 2 for Kinetics-Sounds)")
    clip_norm: float = opt(40.0, "clip the gradient norm of all parameters to this value before each step "
                                 "(the reference code; 0 = off)")

    def validate(self) -> None:
        if not 0 <= self.alpha < math.inf:
            raise UsageError(f"method.alpha must be a finite number >= 0, got {self.alpha}")
        if not 0 <= self.clip_norm < math.inf:
            raise UsageError(f"method.clip_norm must be a finite number >= 0 (0 = no clipping), got {self.clip_norm}")


@register_method("dgl")
class DGL(Joint):
    summary = "DGL: the fusion head trains on detached features, the encoders on unimodal (modality-dropout) losses"
    table_order = 24
    perf_bound = 1.3
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"DGL paper (Tab. 1)": (77.48, None)},
        "kinetics-sounds": {"DGL paper (Tab. 1)": (74.78, None)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = DGLOptions
    min_modalities = 2
    # The paper's settings (§4.1; lr 2e-3 as its scripts run). The reference steps MultiStepLR at
    # the start of each epoch, so its decay comes one epoch early; here it comes after epoch 70.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "step", "step_size": 70, "gamma": 0.1, "epochs": 100,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.alpha": trial.suggest_categorical("method.alpha", list(ALPHA_GRID))}

    def build(self) -> nn.Module:
        # Built under joint's seed stream: the same seed gives joint's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self._clipped_total = 0.0
        self._steps_total = 0
        self._reset_epoch()
        return self.model

    # --- the losses ----------------------------------------------------------------------------
    def stacked_dropout_logits(self, feats: dict[str, torch.Tensor], *, detach_head: bool = True) -> torch.Tensor:
        """``φ(0, …, f_m, …, 0)`` for every modality m in turn, stacked along the batch dimension
        (M·B rows); with ``detach_head`` no gradient reaches φ's parameters.

        Concat: ``W_m f_m + b`` for each m (the zero blocks contribute nothing, so they are not
        multiplied). Any other head: one call on the M zero-filled copies of the batch, with
        ``torch.func.functional_call`` and detached parameters."""
        head = self.model.head
        if type(head) is ConcatFusion:
            weight, bias = (head.fc.weight.detach(), head.fc.bias.detach()) if detach_head else \
                (head.fc.weight, head.fc.bias)
            blocks, start = {}, 0
            for m in head.modalities:
                stop = start + head.dims[m]
                blocks[m] = weight[:, start:stop]
                start = stop
            return torch.cat([F.linear(f, blocks[m], bias) for m, f in feats.items()])
        names = list(feats)
        stacked = {k: torch.cat([f if k == m else torch.zeros_like(f) for m in names]) for k, f in feats.items()}
        if not detach_head:
            return head(stacked)
        return functional_call(head, {n: p.detach() for n, p in head.named_parameters()}, (stacked,))

    def dropout_logits(self, feats: dict[str, torch.Tensor], *, detach_head: bool = True) -> dict[str, torch.Tensor]:
        """``φ(0, …, f_m, …, 0)`` per modality m (the unimodal predictions)."""
        logits = self.stacked_dropout_logits(feats, detach_head=detach_head)
        return dict(zip(feats, logits.chunk(len(feats))))

    def split_losses(self, batch: Batch, *, detach_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_d, [L_m for each modality])`` on one batch (one encoder forward)."""
        feats = self.encode(batch)
        y = batch["label"]
        fused = F.cross_entropy(self.model.head({m: f.detach() for m, f in feats.items()}), y)
        z = self.stacked_dropout_logits(feats, detach_head=detach_head)
        per_sample = F.cross_entropy(z, y.repeat(len(feats)), reduction="none")
        return fused, per_sample.view(len(feats), -1).mean(dim=1)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        fused, unimodal = self.split_losses(batch)
        # the trace stays on the device until the epoch ends (as the loop's own step outputs)
        self._trace.append((fused.detach(), unimodal.detach(), len(batch["label"])))
        return {"loss": fused + self.options.alpha * unimodal.sum(), "_loss_fused": fused, "_loss_unimodal": unimodal}

    def after_backward(self, ctx: StepContext, outputs: dict[str, torch.Tensor]) -> None:
        if self.options.clip_norm > 0:
            self._norms.append(clip_gradients(self.model.parameters(), self.options.clip_norm))

    # --- evaluation ----------------------------------------------------------------------------
    def eval_forward(self, batch: Batch) -> EvalOutput:
        logits, feats = self.forward(batch)
        return EvalOutput(logits, self.dropout_logits(feats), feats)

    # --- trace ---------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._trace: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._norms: list[torch.Tensor] = []

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._reset_epoch()

    def epoch_log(self) -> dict[str, Any]:
        if not self._trace:  # no step this epoch
            return {}
        losses = torch.stack([torch.cat([fused.reshape(1), unimodal]) for fused, unimodal, _ in self._trace]).float()
        sizes = torch.tensor([n for *_, n in self._trace], dtype=torch.float32, device=losses.device)
        means = (losses * sizes[:, None]).sum(dim=0) / sizes.sum()
        clipped = (torch.stack(self._norms) > self.options.clip_norm).sum().reshape(1) if self._norms \
            else torch.zeros(1, device=losses.device)
        *values, n_clipped = torch.cat([means, clipped.to(means.dtype)]).tolist()  # the epoch's one read
        row: dict[str, Any] = {"dgl_loss_fused": values[0],
                               **{f"dgl_loss_{m}": v for m, v in zip(self.modalities, values[1:])}}
        if self.options.clip_norm > 0:
            row["dgl_clipped"] = n_clipped / max(len(self._norms), 1)
            self._clipped_total += n_clipped
            self._steps_total += len(self._norms)
        return row

    def record_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"unimodal_prediction": "fusion head on zero-filled other features"}
        if self.options.clip_norm > 0:
            facts["clipped_steps"] = int(self._clipped_total)
            facts["clipped_fraction"] = self._clipped_total / max(self._steps_total, 1)
        return facts
