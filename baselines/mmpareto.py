"""``mmpareto``: MMPareto, Pareto integration of the multimodal and unimodal gradients of each
encoder (Wei & Hu, ICML 2024).

The model is ``multi_loss``'s: encoders ψ_m, a fused head, and a separate linear head per
modality. Losses ``L_mm = CE(z_fused, y)`` and ``L_m = CE(h_m(f_m), y)``; each is differentiated
on its own (the suite's per-loss gradient hook). For every encoder m, with all of its parameters
flattened into one vector:

- ``g_mm = ∇_θm L_mm``, ``g_u = ∇_θm L_m`` (no other unimodal loss reaches θ_m);
- ``cos β = ⟨g_mm, g_u⟩ / (‖g_mm‖ ‖g_u‖)``; a conflict is ``cos β < 0`` (``conflict="paper"``) or
  ``cos β ≤ 0`` (``conflict="code"``);
- no conflict: ``α_mm = α_u = ½``; conflict: the two-vector min-norm (MGDA) weight
  ``α_mm = (‖g_u‖² − ⟨g_mm, g_u⟩) / ‖g_mm − g_u‖²``, ``α_u = 1 − α_mm`` (the reference solver's
  boundary cases, 0.999 if ``⟨g_mm, g_u⟩ ≥ ‖g_mm‖²`` and 0.001 if ``⟨g_mm, g_u⟩ ≥ ‖g_u‖²``, kept);
- ``h' = 2 α_mm g_mm + 2 α_u g_u``;
- ``rescale="paper"`` (Alg. 1): ``h = γ ‖g_mm + g_u‖ h' / ‖h'‖`` over the whole encoder;
  ``rescale="code"``: per parameter tensor p, ``h_p = γ h'_p max(1, ‖g_mm,p + g_u,p‖ / ‖h'_p‖)``.

The heads (fused and unimodal) receive the plain gradient of ``L_mm + Σ_m L_m``. Prediction: the
fused head.

Implementation: per parameter tensor, one pass gives ``‖g_mm,p‖``, ``‖g_u,p‖`` and
``⟨g_mm,p, g_u,p⟩`` (read in the tensor's own memory layout, no copy); every norm and inner
product above follows from these by algebra (``‖x g_mm + y g_u‖² = x²‖g_mm‖² + 2xy⟨g_mm, g_u⟩ +
y²‖g_u‖²``, in float64), and ``h = c_mm g_mm + c_u g_u`` is written over the per-loss gradients
with foreach kernels. Everything stays on the device: a step reads nothing back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.joint import MultiLoss
from benchmark.config import opt
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import Batch, Stage, StepContext, shared_search_space
from benchmark.registry import register_method

RESCALE_RULES = ("paper", "code")
CONFLICT_RULES = ("paper", "code")
FUSED = "loss_fused"
GAMMA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)  # Synergy's sweep; the paper and BalanceBenchmark use 1.5
COS_EPS = 1e-8  # as torch.nn.functional.cosine_similarity, which the reference calls


@dataclass
class MMParetoOptions:
    gamma: float = opt(1.5, "γ: the encoders' integrated gradient is scaled by γ (1.5 in the paper and the code)")
    rescale: str = opt("paper", "magnitude of the integrated gradient: paper (γ‖g_mm+g_u‖ over the whole encoder) "
                                "or code (per parameter tensor, never shrunk below ‖g_mm,p+g_u,p‖)")
    conflict: str = opt("paper", "what counts as a conflict: paper (cos < 0) or code (cos <= 0)")

    def validate(self) -> None:
        if not 0 < self.gamma < float("inf"):
            raise UsageError(f"method.gamma must be a finite number > 0, got {self.gamma}")
        if self.rescale not in RESCALE_RULES:
            raise UsageError(f"method.rescale must be one of {', '.join(RESCALE_RULES)}, got {self.rescale!r}")
        if self.conflict not in CONFLICT_RULES:
            raise UsageError(f"method.conflict must be one of {', '.join(CONFLICT_RULES)}, got {self.conflict!r}")


def min_norm_weight(gg_mm: torch.Tensor, g_mm_u: torch.Tensor, gg_u: torch.Tensor) -> torch.Tensor:
    """Weight of the first vector in the min-norm point of the segment between two vectors, from
    ``‖g_mm‖²``, ``⟨g_mm, g_u⟩`` and ``‖g_u‖²`` (the reference's ``_min_norm_element_from2``, with
    its 0.999 / 0.001 boundary cases)."""
    inner = (gg_u - g_mm_u) / (gg_mm + gg_u - 2 * g_mm_u)
    return torch.where(g_mm_u >= gg_mm, torch.full_like(inner, 0.999),
                       torch.where(g_mm_u >= gg_u, torch.full_like(inner, 0.001), inner))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ over every element, without copying a dense tensor in any memory format (the
    gradients of a channels-last kernel are channels-last): both are read in ``a``'s storage order."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    order = sorted(range(a.dim()), key=a.stride, reverse=True)
    return torch.dot(a.permute(order).reshape(-1), b.permute(order).reshape(-1))


def pareto_integrate(g_mm: Sequence[torch.Tensor], g_u: Sequence[torch.Tensor], *, gamma: float = 1.5,
                     rescale: str = "paper", conflict: str = "paper", inplace: bool = False
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One encoder's MMPareto gradient from its parameters' multimodal and unimodal gradients
    (two lists, one tensor per parameter, in the same order).

    Returns ``(h, cos β, conflict, α_mm)``: ``h`` one tensor per parameter, the others 0-dim
    tensors on the gradients' device. The encoder-wide (and, for ``rescale="code"``, per-tensor)
    norms and inner products come from one pass of ``⟨g_mm,p, g_u,p⟩``, ``‖g_mm,p‖`` and
    ``‖g_u,p‖`` per tensor, combined in float64; ``h`` is then ``c_mm·g_mm + c_u·g_u`` with the
    coefficients of the chosen rule. With ``inplace`` it is written over ``g_mm`` (and ``g_u`` is
    overwritten on the way): no copy of the encoder's gradient is made."""
    if not inplace:
        g_mm, g_u = [g.clone() for g in g_mm], [g.clone() for g in g_u]
    else:
        g_mm, g_u = list(g_mm), list(g_u)
    device = g_mm[0].device
    wide = torch.float64 if device.type != "mps" else torch.float32  # MPS has no float64
    per_tensor = torch.stack([torch.stack(torch._foreach_norm(g_mm)), torch.stack(torch._foreach_norm(g_u)),
                              torch.stack([_dot(a, b) for a, b in zip(g_mm, g_u)])]).to(wide)
    nn_mm, nn_u, dots = per_tensor[0].square(), per_tensor[1].square(), per_tensor[2]
    gg_mm, gg_u, g_mm_u = nn_mm.sum(), nn_u.sum(), dots.sum()
    cos = g_mm_u / (gg_mm * gg_u).clamp_min(COS_EPS ** 2).sqrt()
    clash = cos < 0 if conflict == "paper" else cos <= 0
    alpha = torch.where(clash, min_norm_weight(gg_mm, g_mm_u, gg_u), torch.full_like(cos, 0.5))
    a, b = 2 * alpha, 2 * (1 - alpha)  # h' = a g_mm + b g_u; exactly g_mm + g_u when α = ½

    def norm_of(x: torch.Tensor, y: torch.Tensor, mm: torch.Tensor, uu: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """‖x g_mm + y g_u‖ from the squared norms and the inner product."""
        return (x * x * mm + 2 * x * y * mu + y * y * uu).clamp_min(0).sqrt()

    one = torch.ones_like(alpha)
    if rescale == "paper":
        norm_total, norm_h = norm_of(one, one, gg_mm, gg_u, g_mm_u), norm_of(a, b, gg_mm, gg_u, g_mm_u)
        ratio = norm_total / norm_h.clamp_min(torch.finfo(wide).tiny)
        scale = gamma * torch.where(norm_h > 0, ratio, torch.zeros_like(ratio))  # h' = 0 stays 0
        c_mm, c_u = (a * scale).to(g_mm[0].dtype), (b * scale).to(g_mm[0].dtype)
    else:
        norm_total, norm_h = norm_of(one, one, nn_mm, nn_u, dots), norm_of(a, b, nn_mm, nn_u, dots)
        ratio = norm_total / norm_h.clamp_min(torch.finfo(wide).tiny)
        scale = gamma * torch.where(norm_h > 0, ratio.clamp_min(1.0), torch.ones_like(ratio))  # never shrunk
        c_mm, c_u = list((a * scale).to(g_mm[0].dtype).unbind()), list((b * scale).to(g_mm[0].dtype).unbind())
    torch._foreach_mul_(g_mm, c_mm)
    torch._foreach_mul_(g_u, c_u)
    torch._foreach_add_(g_mm, g_u)
    return g_mm, cos, clash, alpha


@dataclass
class _Layout:
    """Where each encoder's parameters sit among a stage's trainable parameters."""

    encoders: list[tuple[str, list[int]]]  # modality, indices
    shared: list[int]  # every other parameter (the heads): the plain summed gradient


@register_method("mmpareto")
class MMPareto(MultiLoss):
    summary = "MMPareto: per-encoder Pareto (MGDA) integration of multimodal and unimodal gradients, scaled by γ"
    table_order = 21
    perf_bound = 3.0
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MMPareto paper (Tab. 1)": (75.13, None),
                    "BalanceBenchmark (1 run, test-selected)": (79.97, None)},
        "kinetics-sounds": {"MMPareto paper (Tab. 1)": (70.13, None)},
    }
    # multi_loss's model: the same encoders, heads and batches for a seed
    shares_streams_with = "multi_loss"
    Options = MMParetoOptions
    min_modalities = 2
    # The paper's settings (App. B; 50 epochs, the code's default). The code builds StepLR(30, 0.1)
    # but never steps it: the learning rate is constant. The shared configuration is never changed
    # silently.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "none", "epochs": 50,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.gamma": trial.suggest_categorical("method.gamma", list(GAMMA_GRID))}

    def check(self) -> None:
        if "fused" in self.modalities:
            raise UsageError("mmpareto names its multimodal loss loss_fused, so no modality may be called "
                             "'fused'; rename that modality")

    def build(self) -> nn.Module:
        # Built under multi_loss's seed stream: the same seed gives multi_loss's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self.gradient_losses = [FUSED, *(f"loss_{m}" for m in self.modalities)]
        self._layouts: dict[int, _Layout] = {}
        self._totals: dict[str, list[float]] = {}  # modality → summed (conflict, cos, α_mm) over the run
        self._encoders: list[tuple[str, list[int]]] = []  # the traced encoders (those with trainable parameters)
        self._steps = 0
        self._reset_epoch()
        return self.model

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, feats = self.forward(batch)
        y = batch["label"]
        fused = F.cross_entropy(logits, y)
        unimodal = {m: F.cross_entropy(self.model.unimodal_heads[m](f), y) for m, f in feats.items()}
        return {"loss": fused + sum(unimodal.values()), FUSED: fused,
                **{f"loss_{m}": value for m, value in unimodal.items()}}

    def layout(self, stage: Stage) -> _Layout:
        """Each encoder's positions among ``stage``'s trainable parameters (matched by identity;
        computed once per stage)."""
        key = id(stage)
        if key not in self._layouts:
            params = stage.trainable_parameters()
            owner = {id(p): m for m in self.modalities for p in self.model.encoders[m].parameters()}
            encoders = []
            for m in self.modalities:
                idx = [i for i, p in enumerate(params) if owner.get(id(p)) == m]
                if idx:
                    encoders.append((m, idx))
            shared = [i for i, p in enumerate(params) if id(p) not in owner]
            self._layouts[key] = _Layout(encoders, shared)
        return self._layouts[key]

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]], ctx: StepContext) -> list[torch.Tensor]:
        """Each encoder's Pareto-integrated gradient, each head's summed gradient. The per-loss
        gradient tensors are consumed: the results are written over them (no copy is made)."""
        layout = self.layout(ctx.stage)
        self._encoders = layout.encoders
        names = list(grads)
        out: list[torch.Tensor | None] = [None] * len(grads[names[0]])
        if layout.shared:
            heads = [grads[names[0]][i] for i in layout.shared]
            for n in names[1:]:
                torch._foreach_add_(heads, [grads[n][i] for i in layout.shared])
            for i, g in zip(layout.shared, heads):
                out[i] = g
        o = self.options
        stats = []
        for m, idx in layout.encoders:
            h, cos, clash, alpha = pareto_integrate([grads[FUSED][i] for i in idx], [grads[f"loss_{m}"][i] for i in idx],
                                                    gamma=o.gamma, rescale=o.rescale, conflict=o.conflict, inplace=True)
            for i, g in zip(idx, h):
                out[i] = g
            stats.append(torch.stack([clash.float(), cos.float(), alpha.float()]))
        if stats:
            self._trace.append(torch.stack(stats))  # modality × (conflict, cos, α_mm), kept on the device
        return out  # type: ignore[return-value]

    # --- trace ---------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._trace: list[torch.Tensor] = []

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._reset_epoch()

    def epoch_log(self) -> dict[str, Any]:
        """The epoch's conflict rate, mean cos β and mean α_mm of each encoder with trainable
        parameters (one read from the device)."""
        n = len(self._trace)
        if not n:
            return {}
        names = [m for m, _ in self._encoders]
        means = (torch.stack(self._trace).sum(dim=0) / n).tolist()
        row: dict[str, Any] = {}
        for m, (conflicts, cos, alpha) in zip(names, means):
            row.update({f"mmpareto_conflict_{m}": conflicts, f"mmpareto_cos_{m}": cos,
                        f"mmpareto_alpha_mm_{m}": alpha})
            total = self._totals.setdefault(m, [0.0, 0.0, 0.0])
            for k, value in enumerate((conflicts, cos, alpha)):
                total[k] += value * n
        self._steps += n
        return row

    def record_facts(self) -> dict[str, Any]:
        n = max(self._steps, 1)
        return {"steps": self._steps,
                "conflict_rate": {m: t[0] / n for m, t in self._totals.items()},
                "mean_cos": {m: t[1] / n for m, t in self._totals.items()},
                "mean_alpha_mm": {m: t[2] / n for m, t in self._totals.items()}}
