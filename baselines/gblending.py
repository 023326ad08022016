"""``gblending``: Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020).

MultiLoss's model (encoders, the fused head, a separate linear head per modality: heads 1..M
unimodal, head M+1 fused) trained with a weighted sum of the heads' cross-entropies:

- **Loss** (Eq. 7): ``L = Σ_{k=1}^{M+1} w_k·CE(z_k, y)``, ``Σ_k w_k = 1``; the weights are fixed
  between estimates.
- **Data.** A hold-out V (``gb_holdout`` = 8 % of train, stratified, drawn from the stream
  ``method/gblending/holdout``) is carved from the training split; the model trains on
  ``T = train ∖ V``. The validation and test splits are never touched. ``T′ ⊂ T`` is a fixed random
  subset of size |V| (stream ``method/gblending/train_probe``) on which the train loss is measured.
- **Estimate at checkpoint N** (Alg. 1): for each head k a copy of its sub-network (encoder m and
  head m, or every encoder and the fused head) is trained n epochs on T with that head's CE only
  (fresh optimizer, the run's settings at the current learning rate). In eval mode, before and after:
  ``ΔG_k = L^V_N − L^V_{N+n}``, ``ΔO_k = (L^V_{N+n} − L^T′_{N+n}) − (L^V_N − L^T′_N)``, and
  ``w_k = (ΔG_k/ΔO_k²) / Σ_j (ΔG_j/ΔO_j²)``. ``gb_metric=accuracy`` uses −accuracy in place of L.
- **Degenerate cases.** ``nonpositive=clip``: ``ΔG ← max(ΔG, 0)``, ``ΔO² ← max(ΔO², 1e-8)``, equal
  weights if every ratio is 0; ``abs``: ``|ΔG/ΔO²|`` (the re-implementations).
- **Schedule.** ``online`` (Alg. 3): an estimate at the start of each super-epoch, the first lasting
  ``warmup_epochs`` (10), the later ones ``super_epoch`` (5); ``offline`` (Alg. 2): one estimate from
  the initial model, its copies trained for the whole run's epochs; ``off``: fixed equal weights.

The M unimodal copies train together in one pass (their losses reach disjoint parameters, so the
sum trains each as if alone); the fused copy trains in a second pass. See docs/methods/gblending.md.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from baselines.joint import MultiLoss
from benchmark.config import opt
from benchmark.data.base import MultimodalData, TensorSplit, iterate_batches, split_labels, stratified_split
from benchmark.device import derive_seed, seeded
from benchmark.errors import UsageError
from benchmark.method import Batch, EvalOutput, StepContext, make_optimizer
from benchmark.registry import register_method

SCHEDULES = ("online", "offline", "off")
METRICS = ("loss", "accuracy")
NONPOSITIVE = ("clip", "abs")
PROBES = ("holdout_size", "all")
COPY_LRS = ("current", "initial")
MIN_GAP_SQ = 1e-8  # ΔO² floor


@dataclass
class GBlendingOptions:
    gb_holdout: str = opt("0.08", "hold-out V: a fraction of train (carved out, stratified; the model trains on "
                                  "the rest) or 'val' (the model-selection split: it then leaks into selection)")
    train_probe: str = opt("holdout_size", "T′ where the train loss is measured: holdout_size (a fixed random "
                                           "subset of T of |V| samples) or all (the whole of T)")
    gb_metric: str = opt("loss", "what G and O are measured in: loss (cross-entropy) or accuracy")
    nonpositive: str = opt("clip", "degenerate ΔG/ΔO: clip (ΔG ← max(ΔG, 0), ΔO² ≥ 1e-8) or abs (|ΔG/ΔO²|, "
                                   "the re-implementations)")
    schedule: str = opt("online", "online (re-estimate at each super-epoch start, Alg. 3), offline (one "
                                  "estimate from the initial model over the whole run, Alg. 2) or off "
                                  "(fixed equal weights 1/(M+1))")
    warmup_epochs: int = opt(10, "length of the first super-epoch (paper §3.3: 10)")
    super_epoch: int = opt(5, "length of every later super-epoch (paper §3.3: 5)")
    gb_epochs: int = opt(0, "n: epochs each copy trains per estimate; 0 = the super-epoch's length, cut "
                            "at the run's end (offline: the run's epochs)")
    copy_lr: str = opt("current", "copies' learning rate: current (the main optimizer's at the estimate) "
                                  "or initial (the configured lr)")

    def holdout_fraction(self) -> float | None:
        """The hold-out fraction, or None for the validation split."""
        return None if self.gb_holdout == "val" else float(self.gb_holdout)

    def validate(self) -> None:
        if self.gb_holdout != "val":
            try:
                frac = float(self.gb_holdout)
            except ValueError:
                frac = math.nan
            if not 0 < frac < 1:
                raise UsageError(f"method.gb_holdout must be a fraction in (0, 1) or 'val', got {self.gb_holdout!r}")
        for name, choices in (("train_probe", PROBES), ("gb_metric", METRICS), ("nonpositive", NONPOSITIVE),
                              ("schedule", SCHEDULES), ("copy_lr", COPY_LRS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"method.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("warmup_epochs", "super_epoch"):
            if getattr(self, name) < 1:
                raise UsageError(f"method.{name} must be >= 1, got {getattr(self, name)}")
        if self.gb_epochs < 0:
            raise UsageError(f"method.gb_epochs must be >= 0 (0: the super-epoch's length), got {self.gb_epochs}")


# --- the formulas ------------------------------------------------------------------------------
def blend_weights(delta_g: list[float], delta_o: list[float], nonpositive: str = "clip") -> list[float]:
    """``w_k = (ΔG_k/ΔO_k²) / Σ_j (ΔG_j/ΔO_j²)`` with the degenerate-case rule (clip or abs);
    equal weights when every ratio is 0."""
    ratios = []
    for g, o in zip(delta_g, delta_o):
        gap = max(o * o, MIN_GAP_SQ)
        ratios.append(max(g, 0.0) / gap if nonpositive == "clip" else abs(g / gap))
    total = sum(ratios)
    if not total > 0 or not math.isfinite(total):
        return [1.0 / len(ratios)] * len(ratios)
    return [r / total for r in ratios]


def deltas(before_v: list[float], before_t: list[float], after_v: list[float], after_t: list[float]
           ) -> tuple[list[float], list[float]]:
    """``ΔG = G^V_N − G^V_{N+n}``, ``ΔO = (G^V_{N+n} − G^T′_{N+n}) − (G^V_N − G^T′_N)`` per head."""
    dg = [b - a for b, a in zip(before_v, after_v)]
    do = [(av - at) - (bv - bt) for bv, bt, av, at in zip(before_v, before_t, after_v, after_t)]
    return dg, do


def super_epoch_starts(epochs: int, warmup: int, length: int) -> list[int]:
    """Epochs (0-based) at which an online estimate is made: 0, warmup, warmup + length, …"""
    starts = [0] if epochs > 0 else []
    e = warmup
    while e < epochs:
        starts.append(e)
        e += length
    return starts


def _subset(split: Dataset, indices: np.ndarray) -> Dataset:
    if isinstance(split, TensorSplit):
        return split.subset(indices)
    return Subset(split, [int(i) for i in indices])


@register_method("gblending")
class GBlending(MultiLoss):
    summary = "G-Blending: heads' CEs weighted by ΔG/ΔO² estimated on a hold-out carved from train"
    Options = GBlendingOptions  # type: ignore[assignment]
    min_modalities = 2
    table_order = 25
    shares_streams_with = "multi_loss"  # multi_loss's initial weights and batch order for a seed
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MMPareto paper (Tab. 1)": (72.01, None),
                    "BalanceBenchmark (1 run, test-selected)": (71.59, None),
                    "D&R paper (Tab. 1)": (69.89, None), "DGL paper (Tab. 1)": (69.21, None),
                    "InfoReg paper (Tab. 2)": (69.11, None)},
        "kinetics-sounds": {"MMPareto paper (Tab. 1)": (68.90, None),
                            "BalanceBenchmark (1 run, test-selected)": (68.82, None),
                            "D&R paper (Tab. 1)": (68.60, None), "DGL paper (Tab. 1)": (69.60, None),
                            "InfoReg paper (Tab. 2)": (68.33, None)},
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        from benchmark.method import shared_search_space

        return {**shared_search_space(trial),
                "method.gb_metric": trial.suggest_categorical("method.gb_metric", list(METRICS))}

    # --- building ----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        with seeded(self.cfg.seed, self.stream("build")):  # multi_loss's weights for the seed
            super().build()
        self.heads = [*self.modalities, "fused"]
        k = len(self.heads)
        self.weights = torch.full((k,), 1.0 / k)
        self._weights_dev: torch.Tensor | None = None
        self.estimates: list[dict[str, Any]] = []
        self.copy_seconds = 0.0
        self.train_set: Dataset | None = None
        self.holdout_set: Dataset | None = None
        self.probe_set: Dataset | None = None
        self.train_indices = self.holdout_indices = self.probe_indices = np.zeros(0, dtype=np.int64)
        return self.model

    def set_weights(self, weights: list[float]) -> None:
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self._weights_dev = None

    def make_splits(self, data: MultimodalData) -> None:
        """V, T and T′ (indices into the training split; V = the validation split with 'val')."""
        train = data.splits["train"]
        o = self.options
        frac = o.holdout_fraction()
        if frac is None:
            self.train_indices = np.arange(len(train))
            self.holdout_indices = np.zeros(0, dtype=np.int64)
            self.train_set, self.holdout_set = train, data.splits["val"]
        else:
            kept, carved = stratified_split(split_labels(train), frac,
                                            derive_seed(self.cfg.seed, f"method/{self.name}/holdout"))
            self.train_indices, self.holdout_indices = kept, carved
            self.train_set, self.holdout_set = _subset(train, kept), _subset(train, carved)
        n_probe = len(self.holdout_set)  # type: ignore[arg-type]
        if o.train_probe == "all" or n_probe >= len(self.train_indices):
            self.probe_indices = self.train_indices
        else:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, f"method/{self.name}/train_probe"))
            self.probe_indices = np.sort(rng.choice(self.train_indices, size=n_probe, replace=False))
        self.probe_set = _subset(train, self.probe_indices)

    def run(self, trainer: Any) -> dict[str, Any]:
        self.make_splits(trainer.data)
        stage = self.stage()
        stage.train_split = self.train_set  # the loop's batches and BatchNorm statistics: T only
        trainer.fit(stage)
        return self.record_facts()

    # --- training ----------------------------------------------------------------------------
    def head_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of every head (unimodal heads in modality order, then the fused head) and the fused logits."""
        feats = self.encode(batch)
        logits = self.model.head(feats)
        y = batch["label"]
        ces = [F.cross_entropy(self.model.unimodal_heads[m](f), y) for m, f in feats.items()]
        ces.append(F.cross_entropy(logits, y))
        return torch.stack(ces), logits

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        ces, _ = self.head_losses(batch)
        if self._weights_dev is None or self._weights_dev.device != ces.device:
            self._weights_dev = self.weights.to(ces.device)
        loss = torch.dot(self._weights_dev.to(ces.dtype), ces)
        return {"loss": loss, "joint_ce": ces[-1].detach(), "unimodal_ce": ces[:-1].detach().sum()}

    def eval_forward(self, batch: Batch) -> EvalOutput:
        return super().eval_forward(batch)  # fused logits at test time, the separate heads as readouts

    # --- the estimate (Alg. 1) ---------------------------------------------------------------
    def estimate_epochs_at(self, epoch: int) -> int | None:
        """n for an estimate at ``epoch``, or None when no estimate is made there."""
        o = self.options
        if o.schedule == "off":
            return None
        if o.schedule == "offline":
            return (o.gb_epochs or self.cfg.epochs) if epoch == 0 else None
        if epoch not in super_epoch_starts(self.cfg.epochs, o.warmup_epochs, o.super_epoch):
            return None
        length = o.warmup_epochs if epoch == 0 else o.super_epoch
        return o.gb_epochs or min(length, self.cfg.epochs - epoch)  # a super-epoch ends with the run

    def on_epoch_start(self, ctx: StepContext) -> None:
        n = self.estimate_epochs_at(ctx.epoch)
        if n is None or self.train_set is None:
            return
        lr = ctx.optimizers[0].param_groups[0]["lr"] if self.options.copy_lr == "current" and ctx.optimizers \
            else self.cfg.lr
        self.estimate(ctx, n, lr)

    @torch.no_grad()
    def measure(self, trainer: Any, model: nn.Module, split: Dataset) -> list[float]:
        """Per head: mean CE (or −accuracy) over ``split``, in eval mode."""
        was_training = model.training
        model.eval()
        k = len(self.heads)
        loss_sum = torch.zeros(k, dtype=torch.float64)
        hits = torch.zeros(k, dtype=torch.float64)
        total = 0
        try:
            for batch in iterate_batches(split, self.cfg.eval_batch_size, shuffle=False):
                batch = trainer.to_device(batch)
                y = batch["label"]
                with trainer.autocast():
                    feats = {m: enc(batch[m]) for m, enc in model.encoders.items()}
                    logits = [model.unimodal_heads[m](f) for m, f in feats.items()] + [model.head(feats)]
                z = torch.stack([t.float() for t in logits])  # K×B×C
                ce = F.cross_entropy(z.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).sum(1)
                loss_sum += ce.double().cpu()
                hits += (z.argmax(-1) == y).sum(1).double().cpu()
                total += len(y)
        finally:
            model.train(was_training)
        if self.options.gb_metric == "accuracy":
            return (-hits / max(total, 1)).tolist()
        return (loss_sum / max(total, 1)).tolist()

    def train_copy(self, ctx: StepContext, copy_model: nn.Module, fused: bool, epochs: int, lr: float,
                   seed_key: str) -> None:
        """Train a copy for ``epochs`` on T: the fused CE (fused) or the sum of the unimodal CEs,
        each of which reaches only its own encoder and head."""
        params = [*copy_model.encoders.parameters(),
                  *(copy_model.head.parameters() if fused else copy_model.unimodal_heads.parameters())]
        optimizer = make_optimizer(params, self.cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, seed_key))
        trainer = ctx.trainer
        copy_model.train()
        assert self.train_set is not None
        for _ in range(epochs):
            for batch in iterate_batches(self.train_set, self.cfg.batch_size, shuffle=True, generator=generator):
                if len(batch["label"]) < 2:
                    continue
                batch = trainer.to_device(batch)  # type: ignore[attr-defined]
                y = batch["label"]
                with ctx.autocast():
                    feats = {m: enc(batch[m]) for m, enc in copy_model.encoders.items()}
                    if fused:
                        loss = F.cross_entropy(copy_model.head(feats), y)
                    else:
                        loss = sum(F.cross_entropy(copy_model.unimodal_heads[m](f), y) for m, f in feats.items())
                optimizer.zero_grad(set_to_none=True)
                ctx.backward(loss)
                ctx.optimizer_step(optimizer)

    def estimate(self, ctx: StepContext, epochs: int, lr: float) -> None:
        """Alg. 1 at the current model: copies trained ``epochs`` per head, then the weights."""
        t0 = time.perf_counter()
        trainer = ctx.trainer
        assert self.holdout_set is not None and self.probe_set is not None
        model = self.model
        before_v = self.measure(trainer, model, self.holdout_set)
        before_t = self.measure(trainer, model, self.probe_set)
        after_v, after_t = list(before_v), list(before_t)
        stream = f"method/{self.name}/copies/{ctx.epoch}"
        with seeded(self.cfg.seed, stream):  # dropout in the copies: the global RNG is left as it was
            for fused in (False, True):
                twin = copy.deepcopy(model)
                self.train_copy(ctx, twin, fused, epochs, lr, f"{stream}/batches")
                v, t = self.measure(trainer, twin, self.holdout_set), self.measure(trainer, twin, self.probe_set)
                cols = [len(self.heads) - 1] if fused else list(range(len(self.modalities)))
                for c in cols:
                    after_v[c], after_t[c] = v[c], t[c]
                del twin
        dg, do = deltas(before_v, before_t, after_v, after_t)
        weights = blend_weights(dg, do, self.options.nonpositive)
        self.set_weights(weights)
        seconds = time.perf_counter() - t0
        self.copy_seconds += seconds
        self.estimates.append({"epoch": ctx.epoch, "copy_epochs": epochs, "lr": lr, "seconds": seconds,
                               "weights": dict(zip(self.heads, weights)),
                               "delta_g": dict(zip(self.heads, dg)), "delta_o": dict(zip(self.heads, do))})
        trainer.log(f"[{self.name}] epoch {ctx.epoch}: weights "
                    + ", ".join(f"{h} {w:.3f}" for h, w in zip(self.heads, weights)))

    # --- the trace ---------------------------------------------------------------------------
    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"gblending_w_{h}": w for h, w in zip(self.heads, self.weights.tolist())}
        if self.options.schedule != "off":
            last = self.estimates[-1] if self.estimates else None
            out["gblending_estimate_epoch"] = last["epoch"] if last else -1
            for h in self.heads:
                out[f"gblending_dG_{h}"] = last["delta_g"][h] if last else 0.0
                out[f"gblending_dO_{h}"] = last["delta_o"][h] if last else 0.0
        return out

    def record_facts(self) -> dict[str, Any]:
        o = self.options
        return {
            "heads": list(self.heads),
            "schedule": o.schedule,
            "weights": dict(zip(self.heads, self.weights.tolist())),
            "estimates": list(self.estimates),
            "holdout_source": "val" if o.holdout_fraction() is None else "train",
            "holdout_size": len(self.holdout_set) if self.holdout_set is not None else 0,  # type: ignore[arg-type]
            "train_size": len(self.train_indices),
            "probe_size": len(self.probe_indices),
            "copy_seconds": self.copy_seconds,
        }
