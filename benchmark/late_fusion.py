"""Test-time late fusion of per-modality logits (UDI's anchor and followers, the ensemble)."""

from __future__ import annotations

import torch

from benchmark.losses import entropy

FUSION_RULES = ("logit_sum", "prob_mean", "entropy")


def fuse(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Fused logits of per-modality logits (same shape each), by ``rule``:

    - ``logit_sum``: Σ_m z_m.
    - ``prob_mean``: log of the mean softmax probability (its arg-max is the mean-probability
      prediction, as in the ``ensemble`` baseline).
    - ``entropy``: per sample, w_m = softmax_m(max_j e_j − e_m) with e_m the entropy of p_m, and
      Σ_m w_m z_m (MLA's test-time weighting: a confident modality counts more).
    """
    if rule == "logit_sum":
        return torch.stack(logits).sum(dim=0)
    if rule == "prob_mean":
        probs = torch.stack([z.float().softmax(dim=-1) for z in logits]).mean(dim=0)
        return probs.clamp_min(1e-12).log()
    if rule == "entropy":
        ent = torch.stack([entropy(z) for z in logits])  # (M, batch)
        weights = torch.softmax(ent.max(dim=0, keepdim=True).values - ent, dim=0)
        return (weights.unsqueeze(-1) * torch.stack([z.float() for z in logits])).sum(dim=0)
    raise ValueError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")
