"""``ogm_ge``: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR
2022), and ``ogm``: the same modulation without the Gaussian noise.

Two modalities ``a`` (the dataset's first) and ``v`` (its second), late fusion (concat or sum),
trained with the joint cross-entropy only. Between backward and the optimizer step:

- ``s_a = Σ_i softmax(z_a,i)[y_i]``, ``s_v`` likewise, from the fused head's unimodal readouts;
- ``ρ_v = s_v / s_a``, ``ρ_a = 1 / ρ_v``;
- ``ρ_v > 1``: ``k_v = 1 − tanh(α ρ_v)``, ``k_a = 1``; otherwise ``k_a = 1 − tanh(α ρ_a)``, ``k_v = 1``;
- the encoders' conv-kernel gradients (4-D tensors) become ``k·g`` (OGM) or ``k·g + ε`` with
  ``ε ~ N(0, std(g)²)`` elementwise, ``std`` of the unmodulated gradient (OGM-GE), on both encoders;
- only inside the modulation window: by default a fraction of the run's epoch budget E, epochs
  e with ``modulation_start·E ≤ e < modulation_end·E`` (start 0, end 0.5: the first half, as the
  reference's epochs 0–50 of 100); with ``window="epochs"`` absolute 0-based epochs
  ``modulation_start ≤ e ≤ modulation_end`` (both ends included, as the reference).

Encoders without conv kernels (MLPs on vector data) have their weight matrices modulated instead
(``modulate="auto"``; see docs/methods/ogm_ge.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.joint import Joint
from baselines.window import check_window, in_window
from benchmark.config import opt
from benchmark.device import derive_seed, seeded
from benchmark.errors import UsageError
from benchmark.method import Batch, StepContext, shared_search_space
from benchmark.registry import register_method

MODULATE_CHOICES = ("auto", "conv", "weights")


@dataclass
class OGMGEOptions:
    alpha: float = opt(0.8, "α: strength of the modulation, k = 1 − tanh(α ρ)")
    modulation_start: float = opt(0.0, "start of the modulation window: a fraction of the epoch budget "
                                       "(window=fraction) or the first modulated epoch, 0-based (window=epochs)")
    modulation_end: float = opt(0.5, "end of the modulation window: a fraction of the epoch budget, excluded "
                                     "(window=fraction) or the last modulated epoch, included (window=epochs)")
    window: str = opt("fraction", "unit of modulation_start/end: fraction (of the run's epochs) or epochs")
    noise: bool = opt(True, "add N(0, std(g)²) to the modulated gradients (the GE in OGM-GE)")
    modulate: str = opt("auto", "which encoder gradients are modulated: conv (4-D kernels only), "
                                "weights (every tensor with ≥ 2 dims) or auto (conv if the encoder "
                                "has conv kernels, else weights)")

    def validate(self) -> None:
        if self.alpha < 0:
            raise UsageError(f"method.alpha must be >= 0, got {self.alpha}")
        check_window(self.modulation_start, self.modulation_end, self.window)
        if self.modulate not in MODULATE_CHOICES:
            raise UsageError(
                f"method.modulate must be one of {', '.join(MODULATE_CHOICES)}, got {self.modulate!r}"
            )


@dataclass
class OGMOptions(OGMGEOptions):
    noise: bool = opt(False, "add N(0, std(g)²) to the modulated gradients (off: plain OGM)")


def ogm_coefficients(z_a: torch.Tensor, z_v: torch.Tensor, y: torch.Tensor,
                     alpha: float) -> tuple[float, float, float]:
    """``(k_a, k_v, ρ_v)`` from the batch's unimodal logits and labels (the reference's Eq. 10,
    discontinuous at ρ = 1: at exactly ρ_v = 1 the first modality is damped)."""
    z_a, z_v = z_a.detach().double(), z_v.detach().double()
    idx = torch.arange(len(y), device=y.device)
    s_a = z_a.softmax(dim=1)[idx, y].sum()
    s_v = z_v.softmax(dim=1)[idx, y].sum()
    ratio_v = (s_v / s_a).item()  # the step's one host synchronisation: the branch needs the value
    ratio_a = 1.0 / ratio_v if ratio_v != 0 else float("inf")
    if ratio_v > 1:
        return 1.0, 1.0 - math.tanh(alpha * ratio_v), ratio_v
    return 1.0 - math.tanh(alpha * ratio_a), 1.0, ratio_v


def modulated_parameters(encoder: nn.Module, rule: str) -> tuple[list[nn.Parameter], str]:
    """The encoder parameters whose gradients OGM scales, and the rule actually applied."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    if rule == "auto":
        rule = "conv" if any(p.dim() == 4 for p in params) else "weights"
    if rule == "conv":
        return [p for p in params if p.dim() == 4], rule
    return [p for p in params if p.dim() >= 2], rule


@register_method("ogm_ge")
class OGMGE(Joint):
    summary = "OGM-GE: joint CE; encoder gradients scaled by 1 − tanh(α ρ) plus Gaussian noise"
    table_order = 5
    perf_bound = 1.15
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MCR reruns (3 folds, val-selected)": (65.6, 3.8)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = OGMGEOptions
    min_modalities = 2
    max_modalities = 2
    # The reference's defaults (CREMA-D); the shared configuration is never changed silently.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "step", "step_size": 70, "gamma": 0.1, "epochs": 100,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial), "method.alpha": trial.suggest_float("method.alpha", 0.1, 2.0)}

    def check(self) -> None:
        if self.cfg.fusion not in ("concat", "sum"):
            raise UsageError(
                f"{self.name} needs fusion concat or sum (a linear unimodal readout), got "
                f"{self.cfg.fusion!r}; set --set fusion=concat"
            )

    def build(self) -> nn.Module:
        # Built under joint's seed stream: the same seed gives joint's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self._targets: dict[str, list[nn.Parameter]] = {}
        self._rules: dict[str, str] = {}
        for m in self.modalities:
            self._targets[m], self._rules[m] = modulated_parameters(self.model.encoders[m], self.options.modulate)
        self._noise_gen: torch.Generator | None = None
        self._reset_epoch()
        return self.model

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        feats = self.encode(batch)
        logits = self.model.head(feats)
        a, v = self.modalities
        readouts = self.model.head.unimodal_logits(feats)
        return {"loss": F.cross_entropy(logits, batch["label"]),
                "_z_a": readouts[a].detach(), "_z_v": readouts[v].detach(), "_y": batch["label"]}

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is inside the modulation window."""
        o = self.options
        return in_window(epoch, o.modulation_start, o.modulation_end, o.window, self.cfg.epochs)

    def after_backward(self, ctx: StepContext, outputs: dict[str, torch.Tensor]) -> None:
        z_a, z_v, y = outputs["_z_a"], outputs["_z_v"], outputs["_y"]
        k_a, k_v, ratio_v = ogm_coefficients(z_a, z_v, y, self.options.alpha)
        self._sums["ratio"] += ratio_v
        self._sums["k_a"] += k_a
        self._sums["k_v"] += k_v
        self._sums["n"] += 1
        if not self.active(ctx.epoch):
            return
        a, v = self.modalities
        self.modulate({a: k_a, v: k_v})
        self._sums["modulated_steps"] += 1

    def modulate(self, coeffs: dict[str, float]) -> None:
        """Scale (and, for OGM-GE, perturb) the target gradients of each encoder in place."""
        for m, k in coeffs.items():
            for p in self._targets[m]:
                if p.grad is None:
                    continue
                g = p.grad
                if self.options.noise:
                    # std stays on the device (no host synchronisation per tensor); in place, so
                    # that every conv kernel costs one draw and two passes, with no new tensor
                    std = (g.float().std() + 1e-8).to(g.dtype) if g.numel() > 1 else 1e-8
                    noise = torch.randn(g.shape, generator=self._generator(g.device), device=g.device,
                                        dtype=g.dtype)
                    g.mul_(k).addcmul_(noise, torch.as_tensor(std, dtype=g.dtype, device=g.device))
                else:
                    g.mul_(k)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._noise_gen is None or self._noise_gen.device != device:
            self._noise_gen = torch.Generator(device=device)
            self._noise_gen.manual_seed(derive_seed(self.cfg.seed, f"method/{self.name}/noise"))
        return self._noise_gen

    def _reset_epoch(self) -> None:
        self._sums = {"ratio": 0.0, "k_a": 0.0, "k_v": 0.0, "n": 0, "modulated_steps": 0}

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._reset_epoch()

    def epoch_log(self) -> dict[str, Any]:
        n = max(self._sums["n"], 1)
        a, v = self.modalities
        return {"ogm_ratio_v": self._sums["ratio"] / n, f"ogm_k_{a}": self._sums["k_a"] / n,
                f"ogm_k_{v}": self._sums["k_v"] / n, "ogm_modulated_steps": self._sums["modulated_steps"]}

    def record_facts(self) -> dict[str, Any]:
        a, v = self.modalities
        return {
            "roles": {"a": a, "v": v},
            "modulated_epochs": [e for e in range(self.cfg.epochs) if self.active(e)],
            "modulated": {m: {"rule": self._rules[m], "tensors": len(self._targets[m]),
                              "elements": sum(p.numel() for p in self._targets[m])}
                          for m in self.modalities},
        }


@register_method("ogm")
class OGM(OGMGE):
    summary = "OGM: joint CE; encoder gradients scaled by 1 − tanh(α ρ) (no noise)"
    table_order = 4
    perf_bound = 1.15
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"BalanceBenchmark (1 run, test-selected)": (67.76, None)},
    }
    Options = OGMOptions
