"""``reconboost``: alternating stage-wise boosting over modality learners (Hua et al., ICML 2024).

- **Learners.** ``z_m = h(P_m(ψ_m(x_m)))``: encoder ψ_m, one **shared** MLP head
  ``h = Linear(d, hidden) → ReLU → Linear(hidden, C)`` and ``P_m`` the identity when every
  encoder gives d features (``projection="auto"``; a per-modality ``Linear(d_m, d)`` to the largest
  size d when they differ, ``projection="refuse"`` refuses that case instead).
- **Ensemble.** ``F = β_b · Σ_{m active} z_m`` with a learnable scalar β_b (initialised to 1).
  Test-time prediction: ``argmax F``.
- **Stage t** trains modality ``m = t mod M`` (dataset order) in two phases:

  * phase 1, ``learner_epochs`` = E₁ epochs, a fresh optimiser over ψ_m, P_m and h (lr ``m_lr``):
    per sample ``ℓ = (1/C)·(w₁ − w₂·sg(softmax(F₋m)[y]))·(−log softmax(z_m)[y])`` with
    ``F₋m = β_b·Σ_{j≠m, active} z_j`` computed without gradient; when no other learner is active
    ``F₋m`` is the constant c₀ of the reference code, whose softmax over one column is 1, so the
    weight is ``(w₁ − w₂)/C``. Loss = batch mean of ℓ (+ α·L_mc, ``consolidation``).
  * phase 2, ``rectify_epochs`` = E₂ epochs, a fresh optimiser over every encoder, projection, h
    and β_b (lr ``e_lr``): ``CE(F, y)``.

- **Schedule.** Both learning rates are multiplied by ``lr_gamma`` every ``lr_every`` stages.
  ``cfg.epochs`` is the run's epoch budget: ``stages = max(1, epochs // (E₁ + E₂))``. The stage's
  validation accuracy is the one after its last epoch; the best stage is selected on validation
  and restored at the end; ``cfg.patience`` > 0 stops after that many stages without a better one.
  No rollback inside a phase: each epoch is one ``Trainer.fit`` call of one epoch with the phase's
  own persistent optimiser (``cfg.scheduler`` does not apply: the stage schedule above replaces it).
- **Initialisation.** ``init="unimodal"``: the shared unimodal checkpoints load every encoder and
  learner m keeps its own linear classifier (frozen) until its first stage; all learners are in
  the ensemble from the start. ``init="scratch"``: a learner joins the ensemble at its first stage.

See docs/methods/reconboost.md for the map to the reference code and the deliberate differences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import (
    Batch,
    EvalOutput,
    Method,
    Stage,
    StepContext,
    make_optimizer,
    shared_search_space,
)
from benchmark.registry import register_method
from benchmark.unimodal import build_unimodal, train_unimodal


def boost_weights(others: torch.Tensor | None, labels: torch.Tensor, w1: float, w2: float,
                  num_classes: int) -> torch.Tensor:
    """Per-sample reconcilement weight ``(w₁ − w₂·softmax(F₋m)[y]) / C`` (no gradient). ``others``
    is F₋m (B, C), or None for the constant c₀ (softmax over one column: 1)."""
    if others is None:
        p = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    else:
        p = others.detach().float().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return (w1 - w2 * p) / num_classes


def learner_loss(z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``weight · CE(z_m, y)`` per sample."""
    return (weights * F.cross_entropy(z, labels, reduction="none")).mean()


def consolidation_term(z: torch.Tensor, z_prev: torch.Tensor, mode: str) -> torch.Tensor:
    """``MSE(softmax z_m, softmax z_prev)`` (mean over elements). ``code``: both operands detached,
    as in the reference (no gradient); ``true``: the gradient reaches z_m."""
    p = z.float().softmax(dim=1)
    q = z_prev.detach().float().softmax(dim=1)
    return F.mse_loss(p.detach() if mode == "code" else p, q)


@dataclass
class ReconBoostOptions:
    w1: float = opt(5.0, "w₁: the constant part of the reconcilement weight")
    w2: float = opt(1.0, "w₂: the weight of the ensemble's probability of the label (0 = plain boosting)")
    learner_epochs: int = opt(4, "E₁: epochs of phase 1 (one learner) per stage")
    rectify_epochs: int = opt(4, "E₂: epochs of phase 2 (global rectification, CE of the ensemble) per stage")
    m_lr: float = opt(0.0, "learning rate of phase 1 (0 = the run's lr)")
    e_lr: float = opt(0.0, "learning rate of phase 2 (0 = the run's lr)")
    lr_every: int = opt(30, "both learning rates are multiplied by lr_gamma every this many stages (0 = never)")
    lr_gamma: float = opt(0.1, "the stage-wise learning-rate factor")
    hidden: int = opt(256, "hidden units of the shared head h")
    beta: float = opt(1.0, "initial value of the learnable ensemble scale β_b")
    alpha: float = opt(0.5, "α: weight of the memory-consolidation term (inert unless consolidation=true)")
    consolidation: str = opt("false", "memory consolidation: false (no term, the code's gradients), code (the "
                                      "code's detached term and its train-mode forward) or true (gradient reaches z_m)")
    others_mode: str = opt("eval", "the other learners while computing F₋m: eval (fixed ensemble) or code "
                                   "(train mode as in the reference, moving their BatchNorm statistics)")
    init: str = opt("unimodal", "unimodal (the shared unimodal checkpoints, every learner in the ensemble) or "
                                "scratch (a learner joins at its first stage)")
    projection: str = opt("auto", "encoders of different feature sizes: auto (a per-modality linear map to the "
                                  "largest size) or refuse")

    def validate(self) -> None:
        choices = {"consolidation": ("false", "code", "true"), "others_mode": ("eval", "code"),
                   "init": ("unimodal", "scratch"), "projection": ("auto", "refuse")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"method.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}; "
                                 f"set method.{name} to one of them")
        if self.learner_epochs < 1 or self.rectify_epochs < 0:
            raise UsageError(f"method.learner_epochs={self.learner_epochs} and method.rectify_epochs="
                             f"{self.rectify_epochs}: use learner_epochs >= 1 and rectify_epochs >= 0")
        for name in ("m_lr", "e_lr", "lr_every", "alpha"):
            if getattr(self, name) < 0:
                raise UsageError(f"method.{name}={getattr(self, name)} is negative; use a value >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise UsageError(f"method.lr_gamma={self.lr_gamma} is outside (0, 1]; use e.g. 0.1")
        if self.hidden < 1:
            raise UsageError(f"method.hidden={self.hidden}: use a positive number of hidden units")


class ReconBoostNet(nn.Module):
    """Encoders, projections, the shared head h, each learner's own classifier (init=unimodal,
    used until its first stage), β_b and two flags per modality (in the state dict)."""

    def __init__(self, modalities: list[str], encoders: dict[str, nn.Module], own_heads: dict[str, nn.Module],
                 head: nn.Module, projections: dict[str, nn.Module], beta: float, active: bool) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict(encoders)
        self.own_heads = nn.ModuleDict(own_heads)
        for p in self.own_heads.parameters():
            p.requires_grad_(False)  # the reference's DynamicNet.parameters() skips them
        self.projections = nn.ModuleDict(projections)
        self.head = head
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        n = len(modalities)
        self.register_buffer("active", torch.full((n,), float(active)))  # in the ensemble
        self.register_buffer("shared", torch.zeros(n))  # reads the shared head (trained once)
        self.flags: list[tuple[bool, bool]] = [(active, False)] * n  # host copy of the buffers

    def sync_flags(self) -> None:
        self.flags = [(bool(a), bool(s)) for a, s in zip(self.active.tolist(), self.shared.tolist())]

    def set_flags(self, i: int, active: bool, shared: bool) -> None:
        self.active[i], self.shared[i] = float(active), float(shared)
        self.flags[i] = (active, shared)

    def learner(self, batch: Batch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modalities[i]
        feats = self.encoders[m](batch[m])
        if self.flags[i][1] or m not in self.own_heads:
            return self.head(self.projections[m](feats)), feats
        return self.own_heads[m](feats), feats

    def ensemble(self, batch: Batch, skip: int | None = None) -> torch.Tensor | None:
        zs = [self.learner(batch, i)[0] for i in range(len(self.modalities)) if i != skip and self.flags[i][0]]
        return self.beta * torch.stack(zs).sum(0) if zs else None


@register_method("reconboost")
class ReconBoost(Method):
    summary = "stage-wise boosting of modality learners with a shared head, reconciled by the ensemble"
    Options = ReconBoostOptions
    min_modalities = 2
    table_order = 27
    perf_bound = None
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64,
        "scheduler": "none", "epochs": 800,  # 100 stages of E₁ = E₂ = 4 epochs
    }
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {  # re-runs (METHODS.md)
        "crema-d": {"BalanceBenchmark (1 run, test-selected)": (74.01, None),
                    "MCR reruns (3 folds, val-selected)": (69.0, 2.4)},
        "kinetics-sounds": {"BalanceBenchmark (1 run, test-selected)": (68.38, None)},
    }
    absent_rule = "head"

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        space = shared_search_space(trial)
        space["method.w1"] = trial.suggest_categorical("method.w1", [1.0, 3.0, 5.0, 10.0])
        space["method.learner_epochs"] = trial.suggest_categorical("method.learner_epochs", [1, 4, 10])
        return space

    def check(self) -> None:
        if self.options.projection == "refuse":
            self.require_equal_feature_sizes("its learners share one head",
                                             "set method.projection=auto or use encoders of one size")

    # --- model ------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        o = self.options
        units = {m: build_unimodal(self, m) for m in self.modalities}
        sizes = {m: units[m].encoder.out_dim for m in self.modalities}
        d = max(sizes.values())
        with seeded(self.cfg.seed, self.stream("build")):
            projections = {m: nn.Identity() if sizes[m] == d else nn.Linear(sizes[m], d) for m in self.modalities}
            head = nn.Sequential(nn.Linear(d, o.hidden), nn.ReLU(), nn.Linear(o.hidden, self.info.num_classes))
        own = {m: units[m].head for m in self.modalities} if o.init == "unimodal" else {}
        self.model = ReconBoostNet(self.modalities, {m: units[m].encoder for m in self.modalities}, own, head,
                                   projections, o.beta, active=o.init == "unimodal")
        self._stages: list[dict[str, Any]] = []
        self._row: dict[str, Any] = {}
        self._facts: dict[str, Any] = {}
        return self.model

    def checkpoint_state(self) -> dict[str, Any]:
        return {"flags": [list(f) for f in self.model.flags]}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        for i, (active, shared) in enumerate(state.get("flags", [])):
            self.model.set_flags(i, bool(active), bool(shared))

    def _flags(self) -> ReconBoostNet:
        return self.model

    def others_to_eval(self, i: int) -> None:
        """Phase 1 with ``others_mode=eval``: the other encoders (and projections) in eval mode."""
        if self.options.others_mode == "eval":
            for j, name in enumerate(self.modalities):
                if j != i:
                    self.model.encoders[name].eval()
                    self.model.projections[name].eval()

    # --- prediction -------------------------------------------------------------------------
    def predict(self, batch: Batch) -> torch.Tensor:
        out = self._flags().ensemble(batch)
        assert out is not None
        return out

    def eval_forward(self, batch: Batch) -> EvalOutput:
        net = self._flags()
        unimodal, feats = {}, {}
        for i, m in enumerate(self.modalities):
            unimodal[m], feats[m] = net.learner(batch, i)
        return EvalOutput(self.fuse_heads(unimodal), unimodal, feats)

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        return self._flags().learner(batch, self.modalities.index(modality))[0]

    def fuse_heads(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        net = self._flags()
        zs = [z for m, z in logits.items() if net.flags[self.modalities.index(m)][0]] or list(logits.values())
        return net.beta * torch.stack(zs).sum(0)

    # --- the two phases -----------------------------------------------------------------------
    def phase1_step(self, i: int, t: int) -> Any:
        o, net, labels_key = self.options, self.model, "label"
        prev = (t - 1) % len(self.modalities) if t > 0 else None

        def step(batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
            y = batch[labels_key]
            z, _ = net.learner(batch, i)
            with torch.no_grad():
                others = net.ensemble(batch, skip=i)
            w = boost_weights(others, y, o.w1, o.w2, self.info.num_classes)
            loss = learner_loss(z, y, w)
            out = {"loss": loss, "weight": w.mean()}
            if o.consolidation != "false" and prev is not None and prev != i:
                enc = net.encoders[self.modalities[prev]]
                was = enc.training
                enc.train(o.consolidation == "code" or o.others_mode == "code")
                with torch.no_grad():
                    z_prev, _ = net.learner(batch, prev)
                enc.train(was)
                mc = consolidation_term(z, z_prev, o.consolidation)
                out["loss"] = loss + o.alpha * mc
                out["consolidation"] = mc.detach()
            return out

        return step

    def phase2_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = self.model.ensemble(batch)
        assert logits is not None
        return {"loss": F.cross_entropy(logits, batch["label"])}

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_optimizer(params, dataclasses.replace(self.cfg, lr=lr))

    def _phase(self, trainer: Any, name: str, step: Any, params: list[nn.Parameter], lr: float,
               epochs: int, t: int, i: int, on_epoch_start: Any = None) -> list[dict[str, Any]]:
        opt_ = self._optimizer([p for p in params if p.requires_grad], lr)
        rows = []
        for e in range(epochs):
            self._row = {"reconboost_stage": t, "reconboost_modality": i, "reconboost_phase": 1 if name.endswith("learner") else 2,
                         "reconboost_phase_epoch": e}
            stage = Stage(name=name, module=self.model, step=step, predict=self.predict,
                          seed_key=self.stream(f"order/{t}/{name}/{e}"), params=params,
                          make_optimizers=lambda _p, o=opt_: [o], on_epoch_start=on_epoch_start,
                          epoch_log=self.epoch_log, epochs=1, patience=0, modalities=list(self.modalities),
                          scheduler=False)  # one epoch per fit: the stage-wise decay replaces cfg.scheduler
            result = trainer.fit(stage)
            rows.append(result.history[-1])
        return rows

    def run(self, trainer: Any) -> dict[str, Any]:
        o, net, mods = self.options, self.model, self.modalities
        infos = {}
        if o.init == "unimodal":
            for m in mods:
                unit, infos[m] = train_unimodal(trainer, self, m)
                net.encoders[m].load_state_dict(unit.encoder.state_dict())
                net.own_heads[m].load_state_dict(unit.head.state_dict())
        net.to(trainer.device)
        per_stage = max(o.learner_epochs + o.rectify_epochs, 1)
        budget = max(1, self.cfg.epochs // per_stage)
        patience = self.cfg.patience
        shared_params = list(net.head.parameters())
        all_params = [p for p in net.parameters() if p.requires_grad]
        best_acc, best_stage, best_state = -1.0, -1, None
        stopped = False
        for t in range(budget):
            i = t % len(mods)
            m = mods[i]
            scale = o.lr_gamma ** (t // o.lr_every) if o.lr_every else 1.0
            net.set_flags(i, True, True)

            learner_params = list(net.encoders[m].parameters()) + list(net.projections[m].parameters()) + shared_params
            p1 = self._phase(trainer, "reconboost:learner", self.phase1_step(i, t), learner_params,
                             (o.m_lr or self.cfg.lr) * scale, o.learner_epochs, t, i,
                             lambda ctx, i=i: self.others_to_eval(i))
            p2 = self._phase(trainer, "reconboost:rectify", self.phase2_step, all_params,
                             (o.e_lr or self.cfg.lr) * scale, o.rectify_epochs, t, i)
            last = (p2 or p1)[-1]
            acc = last["val_accuracy"]
            self._stages.append({"stage": t, "modality": m, "lr_scale": scale,
                                 "learner_loss": p1[-1].get("train_loss"),
                                 "rectify_loss": p2[-1].get("train_loss") if p2 else None,
                                 "val_accuracy": acc, "beta": last.get("reconboost_beta")})
            if acc > best_acc:
                best_acc, best_stage = acc, t
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if patience and t - best_stage >= patience:
                stopped = True
                trainer.log(f"[reconboost] early stop: no better validation accuracy for {patience} stages")
                break
        if best_state is not None:
            net.load_state_dict(best_state)
            net.sync_flags()
            trainer.log(f"[reconboost] best stage {best_stage} (val acc {best_acc:.4f}): its weights restored")
        self._facts = {"stage_budget": budget, "stages_run": len(self._stages), "best_stage": best_stage,
                       "best_val_accuracy": best_acc, "stopped_early": stopped}
        facts = self.record_facts()
        if infos:
            facts["unimodal"] = infos
        return facts

    # --- trace --------------------------------------------------------------------------------
    def epoch_log(self) -> dict[str, Any]:
        return {**self._row, "reconboost_beta": self.model.beta.item()}

    def record_facts(self) -> dict[str, Any]:
        o = self.options
        return {"reconboost": {"schedule": self._stages, **self._facts,
                               "epochs_per_stage": o.learner_epochs + o.rectify_epochs,
                               "beta": self.model.beta.item(), "init": o.init,
                               "consolidation": o.consolidation, "others_mode": o.others_mode}}
