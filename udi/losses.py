"""UDI's consistency term: the Jensen-Shannon divergence between anchor and follower predictions,
and the predictive entropy used to break ties when the anchor is chosen."""

from __future__ import annotations

import math

import torch


def js_divergence(p: torch.Tensor, q: torch.Tensor, *, from_logits: bool = False) -> torch.Tensor:
    """Batch mean of JS(p ‖ q) = ½ KL(p ‖ r) + ½ KL(q ‖ r), r = ½(p + q), in nats.

    ``p`` and ``q`` are (batch, classes) probabilities, or logits with ``from_logits=True`` (the
    log-space form used in training: no probability is rounded to zero before its logarithm is
    taken). Terms with a zero probability contribute zero (0 log 0 = 0), so disjoint
    distributions give exactly ln 2. The result lies in [0, ln 2] and is symmetric in p and q.
    """
    if from_logits:
        log_p = torch.log_softmax(p.float(), dim=-1)
        log_q = torch.log_softmax(q.float(), dim=-1)
        log_r = torch.logaddexp(log_p, log_q) - math.log(2.0)
        kl_p = (log_p.exp() * (log_p - log_r)).sum(dim=-1)
        kl_q = (log_q.exp() * (log_q - log_r)).sum(dim=-1)
    else:
        p, q = p.float(), q.float()
        r = 0.5 * (p + q)
        kl_p = (torch.xlogy(p, p) - torch.xlogy(p, r)).sum(dim=-1)
        kl_q = (torch.xlogy(q, q) - torch.xlogy(q, r)).sum(dim=-1)
    return (0.5 * (kl_p + kl_q)).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample predictive entropy −Σ_c p_c log p_c of softmax(logits), in nats."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)
