"""Precise BatchNorm statistics: recompute the running mean and variance of the BatchNorm layers
that are being trained from a pass over training data with the weights held fixed.

During training a BatchNorm layer keeps an exponential moving average (momentum 0.1, i.e. about
the last 10 mini-batches) of its batch statistics, computed while the weights under it kept
moving. Early in training, or with a large learning rate, those averages describe weights that no
longer exist, and eval-mode accuracy swings by many points from one epoch to the next although
the weights changed little (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). Recomputing
the statistics of the current weights before each validation makes the validation curve, and
so the choice of the best epoch, reflect the weights rather than the lag of the averages. It
changes no gradient and no weight: the training trajectory is the same with and without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def trained_batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers with running statistics whose affine parameters are being trained (a
    frozen part, e.g. UDI's anchor, keeps the statistics it was frozen with)."""
    layers = []
    for layer in module.modules():
        if isinstance(layer, _BatchNorm) and layer.track_running_stats:
            params = [p for p in (layer.weight, layer.bias) if p is not None]
            if not params or any(p.requires_grad for p in params):
                layers.append(layer)
    return layers


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                        forward: Callable[[dict[str, torch.Tensor]], object], max_samples: int) -> int:
    """Replace the running statistics of ``module``'s trained BatchNorm layers by the exact
    average over up to ``max_samples`` samples of ``batches``; returns the samples used.

    Everything else stays in eval mode (no dropout, frozen layers unchanged); the module's
    training flags are restored afterwards.
    """
    layers = trained_batchnorms(module)
    if not layers or max_samples <= 0:
        return 0
    modes = {m: m.training for m in module.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    module.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch counts equally
        layer.train()
    seen = 0
    try:
        for batch in batches:
            if seen >= max_samples:
                break
            if len(batch["label"]) < 2:  # a batch of one has no variance
                continue
            forward(batch)
            seen += len(batch["label"])
    finally:
        if seen == 0:  # nothing to average over: keep the running statistics as they were
            for layer, state in zip(layers, saved):
                layer.load_state_dict(state)
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return seen
