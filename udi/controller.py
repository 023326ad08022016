"""UDI's dynamic controller: the weights of the two unsupervised terms from how well their
gradients agree with the classification gradient, over the follower's parameters.

    s_k = max(0, ⟨g_cls, g_k⟩),   λ_k = s_k / (s_con + s_com + ε),   k ∈ {con, com}

If both s_k are 0 (neither term helps the classification loss on that batch), the previous
weights are kept (initially the user's λ_con, λ_com, 0.5 and 0.5 by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def inner_product(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """⟨a, b⟩ of two gradients given per parameter (None = zero), as if both were flattened."""
    total = None
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        term = (x.double() * y.double()).sum()
        total = term if total is None else total + term
    return 0.0 if total is None else float(total)


@dataclass
class ControllerStep:
    """One computation of the controller: the inner products and the weights it gave."""

    ip_con: float
    ip_com: float
    lambda_con: float
    lambda_com: float
    kept_previous: bool


def controller_weights(ip_con: float, ip_com: float, previous: tuple[float, float],
                       eps: float = 1e-12) -> ControllerStep:
    """λ from the two inner products ⟨g_cls, g_con⟩ and ⟨g_cls, g_com⟩."""
    s_con, s_com = max(0.0, ip_con), max(0.0, ip_com)
    if s_con == 0.0 and s_com == 0.0:
        return ControllerStep(ip_con, ip_com, previous[0], previous[1], True)
    total = s_con + s_com + eps
    return ControllerStep(ip_con, ip_com, s_con / total, s_com / total, False)


def controller_from_gradients(g_cls: Sequence[torch.Tensor | None], g_con: Sequence[torch.Tensor | None],
                              g_com: Sequence[torch.Tensor | None], previous: tuple[float, float],
                              eps: float = 1e-12) -> ControllerStep:
    """λ from gradients given per parameter (lists aligned with the follower's parameters)."""
    return controller_weights(inner_product(g_cls, g_con), inner_product(g_cls, g_com), previous, eps)


class DynamicController:
    """Holds (λ_con, λ_com) and recomputes them on schedule.

    ``every=None`` computes at the first step of each epoch; ``every=N`` at every N-th step
    counted across epochs (steps 0, N, 2N, ...). Between computations the weights are held, so a
    step without a computation costs exactly what a static-weight step costs.
    """

    def __init__(self, params: list[torch.nn.Parameter], initial: tuple[float, float],
                 every: int | None = None, eps: float = 1e-12) -> None:
        self.params = params
        self.weights = (float(initial[0]), float(initial[1]))
        self.every = every
        self.eps = eps
        self.global_step = 0
        self.last: ControllerStep | None = None
        self.epoch_steps: list[ControllerStep] = []

    def due(self, step_in_epoch: int) -> bool:
        if self.every is None:
            return step_in_epoch == 0
        return self.global_step % self.every == 0

    def update(self, cls: torch.Tensor, con: torch.Tensor, com: torch.Tensor) -> ControllerStep:
        """Recompute λ from the three loss terms of the current batch (their graphs are kept
        for the step's own backward pass)."""
        grads = [torch.autograd.grad(term, self.params, retain_graph=True, allow_unused=True)
                 for term in (cls, con, com)]
        result = controller_from_gradients(*grads, previous=self.weights, eps=self.eps)
        self.weights = (result.lambda_con, result.lambda_com)
        self.last = result
        self.epoch_steps.append(result)
        return result

    def advance(self) -> None:
        self.global_step += 1
