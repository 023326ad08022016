"""CLUB: the contrastive log-ratio upper bound of mutual information (Cheng et al., ICML 2020).

A variational Gaussian q_φ(y | x) = N(μ_φ(x), diag σ²_φ(x)) is fitted by maximum likelihood on
(x, y) pairs; the bound is

    Î = mean_i log q_φ(y_i | x_i) − mean_i mean_j log q_φ(y_j | x_i).

In UDI, x is the conditioning side (the anchor's features by default) and y the other; the
estimator is fitted on detached features with its own optimizer, and Î is minimised by the
follower's encoder only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CLUB_MODES = ("all_pairs", "sampled")


class CLUBEstimator(nn.Module):
    """q_φ(y | x): two MLPs (one hidden ReLU layer each) for the mean and the log-variance;
    the log-variance head ends in tanh, so σ² stays within [e⁻¹, e]."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """mean_i log q_φ(y_i | x_i), the full Gaussian log-density (nats)."""
        mu, logvar = self(x)
        per_dim = -0.5 * ((y - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
        return per_dim.sum(dim=-1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the estimator's optimizer minimises: the negative log-likelihood."""
        return -self.log_likelihood(x, y)

    def bound(self, x: torch.Tensor, y: torch.Tensor, mode: str = "all_pairs",
              generator: torch.Generator | None = None) -> torch.Tensor:
        """The CLUB estimate Î of I(x; y) on a batch (see :func:`club_upper_bound`)."""
        mu, logvar = self(x)
        return club_upper_bound(mu, logvar, y, mode=mode, generator=generator)


def club_upper_bound(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, mode: str = "all_pairs",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Î from the conditional's parameters μ_i = μ_φ(x_i), log σ²_i and the samples y_j.

    The normaliser of the Gaussian (log σ² and log 2π) is the same in the positive and the
    negative term of each i and cancels, leaving quadratic terms only:

    - ``all_pairs``: Î = mean_i Σ_d [mean_j (y_jd − μ_id)² − (y_id − μ_id)²] / (2σ²_id).
      mean_j (y_jd − μ_id)² = (μ_id − ȳ_d)² + v_d with ȳ, v the batch mean and (biased) variance
      of y, so the N×N pairs cost O(N·d), not O(N²·d); the value is the same.
    - ``sampled``: one negative per i, j = π(i) for a random permutation π drawn from
      ``generator``, on the generator's device (CLUB-S): Î = mean_i Σ_d [(y_π(i)d − μ_id)² − (y_id − μ_id)²] / (2σ²_id).
    """
    inv = 0.5 * torch.exp(-logvar)
    positive = ((y - mu) ** 2 * inv).sum(dim=-1)
    if mode == "all_pairs":
        y_mean = y.mean(dim=0, keepdim=True)
        y_var = ((y - y_mean) ** 2).mean(dim=0, keepdim=True)
        negative = (((mu - y_mean) ** 2 + y_var) * inv).sum(dim=-1)
    elif mode == "sampled":
        # drawn where the generator lives: a generator on y's device means no host-to-device copy
        perm = torch.randperm(y.shape[0], generator=generator,
                              device=generator.device if generator is not None else y.device)
        if perm.device != y.device:
            perm = perm.to(y.device, non_blocking=True)
        negative = ((y[perm] - mu) ** 2 * inv).sum(dim=-1)
    else:
        raise ValueError(f"unknown CLUB mode {mode!r}; choose one of {', '.join(CLUB_MODES)}")
    return (negative - positive).mean()


def club_upper_bound_pairs(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The all-pairs bound by its definition, with the N×N log-densities written out (O(N²·d)
    memory: a reference for tests, not for training)."""
    var = logvar.exp()
    log_q = -0.5 * ((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2 / var.unsqueeze(1)
                    + logvar.unsqueeze(1) + math.log(2 * math.pi)).sum(dim=-1)  # [i, j] = log q(y_j | x_i)
    return log_q.diagonal().mean() - log_q.mean()
