"""G-Blending: the weight formula (hand check, degenerate cases), the deltas, the schedule, the
hold-out carved from train (disjoint from T, the validation and the test splits), the estimate
(copies leave the model and the global stream untouched), equivalence with 1/(M+1) × multi_loss
when estimation is off, and command-line runs with 2 and 3 modalities."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run

from baselines.gblending import blend_weights, deltas, super_epoch_starts
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.data.base import iterate_batches
from benchmark.device import derive_seed
from benchmark.errors import UsageError
from benchmark.method import StepContext, create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

FAST = {"method.gb_epochs": 1, "method.warmup_epochs": 1, "method.super_epoch": 1, "diagnostics": False}

# --- the formulas ------------------------------------------------------------------------------


def test_hand_check_weights() -> None:
    """ΔG = (0.2, 0.1, 0.3), ΔO = (0.1, 0.05, 0.3) ⇒ ΔG/ΔO² = (20, 40, 3.33) ⇒ w = (0.3158, 0.6316, 0.0526)."""
    w = blend_weights([0.2, 0.1, 0.3], [0.1, 0.05, 0.3])
    assert w == pytest.approx([0.3158, 0.6316, 0.0526], abs=1e-4)
    assert sum(w) == pytest.approx(1.0)
    assert blend_weights([0.2, 0.1, 0.3], [0.1, -0.05, 0.3], "abs") == pytest.approx(w, abs=1e-12)  # ΔO squared


def test_degenerate_cases() -> None:
    # clip: a negative ΔG counts 0; a zero gap is floored at 1e-8; all zero ⇒ equal weights
    assert blend_weights([-0.1, 0.2], [0.1, 0.1]) == [0.0, 1.0]
    assert blend_weights([-0.1, -0.2, 0.0], [0.1, 0.1, 0.1]) == pytest.approx([1 / 3] * 3)
    assert blend_weights([1e-9, 0.0], [0.0, 0.1]) == pytest.approx([1e-9 / 1e-8 / (0.1), 0.0])
    # abs: |ΔG/ΔO²|, as the re-implementations
    assert blend_weights([-0.1, 0.1], [0.1, 0.1], "abs") == pytest.approx([0.5, 0.5])


def test_deltas_follow_the_paper() -> None:
    # ΔG = L^V_N − L^V_{N+n}; ΔO = (L^V_{N+n} − L^T′_{N+n}) − (L^V_N − L^T′_N)
    dg, do = deltas(before_v=[1.0, 2.0], before_t=[0.9, 1.5], after_v=[0.8, 1.9], after_t=[0.5, 1.0])
    assert dg == pytest.approx([0.2, 0.1])
    assert do == pytest.approx([(0.8 - 0.5) - (1.0 - 0.9), (1.9 - 1.0) - (2.0 - 1.5)])


def test_online_schedule() -> None:
    assert super_epoch_starts(22, 10, 5) == [0, 10, 15, 20]
    assert super_epoch_starts(3, 10, 5) == [0]
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"), ModalitySpec("v", "vector", (6,), "mlp")],
                    num_classes=3)
    online = create_method("gblending", info, build_config({"method": "gblending", "epochs": 20}))
    assert [online.estimate_epochs_at(e) for e in (0, 1, 10, 15, 16)] == [10, None, 5, 5, None]
    short = create_method("gblending", info, build_config({"method": "gblending", "epochs": 12}))
    assert [short.estimate_epochs_at(e) for e in (0, 10)] == [10, 2]  # the last super-epoch ends with the run
    offline = create_method("gblending", info, build_config({"method": "gblending", "epochs": 20,
                                                              "method.schedule": "offline"}))
    assert [offline.estimate_epochs_at(e) for e in (0, 10)] == [20, None]
    off = create_method("gblending", info, build_config({"method": "gblending", "method.schedule": "off"}))
    assert off.estimate_epochs_at(0) is None


# --- hold-out, estimate ------------------------------------------------------------------------


def _prepared(tiny: dict, **options):
    run = prepare(build_config(dict(tiny, method="gblending", **{f"method.{k}": v for k, v in options.items()})))
    run.method.build()
    run.method.make_splits(run.data)
    trainer = Trainer(run.cfg, run.data, run.device)
    stage = run.method.stage()
    return run, trainer, (lambda epoch: StepContext(trainer, stage, epoch, 0, 6, []))


def _rows(split) -> set[bytes]:
    return {t.numpy().tobytes() for t in split.inputs["m0"]}


def test_holdout_is_carved_from_train_and_disjoint(tiny: dict) -> None:
    run, _, _ = _prepared(tiny)
    m = run.method
    n = len(run.data.splits["train"])
    v, t, p = set(m.holdout_indices.tolist()), set(m.train_indices.tolist()), set(m.probe_indices.tolist())
    assert not v & t and v | t == set(range(n)) and p <= t
    assert len(v) == pytest.approx(0.08 * n, abs=run.data.info.num_classes) and len(p) == len(v)
    # stratified: every class is in V
    labels = run.data.splits["train"].labels.numpy()
    assert set(labels[m.holdout_indices]) == set(labels.tolist())
    # the samples of V are none of the validation or test samples, nor any of T
    held = _rows(m.holdout_set)
    assert not held & _rows(run.data.splits["val"]) and not held & _rows(run.data.splits["test"])
    assert not held & _rows(m.train_set) and _rows(m.probe_set) <= _rows(m.train_set)
    # seeded from the method's own stream: the same seed gives the same V
    again, _, _ = _prepared(tiny)
    assert np.array_equal(again.method.holdout_indices, m.holdout_indices)
    assert np.array_equal(again.method.probe_indices, m.probe_indices)
    # "val": V is the model-selection split, T the whole of train
    val, _, _ = _prepared(tiny, gb_holdout="val")
    assert val.method.holdout_set is val.data.splits["val"] and len(val.method.train_indices) == n


def test_a_run_trains_on_t_only(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="gblending", **{"method.schedule": "off", "diagnostics": False})))
    seen: list[torch.Tensor] = []
    original = run.method.training_step

    def spy(batch, ctx):
        seen.append(batch["m0"])
        return original(batch, ctx)

    run.method.training_step = spy  # type: ignore[method-assign]
    record = execute(run)
    trained = {r.numpy().tobytes() for r in torch.cat(seen)}
    assert trained == _rows(run.method.train_set) and not trained & _rows(run.method.holdout_set)
    assert record["method_record"]["train_size"] + record["method_record"]["holdout_size"] == 192


def test_estimate_leaves_model_and_global_stream_untouched(tiny: dict) -> None:
    run, _, ctx = _prepared(tiny, gb_epochs=1)
    m = run.method
    state = {k: v.clone() for k, v in m.model.state_dict().items()}
    rng = torch.get_rng_state()
    m.on_epoch_start(ctx(0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in m.model.state_dict().items())  # BN statistics too
    assert m.model.training
    (est,) = m.estimates
    w = list(est["weights"].values())
    assert sum(w) == pytest.approx(1.0) and all(x >= 0 for x in w)
    assert w == pytest.approx(blend_weights(list(est["delta_g"].values()), list(est["delta_o"].values())))
    assert m.weights.tolist() == pytest.approx(w)
    # the "before" losses are the model's on V: ΔG = L^V_N − L^V_{N+n} for the fused copy
    before = m.measure(ctx(0).trainer, m.model, m.holdout_set)
    y = m.holdout_set.labels
    with torch.no_grad():
        m.model.eval()
        fused = torch.nn.functional.cross_entropy(m.predict(dict(m.holdout_set.inputs, label=y)), y).item()
        m.model.train()
    assert before[-1] == pytest.approx(fused, abs=1e-5)
    # the copies' batches come from the method's own stream: the same estimate again gives the same weights
    again, _, ctx2 = _prepared(tiny, gb_epochs=1)
    again.method.on_epoch_start(ctx2(0))
    assert again.method.estimates[0]["weights"] == pytest.approx(est["weights"])
    gen = torch.Generator().manual_seed(derive_seed(run.cfg.seed, "method/gblending/copies/0/batches"))
    assert len(list(iterate_batches(m.train_set, 32, shuffle=True, generator=gen))) == 6


def test_accuracy_metric(tiny: dict) -> None:
    run, _, ctx = _prepared(tiny, gb_epochs=1, gb_metric="accuracy")
    before = run.method.measure(ctx(0).trainer, run.method.model, run.method.holdout_set)
    assert all(-1 <= x <= 0 for x in before)  # −accuracy
    run.method.on_epoch_start(ctx(0))
    assert sum(run.method.estimates[0]["weights"].values()) == pytest.approx(1.0)


# --- invariance --------------------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [2, 3])
def test_equal_weights_are_multi_loss_over_m_plus_one(tiny: dict, modalities: int) -> None:
    """Estimation off, w_k = 1/(M+1) ⇒ loss and gradients = 1/(M+1) × multi_loss's (λ_uni = 1),
    from the same initial weights (multi_loss's streams)."""
    base = dict(tiny, seed=3, **{"dataset.modalities": modalities})
    gb = prepare(build_config(dict(base, method="gblending", **{"method.schedule": "off"})))
    ml = prepare(build_config(dict(base, method="multi_loss")))
    from benchmark.method import build_method

    build_method(gb.method)
    build_method(ml.method)
    sg, sm = gb.method.model.state_dict(), ml.method.model.state_dict()
    assert sg.keys() == sm.keys() and all(torch.equal(sg[k], sm[k]) for k in sg)
    batch = next(iterate_batches(gb.data.splits["train"], 32, shuffle=False))
    out_g = gb.method.training_step(batch, None)  # type: ignore[arg-type]
    out_m = ml.method.training_step(batch, None)  # type: ignore[arg-type]
    torch.testing.assert_close(out_g["loss"], out_m["loss"] / (modalities + 1))
    out_g["loss"].backward()
    out_m["loss"].backward()
    for (name, pg), (_, pm) in zip(gb.method.model.named_parameters(), ml.method.model.named_parameters()):
        torch.testing.assert_close(pg.grad, pm.grad / (modalities + 1), msg=name)


def test_same_seed_repeats(tiny: dict) -> None:
    cfg = dict(tiny, method="gblending", seed=2, **FAST)
    assert_same_run(execute(prepare(build_config(cfg))), execute(prepare(build_config(cfg))))



def test_offline_estimate_with_the_validation_split_as_holdout(tiny: dict) -> None:
    cfg = dict(tiny, method="gblending", **{"method.schedule": "offline", "method.gb_holdout": "val",
                                            "method.train_probe": "all", "diagnostics": False})
    record = execute(prepare(build_config(cfg)))
    facts = record["method_record"]
    assert [(e["epoch"], e["copy_epochs"]) for e in facts["estimates"]] == [(0, tiny["epochs"])]
    assert facts["holdout_source"] == "val" and facts["train_size"] == facts["probe_size"] == 192
    assert facts["holdout_size"] == 64
    assert all(row["gblending_estimate_epoch"] == 0 for row in record["history"])
    assert record["history"][-1]["gblending_w_fused"] == pytest.approx(facts["weights"]["fused"])

# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "gblending", "--dataset", "synthetic", "--set", "epochs=2",
            "--set", "dataset.n_train=128", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", f"dataset.modalities={modalities}", "--set", "method.gb_epochs=1",
            "--set", "method.warmup_epochs=1", "--set", "method.super_epoch=1",
            "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("gblending-*.json")
    record = json.loads(path.read_text())
    heads = [f"m{i}" for i in range(modalities)] + ["fused"]
    facts = record["method_record"]
    assert facts["heads"] == heads and [e["epoch"] for e in facts["estimates"]] == [0, 1]
    for row, est in zip(record["history"], facts["estimates"]):
        assert row["gblending_estimate_epoch"] == est["epoch"]
        assert sum(row[f"gblending_w_{h}"] for h in heads) == pytest.approx(1.0, abs=1e-5)
        for h in heads:
            assert row[f"gblending_w_{h}"] == pytest.approx(est["weights"][h], abs=1e-6)
            assert math.isfinite(row[f"gblending_dG_{h}"]) and math.isfinite(row[f"gblending_dO_{h}"])
            assert row[f"gblending_dG_{h}"] == pytest.approx(est["delta_g"][h])


def test_bad_options_are_refused(tmp_path, capsys) -> None:
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"), ModalitySpec("v", "vector", (6,), "mlp")],
                    num_classes=3)
    for key, value in (("gb_holdout", "1.5"), ("gb_holdout", "test"), ("gb_metric", "f1"),
                       ("nonpositive", "zero"), ("schedule", "weekly"), ("train_probe", "half"),
                       ("copy_lr", "fixed"), ("warmup_epochs", "0"), ("super_epoch", "0"), ("gb_epochs", "-1")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            create_method("gblending", info, build_config({"method": "gblending", f"method.{key}": value}))
    assert main(["run", "--method", "gblending", "--set", "method.schedule=weekly", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path)]) == 2
    assert "method.schedule" in capsys.readouterr().err
