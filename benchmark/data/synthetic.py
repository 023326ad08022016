"""``synthetic``: a generator with a known answer.

Latent factors: a shared ``s`` and one unique ``u_m`` per modality. The label is the arg-max of
a random linear score of all factors, so the best accuracy needs every modality. Modality ``m``
sees ``[share_m * s, u_m]`` through a random two-layer tanh map into ``dim`` dimensions, plus
Gaussian noise of std ``noise_m``. ``weight_m`` scales how much ``u_m`` moves the label.

Presets:
- ``imbalanced``: ``m0`` is easy (it sees the shared factor, which carries most of the label,
  almost linearly and with little noise) and ``m1`` is hard but complementary: its own factor
  moves the label through its square (no linear signal) and is buried among label-free
  "clutter" dimensions that a learned encoder must tune out. Joint training fits the training set
  through ``m0`` and leaves ``m1``'s encoder close to its initialisation.
- ``balanced``: every modality alike.
A third and further modality (``modalities=3``) is of medium difficulty. ``synthetic-3m`` is the
same generator with three modalities by default (its own name, so that sweeps and tables keep it
apart from the two-modality set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.data.builder import DatasetBuilder
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

# Per modality, by preset: (share of s seen, noise std, weight of the own factor in the label,
# warp = frequency of the sine map; 0 gives a linear map, larger is harder to decode).
PARAMS = ("share", "noise", "weight", "warp", "square", "clutter")
PRESETS: dict[str, list[tuple[float, ...]]] = {
    "imbalanced": [(1.0, 0.05, 0.5, 0.5, 0, 0), (0.3, 0.1, 2.0, 1.0, 1, 3.0), (0.5, 0.2, 1.0, 0.5, 0, 1.0)],
    "balanced": [(0.7, 0.2, 1.0, 0.5, 0, 0), (0.7, 0.2, 1.0, 0.5, 0, 0), (0.7, 0.2, 1.0, 0.5, 0, 0)],
}


def _floats(text: str, name: str, count: int) -> list[float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"dataset.{name} expects comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise UsageError(f"dataset.{name} needs {count} values (one per modality), got {len(values)}")
    return values


@dataclass
class SyntheticOptions:
    preset: str = opt("imbalanced", "imbalanced or balanced")
    modalities: int = opt(2, "number of modalities (2 or more)")
    num_classes: int = opt(4, "number of classes")
    n_train: int = opt(4000, "training samples")
    n_val: int = opt(1000, "validation samples")
    n_test: int = opt(2000, "test samples")
    dim: int = opt(32, "input dimension of every modality")
    latent_dim: int = opt(8, "dimension of the shared factor and of each unique factor")
    shared_weight: float = opt(2.0, "how much the shared factor moves the label")
    share: str = opt("", "per-modality share of the shared factor seen, e.g. '1,0.3' (default: preset)")
    noise: str = opt("", "per-modality noise std, e.g. '0.05,0.6' (default: preset)")
    weight: str = opt("", "per-modality weight of the unique factor in the label (default: preset)")
    warp: str = opt("", "per-modality frequency of the sine map, 0 = linear (default: preset)")
    square: str = opt("", "per modality, 1 if its unique factor moves the label through its square (default: preset)")
    clutter: str = opt("", "per modality, std of label-free nuisance dimensions mixed in, 0 = none (default: preset)")
    seed: int = opt(0, "seed of the generator (the data, not the run)")

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(f"dataset.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.modalities < 2:
            raise UsageError(f"dataset.modalities must be >= 2, got {self.modalities}")
        if self.num_classes < 2:
            raise UsageError(f"dataset.num_classes must be >= 2, got {self.num_classes}")
        for name in ("n_train", "n_val", "n_test", "dim", "latent_dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"dataset.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("noise", "clutter"):  # standard deviations
            values = _floats(getattr(self, name), name, self.modalities) or []
            if any(not 0 <= v < float("inf") for v in values):
                raise UsageError(f"dataset.{name} values must be finite and >= 0, got {getattr(self, name)!r}")

    def per_modality(self) -> list[dict[str, float]]:
        base = PRESETS[self.preset]
        rows = [base[min(i, len(base) - 1)] for i in range(self.modalities)]
        columns = [list(col) for col in zip(*rows)]
        for k, name in enumerate(PARAMS):
            given = _floats(getattr(self, name), name, self.modalities)
            if given is not None:
                columns[k] = given
        return [dict(zip(PARAMS, row)) for row in zip(*columns)]


def generate(options: SyntheticOptions, dataset_name: str = "synthetic") -> MultimodalData:
    rng = np.random.default_rng(options.seed)
    params = options.per_modality()
    k, d = options.num_classes, options.latent_dim
    n_total = options.n_train + options.n_val + options.n_test
    shared = rng.standard_normal((n_total, d))
    unique = [rng.standard_normal((n_total, d)) for _ in params]
    score = options.shared_weight * shared @ rng.standard_normal((d, k)) / np.sqrt(d)
    for p, u in zip(params, unique):
        effect = (u**2 - 1) / np.sqrt(2) if p["square"] else u
        score += p["weight"] * effect @ rng.standard_normal((d, k)) / np.sqrt(d)
    labels = score.argmax(axis=1)
    inputs = {}
    for m, (p, u) in enumerate(zip(params, unique)):
        share, noise, warp, clutter = p["share"], p["noise"], p["warp"], p["clutter"]
        latent = np.concatenate([share * shared, u], axis=1)
        proj = latent @ rng.standard_normal((2 * d, 4 * options.dim)) / np.sqrt(2 * d)
        hidden = np.sin(warp * proj) if warp > 0 else proj
        x = hidden @ rng.standard_normal((4 * options.dim, options.dim)) / np.sqrt(4 * options.dim)
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
        x = x + noise * rng.standard_normal(x.shape)
        if clutter > 0:  # label-free structure a learned encoder must tune out
            dims = options.dim
            nuisance = clutter * rng.standard_normal((n_total, dims))
            rotation = np.linalg.qr(rng.standard_normal((2 * dims, 2 * dims)))[0]
            x = (np.concatenate([x, nuisance], axis=1) @ rotation)[:, : 2 * dims]
        inputs[f"m{m}"] = x
    bounds = np.cumsum([0, options.n_train, options.n_val, options.n_test])
    splits = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:]):
        splits[name] = TensorSplit(
            {m: torch.from_numpy(x[lo:hi]).float() for m, x in inputs.items()},
            torch.from_numpy(labels[lo:hi]),
        )
    info = DataInfo(
        name=dataset_name,
        modalities=[ModalitySpec(m, "vector", (x.shape[1],), "mlp") for m, x in inputs.items()],
        num_classes=k,
        classes=[str(c) for c in range(k)],
    )
    manifest = {"recipe": {"per_modality": params}}
    return MultimodalData(info, splits, manifest)


@register_dataset("synthetic")
class SyntheticDataset(DatasetBuilder):
    Options = SyntheticOptions
    summary = "generated latent-factor data with a known imbalance (offline, instant)"

    def load(self) -> MultimodalData:
        return generate(self.options)


@dataclass
class SyntheticThreeOptions(SyntheticOptions):
    modalities: int = opt(3, "number of modalities (2 or more)")


@register_dataset("synthetic-3m")
class SyntheticThreeDataset(DatasetBuilder):
    Options = SyntheticThreeOptions
    summary = "the synthetic generator with three modalities (easy m0, hard m1, medium m2)"

    def load(self) -> MultimodalData:
        return generate(self.options, "synthetic-3m")
