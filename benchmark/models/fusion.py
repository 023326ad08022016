"""Fusion heads: features of every modality → fused logits, with unimodal readouts where defined.

``concat`` and ``sum`` are linear in each modality's features, so each has a natural unimodal
readout (z_m = W_m f_m + b/M); ``film`` and ``gated`` mix modalities multiplicatively and have none.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.errors import UsageError
from benchmark.registry import FUSIONS, register_fusion

Features = dict[str, torch.Tensor]


class FusionHead(nn.Module):
    """Base class: ``forward(features) -> logits``; ``unimodal_logits`` where the head allows."""

    has_unimodal_readout = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    def unimodal_logits(self, feats: Features) -> Features | None:
        return None


@register_fusion("concat")
class ConcatFusion(FusionHead):
    """One linear layer on [f_1; …; f_M]."""

    has_unimodal_readout = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, feats: Features) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.modalities], dim=1))

    def unimodal_logits(self, feats: Features) -> Features:
        out, start = {}, 0
        share = self.fc.bias / len(self.modalities)
        for m in self.modalities:
            stop = start + self.dims[m]
            if m in feats:
                out[m] = feats[m] @ self.fc.weight[:, start:stop].t() + share
            start = stop
        return out


@register_fusion("sum")
class SumFusion(FusionHead):
    """Σ_m W_m f_m + b."""

    has_unimodal_readout = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fcs = nn.ModuleDict({m: nn.Linear(d, num_classes, bias=False) for m, d in dims.items()})
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, feats: Features) -> torch.Tensor:
        return sum(self.fcs[m](feats[m]) for m in self.modalities) + self.bias

    def unimodal_logits(self, feats: Features) -> Features:
        share = self.bias / len(self.modalities)
        return {m: self.fcs[m](feats[m]) + share for m in self.modalities if m in feats}


@register_fusion("film")
class FiLMFusion(FusionHead):
    """γ, β from the first modality's features modulate every other modality's features."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        cond, *others = self.modalities
        self.cond = cond
        self.film = nn.ModuleDict({m: nn.Linear(dims[cond], 2 * dims[m]) for m in others})
        self.fc = nn.Linear(sum(dims[m] for m in others), num_classes)

    def forward(self, feats: Features) -> torch.Tensor:
        parts = []
        for m, layer in self.film.items():
            gamma, beta = layer(feats[self.cond]).chunk(2, dim=1)
            parts.append(gamma * feats[m] + beta)
        return self.fc(torch.cat(parts, dim=1))


@register_fusion("gated")
class GatedFusion(FusionHead):
    """σ(W_x f_x) ⊙ Σ_y W_y f_y, then a linear layer; x is the first modality."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int | None = None) -> None:
        super().__init__(dims, num_classes)
        hidden = hidden or max(dims.values())
        cond, *others = self.modalities
        self.cond = cond
        self.gate = nn.Linear(dims[cond], hidden)
        self.values = nn.ModuleDict({m: nn.Linear(dims[m], hidden) for m in others})
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feats: Features) -> torch.Tensor:
        value = sum(layer(feats[m]) for m, layer in self.values.items())
        return self.fc(torch.sigmoid(self.gate(feats[self.cond])) * value)


def create_fusion(name: str, dims: dict[str, int], num_classes: int) -> FusionHead:
    if len(dims) < 2 and name in ("film", "gated"):
        raise UsageError(f"fusion {name!r} needs at least 2 modalities")
    return FUSIONS.get(name)(dims, num_classes)
