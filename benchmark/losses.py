"""Divergences and entropies shared by methods (UDI's consistency term, MCR's permutation game,
entropy-based fusion).

Written for the many-rows, few-classes tensors these methods produce (MCR stacks 32
permutations of a batch): on the CPU, ``torch.log_softmax`` over a short last dimension and
``torch.logaddexp`` are several times slower than plain element-wise operations and sums, so the
logit path builds log-probabilities from those and writes JS through entropies. Gradients keep
the layout of the inputs, so adding a term with weight 0 leaves a model's training unchanged to
the bit.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension from plain element-wise operations and reductions."""
    z = logits.float()
    z = z - z.detach().amax(dim=-1, keepdim=True)
    return z - z.exp().sum(dim=-1, keepdim=True).log()


def js_divergence(p: torch.Tensor, q: torch.Tensor, *, from_logits: bool = False,
                  reduction: str = "mean") -> torch.Tensor:
    """Batch mean (``reduction="sum"``: batch sum) of JS(p ‖ q) = ½ KL(p ‖ r) + ½ KL(q ‖ r), r = ½(p + q), in nats.

    ``p`` and ``q`` are (batch, classes) probabilities, or logits with ``from_logits=True`` (the
    form used in training; there JS = H(r) − ½H(p) − ½H(q), with log p and log q from the
    logits, so no probability is rounded to zero before its logarithm is taken). Terms with a zero
    probability contribute zero (0 log 0 = 0), so disjoint distributions give exactly ln 2. The
    value lies in [0, ln 2] and is symmetric in p and q.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")
    rows = p.shape[0] if reduction == "mean" else 1
    if from_logits:
        log_p, log_q = _log_softmax(p), _log_softmax(q)
        prob_p, prob_q = log_p.exp(), log_q.exp()
        r = 0.5 * (prob_p + prob_q)
        # r log r with r clamped inside the log only: finite value and gradient where r underflows
        total = 0.5 * (prob_p * log_p).sum() + 0.5 * (prob_q * log_q).sum() - (r * r.clamp_min(_TINY).log()).sum()
        return total / rows
    p, q = p.float(), q.float()
    r = 0.5 * (p + q)
    kl = torch.xlogy(p, p) - torch.xlogy(p, r) + torch.xlogy(q, q) - torch.xlogy(q, r)
    return 0.5 * kl.sum() / rows


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample predictive entropy −Σ_c p_c log p_c of softmax(logits), in nats."""
    log_p = _log_softmax(logits)
    return -(log_p.exp() * log_p).sum(dim=-1)
