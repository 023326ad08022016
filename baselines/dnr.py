"""``dnr``: Diagnosing & Re-learning (Wei et al., ECCV 2024).

Late fusion trained with the joint cross-entropy on the fused logits (one loss, joint's step).
Every H epochs each encoder is diagnosed and softly re-initialised towards its initial weights.

- **Snapshot.** ``θ_m^init``: the parameters of encoder m at construction, copied once.
- **Diagnosis** (eval mode, no gradient; BatchNorm neither updates nor uses batch statistics):
  the pooled features ``f_m`` of the whole training split (eval transforms, in order) and of the
  validation split; each set scaled separately to [−1, 1] per dimension (MinMax); k-means with
  k = #classes (scikit-learn, ``random_state=0``, ``n_init`` restarts); purity
  ``P = (1/N) Σ_clusters max_class |cluster ∩ class|``;
  ``g_m = |P_m^train − P_m^val|`` and ``a_m = tanh(λ·g_m)``.
- **Re-learning.** ``θ_m ← (1 − a_m)·θ_m + a_m·θ_m^init`` for every parameter of encoder m (BN
  affine parameters included; computed as ``lerp(θ_m, θ_m^init, a_m)``, exact at a = 0 and a = 1).
  BN running buffers, the fusion head and the optimizer state are not touched.
- **When.** At the start of epoch e+1 after an epoch e (0-based) with ``e mod H = 0`` and ``e > 0``,
  at most ``max_reinits`` times.

The diagnosis draws no random number from the streams that fix joint's weights and batch order
(the global streams are restored after it), so with λ = 0 a run is joint's, to the bit.
See docs/methods/dnr.md for the map to the reference code and the deliberate differences.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from baselines.joint import Joint
from benchmark.config import opt
from benchmark.data.base import iterate_batches
from benchmark.device import seeded
from benchmark.diagnostics import rng_untouched
from benchmark.errors import UsageError
from benchmark.method import StepContext, shared_search_space
from benchmark.registry import register_method

KMEANS_SEED = 0  # the reference's random_state


@dataclass
class DnROptions:
    lambda_: float = opt(3.0, "λ: re-learning strength a_m = tanh(λ·|P_train − P_val|) (the paper: 3 on "
                              "CREMA-D, 7 on Kinetics-Sounds and UCF-101, 8 on CMU-MOSI)")
    every: int = opt(20, "H: diagnose after every epoch e (0-based) with e mod H = 0 and e > 0 (the paper: 20; "
                         "5 on CMU-MOSI)")
    max_reinits: int = opt(3, "R: at most this many re-initialisations (the reference code, reinit_num = 3; "
                              "the paper's Alg. 1 has no cap: set it >= epochs/H)")
    n_init: int = opt(10, "k-means restarts (scikit-learn's default before 1.4, which the reference ran; "
                          "'auto' in later releases means 1 for k-means++)")
    restart_patience: bool = opt(True, "early stopping's patience counts from each re-initialisation that moved "
                                       "the weights (a_m > 0), so that the model can recover from it; the best "
                                       "epoch is still chosen over the whole run")

    def validate(self) -> None:
        if not (self.lambda_ >= 0 and math.isfinite(self.lambda_)):
            raise UsageError(f"method.lambda_ must be a finite number >= 0, got {self.lambda_}")
        if self.every < 1:
            raise UsageError(f"method.every must be >= 1 (epochs between diagnoses), got {self.every}")
        if self.max_reinits < 0:
            raise UsageError(f"method.max_reinits must be >= 0, got {self.max_reinits}")
        if self.n_init < 1:
            raise UsageError(f"method.n_init must be >= 1, got {self.n_init}")


# --- the formulas ------------------------------------------------------------------------------
def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """``(1/N) Σ_clusters max_class |cluster ∩ class|`` from integer labels and cluster ids."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    clusters = np.asarray(clusters, dtype=np.int64).ravel()
    if labels.size == 0:
        return 0.0
    _, lab = np.unique(labels, return_inverse=True)
    _, clu = np.unique(clusters, return_inverse=True)
    counts = np.zeros((clu.max() + 1, lab.max() + 1), dtype=np.int64)
    np.add.at(counts, (clu, lab), 1)
    return float(counts.max(axis=1).sum()) / labels.size


def minmax(features: np.ndarray) -> np.ndarray:
    """Each dimension scaled to [−1, 1] over the set (scikit-learn's MinMaxScaler(feature_range=(−1, 1)):
    a constant dimension maps to −1)."""
    from sklearn.preprocessing import MinMaxScaler

    return MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)


def cluster_purity(features: np.ndarray, labels: np.ndarray, num_classes: int, n_init: int) -> float:
    """Purity of k-means (k = #classes, ``random_state=0``) on the MinMax-scaled features."""
    from sklearn.cluster import KMeans

    x = minmax(np.asarray(features, dtype=np.float32))
    k = min(num_classes, len(x))  # scikit-learn refuses more clusters than samples
    pred = KMeans(n_clusters=k, random_state=KMEANS_SEED, n_init=n_init).fit_predict(x)
    return purity(labels, pred)


def strength(p_train: float, p_val: float, lam: float) -> float:
    """``a = tanh(λ·|P_train − P_val|)``."""
    return math.tanh(lam * abs(p_train - p_val))


@torch.no_grad()
def relearn(params: list[torch.Tensor], initial: list[torch.Tensor], a: float) -> None:
    """``θ ← (1 − a)·θ + a·θ^init`` in place, one foreach call (exact at a = 0 and a = 1)."""
    if params and a != 0.0:
        torch._foreach_lerp_(params, initial, a)


def eval_view(split: Any) -> Any:
    """The split with its train-time augmentation switched off (a shallow copy whose per-modality
    transforms have ``train = False``); splits without such transforms are returned as they are."""
    transforms = getattr(split, "transforms", None)
    if not isinstance(transforms, dict) or not any(getattr(t, "train", False) for t in transforms.values()):
        return split
    view = copy.copy(split)
    view.transforms = {}
    for name, t in transforms.items():
        if getattr(t, "train", False):
            t = copy.copy(t)
            t.train = False
        view.transforms[name] = t
    return view


@register_method("dnr")
class DnR(Joint):
    summary = "D&R: joint CE; every H epochs encoders with a large train/val k-means purity gap move back to init"
    table_order = 26
    perf_bound = 1.3
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"D&R paper (Tab. 1)": (75.13, None)},
        "kinetics-sounds": {"D&R paper (Tab. 1)": (69.10, None)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = DnROptions
    min_modalities = 2
    # The reference's CREMA-D setting (ours.py / ours.sh): constant SGD learning rate, 90 epochs.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
        "scheduler": "none", "epochs": 90,
    }

    @classmethod
    def perf_variants(cls, modalities: list[str]) -> list[tuple[str, dict[str, Any]]]:
        # its step is joint's; the second row puts a diagnosis in the timed run (after epoch 1)
        return [("dnr", {}), ("dnr (diagnosis after epoch 1)", {"method.every": 1})]

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.lambda_": trial.suggest_float("method.lambda_", 0.5, 8.0, log=True),
                "method.every": trial.suggest_categorical("method.every", [1, 3, 5, 10, 20])}

    def build(self) -> nn.Module:
        # Built under joint's seed stream: the same seed gives joint's initial weights.
        with seeded(self.cfg.seed, self.stream("build")):
            super().build()
        self.initial = {m: [p.detach().clone() for p in enc.parameters()]
                        for m, enc in self.model.encoders.items()}
        self.diagnoses: list[dict[str, Any]] = []
        self._last: dict[str, Any] = {}
        return self.model

    # --- when ----------------------------------------------------------------------------------
    def due(self, finished_epoch: int) -> bool:
        """Whether a diagnosis follows epoch ``finished_epoch`` (0-based)."""
        o = self.options
        return (finished_epoch > 0 and finished_epoch % o.every == 0
                and len(self.diagnoses) < o.max_reinits)

    def on_epoch_start(self, ctx: StepContext) -> None:
        self._last = {}
        if self.due(ctx.epoch - 1):
            self.diagnose_and_relearn(ctx, ctx.epoch - 1)

    # --- diagnosis -----------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, trainer: Any, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Pooled features per modality and labels of a whole split (eval mode, eval transforms,
        in order), on the host as float32."""
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels: list[torch.Tensor] = []
        data = eval_view(trainer.data.splits[split])
        pin = trainer.device.type == "cuda"
        for batch in iterate_batches(data, self.cfg.eval_batch_size, shuffle=False,
                                     num_workers=self.cfg.num_workers, pin_memory=pin):
            batch = trainer.to_device(batch)
            with trainer.autocast():
                out = self.encode(batch)
            for m, f in out.items():
                feats[m].append(f.float())
            labels.append(batch["label"])
        # one copy to the host per modality and set
        return ({m: torch.cat(fs).flatten(1).cpu().numpy() for m, fs in feats.items()},
                torch.cat(labels).cpu().numpy())

    def diagnose(self, trainer: Any) -> dict[str, Any]:
        """Purities of train and val per modality, their gaps and the strengths a_m."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with rng_untouched():  # a loader's base seed, an augmenting transform: not joint's streams
                train_f, train_y = self.features(trainer, "train")
                val_f, val_y = self.features(trainer, "val")
        finally:
            model.train(was_training)
        c, n_init, lam = self.info.num_classes, self.options.n_init, self.options.lambda_
        out: dict[str, Any] = {"purity_train": {}, "purity_val": {}, "gap": {}, "a": {}}
        for m in self.modalities:
            p_tr = cluster_purity(train_f[m], train_y, c, n_init)
            p_va = cluster_purity(val_f[m], val_y, c, n_init)
            out["purity_train"][m] = p_tr
            out["purity_val"][m] = p_va
            out["gap"][m] = abs(p_tr - p_va)
            out["a"][m] = strength(p_tr, p_va, lam)
        return out

    def relearn_encoders(self, strengths: dict[str, float]) -> None:
        """``θ_m ← (1 − a_m)·θ_m + a_m·θ_m^init`` for every parameter of every encoder."""
        for m, enc in self.model.encoders.items():
            params = list(enc.parameters())
            if params and self.initial[m][0].device != params[0].device:  # the trainer moved the model
                self.initial[m] = [t.to(p.device) for t, p in zip(self.initial[m], params)]
            relearn(params, self.initial[m], strengths[m])

    def diagnose_and_relearn(self, ctx: StepContext, finished_epoch: int) -> None:
        start = time.perf_counter()
        result = self.diagnose(ctx.trainer)
        self.relearn_encoders(result["a"])
        if self.options.restart_patience and max(result["a"].values()) > 0:
            ctx.restart_patience()
        result = {"after_epoch": finished_epoch, **result, "seconds": time.perf_counter() - start}
        self.diagnoses.append(result)
        self._last = result

    # --- the trace -----------------------------------------------------------------------------
    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dnr_reinits": len(self.diagnoses)}
        d = self._last
        if d:
            for m in self.modalities:
                out[f"dnr_purity_train_{m}"] = d["purity_train"][m]
                out[f"dnr_purity_val_{m}"] = d["purity_val"][m]
                out[f"dnr_gap_{m}"] = d["gap"][m]
                out[f"dnr_a_{m}"] = d["a"][m]
            out["dnr_diagnosis_seconds"] = d["seconds"]
        return out

    def record_facts(self) -> dict[str, Any]:
        o = self.options
        return {
            "modalities": list(self.modalities),
            "diagnoses": self.diagnoses,
            "reinits": len(self.diagnoses),
            "scheduled_after_epochs": [e for e in range(1, self.cfg.epochs - 1) if e % o.every == 0][:o.max_reinits],
            "snapshot_parameters": {m: sum(p.numel() for p in ps) for m, ps in self.initial.items()},
            "kmeans": {"random_state": KMEANS_SEED, "n_init": o.n_init},
        }
