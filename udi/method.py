"""``udi``: Unidirectional Dynamic Interaction (Wang et al., arXiv 2509.02281).

Phase 1 trains every modality alone (exactly the ``unimodal`` baseline's training, reusing its
cached checkpoints) and picks the anchor; phase 2 trains each other modality (a follower) with

    L_m = CE(z_m, y) + λ_con · JS(p_a ‖ p_m) + λ_com · Î_CLUB(f_a; f_m)

against the frozen anchor, the weights set by the dynamic controller or fixed. Prediction is a
late fusion of every modality's head. See docs/udi.md for every choice and option.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.device import derive_seed, seeded
from benchmark.errors import UsageError
from benchmark.late_fusion import FUSION_RULES, fuse
from benchmark.losses import entropy, js_divergence
from benchmark.method import Batch, EvalOutput, Method, Stage, StepContext, shared_search_space
from benchmark.registry import register_method
from benchmark.trainer import Trainer
from benchmark.unimodal import UnimodalModel, build_unimodal, seed_key, train_unimodal, unimodal_eval
from udi.anchor import select_anchor
from udi.club import CLUB_MODES, CLUBEstimator, club_upper_bound
from udi.controller import DynamicController

CLUB_DIRECTIONS = ("follower_given_anchor", "anchor_given_follower")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"method.{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class UDIOptions:
    anchor: str = opt("auto", "anchor modality: auto (best unimodal validation accuracy, entropy "
                              "tie-break) or a modality name (forced, the anchor ablation)")
    tie_tol: float = opt(0.5, "accuracy gap in percentage points within which modalities count as "
                              "tied for the anchor; the lowest validation entropy then wins")
    controller: str = opt("dynamic", "loss weights: dynamic (gradient-alignment controller) or static "
                                     "(fixed lambda_con, lambda_com)")
    lambda_con: float = opt(0.5, "weight of the consistency (JS) term: the static weight, and the "
                                 "dynamic controller's initial weight")
    lambda_com: float = opt(0.5, "weight of the complementarity (CLUB) term: the static weight, and the "
                                 "dynamic controller's initial weight")
    controller_every: str = opt("epoch", "when the dynamic controller recomputes the weights: epoch "
                                         "(first mini-batch of each epoch) or an integer N (every N steps)")
    controller_eps: float = opt(1e-12, "epsilon in lambda_k = s_k / (s_con + s_com + eps)")
    club_mode: str = opt("all_pairs", "CLUB bound: all_pairs (every sample of the batch as a "
                                      "negative) or sampled (one random negative per sample)")
    club_direction: str = opt("follower_given_anchor", "CLUB conditional: follower_given_anchor "
                              "q(f_m | f_a) or anchor_given_follower q(f_a | f_m)")
    club_hidden: int = opt(64, "hidden units of each of the CLUB estimator's two MLPs (mean, log-variance)")
    club_optimizer: str = opt("adam", "optimizer of the CLUB estimator: adam or sgd")
    club_lr: float = opt(1e-3, "learning rate of the CLUB estimator's optimizer")
    fusion_rule: str = opt("logit_sum", "test-time late fusion of the heads: logit_sum, prob_mean or entropy")
    follower_init: str = opt("scratch", "follower initialisation: scratch (fresh weights, as the unimodal "
                                        "baseline) or unimodal (its phase-1 weights)")
    select_on: str = opt("fusion", "validation accuracy that picks each follower's best epoch: fusion "
                                   "(anchor, followers so far and this one, fused) or follower (its own head)")

    def every(self) -> int | None:
        """The controller's period in steps, or None for once per epoch."""
        return None if self.controller_every == "epoch" else int(self.controller_every)

    def validate(self) -> None:
        if not self.anchor:
            raise UsageError("method.anchor must be auto or a modality name, got ''")
        _choice("controller", self.controller, ("dynamic", "static"))
        for name in ("lambda_con", "lambda_com", "tie_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"method.{name} must be a finite number >= 0, got {value}")
        if self.controller_every != "epoch":
            try:
                every = int(self.controller_every)
            except ValueError:
                every = 0
            if every < 1:
                raise UsageError(f"method.controller_every must be epoch or an integer >= 1, "
                                 f"got {self.controller_every!r}")
            self.controller_every = str(every)
        if not (self.controller_eps > 0 and math.isfinite(self.controller_eps)):
            raise UsageError(f"method.controller_eps must be > 0, got {self.controller_eps}")
        _choice("club_mode", self.club_mode, CLUB_MODES)
        _choice("club_direction", self.club_direction, CLUB_DIRECTIONS)
        _choice("club_optimizer", self.club_optimizer, ("adam", "sgd"))
        if self.club_hidden < 1:
            raise UsageError(f"method.club_hidden must be >= 1, got {self.club_hidden}")
        if not (self.club_lr > 0 and math.isfinite(self.club_lr)):
            raise UsageError(f"method.club_lr must be > 0, got {self.club_lr}")
        _choice("fusion_rule", self.fusion_rule, FUSION_RULES)
        _choice("follower_init", self.follower_init, ("scratch", "unimodal"))
        _choice("select_on", self.select_on, ("fusion", "follower"))


class UDIModel(nn.Module):
    """One unimodal model (encoder + linear head) per modality: the anchor and the followers."""

    def __init__(self, units: dict[str, UnimodalModel]) -> None:
        super().__init__()
        self.units = nn.ModuleDict(units)


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Full precision for the CLUB estimator (exp of log-variances, small sums of squares)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradient into ``module``'s parameters inside the block (they are restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class FollowerPhase:
    """The training of one follower against the frozen anchor: its model, CLUB estimator and
    controller, and the :class:`Stage` the trainer runs."""

    def __init__(self, method: UDI, trainer: Trainer, modality: str, controller: str | None = None) -> None:
        opts, cfg = method.options, method.cfg
        self.method = method
        self.trainer = trainer
        self.modality = modality
        self.anchor_name = method.anchor
        self.anchor = method.model.units[method.anchor]
        self.device = trainer.device
        self.follower = build_unimodal(method, modality)
        if opts.follower_init == "unimodal":
            self.follower.load_state_dict(method.phase1[modality].state_dict())
        self.follower.to(self.device)
        a_dim, m_dim = self.anchor.encoder.out_dim, self.follower.encoder.out_dim
        x_dim, y_dim = (a_dim, m_dim) if opts.club_direction == "follower_given_anchor" else (m_dim, a_dim)
        with seeded(cfg.seed, f"udi/club/{modality}"):
            self.club = CLUBEstimator(x_dim, y_dim, opts.club_hidden)
        self.club.to(self.device)
        if opts.club_optimizer == "adam":
            self.club_opt: torch.optim.Optimizer = torch.optim.Adam(self.club.parameters(), lr=opts.club_lr)
        else:
            self.club_opt = torch.optim.SGD(self.club.parameters(), lr=opts.club_lr, momentum=0.9)
        # on the training device, so that a sampled negative needs no host-to-device copy per step
        self.negatives = torch.Generator(device=self.device)
        self.negatives.manual_seed(derive_seed(cfg.seed, f"udi/club-negatives/{modality}"))
        self.mode = controller or opts.controller
        self.static = (float(opts.lambda_con), float(opts.lambda_com))
        self.controller = (DynamicController(list(self.follower.parameters()), self.static,
                                             every=opts.every(), eps=opts.controller_eps)
                           if self.mode == "dynamic" else None)
        self.controller_seconds = 0.0
        self.frozen = [self.anchor] + [method.model.units[f] for f in method.trained_followers]

    # --- the losses -------------------------------------------------------------------------
    def _club_pair(self, f_a: torch.Tensor, f_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning side, predicted side) of the CLUB estimator."""
        if self.method.options.club_direction == "follower_given_anchor":
            return f_a, f_m
        return f_m, f_a

    def fit_estimator(self, f_a: torch.Tensor, f_m: torch.Tensor) -> torch.Tensor:
        """One optimizer step of q_φ on the detached features; returns its negative log-likelihood."""
        x, y = self._club_pair(f_a.detach().float(), f_m.detach().float())
        with _no_autocast(self.device), torch.enable_grad():
            self.club_opt.zero_grad(set_to_none=True)
            nll = self.club.learning_loss(x, y)
            nll.backward()
            self.club_opt.step()
        return nll.detach()

    def complementarity(self, f_a: torch.Tensor, f_m: torch.Tensor) -> torch.Tensor:
        """Î_CLUB(f_a; f_m) with the estimator held fixed: its gradient reaches the follower only."""
        opts = self.method.options
        x, y = self._club_pair(f_a.float(), f_m.float())
        with _no_autocast(self.device):
            if opts.club_direction == "follower_given_anchor":
                with torch.no_grad():  # μ(f_a), σ(f_a) depend on neither the follower nor φ's update
                    mu, logvar = self.club(x)
            else:
                with _frozen(self.club):
                    mu, logvar = self.club(x)
            return club_upper_bound(mu, logvar, y, mode=opts.club_mode, generator=self.negatives)

    # --- the stage --------------------------------------------------------------------------
    def weights(self) -> tuple[float, float]:
        return self.controller.weights if self.controller is not None else self.static

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        y = batch["label"]
        with torch.no_grad():
            z_a, f_a = self.anchor(batch[self.anchor_name])
        z_m, f_m = self.follower(batch[self.modality])
        cls = F.cross_entropy(z_m, y)
        con = js_divergence(z_a, z_m, from_logits=True)
        club_nll = self.fit_estimator(f_a, f_m)
        com = self.complementarity(f_a, f_m)
        if self.controller is not None:
            if self.controller.due(ctx.step):
                t0 = time.perf_counter()
                self.controller.update(cls, con, com)
                self.controller_seconds += time.perf_counter() - t0
            self.controller.advance()
        lam_con, lam_com = self.weights()
        loss = cls + lam_con * con + lam_com * com
        return {"loss": loss, "cls": cls.detach(), "con": con.detach(), "com": com.detach(),
                "club_nll": club_nll}

    def predict(self, batch: Batch) -> torch.Tensor:
        if self.method.options.select_on == "follower":
            return self.follower(batch[self.modality])[0]
        units = [self.anchor_name, *self.method.trained_followers, self.modality]
        models = {m: self.method.model.units[m] for m in units}
        models[self.modality] = self.follower
        return fuse([models[m](batch[m])[0] for m in units], self.method.options.fusion_rule)

    def on_epoch_start(self, ctx: StepContext) -> None:
        for module in self.frozen:  # the loop sets only the follower to train mode; keep these in eval
            module.eval()
        self.controller_seconds = 0.0
        if self.controller is not None:
            self.controller.epoch_steps = []

    def epoch_log(self) -> dict[str, Any]:
        lam_con, lam_com = self.weights()
        row: dict[str, Any] = {"udi_follower": self.modality, "lambda_con": lam_con, "lambda_com": lam_com,
                               "ip_con": None, "ip_com": None, "controller_updates": 0,
                               "controller_kept_previous": None, "controller_seconds": self.controller_seconds}
        if self.controller is not None and self.controller.epoch_steps:
            last = self.controller.epoch_steps[-1]
            row.update(ip_con=last.ip_con, ip_com=last.ip_com,
                       controller_updates=len(self.controller.epoch_steps),
                       controller_kept_previous=last.kept_previous)
        return row

    def stage(self, **overrides: Any) -> Stage:
        fields: dict[str, Any] = dict(
            name=f"udi:follower:{self.modality}", module=self.follower, step=self.step, predict=self.predict,
            seed_key=seed_key(self.modality), on_epoch_start=self.on_epoch_start, epoch_log=self.epoch_log,
            modalities=[self.modality],
        )
        fields.update(overrides)
        return Stage(**fields)


TRACE_KEYS = ("epoch", "train_loss", "train_cls", "train_con", "train_com", "train_club_nll", "lambda_con",
              "lambda_com", "ip_con", "ip_com", "controller_updates", "controller_kept_previous",
              "val_accuracy")


@register_method("udi")
class UDI(Method):
    summary = "UDI: frozen best unimodal anchor guides each follower (JS + CLUB, dynamic weights)"
    Options = UDIOptions
    min_modalities = 2

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.club_lr": trial.suggest_float("method.club_lr", 1e-4, 1e-2, log=True),
                "method.club_hidden": trial.suggest_categorical("method.club_hidden", [32, 64, 128])}

    def check(self) -> None:
        anchor = self.options.anchor
        if anchor != "auto" and anchor not in self.modalities:
            raise UsageError(f"method.anchor {anchor!r} is not a modality of {self.info.name}; "
                             f"choose auto or one of {', '.join(self.modalities)}")

    def build(self) -> nn.Module:
        self.model = UDIModel({m: build_unimodal(self, m) for m in self.modalities})
        self.anchor: str = ""
        self.phase1: dict[str, UnimodalModel] = {}
        self.trained_followers: list[str] = []
        return self.model

    @property
    def followers(self) -> list[str]:
        return [m for m in self.modalities if m != self.anchor]

    # --- phase 1 ----------------------------------------------------------------------------
    def validation_stats(self, trainer: Trainer, models: dict[str, UnimodalModel]
                         ) -> tuple[dict[str, float], dict[str, float]]:
        """Validation accuracy (fraction) and mean predictive entropy (nats) of each model."""
        accuracy, mean_entropy = {}, {}
        for m, model in models.items():
            out, labels = trainer.collect(lambda b, model=model: unimodal_eval(model, b), model, "val")
            accuracy[m] = (out.logits.argmax(dim=1) == labels).sum().item() / max(len(labels), 1)
            mean_entropy[m] = entropy(out.logits).mean().item()
        return accuracy, mean_entropy

    def anchor_phase(self, trainer: Trainer) -> dict[str, Any]:
        infos = {}
        for m in self.modalities:
            self.phase1[m], infos[m] = train_unimodal(trainer, self, m)
        accuracy, mean_entropy = self.validation_stats(trainer, self.phase1)
        choice = select_anchor(accuracy, mean_entropy, self.options.tie_tol, self.options.anchor)
        self.anchor = choice.anchor
        anchor = self.phase1[self.anchor]
        anchor.requires_grad_(False)
        anchor.zero_grad(set_to_none=True)  # drop the last phase-1 gradients: none may reach it now
        anchor.eval()
        self.model.units[self.anchor] = anchor
        if self.options.follower_init == "unimodal":  # until trained, a follower is its phase-1 model
            for m in self.followers:
                self.model.units[m] = self.phase1[m]
        trainer.log(f"[udi] anchor {self.anchor} ({choice.rule}); unimodal val accuracy "
                    + ", ".join(f"{m} {a:.4f}" for m, a in accuracy.items()))
        return {
            "anchor": self.anchor,
            "anchor_rule": choice.rule,
            "anchor_tied": choice.tied,
            "unimodal_val_accuracy": accuracy,
            "unimodal_val_entropy": mean_entropy,
            "unimodal": infos,
            "reused": {m: bool(info.get("reused")) for m, info in infos.items()},
        }

    # --- phase 2 ----------------------------------------------------------------------------
    def follower_phase(self, trainer: Trainer) -> dict[str, Any]:
        trace, stages = {}, {}
        for m in self.followers:
            phase = FollowerPhase(self, trainer, m)
            result = trainer.fit(phase.stage())
            phase.follower.eval()
            self.model.units[m] = phase.follower
            self.trained_followers.append(m)
            trace[m] = [{k: row.get(k) for k in TRACE_KEYS} for row in result.history]
            stages[m] = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                         "epochs_run": result.epochs_run}
        opts = self.options
        return {
            "followers": list(self.followers),
            "follower_stages": stages,
            "controller": {"mode": opts.controller, "every": opts.controller_every,
                           "initial": [opts.lambda_con, opts.lambda_com], "trace": trace},
        }

    def run(self, trainer: Trainer) -> dict[str, Any]:
        facts = self.anchor_phase(trainer)
        facts.update(self.follower_phase(trainer))
        return facts

    # --- prediction -------------------------------------------------------------------------
    def eval_forward(self, batch: Batch) -> EvalOutput:
        logits, feats = {}, {}
        for m in self.modalities:
            logits[m], feats[m] = self.model.units[m](batch[m])
        fused = fuse([logits[m] for m in self.modalities], self.options.fusion_rule)
        return EvalOutput(fused, logits, feats)

    absent_rule = "head"

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        return self.model.units[modality](batch[modality])[0]

    def fuse_heads(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return fuse(list(logits.values()), self.options.fusion_rule)

    def training_readouts(self, stage: Stage, batch: Batch) -> dict[str, torch.Tensor] | None:
        """A follower's stage: the anchor's, the trained followers' and this follower's logits."""
        if not stage.name.startswith("udi:follower:"):
            return None
        current = stage.modalities[0]
        units = {m: self.model.units[m] for m in [self.anchor, *self.trained_followers] if m != current}
        units[current] = stage.module
        return {m: unit(batch[m])[0] for m, unit in units.items()}
