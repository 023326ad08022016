"""Imbalance diagnostics: Shapley values, utilisation, robustness, error matrix, ρ trace."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_run

from benchmark.config import build_config
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.device import seed_everything, seeded
from benchmark.diagnostics import (
    NOISE_LEVELS,
    Diagnostics,
    cached_subset_accuracy,
    error_matrix,
    head_cache,
    imbalance_degree,
    noise_accuracy,
    noise_auc,
    rho_ratios,
    shapley_values,
    subset_accuracy,
    utilisation,
)
from benchmark.errors import UsageError
from benchmark.method import create_method
from benchmark.metrics import accuracy
from benchmark.registry import METHODS, list_methods
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

F = frozenset


# --- the arithmetic -----------------------------------------------------------------------------------
def test_shapley_of_an_ignored_modality_is_zero():
    v = {F(): 0.25, F("a"): 0.8, F("b"): 0.25, F("ab"): 0.8}
    phi = shapley_values(v, ["a", "b"])
    assert phi == {"a": pytest.approx(0.8 - 0.25), "b": 0.0}
    assert imbalance_degree(phi) == pytest.approx(1.0)


def test_shapley_three_modalities_by_hand():
    # v(S) = sum of per-modality gains plus a bonus for {a, b} together: the bonus is split in two
    gain = {"a": 0.3, "b": 0.2, "c": 0.1}
    v = {F(s): 0.1 + sum(gain[m] for m in s) + (0.06 if {"a", "b"} <= set(s) else 0.0)
         for s in ["", "a", "b", "c", "ab", "ac", "bc", "abc"]}
    phi = shapley_values(v, ["a", "b", "c"])
    assert phi["a"] == pytest.approx(0.33) and phi["b"] == pytest.approx(0.23) and phi["c"] == pytest.approx(0.1)
    assert sum(phi.values()) == pytest.approx(v[F("abc")] - v[F()])
    assert imbalance_degree(phi) == pytest.approx((0.33 - 0.1) / 0.66)


def test_imbalance_degree_and_utilisation():
    assert imbalance_degree({"a": 0.3, "b": 0.1}) == pytest.approx(0.5)
    assert imbalance_degree({"a": 0.1, "b": -0.1}) is None  # no better than chance: undefined
    v = {F(): 0.1, F("a"): 0.6, F("b"): 0.4, F("ab"): 0.8}
    u = utilisation(v, ["a", "b"])
    assert u == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}


def test_noise_auc_rho_and_error_matrix():
    assert noise_auc(0.8, [0.8] * 4) == pytest.approx(0.8)
    # trapezoids over 0, .25, .5, 1, 2 of a curve falling linearly from 1 to 0 at σ = 2
    assert noise_auc(1.0, [1 - s / 2 for s in NOISE_LEVELS]) == pytest.approx(0.5)
    assert rho_ratios({"a": 30.0, "b": 10.0}) == {"a": 3.0, "b": pytest.approx(1 / 3)}
    assert rho_ratios({"a": 30.0, "b": 10.0, "c": 20.0}) == {"a": 3.0, "b": 1.0, "c": 2.0}
    fused = torch.tensor([True, True, False, False, True])
    a = torch.tensor([True, False, False, True, True])
    b = torch.tensor([True, True, False, False, False])
    m = error_matrix(fused, a, b)
    assert m["fused_right"] == [[0, 1], [1, 1]] and m["fused_wrong"] == [[1, 0], [1, 0]]


# --- on trained models -----------------------------------------------------------------------------------
def _balanced_data(copy: bool = False, classes: int = 4, per_class: int = 20) -> MultimodalData:
    """Two vector modalities; ``a`` carries the label, ``b`` is noise (or, with ``copy``, a copy of
    ``a``). Every split has the same number of samples per class."""
    gen = torch.Generator().manual_seed(0)

    def split(n_per: int) -> TensorSplit:
        y = torch.arange(classes).repeat_interleave(n_per)
        a = torch.nn.functional.one_hot(y, 8).float() * 2 + 0.3 * torch.randn(len(y), 8, generator=gen)
        b = a.clone() if copy else torch.randn(len(y), 8, generator=gen)
        return TensorSplit({"a": a, "b": b}, y)

    specs = [ModalitySpec(m, "vector", (8,), "mlp") for m in ("a", "b")]
    return MultimodalData(DataInfo("balanced", specs, classes),
                          {"train": split(per_class * 2), "val": split(per_class), "test": split(per_class)})


def _train(method_name: str, data: MultimodalData, **overrides):
    """Train ``method_name`` on in-code data; returns the method, its trainer and the diagnostics
    object (attached before training, as the runner does)."""
    cfg = build_config({"method": method_name, "epochs": 3, "batch_size": 16, "lr": 0.05, **overrides})
    seed_everything(cfg.seed)
    trainer = Trainer(cfg, data, torch.device("cpu"))
    method = create_method(method_name, data.info, cfg)
    with seeded(cfg.seed, f"method/{method_name}/build"):
        method.build()
    diagnostics = Diagnostics(method, cfg, trainer)
    method.run(trainer)
    return method, trainer, diagnostics


def _clean_accuracy(method, trainer) -> float:
    out, y = trainer.collect(method.eval_forward, method.model, "test")
    return accuracy(out.logits, y)


def test_model_built_to_ignore_a_modality_gets_zero_shapley():
    data = _balanced_data()
    # joint with the head's weights on b's features zeroed: b cannot move the prediction
    method, trainer, diagnostics = _train("joint", data)
    with torch.no_grad():
        method.model.head.fc.weight[:, method.model.head.dims["a"]:] = 0
    d = diagnostics.evaluate()
    assert d["subset_accuracy"]["b"] == 0.25  # a absent: one constant prediction on balanced classes
    assert d["shapley"]["b"] == 0.0
    assert d["shapley"]["a"] == pytest.approx(d["subset_accuracy"]["a+b"] - 0.25, abs=1e-12)
    assert d["subset_accuracy"]["a+b"] > 0.5
    # unimodal on a: built to use a alone
    method, trainer, diagnostics = _train("unimodal", data, **{"method.modality": "a"})
    d = diagnostics.evaluate()
    assert d["shapley"]["b"] == 0.0 and d["utilisation"]["b"] == 0.0
    assert d["shapley"]["a"] == pytest.approx(_clean_accuracy(method, trainer) - 0.25, abs=1e-12)


@pytest.mark.parametrize("method_name", ["joint", "ensemble"])
def test_symmetric_construction_gives_equal_shapley(method_name):
    data = _balanced_data(copy=True)  # b is a copy of a
    method, trainer, diagnostics = _train(method_name, data, fusion="sum")
    with torch.no_grad():  # b's encoder and weights become a's
        if method_name == "joint":
            method.model.encoders["b"].load_state_dict(method.model.encoders["a"].state_dict())
            method.model.head.fcs["b"].load_state_dict(method.model.head.fcs["a"].state_dict())
        else:
            method.model["b"].load_state_dict(method.model["a"].state_dict())
    d = diagnostics.evaluate()
    assert d["subset_accuracy"]["a"] == d["subset_accuracy"]["b"]
    assert d["shapley"]["a"] == d["shapley"]["b"]
    assert d["imbalance_degree"] == 0.0
    assert d["absent"] == ("zeros" if method_name == "joint" else "head")


@pytest.mark.parametrize("method_name", ["joint", "udi", "mla", "ensemble"])
def test_noise_of_zero_gives_the_clean_accuracy(method_name):
    data = _balanced_data()
    method, trainer, _ = _train(method_name, data)
    clean = _clean_accuracy(method, trainer)
    cache = head_cache(method, trainer) if method.absent_rule == "head" else None
    for m in ("a", "b"):
        assert noise_accuracy(method, trainer, m, 0.0, std=1.0, seed=0) == clean
        assert noise_accuracy(method, trainer, m, 0.0, std=1.0, seed=0, cache=cache) == clean
    # large noise on the informative modality hurts; each (modality, σ) repeats to the bit
    assert noise_accuracy(method, trainer, "a", 4.0, std=1.0, seed=0) < clean
    assert noise_accuracy(method, trainer, "a", 1.0, 1.0, 0) == noise_accuracy(method, trainer, "a", 1.0, 1.0, 0)
    if cache is not None:  # a late fusion's cached heads give what its full prediction gives
        assert noise_accuracy(method, trainer, "a", 1.0, 1.0, 0, cache) == noise_accuracy(method, trainer, "a", 1.0, 1.0, 0)
        for present in (F("a"), F("b"), F("ab")):
            assert cached_subset_accuracy(method, trainer, cache, present) == subset_accuracy(method, trainer, present, {})
        assert cached_subset_accuracy(method, trainer, cache, F("ab")) == clean


def test_absent_mean_fills_the_training_mean():
    data = _balanced_data()
    method, trainer, diagnostics = _train("joint", data, absent="mean")
    d = diagnostics.evaluate()
    assert d["absent"] == "mean"
    mean_b = data.splits["train"].inputs["b"].mean(dim=0)
    assert d["subset_accuracy"]["a"] == subset_accuracy(method, trainer, F("a"), {"a": mean_b, "b": mean_b})
    with pytest.raises(UsageError, match="absent"):
        build_config({"absent": "noise"})


# --- every method, through the runner ------------------------------------------------------------------
ROLLING = {"ensemble", "unimodal"}  # no model trained on several modalities at once: no ρ trace


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("method", list_methods())
def test_every_record_carries_diagnostics(method: str, modalities: int, tiny: dict, tmp_path) -> None:
    max_m = METHODS.get(method).max_modalities
    if max_m is not None and modalities > max_m:
        pytest.skip(f"{method} takes at most {max_m} modalities")
    record = execute(prepare(build_config(dict(tiny, method=method, epochs=1, **{"dataset.modalities": modalities}))),
                     cache_dir=str(tmp_path))
    m, d = record["metrics"], record["metrics"]["diagnostics"]
    names = d["modalities"]
    assert len(names) == modalities and d["chance"] == 1 / 4
    full = "+".join(names)
    assert d["subset_accuracy"][full] == m["accuracy"]
    assert len(d["subset_accuracy"]) == 2 ** modalities - 1
    # efficiency: the Shapley values share out v(N) − v(∅)
    assert sum(d["shapley"].values()) == pytest.approx(m["accuracy"] - d["chance"], abs=1e-12)
    assert d["absent"] == ("head" if METHODS.get(method).absent_rule == "head" else "zeros")
    for name in names:
        assert d["absent_accuracy"][name] == d["subset_accuracy"]["+".join(n for n in names if n != name)]
        assert len(d["noise_accuracy"][name]) == len(NOISE_LEVELS)
        assert all(0.0 <= a <= 1.0 for a in d["noise_accuracy"][name])
    if modalities == 2 and method != "unimodal":
        em = d["error_matrix"]
        assert sum(map(sum, em["fused_right"])) == round(m["accuracy"] * 64)
        assert sum(map(sum, em["fused_right"] + em["fused_wrong"])) == 64
    if method in ROLLING:
        assert d["rho"] == []
    else:
        assert d["rho"], "ρ per epoch for every method with unimodal readouts"
        assert all(set(row["rho"]) <= set(names) and len(row["rho"]) >= 2 for row in d["rho"])
        if modalities == 2:
            r = d["rho"][-1]["rho"]
            assert r[names[0]] * r[names[1]] == pytest.approx(1.0)
        else:
            assert min(d["rho"][-1]["rho"].values()) == pytest.approx(1.0)
    assert d["seconds"] >= d["rho_seconds"] >= 0.0
    assert all(math.isfinite(x) for x in d["input_std"].values())


def test_more_than_four_modalities_skip_shapley(tiny: dict) -> None:
    d = execute(prepare(build_config(dict(tiny, method="joint", **{"dataset.modalities": 5}))))["metrics"]["diagnostics"]
    assert d["shapley"] is None and d["imbalance_degree"] is None
    assert len(d["subset_accuracy"]) == 1 + 5 and len(d["absent_accuracy"]) == 5


@pytest.mark.parametrize("method", ["joint", "udi", "ogm_ge"])
def test_diagnostics_repeat_and_leave_training_alone(method: str, tiny: dict, tmp_path) -> None:
    cfg = dict(tiny, method=method)
    first = execute(prepare(build_config(cfg)))
    again = execute(prepare(build_config(cfg)))
    off = execute(prepare(build_config(dict(cfg, diagnostics=False))))
    assert "diagnostics" not in off["metrics"]
    assert_same_run(first, off)
    assert_same_run(first, again)
    strip = ("seconds", "rho_seconds")
    d1, d2 = ({k: v for k, v in r["metrics"]["diagnostics"].items() if k not in strip} for r in (first, again))
    assert d1 == d2  # bit for bit: noise from its own named streams


def test_fusion_without_readouts_uses_probes_and_has_no_rho(tiny: dict) -> None:
    record = execute(prepare(build_config(dict(tiny, method="joint", fusion="gated", epochs=1))))
    d = record["metrics"]["diagnostics"]
    assert d["rho"] == [] and d["error_matrix"]["source"] == "probe"
    assert sum(map(sum, d["error_matrix"]["fused_right"] + d["error_matrix"]["fused_wrong"])) == 64
    assert sum(d["shapley"].values()) == pytest.approx(record["metrics"]["accuracy"] - d["chance"], abs=1e-12)
    em, probes = d["error_matrix"], record["metrics"]["probe_accuracy"]
    assert sum(em["fused_right"][1]) + sum(em["fused_wrong"][1]) == round(probes[em["rows"]] * 64)
    columns_right = sum(row[1] for row in em["fused_right"] + em["fused_wrong"])
    assert columns_right == round(probes[em["columns"]] * 64)


def test_input_stats_match_a_direct_computation():
    from benchmark.diagnostics import input_stats

    data = _balanced_data()
    method, trainer, _ = _train("joint", data, epochs=1)
    mean, std = input_stats(trainer, ["a", "b"])
    for m in ("a", "b"):
        x = data.splits["train"].inputs[m].double()
        assert torch.allclose(mean[m].double(), x.mean(dim=0), atol=1e-6)
        assert std[m] == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
    no_mean, same_std = input_stats(trainer, ["a", "b"], need_mean=False)
    assert no_mean == {} and same_std == pytest.approx(std, rel=1e-12)


@pytest.mark.parametrize("method_name", ["joint", "ensemble"])
def test_diagnostics_from_the_runs_test_outputs_equal_their_own_pass(method_name):
    """The runner hands its test outputs over; the diagnostics are those of a fresh pass."""
    data = _balanced_data()
    method, trainer, diagnostics = _train(method_name, data)
    own = diagnostics.evaluate()
    given = diagnostics.evaluate(trainer.collect(method.eval_forward, method.model, "test"))
    for d in (own, given):
        d.pop("seconds")
    assert given == own
