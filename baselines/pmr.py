"""``pmr``: prototypical modal rebalance (Fan et al., CVPR 2023).

Late fusion trained with the joint cross-entropy, plus prototype losses that speed up the
slower modality. Only the pooled features ``f_m`` are used, so any fusion head works.

- **Prototypes.** ``c_m,k`` = mean of ``f_m`` over the class-k samples of a subset D′: the first
  ``max(1, ⌊len(loader)/10⌋)`` batches of a shuffled pass over the training split (eval mode, no
  gradient, its order drawn from the method's own stream ``method/pmr/prototypes``). Computed at
  the start of every epoch (before epoch 0 and after each epoch), then smoothed:
  ``c ← ε·c_old + (1−ε)·c_new`` (``momentum_coef`` = ε). A class absent from D′ keeps its old
  prototype (at the first computation: the mean feature of D′).
- **Prototype logits.** ``u_m,k = −‖f_m − c_m,k‖₂`` (the distance, not squared);
  ``PCE_m = CE(u_m, y)``.
- **Scores and coefficients.** ``s_m = Σ_i softmax(u_m,i)[y_i]`` (constants). Two modalities:
  ``ρ = s_0 / s_1``; ``ρ < 1``: ``β = clip(1/ρ − 1, 0, 1)``, ``γ = 0``; ``ρ ≥ 1``: ``β = 0``,
  ``γ = clip(ρ − 1, 0, 1)`` (``coef="paper"``, Eq. 11). ``coef="binary"`` (the reference code):
  ``ρ < 1`` ⇒ (1, 0), ``ρ > 1`` ⇒ (0, 1), ``ρ = 1`` ⇒ (0, 0), each then multiplied by α.
  M modalities: ``β_m = clip(max_j s_j / s_m − 1, 0, 1)`` (binary: ``s_m < max_j s_j``), which is
  Eq. 11 for M = 2.
- **Loss** inside the modulation window: ``L = CE(z) + α Σ_m β_m PCE_m``, and for epochs
  ``e < per_epochs`` (``per=true``, Eq. 13) ``− μ · mean_{m ≠ b} β_m · H(softmax(u_b))`` with b the
  modality of the highest score (H: batch-mean entropy). Outside the window: ``L = CE(z)``.
  ``PCE_m`` reaches encoder m only; the prototypes and coefficients are constants.

See docs/methods/pmr.md for the map to the reference code and the deliberate differences.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.joint import Joint
from baselines.window import check_window, in_window
from benchmark.config import opt
from benchmark.device import derive_seed, seeded
from benchmark.errors import DivergedError, UsageError
from benchmark.method import Batch, StepContext, shared_search_space
from benchmark.registry import register_method

COEF_RULES = ("paper", "binary")
SMOOTHING = ("every", "code")
ABSENT_RULES = ("keep", "error")
SUBSET_SHARE = 10  # D′ = the first ⌊len(loader)/10⌋ batches of a shuffled training pass
DIRECT_DISTANCE_MAX = 2048  # classes × feature size up to which distances are taken from differences


@dataclass
class PMROptions:
    alpha: float = opt(2.0, "α: weight of the prototype cross-entropies (the CREMA-D scripts: 2; code default 1)")
    coef: str = opt("paper", "coefficients from ρ: paper (β = clip(1/ρ − 1, 0, 1), Eq. 11) or binary "
                             "(the reference code: α on the slower modality, 0 on the other)")
    per: bool = opt(True, "prototype entropy regularisation (Eq. 13; absent from the released code)")
    mu: float = opt(1e-3, "μ: weight of the prototype entropy regularisation (the paper: 1e-2 or 1e-3)")
    per_epochs: int = opt(10, "E_r: PER acts in epochs e < per_epochs (the paper: 'the first few epochs')")
    momentum_coef: float = opt(0.0, "ε: prototype smoothing c ← ε·c_old + (1−ε)·c_new (CREMA-D scripts: 0; "
                                    "code default 0.2)")
    smoothing: str = opt("every", "which prototype recomputations are smoothed: every (all but the first) or "
                                  "code (the reference: also not the one after epoch 0)")
    absent_class: str = opt("keep", "a class absent from the prototype subset: keep (its previous prototype) "
                                    "or error (stop the run; the reference divides by zero)")
    modulation_start: float = opt(0.0, "start of the modulation window: a fraction of the epoch budget "
                                       "(window=fraction) or the first modulated epoch, 0-based (window=epochs)")
    modulation_end: float = opt(0.7, "end of the modulation window: a fraction of the epoch budget, excluded "
                                     "(window=fraction) or the last modulated epoch, included (window=epochs); "
                                     "the scripts: epochs 0–70 of 100")
    window: str = opt("fraction", "unit of modulation_start/end: fraction (of the run's epochs) or epochs")

    def validate(self) -> None:
        if self.alpha < 0:
            raise UsageError(f"method.alpha must be >= 0, got {self.alpha}")
        if self.mu < 0:
            raise UsageError(f"method.mu must be >= 0, got {self.mu}")
        if self.per_epochs < 0:
            raise UsageError(f"method.per_epochs must be >= 0, got {self.per_epochs}")
        if not 0 <= self.momentum_coef < 1:
            raise UsageError(f"method.momentum_coef must be in [0, 1), got {self.momentum_coef}")
        for name, choices in (("coef", COEF_RULES), ("smoothing", SMOOTHING), ("absent_class", ABSENT_RULES)):
            if getattr(self, name) not in choices:
                raise UsageError(f"method.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        check_window(self.modulation_start, self.modulation_end, self.window)


# --- the formulas, as functions of tensors -----------------------------------------------------
def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``u[…, i, k] = −‖f_i − c_k‖₂`` (B×C, or M×B×C for stacked modalities), the Euclidean
    distance, not squared. Computed from the differences for few classes × small features, through
    the ‖a‖² − 2ab + ‖b‖² expansion (a matrix product; relative error about 1e-6) beyond
    ``DIRECT_DISTANCE_MAX`` entries per prototype set, where it is several times faster."""
    direct = prototypes.shape[-2] * prototypes.shape[-1] <= DIRECT_DISTANCE_MAX
    mode = "donot_use_mm_for_euclid_dist" if direct else "use_mm_for_euclid_dist"
    return -torch.cdist(features.float(), prototypes.float(), compute_mode=mode)


def true_class_log_probs(u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(u)`` (M×B×C) and its entries at the labels (M×B): ``PCE_m`` is minus the
    batch mean of row m, and ``s_m`` the batch sum of its exponential."""
    logp = u.log_softmax(dim=-1)
    return logp, logp.gather(-1, y.expand(u.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def prototype_scores(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``s_m = Σ_i softmax(u_m,i)[y_i]`` for stacked prototype logits (M×B×C), without gradient."""
    return true_class_log_probs(u.detach(), y)[1].exp().sum(dim=-1)


def rebalance_coefficients(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """β_m per modality from the scores (M,): ``clip(max_j s_j / s_m − 1, 0, 1)`` (paper; for
    M = 2 this is Eq. 11's β = clip(1/ρ − 1) and γ = clip(ρ − 1)) or ``[s_m < max_j s_j]``
    (binary, the reference code's rule; the α factor is applied by the loss)."""
    s = scores.clamp_min(torch.finfo(scores.dtype).tiny)  # a score that underflowed to 0 gives β = 1
    best = s.max()
    if rule == "binary":
        return (s < best).to(s.dtype)
    return (best / s - 1).clamp(0, 1)


def per_weights(coefficients: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Weight of each modality's entropy in PER (M,): the mean β of the other modalities on the
    best-scoring one (the first of equals; its own β is 0), zero elsewhere; for M = 2 this is
    Eq. 13's γ on modality 0 and β on modality 1."""
    m = len(scores)
    # scatter, not F.one_hot: one_hot checks its indices on the host
    best = torch.zeros_like(coefficients).scatter_(0, scores.argmax().reshape(1), 1.0)
    return best * (coefficients.sum() / max(m - 1, 1))


@register_method("pmr")
class PMR(Joint):
    summary = "PMR: joint CE + prototype cross-entropies that speed up the slower modality (+ entropy regulariser)"
    table_order = 22
    perf_bound = 1.3
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"PMR paper (Tab. 1)": (61.1, None),
                    "MMPareto paper (Tab. 1)": (66.32, None),
                    "BalanceBenchmark (1 run, test-selected)": (67.19, None)},
        "kinetics-sounds": {"MMPareto paper (Tab. 1)": (65.70, None),
                            "BalanceBenchmark (1 run, test-selected)": (67.11, None)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = PMROptions
    min_modalities = 2
    # The paper's CREMA-D setting (SGD concat run in bash.sh); the shared configuration is never
    # changed silently.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "step", "step_size": 70, "gamma": 0.1, "epochs": 100,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.alpha": trial.suggest_float("method.alpha", 0.1, 3.0, log=True),
                "method.mu": trial.suggest_categorical("method.mu", [1e-3, 1e-2])}

    def build(self) -> nn.Module:
        # Built under joint's seed stream: the same seed gives joint's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self.prototypes: dict[str, torch.Tensor] | None = None
        self._stacked: torch.Tensor | None = None  # the prototypes stacked (M×C×d) when sizes agree
        self._subset_gen: torch.Generator | None = None
        self._updates = 0
        self._subset_batches = 0
        self._absent = torch.zeros((), dtype=torch.long)
        self._reset_epoch()
        return self.model

    # --- prototypes --------------------------------------------------------------------------
    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is inside the modulation window."""
        o = self.options
        return in_window(epoch, o.modulation_start, o.modulation_end, o.window, self.cfg.epochs)

    def per_active(self, epoch: int) -> bool:
        return self.options.per and self.options.mu > 0 and epoch < self.options.per_epochs

    @torch.no_grad()
    def update_prototypes(self, ctx: StepContext) -> None:
        """Class means of the features of D′ (eval mode: BatchNorm uses and keeps its running
        statistics), merged into the current prototypes (absent classes, smoothing)."""
        trainer = ctx.trainer
        if self._subset_gen is None:
            self._subset_gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, f"method/{self.name}/prototypes"))
        batches = max(1, ctx.num_batches // SUBSET_SHARE)
        model = self.model
        was_training = model.training
        model.eval()
        num_classes = self.info.num_classes
        sums: dict[str, torch.Tensor] = {}
        counts: torch.Tensor | None = None
        source = trainer.batches("train", shuffle=True, generator=self._subset_gen)
        try:
            for batch in itertools.islice(source, batches):
                with trainer.autocast():
                    feats = self.encode(batch)
                y = batch["label"]
                if counts is None:
                    counts = torch.zeros(num_classes, device=y.device)
                counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
                for m, f in feats.items():
                    if m not in sums:
                        sums[m] = torch.zeros(num_classes, f.shape[1], device=f.device)
                    sums[m].index_add_(0, y, f.float())
        finally:
            source.close()  # ends a loader's workers before the epoch's own pass starts
            model.train(was_training)
        assert counts is not None
        present = counts > 0
        if self.options.absent_class == "error" and not bool(present.all()):  # one read per epoch
            missing = (~present).nonzero().flatten().tolist()
            raise DivergedError(f"{self.name}: class(es) {missing} absent from the prototype subset "
                                f"({batches} batches of {self.cfg.batch_size}) at epoch {ctx.epoch}; "
                                "set method.absent_class=keep or raise batch_size")
        self._absent = self._absent.to(present.device) + (~present).sum()
        eps = self.options.momentum_coef
        first_smoothed = 1 if self.options.smoothing == "every" else 2
        new: dict[str, torch.Tensor] = {}
        for m, total in sums.items():
            means = total / counts.clamp_min(1)[:, None]
            if self.prototypes is None:
                # no previous prototype yet: an absent class starts at the subset's mean feature
                old = (total.sum(dim=0) / counts.sum()).expand_as(means)
            else:
                old = self.prototypes[m]
            if self.prototypes is not None and eps > 0 and self._updates >= first_smoothed:
                means = eps * old + (1 - eps) * means
            new[m] = torch.where(present[:, None], means, old).contiguous()
        self.set_prototypes(new)
        self._updates += 1
        self._subset_batches = batches

    def set_prototypes(self, prototypes: dict[str, torch.Tensor]) -> None:
        """The prototypes per modality (C×d each), stacked too when their sizes agree."""
        self.prototypes = prototypes
        sizes = {p.shape for p in prototypes.values()}
        self._stacked = torch.stack(list(prototypes.values())) if len(sizes) == 1 else None

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.update_prototypes(ctx)
        self._reset_epoch()

    # --- training ----------------------------------------------------------------------------
    def stacked_prototype_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``u`` of every modality, stacked (M×B×C): one batched distance computation when the
        feature sizes are equal."""
        assert self.prototypes is not None
        if self._stacked is not None:
            return prototype_logits(torch.stack(list(feats.values())), self._stacked)
        return torch.stack([prototype_logits(f, self.prototypes[m]) for m, f in feats.items()])

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.prototypes is None:
            raise RuntimeError("pmr: prototypes are computed by on_epoch_start before the first step")
        feats = self.encode(batch)
        logits = self.model.head(feats)
        y = batch["label"]
        ce = F.cross_entropy(logits, y)
        o = self.options
        modulate = self.active(ctx.epoch)
        per = modulate and self.per_active(ctx.epoch)
        # The prototype terms enter the graph only where they can have a non-zero weight: with
        # α = 0 and no PER the step is joint's, to the bit.
        attached = modulate and (o.alpha > 0 or per)
        with contextlib.nullcontext() if attached else torch.no_grad():
            logp, picked = true_class_log_probs(self.stacked_prototype_logits(feats), y)
            mean_log_p = picked.mean(dim=1)  # −PCE_m
        with torch.no_grad():
            scores = picked.detach().exp().sum(dim=1)
            coefs = rebalance_coefficients(scores, o.coef)
        loss = ce
        if attached and o.alpha > 0:
            loss = loss - o.alpha * torch.dot(coefs, mean_log_p)  # + α Σ_m β_m PCE_m
        if attached and per:
            # two modalities: the weight of H(u_0) is γ and that of H(u_1) is β, the coefficients swapped
            weights = coefs.flip(0) if len(coefs) == 2 else per_weights(coefs, scores)
            neg_ent = (logp.exp() * logp).sum(dim=(1, 2))  # −B·H(softmax(u_m)), H a batch mean
            loss = loss + (o.mu / len(y)) * torch.dot(weights, neg_ent)
        with torch.no_grad():  # the trace, summed on the device in place (read once per epoch)
            if self._sums is None:
                self._sums = torch.zeros(3, len(scores), device=scores.device)
                self._hits = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
            sums = self._sums
            sums[0] += scores
            sums[1] += coefs
            sums[2] += mean_log_p.detach()
            self._hits += (logp.argmax(dim=2) == y).sum(dim=1)  # prototype accuracy
        self._steps += 1
        self._samples += len(y)
        self._modulated += int(modulate)
        return {"loss": loss, "joint_ce": ce.detach()}

    # --- the per-epoch trace -------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._sums: torch.Tensor | None = None
        self._hits: torch.Tensor | None = None
        self._steps = 0
        self._samples = 0
        self._modulated = 0

    def epoch_log(self) -> dict[str, Any]:
        if self._sums is None:
            return {}
        assert self._hits is not None
        (scores, coefs, log_p), hits = self._sums.tolist(), self._hits.tolist()  # two reads per epoch
        n = len(self.modalities)
        steps = max(self._steps, 1)
        top = max(max(scores), 1e-300)
        out: dict[str, Any] = {}
        for i, m in enumerate(self.modalities):
            out[f"pmr_ratio_{m}"] = scores[i] / top  # over the epoch's samples: Σ s_m / max_j Σ s_j
            out[f"pmr_beta_{m}"] = coefs[i] / steps
            out[f"pmr_pce_{m}"] = -log_p[i] / steps
            out[f"pmr_proto_acc_{m}"] = hits[i] / max(self._samples, 1)
        if n == 2:
            out["pmr_rho"] = scores[0] / max(scores[1], 1e-300)
        out["pmr_modulated_steps"] = self._modulated
        return out

    def record_facts(self) -> dict[str, Any]:
        o = self.options
        return {
            "modalities": list(self.modalities),
            "modulated_epochs": [e for e in range(self.cfg.epochs) if self.active(e)],
            "per_epochs": [e for e in range(self.cfg.epochs) if self.active(e) and self.per_active(e)],
            "prototype_updates": self._updates,
            "prototype_subset_batches": self._subset_batches,
            "absent_class_events": int(self._absent.item()),
            "loss_weight": "alpha" if o.coef == "binary" else "alpha*beta",
        }
