"""``udi``: Unidirectional Dynamic Interaction (Wang et al., arXiv 2509.02281).

Phase 1 trains every modality alone (exactly the ``unimodal`` baseline's training, reusing its
cached checkpoints) and picks the anchor; phase 2 trains each other modality (a follower) in turn
with

    L_m = CE(z_m, y) + λ_con · JS(p_g ‖ p_m) + λ_com · mean_g Î_CLUB(f_g; f_m)

against its frozen guides g: the anchor, and with ``guidance=progressive`` (three or more
modalities, App. A.2) every follower trained before it, p_g then being their fused prediction. The
weights are set by the dynamic controller or fixed. Prediction is a late fusion of every
modality's head. See docs/udi.md for every choice and option.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import opt
from benchmark.data.base import TensorSplit
from benchmark.device import derive_seed, seeded
from benchmark.errors import UsageError
from benchmark.late_fusion import FUSION_RULES, fuse
from benchmark.losses import entropy, js_divergence
from benchmark.method import Batch, EvalOutput, Method, Stage, StepContext, fused_on_cpu, shared_search_space
from benchmark.registry import register_method
from benchmark.trainer import Trainer
from benchmark.unimodal import UnimodalModel, build_unimodal, seed_key, train_unimodal, unimodal_eval
from udi.anchor import select_anchor
from udi.club import CLUB_MODES, CLUBEstimator, club_upper_bound
from udi.controller import DynamicController

CLUB_DIRECTIONS = ("follower_given_anchor", "anchor_given_follower")
CONTROLLER_TASKS = ("follower_ce", "fused_ce")


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
                                         "(first mini-batch of each epoch, the paper's text, Sec. 3.3), batch "
                                         "(every mini-batch, Algorithm 1) or an integer N (every N steps)")
    controller_task: str = opt("follower_ce", "the task loss whose gradient the controller aligns with: "
                                              "follower_ce (the follower's own CE) or fused_ce (CE of the fused "
                                              "prediction of the guides and the follower; gradient w.r.t. the "
                                              "follower only)")
    controller_eps: float = opt(1e-12, "epsilon in lambda_k = s_k / (s_con + s_com + eps)")
    club_mode: str = opt("all_pairs", "CLUB bound: all_pairs (every sample of the batch as a "
                                      "negative) or sampled (one random negative per sample)")
    club_direction: str = opt("follower_given_anchor", "CLUB conditional: follower_given_anchor "
                              "q(f_m | f_a) or anchor_given_follower q(f_a | f_m)")
    club_hidden: int = opt(64, "hidden units of each of the CLUB estimator's two MLPs (mean, log-variance)")
    club_optimizer: str = opt("adam", "optimizer of the CLUB estimator: adam or sgd")
    club_lr: float = opt(1e-3, "learning rate of the CLUB estimator's optimizer")
    con_reduction: str = opt("mean", "batch reduction of the JS term: mean (scale-consistent with the CE) "
                                     "or sum (Eq. 5 as written)")
    guidance: str = opt("progressive", "what guides the k-th follower when there are 3 or more modalities: "
                                       "progressive (the fused prediction and the features of every modality "
                                       "trained before it, App. A.2) or anchor (the anchor alone)")
    order: str = opt("auto", "follower training order: auto (progressive: by unimodal validation accuracy, "
                             "best first; anchor: the dataset's order) or the followers comma-separated")
    fusion_rule: str = opt("logit_sum", "test-time late fusion of the heads: logit_sum, prob_mean or entropy")
    follower_init: str = opt("scratch", "follower initialisation: scratch (fresh weights, as the unimodal "
                                        "baseline) or unimodal (its phase-1 weights)")
    select_on: str = opt("fusion", "validation accuracy that picks each follower's best epoch: fusion "
                                   "(anchor, followers so far and this one, fused) or follower (its own head)")

    def every(self) -> int | None:
        """The controller's period in steps, or None for once per epoch."""
        if self.controller_every == "epoch":
            return None
        return 1 if self.controller_every == "batch" else int(self.controller_every)

    def validate(self) -> None:
        if not self.anchor:
            raise UsageError("method.anchor must be auto or a modality name, got ''")
        _choice("controller", self.controller, ("dynamic", "static"))
        for name in ("lambda_con", "lambda_com", "tie_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"method.{name} must be a finite number >= 0, got {value}")
        if self.controller_every not in ("epoch", "batch"):
            try:
                every = int(self.controller_every)
            except ValueError:
                every = 0
            if every < 1:
                raise UsageError(f"method.controller_every must be epoch, batch or an integer >= 1, "
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
        _choice("controller_task", self.controller_task, CONTROLLER_TASKS)
        _choice("con_reduction", self.con_reduction, ("mean", "sum"))
        _choice("guidance", self.guidance, ("progressive", "anchor"))
        if not self.order.strip():
            raise UsageError("method.order must be auto or the followers comma-separated, got ''")
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


def guide_key(guide: str, what: str) -> str:
    """The batch key of a frozen guide's stored ``logits`` or ``features``."""
    return f"udi.guide/{guide}/{what}"


class FollowerPhase:
    """The training of one follower against its frozen guides (the anchor alone, or with
    ``guidance=progressive`` the anchor and every follower trained before it): its model, one CLUB
    estimator per guide, the controller, and the :class:`Stage` the trainer runs."""

    def __init__(self, method: UDI, trainer: Trainer, modality: str, controller: str | None = None) -> None:
        opts, cfg = method.options, method.cfg
        self.method = method
        self.trainer = trainer
        self.modality = modality
        self.anchor_name = method.anchor
        self.anchor = method.model.units[method.anchor]
        self.guides = method.guides_of(modality)
        self.guide_models = {g: method.model.units[g] for g in self.guides}
        self.device = trainer.device
        self.follower = build_unimodal(method, modality)
        if opts.follower_init == "unimodal":
            self.follower.load_state_dict(method.phase1[modality].state_dict())
        self.follower.to(self.device)
        self.clubs: list[CLUBEstimator] = []
        self.club_opts: list[torch.optim.Optimizer] = []
        for guide in self.guides:
            self._add_estimator(guide)
        self.club, self.club_opt = self.clubs[0], self.club_opts[0]  # the anchor's pair
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
        self.train_split = self.guided_train_split()

    # --- the frozen guides' outputs, computed once ------------------------------------------
    def guided_train_split(self) -> TensorSplit | None:
        """The training split with every guide's logits and features stored beside the inputs
        (under :func:`guide_key`), so that a step reads them instead of running the frozen guides
        again: they are in eval mode with their weights fixed, so each sample's outputs never
        change. Computed in eval mode in batches of ``batch_size`` (each sample's outputs do not
        depend on the batch around it; a test pins them to the bit). Only for a split held in
        memory, on the CPU in full precision (where the guides' forward is a large part of a
        step); None otherwise, and the guides run at every step as before."""
        trainer = self.trainer
        train = trainer.data.splits["train"]
        if not isinstance(train, TensorSplit) or trainer.device.type != "cpu" or trainer.dtype is not None:
            return None
        outputs: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for module in self.guide_models.values():
                module.eval()
            for batch in trainer.batches(train, shuffle=False, batch_size=self.method.cfg.batch_size):
                for g, model in self.guide_models.items():
                    z, f = model(batch[g])
                    outputs.setdefault(guide_key(g, "logits"), []).append(z)
                    outputs.setdefault(guide_key(g, "features"), []).append(f)
        return TensorSplit({**train.inputs, **{k: torch.cat(v) for k, v in outputs.items()}}, train.labels)

    @staticmethod
    def unit_outputs(batch: Batch, modality: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of ``modality``'s unit on ``batch``: stored in the batch when it comes
        from the guided training split (:meth:`guided_train_split`) and the unit is a guide, else
        computed."""
        if guide_key(modality, "logits") in batch:
            return batch[guide_key(modality, "logits")], batch[guide_key(modality, "features")]
        return model(batch[modality])

    def guide_outputs(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, features) of each guide on ``batch`` (no gradient: the guides are frozen)."""
        with torch.no_grad():
            return [self.unit_outputs(batch, g, model) for g, model in self.guide_models.items()]

    def _add_estimator(self, guide: str) -> None:
        """q_φ for the pair (guide, follower), with its own optimizer. The anchor's estimator keeps
        the seed stream it always had, so that a run guided by the anchor alone is unchanged."""
        opts, cfg = self.method.options, self.method.cfg
        g_dim, m_dim = self.guide_models[guide].encoder.out_dim, self.follower.encoder.out_dim
        x_dim, y_dim = (g_dim, m_dim) if opts.club_direction == "follower_given_anchor" else (m_dim, g_dim)
        key = f"udi/club/{self.modality}" if guide == self.anchor_name else f"udi/club/{guide}/{self.modality}"
        with seeded(cfg.seed, key):
            club = CLUBEstimator(x_dim, y_dim, opts.club_hidden)
        club.to(self.device)
        params = list(club.parameters())
        if opts.club_optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=opts.club_lr, **fused_on_cpu(params))
        else:
            optimizer = torch.optim.SGD(params, lr=opts.club_lr, momentum=0.9, **fused_on_cpu(params))
        self.clubs.append(club)
        self.club_opts.append(optimizer)

    # --- the losses -------------------------------------------------------------------------
    def _club_pair(self, f_a: torch.Tensor, f_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning side, predicted side) of the CLUB estimator."""
        if self.method.options.club_direction == "follower_given_anchor":
            return f_a, f_m
        return f_m, f_a

    def fit_estimator(self, f_a: torch.Tensor, f_m: torch.Tensor, k: int = 0) -> torch.Tensor:
        """One optimizer step of the k-th guide's q_φ on the detached features; returns its
        negative log-likelihood."""
        club, optimizer = self.clubs[k], self.club_opts[k]
        x, y = self._club_pair(f_a.detach().float(), f_m.detach().float())
        with _no_autocast(self.device), torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            nll = club.learning_loss(x, y)
            nll.backward()
            optimizer.step()
        return nll.detach()

    def complementarity(self, f_a: torch.Tensor, f_m: torch.Tensor, k: int = 0) -> torch.Tensor:
        """Î_CLUB(f_g; f_m) of the k-th guide with its estimator held fixed: the gradient reaches
        the follower only."""
        opts = self.method.options
        club = self.clubs[k]
        x, y = self._club_pair(f_a.float(), f_m.float())
        with _no_autocast(self.device):
            if opts.club_direction == "follower_given_anchor":
                with torch.no_grad():  # μ(f_g), σ(f_g) depend on neither the follower nor φ's update
                    mu, logvar = club(x)
            else:
                with _frozen(club):
                    mu, logvar = club(x)
            return club_upper_bound(mu, logvar, y, mode=opts.club_mode, generator=self.negatives)

    def guide_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The guides' prediction: one guide's own logits, or the guides fused by the test-time
        rule (App. A.2: p_ab, the fused prediction of the modalities trained before)."""
        return logits[0] if len(logits) == 1 else fuse(logits, self.method.options.fusion_rule)

    def task_loss(self, cls: torch.Tensor, z_guides: list[torch.Tensor], z_m: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
        """The controller's task loss: the follower's CE, or the CE of the guides and the follower
        fused (the guides carry no gradient, so it is taken w.r.t. the follower only)."""
        if self.method.options.controller_task == "follower_ce":
            return cls
        return F.cross_entropy(fuse([*z_guides, z_m], self.method.options.fusion_rule), y)

    # --- the stage --------------------------------------------------------------------------
    def weights(self) -> tuple[float, float]:
        return self.controller.weights if self.controller is not None else self.static

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        opts = self.method.options
        y = batch["label"]
        guided = self.guide_outputs(batch)
        z_m, f_m = self.follower(batch[self.modality])
        cls = F.cross_entropy(z_m, y)
        z_guides = [z for z, _ in guided]
        con = js_divergence(self.guide_logits(z_guides), z_m, from_logits=True, reduction=opts.con_reduction)
        nlls = [self.fit_estimator(f_g, f_m, k) for k, (_, f_g) in enumerate(guided)]
        bounds = [self.complementarity(f_g, f_m, k) for k, (_, f_g) in enumerate(guided)]
        com = bounds[0] if len(bounds) == 1 else torch.stack(bounds).mean()  # L_com = mean of the bounds
        club_nll = nlls[0] if len(nlls) == 1 else torch.stack(nlls).mean()
        if self.controller is not None:
            if self.controller.due(ctx.step):
                t0 = time.perf_counter()
                self.controller.update(self.task_loss(cls, z_guides, z_m, y), con, com)
                self.controller_seconds += time.perf_counter() - t0
            self.controller.advance()
        lam_con, lam_com = self.weights()
        loss = cls + lam_con * con + lam_com * com
        out = {"loss": loss, "cls": cls.detach(), "con": con.detach(), "com": com.detach(), "club_nll": club_nll}
        if len(bounds) > 1:  # each pair's bound, for the record
            out.update({f"com:{g}": b.detach() for g, b in zip(self.guides, bounds)})
        return out

    def predict(self, batch: Batch) -> torch.Tensor:
        if self.method.options.select_on == "follower":
            return self.follower(batch[self.modality])[0]
        units = [self.anchor_name, *self.method.trained_followers, self.modality]
        models = {m: self.method.model.units[m] for m in units}
        models[self.modality] = self.follower
        # the BatchNorm recalibration passes over the guided training split, whose batches hold the
        # guides' logits (validation batches hold none)
        return fuse([self.unit_outputs(batch, m, models[m])[0] for m in units], self.method.options.fusion_rule)

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
            modalities=[self.modality], train_split=self.train_split,
        )
        fields.update(overrides)
        return Stage(**fields)


TRACE_KEYS = ("epoch", "train_loss", "train_cls", "train_con", "train_com", "train_club_nll", "lambda_con",
              "lambda_com", "ip_con", "ip_com", "controller_updates", "controller_kept_previous",
              "val_accuracy")
PAIR_PREFIX = "train_com:"  # with several guides, each pair's CLUB bound: train_com:<guide>


@register_method("udi")
class UDI(Method):
    summary = "UDI: frozen best unimodal anchor guides each follower (JS + CLUB, dynamic weights)"
    Options = UDIOptions
    min_modalities = 2
    table_order = 50
    # Its own tables and figures (anchor and weight ablations, the controller's trace): a module
    # without torch, as the report runs without it.
    report_module = "udi.report"
    # a follower's step against a unimodal step of the same modality (nox -s perf)
    perf_bound_vs_single = 1.5
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"UDI paper": (83.19, None)},
        "cgmnist": {"UDI paper": (99.11, None)},
    }

    # anchor=auto is the run with the anchor it picks (a sweep that holds both trains it once)
    resolved_options = ("method.anchor",)

    @classmethod
    def same_run_facts(cls, record: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any] | None:
        """The anchor setting is read once, by :func:`select_anchor`, from the unimodal validation
        results every setting computes alike (and records); everything after depends on the
        anchor chosen, not on how. So a run whose setting picks the anchor ``record`` trained is
        that run: it records its own rule and ties."""
        facts = record.get("method_record") or {}
        try:
            choice = select_anchor(facts["unimodal_val_accuracy"], facts["unimodal_val_entropy"],
                                   float(assignments["method.tie_tol"]), str(assignments["method.anchor"]))
        except (KeyError, TypeError, ValueError):
            return None
        if choice.anchor != facts.get("anchor"):
            return None
        return {"anchor_rule": choice.rule, "anchor_tied": choice.tied}

    @classmethod
    def perf_variants(cls, modalities: list[str]) -> list[tuple[str, dict[str, Any]]]:
        # both controller modes, the anchor forced to the first modality so that the follower
        # timed is the last one
        anchor = {"method.anchor": modalities[0]}
        return [("udi (dynamic)", {"method.controller": "dynamic", **anchor}),
                ("udi (static)", {"method.controller": "static", **anchor})]

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
        if self.options.order != "auto":
            given = self.given_order()
            unknown = [m for m in given if m not in self.modalities]
            if unknown or len(set(given)) != len(given) or len(given) < len(self.modalities) - 1 or (
                    anchor != "auto" and set(given) - {anchor} != set(self.modalities) - {anchor}):
                raise UsageError(f"method.order {self.options.order!r} must list every follower of "
                                 f"{self.info.name} once ({', '.join(self.modalities)}, the anchor may be left "
                                 "out); or use auto")

    def given_order(self) -> list[str]:
        return [m.strip() for m in self.options.order.split(",") if m.strip()]

    def build(self) -> nn.Module:
        self.model = UDIModel({m: build_unimodal(self, m) for m in self.modalities})
        self.anchor: str = ""
        self.phase1: dict[str, UnimodalModel] = {}
        self.trained_followers: list[str] = []
        self.follower_order: list[str] = []
        return self.model

    @property
    def followers(self) -> list[str]:
        """The followers in training order (the dataset's order until the anchor phase sets it)."""
        return self.follower_order or [m for m in self.modalities if m != self.anchor]

    def order_followers(self, accuracy: dict[str, float]) -> tuple[list[str], str]:
        """The training order of the followers and the rule that gave it: given, by validation
        accuracy (best first, ties in the dataset's order; App. A.2), or the dataset's order."""
        rest = [m for m in self.modalities if m != self.anchor]
        if self.options.order != "auto":
            given = [m for m in self.given_order() if m != self.anchor]
            if sorted(given) != sorted(rest):
                raise UsageError(f"method.order {self.options.order!r} does not list the followers of anchor "
                                 f"{self.anchor} ({', '.join(rest)}); list them, or use auto")
            return given, "given"
        if self.options.guidance == "anchor":
            return rest, "dataset order"
        return sorted(rest, key=lambda m: (-accuracy[m], rest.index(m))), "validation accuracy"

    def guides_of(self, modality: str) -> list[str]:
        """The frozen modalities that guide ``modality``: the anchor, and with progressive
        guidance every follower trained before it."""
        if self.options.guidance == "anchor":
            return [self.anchor]
        return [self.anchor, *(m for m in self.trained_followers if m != modality)]

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
        self.follower_order, order_rule = self.order_followers(accuracy)
        anchor = self.phase1[self.anchor]
        self.freeze(anchor)
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
            "follower_order": list(self.follower_order),
            "order_rule": order_rule,
            "unimodal_val_accuracy": accuracy,
            "unimodal_val_entropy": mean_entropy,
            "unimodal": infos,
            "reused": {m: bool(info.get("reused")) for m, info in infos.items()},
        }

    # --- phase 2 ----------------------------------------------------------------------------
    def follower_phase(self, trainer: Trainer) -> dict[str, Any]:
        trace, stages, guides = {}, {}, {}
        for m in self.followers:
            phase = FollowerPhase(self, trainer, m)
            guides[m] = list(phase.guides)
            result = trainer.fit(phase.stage())
            self.freeze(phase.follower)
            self.model.units[m] = phase.follower
            self.trained_followers.append(m)
            trace[m] = [{**{k: row.get(k) for k in TRACE_KEYS},
                         **{k: v for k, v in row.items() if k.startswith(PAIR_PREFIX)}} for row in result.history]
            stages[m] = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                         "epochs_run": result.epochs_run}
        opts = self.options
        return {
            "followers": list(self.followers),
            "guidance": opts.guidance,
            "guides": guides,
            "follower_stages": stages,
            "con_reduction": opts.con_reduction,
            "controller": {"mode": opts.controller, "every": opts.controller_every, "task": opts.controller_task,
                           "initial": [opts.lambda_con, opts.lambda_com], "trace": trace},
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """The anchor and the followers in training order (the weights of every one of them are
        ``model.units``, in the state_dict)."""
        return {"anchor": self.anchor, "trained_followers": list(self.trained_followers),
                "follower_order": list(self.follower_order)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.anchor = str(state.get("anchor", ""))
        self.trained_followers = list(state.get("trained_followers", []))
        self.follower_order = list(state.get("follower_order", []))
        for unit in self.model.units.values():  # trained, frozen units, as after training
            self.freeze(unit)

    @staticmethod
    def freeze(model: UnimodalModel) -> None:
        """A trained modality guides the later ones and never changes again: no gradients, eval mode."""
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)  # drop its last training gradients
        model.eval()

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
