"""``inforeg``: information acquisition regulation (Huang et al., CVPR 2025).

Late fusion (concat or sum) trained with the joint cross-entropy. During its "prime learning
window", the encoder of an information-sufficient modality is pulled back toward its weights
from the start of the epoch:

- **Snapshot.** ``w_m^prev`` = the trainable parameters of encoder m at the start of each epoch.
- **Which modality (per batch).** Scores from the fused head's readouts ``z_m = W_m f_m + b/M``:
  ``s_m = −CE(z_m, y)`` (batch mean; ``score="ce"``) or ``s_m = Σ_i softmax(z_m,i)[y_i]``
  (``score="prob_sum"``, the reference code). ``Δ_m`` = mean over ``{j : s_j < s_m}`` of
  ``s_m − s_j`` (0 if that set is empty); m is regulated when ``Δ_m > 0`` and its window is open.
- **Strength.** ``α_m = exp(β·tanh Δ_m)`` (``strength="paper"``, Eq. 16, β = 0.9), or the code's
  ``0.95·exp(tanh Δ_a)`` for the first modality and ``0.1·exp(tanh Δ_v)`` for the second
  (``strength="code"``, two modalities).
- **Update** (after backward, before the optimizer step): ``g ← g + α_m (w − w_m^prev)`` for every
  encoder-m parameter, the gradient of ``(α_m/2)‖w − w_m^prev‖²`` (Eq. 12).
- **Window** (``window="paper"``, Eq. 11): open for modality m in epoch t ≥ 2 when
  ``(Tr_m^{t−1} − Tr_m^{t−2}) / Tr_m^{t−1} > K`` (K = 0.04), ``Tr_m^t`` = the epoch mean over steps
  of ``‖∇_θm L‖²`` (batch gradients, before the regulation is added). ``window="code"``: one window
  for every modality, from the first modality's trace ``Σ_layers (1/n_l) Σ_steps ‖g_l‖²`` over the
  encoder's conv/linear weights (after the regulation is added), as the relative change of its
  10-epoch moving average over a history seeded with ten zeros, K = 0.05, open from epoch 0.
- **Loss.** The joint CE (``unimodal_loss="none"``), or the code's joint CE + Σ_m CE(z_m, y) on the
  fused head's readouts (``"readout"``).

See docs/methods/inforeg.md for the map to the reference code and the deliberate differences.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.joint import Joint
from benchmark.config import opt
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import Batch, StepContext, shared_search_space
from benchmark.registry import register_method

SCORES = ("ce", "prob_sum")
STRENGTHS = ("paper", "code")
WINDOWS = ("paper", "code")
UNIMODAL_LOSSES = ("none", "readout")
DEFAULT_K = {"paper": 0.04, "code": 0.05}
CODE_FACTORS = (0.95, 0.1)  # the reference's constants for its audio (first) and visual (second) encoder
CODE_HISTORY = 10  # the reference's moving average over 10 epochs, its history seeded with 10 zeros
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class InfoRegOptions:
    beta: float = opt(0.9, "β of the strength α_m = exp(β·tanh Δ_m) (strength=paper; the paper's best: 0.9)")
    threshold: float | None = opt(None, "K: the window opens when the trace's relative change exceeds it "
                                        "(default: 0.04 with window=paper, 0.05 with window=code)")
    score: str = opt("ce", "score of a modality: ce (s = −CE of its readout, higher = better) or prob_sum "
                           "(Σ_i p_i[y_i], the reference code)")
    strength: str = opt("paper", "α_m: paper (exp(β·tanh Δ)) or code (0.95·exp(tanh Δ) first modality, "
                                 "0.1·exp(tanh Δ) second; two modalities)")
    window: str = opt("paper", "prime learning window: paper (per modality, epoch-to-epoch change of the mean "
                               "squared gradient norm, from epoch 2) or code (the first modality's 10-epoch "
                               "moving average of its conv/linear trace, for every modality, from epoch 0)")
    unimodal_loss: str = opt("none", "none (the paper's method) or readout (the code: + Σ_m CE of the fused "
                                     "head's readouts)")

    def validate(self) -> None:
        if self.beta < 0:
            raise UsageError(f"method.beta must be >= 0, got {self.beta}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise UsageError("method.threshold must be a number (or none for the window's default), got nan")
        for name, choices in (("score", SCORES), ("strength", STRENGTHS), ("window", WINDOWS),
                              ("unimodal_loss", UNIMODAL_LOSSES)):
            if getattr(self, name) not in choices:
                raise UsageError(f"method.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def k(self) -> float:
        return DEFAULT_K[self.window] if self.threshold is None else self.threshold


# --- the formulas ------------------------------------------------------------------------------
def readout_log_probs(readouts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log softmax(z_m,i)[y_i]`` (M×B) of the stacked readouts (M×B×C): minus the batch mean of
    row m is ``CE(z_m, y)``."""
    logp = readouts.float().log_softmax(dim=-1)
    return logp.gather(-1, y.expand(readouts.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def readout_scores(log_probs: torch.Tensor, rule: str) -> torch.Tensor:
    """``s_m`` for every modality (M,), without gradient, from :func:`readout_log_probs`:
    ``−CE(z_m, y)`` (``ce``) or ``Σ_i p_m,i[y_i]`` (``prob_sum``)."""
    log_probs = log_probs.detach()
    return log_probs.mean(dim=1) if rule == "ce" else log_probs.exp().sum(dim=1)


def score_gaps(scores: Sequence[float]) -> list[float]:
    """``Δ_m`` = mean of ``s_m − s_j`` over the modalities j with ``s_j < s_m`` (0 if none)."""
    gaps = []
    for s in scores:
        below = [s - t for t in scores if t < s]
        gaps.append(sum(below) / len(below) if below else 0.0)
    return gaps


def regulation_strength(gaps: Sequence[float], rule: str, beta: float) -> list[float]:
    """``α_m`` for every modality (0 where ``Δ_m ≤ 0``, i.e. not regulated): ``exp(β·tanh Δ_m)``
    (``paper``) or ``c_m·exp(tanh Δ_m)`` with the code's c = (0.95, 0.1) (``code``)."""
    if rule == "code":
        return [c * math.exp(math.tanh(g)) if g > 0 else 0.0 for c, g in zip(CODE_FACTORS, gaps)]
    return [math.exp(beta * math.tanh(g)) if g > 0 else 0.0 for g in gaps]


@torch.no_grad()
def pull_back_(grads: list[torch.Tensor], params: list[torch.Tensor], prev: list[torch.Tensor],
               alpha: float) -> None:
    """``g ← g + α (w − w_prev)`` for every tensor, in place (the gradient of (α/2)‖w − w_prev‖²)."""
    if not grads:
        return
    diffs = torch._foreach_sub(params, prev)
    torch._foreach_add_(grads, diffs, alpha=alpha)


class GroupedSquaredNorms:
    """``Σ_{l ∈ group m} w_l ‖g_l‖²`` for every group (modality) at once, on the device: one
    ``_foreach_norm`` over all the tensors and one product with a tensor→group weight matrix."""

    def __init__(self, groups: list[list[nn.Parameter]], weights: list[list[float]]) -> None:
        self.params = [p for group in groups for p in group]
        rows = [(m, w) for m, ws in enumerate(weights) for w in ws]
        self._matrix = torch.zeros(len(rows), len(groups))
        for i, (m, w) in enumerate(rows):
            self._matrix[i, m] = w
        self._zero: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(self._matrix.shape[1])
        first = self.params[0]
        if self._matrix.device != first.device:
            self._matrix = self._matrix.to(first.device)
            self._zero = torch.zeros((), device=first.device)
        if self._zero is None:
            self._zero = torch.zeros((), device=first.device)
        grads = [self._zero if p.grad is None else p.grad for p in self.params]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        return (norms * norms) @ self._matrix


def paper_window(traces: list[float], k: float) -> tuple[bool, float | None]:
    """Open in epoch t ≥ 2 if ``(Tr^{t−1} − Tr^{t−2}) / Tr^{t−1} > K`` (``traces``: epochs 0..t−1)."""
    if len(traces) < 2 or traces[-1] <= 0:
        return False, None
    change = (traces[-1] - traces[-2]) / traces[-1]
    return change > k, change


def code_window(traces: list[float], k: float) -> tuple[bool, float | None]:
    """The reference's rule: relative change of the 10-epoch moving average of the trace, over a
    history seeded with ten zeros; epoch 0 counts as a change of 1."""
    if not traces:
        change = 1.0
    else:
        history = [0.0] * CODE_HISTORY + list(traces)
        new = sum(history[-CODE_HISTORY:]) / CODE_HISTORY
        old = sum(history[-CODE_HISTORY - 1:-1]) / CODE_HISTORY
        if new <= 0:
            return False, None
        change = (new - old) / new
    return change > k, change


@register_method("inforeg")
class InfoReg(Joint):
    summary = "InfoReg: joint CE; in its prime learning window the leading encoder is pulled back to its epoch-start weights"
    table_order = 23
    perf_bound = 1.3
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"InfoReg paper (Tab. 2)": (71.90, None)},
        "kinetics-sounds": {"InfoReg paper (Tab. 2)": (69.31, None)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = InfoRegOptions
    min_modalities = 2
    # The reference's settings (main.py); the shared configuration is never changed silently.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "step", "step_size": 30, "gamma": 0.1, "epochs": 50,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.beta": trial.suggest_float("method.beta", 0.1, 1.0),
                "method.threshold": trial.suggest_float("method.threshold", 0.01, 0.1)}

    def check(self) -> None:
        if self.cfg.fusion not in ("concat", "sum"):
            raise UsageError(f"{self.name} needs fusion concat or sum (a linear unimodal readout), got "
                             f"{self.cfg.fusion!r}; set --set fusion=concat")
        if self.options.strength == "code" and len(self.modalities) != 2:
            raise UsageError(f"method.strength=code has constants for two modalities, the dataset has "
                             f"{len(self.modalities)}; set method.strength=paper")

    def build(self) -> nn.Module:
        # Built under joint's seed stream: the same seed gives joint's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self._params: dict[str, list[nn.Parameter]] = {}
        self._layer_weights: dict[str, list[nn.Parameter]] = {}
        for m, enc in self.model.encoders.items():
            self._params[m] = [p for p in enc.parameters() if p.requires_grad]
            self._layer_weights[m] = [mod.weight for mod in enc.modules()
                                      if isinstance(mod, WEIGHT_LAYERS) and mod.weight.requires_grad]
        if self.options.window == "paper":  # all parameters, weight 1
            self._trace = GroupedSquaredNorms([self._params[m] for m in self.modalities],
                                              [[1.0] * len(self._params[m]) for m in self.modalities])
        else:  # the reference: conv/linear weights, each divided by its size
            self._trace = GroupedSquaredNorms([self._layer_weights[m] for m in self.modalities],
                                              [[1.0 / p.numel() for p in self._layer_weights[m]]
                                               for m in self.modalities])
        self._prev: dict[str, list[torch.Tensor]] = {}
        self._traces: dict[str, list[float]] = {m: [] for m in self.modalities}
        self._changes: dict[str, list[float | None]] = {m: [] for m in self.modalities}
        self._open_epochs: dict[str, list[int]] = {m: [] for m in self.modalities}
        self._open = [False] * len(self.modalities)
        self._epoch = -1
        self._closed = True
        self._reset_epoch()
        return self.model

    # --- per epoch -----------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._trace_acc: torch.Tensor | None = None
        self._steps = 0
        self._regulated = [0] * len(self.modalities)
        self._alpha_sum = [0.0] * len(self.modalities)

    def _close_epoch(self) -> None:
        """Move the finished epoch's trace to the history (once per epoch; one read)."""
        if self._closed:
            return
        self._closed = True
        values = self._trace_acc.tolist() if self._trace_acc is not None else [0.0] * len(self.modalities)
        for m, v in zip(self.modalities, values):
            # paper: the epoch mean over steps; code: the reference's sum over steps
            self._traces[m].append(v / max(self._steps, 1) if self.options.window == "paper" else v)

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._close_epoch()
        o = self.options
        if o.window == "paper":
            decisions = [paper_window(self._traces[m], o.k) for m in self.modalities]
        else:
            shared = code_window(self._traces[self.modalities[0]], o.k)
            decisions = [shared] * len(self.modalities)
        self._open = [d[0] for d in decisions]
        for m, (is_open, change) in zip(self.modalities, decisions):
            self._changes[m].append(change)
            if is_open:
                self._open_epochs[m].append(ctx.epoch)
        with torch.no_grad():  # the snapshot w^prev of every encoder
            for m, params in self._params.items():
                if m in self._prev:
                    torch._foreach_copy_(self._prev[m], params)
                else:
                    self._prev[m] = [p.detach().clone() for p in params]
        self._epoch = ctx.epoch
        self._closed = False
        self._reset_epoch()

    # --- per step ------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        feats = self.encode(batch)
        logits = self.model.head(feats)
        y = batch["label"]
        ce = F.cross_entropy(logits, y)
        readout = self.options.unimodal_loss == "readout"
        if not (readout or any(self._open)):  # the readouts are needed only while a window is open
            return {"loss": ce}
        with contextlib.nullcontext() if readout else torch.no_grad():
            z = self.model.head.unimodal_logits(feats if readout else {m: f.detach() for m, f in feats.items()})
            log_probs = readout_log_probs(torch.stack(list(z.values())), y)
        out = {"loss": ce}
        if readout:
            uni = -log_probs.mean(dim=1).sum()  # Σ_m CE(z_m, y)
            out = {"loss": ce + uni, "joint_ce": ce.detach(), "unimodal_ce": uni.detach()}
        if any(self._open):
            out["_scores"] = readout_scores(log_probs, self.options.score)
        return out

    def after_backward(self, ctx: StepContext, outputs: dict[str, torch.Tensor]) -> None:
        o = self.options
        self._steps += 1
        if o.window == "paper":  # Tr: the squared gradient norm of the task loss, before the regulation
            self._add_trace(self._trace())
        if "_scores" in outputs:
            scores = outputs["_scores"].tolist()  # the step's one host read
            alphas = regulation_strength(score_gaps(scores), o.strength, o.beta)
            for i, (m, a) in enumerate(zip(self.modalities, alphas)):
                if a > 0 and self._open[i]:
                    kept = [(p.grad, p, q) for p, q in zip(self._params[m], self._prev[m]) if p.grad is not None]
                    grads, params, prev = (list(t) for t in zip(*kept)) if kept else ([], [], [])
                    pull_back_(grads, params, prev, a)
                    self._regulated[i] += 1
                    self._alpha_sum[i] += a
        if o.window == "code":  # the reference's trace: conv/linear weights, after the regulation
            self._add_trace(self._trace())

    def _add_trace(self, row: torch.Tensor) -> None:
        if self._trace_acc is None:
            self._trace_acc = row
        else:
            self._trace_acc += row

    # --- the per-epoch trace -------------------------------------------------------------------
    def epoch_log(self) -> dict[str, Any]:
        self._close_epoch()
        out: dict[str, Any] = {}
        steps = max(self._steps, 1)
        for i, m in enumerate(self.modalities):
            out[f"inforeg_trace_{m}"] = self._traces[m][-1] if self._traces[m] else 0.0
            out[f"inforeg_open_{m}"] = float(self._open[i])
            out[f"inforeg_regulated_{m}"] = self._regulated[i] / steps
            out[f"inforeg_alpha_{m}"] = self._alpha_sum[i] / self._regulated[i] if self._regulated[i] else 0.0
        return out

    def record_facts(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities),
            "threshold": self.options.k,
            "open_epochs": {m: list(v) for m, v in self._open_epochs.items()},
            "traces": {m: list(v) for m, v in self._traces.items()},
            "relative_changes": {m: list(v) for m, v in self._changes.items()},
            "regulated_tensors": {m: len(v) for m, v in self._params.items()},
        }
