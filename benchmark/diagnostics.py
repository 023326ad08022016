"""Imbalance diagnostics of a trained run (METHODS.md, "Imbalance diagnostics").

On the test split, with the selected checkpoint, once per run after training:

- v(S), the accuracy with only the modalities in S present, for every non-empty S (M ≤ 4; for
  M > 4 only N and each N∖{m}); v(∅) = 1/C;
- exact Shapley values φ_m and the imbalance degree (|φ_1 − φ_2| / (φ_1 + φ_2) for two
  modalities, (max φ − min φ) / Σ φ for more);
- conditional utilisation rates u(m | rest) = (v(N) − v(N∖{m})) / v(N) and, for two
  modalities, d_util = u(m_1 | m_2) − u(m_2 | m_1);
- the accuracy with each modality absent (v(N∖{m})) and with Gaussian noise of std
  σ·std(input) added to one modality, σ ∈ NOISE_LEVELS, and the area under accuracy-vs-σ;
- for two modalities, the 2×2 error matrix of the unimodal readouts (or linear probes), split
  by whether the fused prediction is right.

During training, at the end of each epoch: ρ_m = Σ_i p_m,i[y_i] / Σ_i p_other,i[y_i] (more than
two modalities: the ratio to the smallest sum) from the unimodal readouts of the model being
trained (:meth:`Method.training_readouts`), on a fixed sample of training samples.

How a modality is made absent is the method's business (:meth:`Method.predict_subset`): its
input replaced by zeros or by the training-set mean (``absent=mean``), or, for late fusions of
unimodal heads, its head left out; the record says which. Everything here runs in eval mode,
without gradients, and leaves every random-number stream untouched (noise draws from its own
named streams), so a run's training and its other metrics are the same with or without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset

from benchmark.data.base import TensorSplit, iterate_batches
from benchmark.device import derive_seed
from benchmark.errors import UsageError
from benchmark.files import write_atomic
from benchmark.method import EvalOutput
from benchmark.metrics import accuracy, linear_probe_predictions

if TYPE_CHECKING:
    from benchmark.config import RunConfig
    from benchmark.method import Batch, Method, Stage
    from benchmark.trainer import Trainer

NOISE_LEVELS = (0.25, 0.5, 1.0, 2.0)
MAX_SHAPLEY_MODALITIES = 4  # 2^M subset evaluations
RHO_SAMPLES = 256
STATS_CHUNK = 4096  # samples per slice when the input statistics read a split held as tensors  # training samples the ρ trace is computed on, at each epoch's end


# --- the arithmetic ---------------------------------------------------------------------------------
def subset_name(subset: frozenset[str], modalities: Sequence[str]) -> str:
    """``"a+b"`` in the dataset's modality order; ``""`` for the empty set."""
    return "+".join(m for m in modalities if m in subset)


def shapley_values(v: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float]:
    """φ_m = Σ_{S ⊆ N∖{m}} |S|!(M−|S|−1)!/M! · [v(S ∪ {m}) − v(S)]; ``v`` holds every subset."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in combinations(others, size):
                total += weight * (v[frozenset(s) | {m}] - v[frozenset(s)])
        phi[m] = total
    return phi


def imbalance_degree(phi: Mapping[str, float]) -> float | None:
    """|φ_1 − φ_2| / (φ_1 + φ_2) for two modalities, (max − min) / Σ φ for more; None where the
    sum is not positive (a model no better than chance) or there is one modality."""
    values = list(phi.values())
    total = sum(values)
    if len(values) < 2 or not total > 0:
        return None
    return (max(values) - min(values)) / total


def utilisation(v: Mapping[frozenset[str], float], modalities: Sequence[str]) -> dict[str, float | None]:
    """u(m | rest) = (v(N) − v(N∖{m})) / v(N) (None where v(N) = 0)."""
    full = frozenset(modalities)
    return {m: (v[full] - v[full - {m}]) / v[full] if v[full] > 0 else None for m in modalities}


def noise_auc(clean: float, noisy: Sequence[float], levels: Sequence[float] = NOISE_LEVELS) -> float:
    """Area under accuracy-vs-σ from σ = 0 (the clean accuracy) to the largest σ, trapezoids,
    divided by that σ: the mean accuracy over the range."""
    xs, ys = [0.0, *levels], [clean, *noisy]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / xs[-1]


def rho_ratios(scores: Mapping[str, float]) -> dict[str, float | None]:
    """ρ_m from Σ_i p_m,i[y_i]: over the other modality's sum (two), over the smallest (more)."""
    if len(scores) == 2:
        (a, sa), (b, sb) = scores.items()
        return {a: sa / sb if sb > 0 else None, b: sb / sa if sa > 0 else None}
    low = min(scores.values())
    return {m: s / low if low > 0 else None for m, s in scores.items()}


def error_matrix(fused_right: torch.Tensor, right_a: torch.Tensor, right_b: torch.Tensor) -> dict[str, list[list[int]]]:
    """Counts ``[a right][b right]`` (0 wrong, 1 right) among the samples the fused prediction gets
    right and among those it gets wrong."""
    out = {}
    for name, rows in (("fused_right", fused_right), ("fused_wrong", ~fused_right)):
        out[name] = [[int((rows & (right_a == bool(i)) & (right_b == bool(j))).sum()) for j in (0, 1)]
                     for i in (0, 1)]
    return out


# --- helpers ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """The global random streams (CPU and CUDA) are as they were after the block: evaluation
    passes over an augmented split, or a data loader's base seed, draw from them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def evenly_spaced(split: Dataset, count: int) -> Dataset:
    """At most ``count`` samples of ``split``, evenly spaced (every class of a sorted split)."""
    n = len(split)
    step = max(1, math.ceil(n / count))
    idx = torch.arange(0, n, step)[:count]
    return split.subset(idx) if isinstance(split, TensorSplit) else Subset(split, idx.tolist())


def input_stats(trainer: Trainer, modalities: Sequence[str], need_mean: bool = True
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per modality: the training-set mean input (one sample's shape; only when ``need_mean``)
    and the std of all its input values, in float64. A split held as tensors is read in slices
    of STATS_CHUNK samples, without a data loader."""
    split = trainer.data.splits["train"]
    if isinstance(split, TensorSplit):
        batches: Iterable[Batch] = ({m: split.inputs[m][i:i + STATS_CHUNK] for m in modalities}
                                    for i in range(0, len(split), STATS_CHUNK))
    else:
        batches = iterate_batches(split, trainer.cfg.eval_batch_size, shuffle=False,
                                  num_workers=trainer.cfg.num_workers)
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}
    n = 0
    for batch in batches:
        for m in modalities:
            x = batch[m].double()
            if need_mean:
                sums[m] = sums[m] + x.sum(dim=0) if m in sums else x.sum(dim=0)
            totals[m] = totals.get(m, 0.0) + float(x.sum())
            squares[m] = squares.get(m, 0.0) + float((x * x).sum())
            counts[m] = counts.get(m, 0) + x.numel()
        n += len(batch[modalities[0]])
    mean = {m: (s / n).float() for m, s in sums.items()}
    std = {}
    for m in modalities:
        mu = totals[m] / counts[m]
        std[m] = math.sqrt(max(squares[m] / counts[m] - mu * mu, 0.0))
    return mean, std


def sample_shapes(split: Dataset, modalities: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """One sample's input shape per modality."""
    if isinstance(split, TensorSplit):
        return {m: tuple(split.inputs[m].shape[1:]) for m in modalities}
    sample = split[0]
    return {m: tuple(torch.as_tensor(sample[m]).shape) for m in modalities}


def subset_accuracy(method: Method, trainer: Trainer, present: frozenset[str],
                    fill: dict[str, torch.Tensor]) -> float:
    """Test accuracy with only ``present`` modalities (the method decides what absent means)."""
    return trainer.accuracy(lambda b: method.predict_subset(b, present, fill), method.model, "test")


# A late fusion's head logits over the whole test split (CPU, float32) and the labels: every
# subset, and noise on one modality, then need only the fusion rule (and that one head again).
HeadCache = tuple[dict[str, torch.Tensor], torch.Tensor]


def head_cache(method: Method, trainer: Trainer, test: tuple[EvalOutput, torch.Tensor] | None = None) -> HeadCache:
    """From the run's test outputs (``trainer.collect(method.eval_forward, ...)``, whose unimodal
    readouts are a late fusion's heads) when given, else by one pass over the test split."""
    if test is None:
        test = trainer.collect(method.eval_forward, method.model, "test")
    out, labels = test
    return {m: out.unimodal[m] for m in method.modalities}, labels


@torch.inference_mode()
def _fused_accuracy(method: Method, heads: Mapping[str, torch.Tensor], labels: torch.Tensor) -> float:
    return accuracy(method.fuse_heads(dict(heads)), labels)


def cached_subset_accuracy(method: Method, trainer: Trainer, cache: HeadCache, present: frozenset[str]) -> float:
    """:func:`subset_accuracy` of a late fusion from its cached heads."""
    heads, labels = cache
    return _fused_accuracy(method, {m: heads[m] for m in method.modalities if m in present}, labels)


def _noise_stream(trainer: Trainer, modality: str, sigma: float, std: float, seed: int) -> Callable[[Batch], Batch]:
    """Adds N(0, (σ·std)²) to ``modality``'s input, batch after batch, from the run's stream
    ``diagnostics/noise/<modality>/<σ>`` (so it repeats to the bit)."""
    gen = torch.Generator(device=trainer.device)
    gen.manual_seed(derive_seed(seed, f"diagnostics/noise/{modality}/{sigma:g}"))
    scale = sigma * std

    def noisy(batch: Batch) -> Batch:
        x = batch[modality]
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        return {**batch, modality: x + (scale * noise).to(x.dtype)}

    return noisy


def noise_accuracy(method: Method, trainer: Trainer, modality: str, sigma: float, std: float, seed: int,
                   cache: HeadCache | None = None) -> float:
    """Test accuracy with N(0, (σ·std)²) added to ``modality``'s input (see :func:`_noise_stream`).
    With a late fusion's ``cache`` only that modality's head runs again."""
    if cache is None:
        noisy = _noise_stream(trainer, modality, sigma, std, seed)
        return trainer.accuracy(lambda b: method.predict(noisy(b)), method.model, "test")
    heads, labels = cache
    return _fused_accuracy(method, {**heads, modality: noisy_head_logits(method, trainer, modality, sigma, std, seed)},
                           labels)


def noisy_head_logits(method: Method, trainer: Trainer, modality: str, sigma: float, std: float,
                      seed: int) -> torch.Tensor:
    """:meth:`Method.head_logits` of ``modality`` on the noisy test split (CPU, float32). When the
    head is a cached unimodal checkpoint (:meth:`Method.frozen_checkpoint`), the logits are kept
    beside it: the ``unimodal`` run, the ``ensemble`` and any other run of the same seed that
    loads that checkpoint evaluate it on the same noise, so only the first one computes them."""
    memo, key = _noise_memo(method, trainer, modality, sigma, std, seed)
    if memo is not None and memo.exists():
        with contextlib.suppress(Exception):  # unreadable or another key: computed again
            saved = torch.load(memo, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["logits"]
    noisy = _noise_stream(trainer, modality, sigma, std, seed)
    with torch.inference_mode(), _eval_mode(method.model):
        rows = []
        for batch in trainer.batches("test", shuffle=False):
            with trainer.autocast():
                rows.append(method.head_logits(noisy(batch), modality).float().cpu())
    logits = torch.cat(rows)
    if memo is not None:
        with contextlib.suppress(UsageError, OSError):  # a full or read-only cache costs the sharing only
            write_atomic(memo, lambda fh: torch.save({"key": key, "logits": logits}, fh), binary=True)
    return logits


def _noise_memo(method: Method, trainer: Trainer, modality: str, sigma: float, std: float, seed: int
                ) -> tuple[Path | None, dict[str, Any]]:
    """Where the noisy logits of a frozen checkpoint's head are kept, and what they depend on:
    the checkpoint file as written (a retrained one is another file version), the noise stream,
    σ and the input std, the evaluation batches, the device type and precision."""
    checkpoint = method.frozen_checkpoint(modality)
    if not checkpoint:
        return None, {}
    try:
        st = os.stat(checkpoint)
    except OSError:
        return None, {}
    cfg = trainer.cfg
    key = {"checkpoint": Path(checkpoint).name, "mtime_ns": st.st_mtime_ns, "size": st.st_size,
           "modality": modality, "sigma": repr(float(sigma)), "std": repr(float(std)), "seed": seed,
           "eval_batch_size": cfg.eval_batch_size, "test_samples": len(trainer.data.splits["test"]),
           "device_type": trainer.device.type, "amp": str(cfg.amp), "kind": "noisy-head-v1"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(checkpoint).with_suffix(".noise") / f"{digest}.pt", key


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    modes = [(mod, mod.training) for mod in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for mod, flag in modes:
            mod.training = flag


def _evaluated_subsets(modalities: Sequence[str]) -> list[frozenset[str]]:
    full = frozenset(modalities)
    if len(modalities) <= MAX_SHAPLEY_MODALITIES:
        return [frozenset(s) for k in range(1, len(modalities)) for s in combinations(modalities, k)]
    return [full - {m} for m in modalities]


def _float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# --- the diagnostics of one run ---------------------------------------------------------------------
class Diagnostics:
    """Attached to a run's trainer before training (ρ at each epoch's end); :meth:`evaluate` after
    training gives the record's ``metrics["diagnostics"]``. ``seconds`` is the time spent so far."""

    def __init__(self, method: Method, cfg: RunConfig, trainer: Trainer) -> None:
        self.method = method
        self.cfg = cfg
        self.trainer = trainer
        self.seconds = 0.0
        self.rho: list[dict[str, Any]] = []
        self.rho_seconds = 0.0
        self._sample = evenly_spaced(trainer.data.splits["train"], RHO_SAMPLES)
        self._then = trainer.on_epoch_end
        trainer.on_epoch_end = self._epoch_end

    # --- during training ---------------------------------------------------------------------------
    def _epoch_end(self, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        stage = self.trainer.stage
        ratios = self.training_rho(stage) if stage is not None else None
        if ratios is not None:
            self.rho.append({"stage": row.get("stage"), "epoch": row.get("epoch"), "rho": ratios})
        spent = time.perf_counter() - start
        self.rho_seconds += spent
        self.seconds += spent
        if self._then is not None:
            self._then(row)

    @torch.inference_mode()
    def training_rho(self, stage: Stage) -> dict[str, float | None] | None:
        """ρ per modality of the model ``stage`` trains, on the fixed training sample; None if it
        has fewer than two unimodal readouts. Modes and random streams are left as they were."""
        method, trainer = self.method, self.trainer
        modes = [(mod, mod.training) for root in (method.model, stage.module) for mod in root.modules()]
        sums: dict[str, torch.Tensor] = {}
        try:
            method.model.eval()
            stage.module.eval()
            with rng_untouched():
                for batch in iterate_batches(self._sample, self.cfg.eval_batch_size, shuffle=False,
                                             num_workers=self.cfg.num_workers):
                    batch = trainer.to_device(batch)
                    with trainer.autocast():
                        readouts = method.training_readouts(stage, batch)
                    if not readouts or len(readouts) < 2:
                        return None
                    y = batch["label"]
                    idx = torch.arange(len(y), device=y.device)
                    for m, z in readouts.items():
                        p = z.double().softmax(dim=1)[idx, y].sum()
                        sums[m] = sums[m] + p if m in sums else p
        finally:
            for mod, flag in modes:
                mod.training = flag
        if not sums:
            return None
        return {m: _float(r) for m, r in rho_ratios({m: float(s) for m, s in sums.items()}).items()}

    # --- after training ------------------------------------------------------------------------------
    def evaluate(self, test: tuple[EvalOutput, torch.Tensor] | None = None) -> dict[str, Any]:
        """``test``: the run's own test outputs (``trainer.collect(method.eval_forward, ...)``),
        so that the clean accuracy and a late fusion's heads need no pass of their own."""
        start = time.perf_counter()
        with rng_untouched():
            out = self._evaluate(test)
        self.seconds += time.perf_counter() - start
        out.update(rho=self.rho, rho_samples=len(self._sample), rho_seconds=self.rho_seconds,
                   seconds=self.seconds)
        return out

    def _evaluate(self, test_outputs: tuple[EvalOutput, torch.Tensor] | None) -> dict[str, Any]:
        method, trainer, cfg = self.method, self.trainer, self.cfg
        names = list(method.info.modality_names)
        full = frozenset(names)
        by_input = method.absent_rule == "input"
        mean, std = input_stats(trainer, names, need_mean=by_input and cfg.absent == "mean")
        # Token ids have no mean and no Gaussian noise: absent is all padding (id 0), noise is skipped.
        tokens = {spec.name for spec in method.info.modalities if spec.kind == "tokens"}
        fill = {}
        if by_input:
            shapes = sample_shapes(trainer.data.splits["test"], names)
            fill = {m: (mean[m] if m in mean and m not in tokens else torch.zeros(shapes[m])).to(trainer.device)
                    for m in names}
        if test_outputs is None:
            test_outputs = trainer.collect(method.eval_forward, method.model, "test")
        test, labels = test_outputs
        cache = head_cache(method, trainer, test_outputs) if not by_input else None
        clean = accuracy(test.logits, labels)
        v: dict[frozenset[str], float] = {frozenset(): 1.0 / method.info.num_classes, full: clean}
        for subset in _evaluated_subsets(names):
            v[subset] = (cached_subset_accuracy(method, trainer, cache, subset) if cache is not None
                         else subset_accuracy(method, trainer, subset, fill))
        shapley = shapley_values(v, names) if len(names) <= MAX_SHAPLEY_MODALITIES else None
        util = utilisation(v, names)
        noisy = {m: self._noise_curve(m, std[m], clean, labels, cache) for m in names if m not in tokens}
        return {
            "absent": method.absent_rule if method.absent_rule != "input" else cfg.absent,
            "modalities": names,
            "chance": v[frozenset()],
            "subset_accuracy": {subset_name(s, names): acc for s, acc in v.items() if s},
            "shapley": shapley,
            "imbalance_degree": _float(imbalance_degree(shapley)) if shapley else None,
            "absent_accuracy": {m: v[full - {m}] for m in names} if len(names) > 1 else {},
            "utilisation": util,
            "d_util": (util[names[0]] - util[names[1]]
                       if len(names) == 2 and None not in util.values() else None),
            "noise_levels": list(NOISE_LEVELS),
            "noise_accuracy": noisy,
            "noise_auc": {m: noise_auc(clean, accs) for m, accs in noisy.items()},
            "input_std": {m: x for m, x in std.items() if m not in tokens},
            "not_perturbed": sorted(tokens),
            "error_matrix": self._error_matrix(test, labels, names),
        }

    def _noise_curve(self, modality: str, std: float, clean: float, labels: torch.Tensor,
                     cache: HeadCache | None) -> list[float]:
        """The accuracy at each σ of NOISE_LEVELS with noise on ``modality``."""
        method, trainer, seed = self.method, self.trainer, self.cfg.seed
        if modality not in method.modalities_read():  # the prediction does not read it
            return [clean] * len(NOISE_LEVELS)
        if cache is None and method.modalities_read() == [modality] and method.frozen_checkpoint(modality):
            # one frozen model's head is the whole prediction: its (shared) noisy logits decide
            return [accuracy(noisy_head_logits(method, trainer, modality, s, std, seed), labels)
                    for s in NOISE_LEVELS]
        return [noise_accuracy(method, trainer, modality, s, std, seed, cache) for s in NOISE_LEVELS]

    def _error_matrix(self, test: Any, labels: torch.Tensor, names: list[str]) -> dict[str, Any] | None:
        """Two modalities: from the unimodal readouts, else from linear probes on the features."""
        if len(names) != 2:
            return None
        fused_right = test.logits.argmax(dim=1) == labels
        if test.unimodal is not None and all(m in test.unimodal for m in names):
            right = [test.unimodal[m].argmax(dim=1) == labels for m in names]
            source = "readout"
        elif self.cfg.probe and all(m in test.features for m in names):
            train, train_y = self.trainer.collect(self.method.eval_forward, self.method.model, "train")
            right = [torch.as_tensor(linear_probe_predictions(train.features[m], train_y, test.features[m])) == labels
                     for m in names]
            source = "probe"
        else:
            return None
        return {"source": source, "rows": names[0], "columns": names[1], **error_matrix(fused_right, *right)}
