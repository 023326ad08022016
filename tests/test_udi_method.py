"""The ``udi`` method end to end: the frozen anchor, invariance to the unimodal baseline, the
record, reuse of unimodal checkpoints, options."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import host_syncs

from benchmark.cli import main
from benchmark.config import build_config
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import StepContext
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer
from udi.method import UDI, FollowerPhase


def _udi(tiny: dict, **options) -> dict:
    return dict(tiny, method="udi", **{f"method.{k}": v for k, v in options.items()})


def _phase1(cfg_items: dict) -> tuple[UDI, Trainer]:
    run = prepare(build_config(cfg_items))
    trainer = Trainer(run.cfg, run.data, run.device)
    method = run.method
    with seeded(run.cfg.seed, "method/udi/build"):
        method.build()
    method.anchor_phase(trainer)
    return method, trainer


@pytest.mark.parametrize("options", [
    dict(controller="dynamic", controller_every="1"),
    dict(controller="dynamic", club_direction="anchor_given_follower", club_mode="sampled",
         follower_init="unimodal"),
])
def test_anchor_is_bitwise_unchanged_and_gets_no_gradient(tiny: dict, options: dict) -> None:
    method, trainer = _phase1(_udi(tiny, **options))
    anchor = method.model.units[method.anchor]
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    assert any("running_mean" in k for k in before), "the encoder has BatchNorm statistics to protect"
    method.model.train()  # whatever sets the model to train mode, the anchor stays in eval mode
    facts = method.follower_phase(trainer)
    after = anchor.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None and not p.requires_grad for p in anchor.parameters())
    assert not anchor.training
    trace = facts["controller"]["trace"][method.followers[0]]
    assert len(trace) == tiny["epochs"] and all(row["controller_updates"] > 0 for row in trace)
    # the follower did train, and its epochs passed through the controller
    follower = method.model.units[method.followers[0]]
    assert any(not torch.equal(p, q) for p, q in zip(follower.parameters(),
                                                     method.phase1[method.followers[0]].parameters()))


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _stage_rows(record: dict, stage: str) -> list[dict]:
    return [row for row in record["history"] if row["stage"] == stage]


def test_static_zero_weights_train_the_follower_exactly_as_the_unimodal_baseline(tiny: dict) -> None:
    base = dict(tiny, epochs=3)
    uni_run = prepare(build_config(dict(base, method="unimodal", **{"method.modality": "m1"})))
    uni = execute(uni_run)
    zero = dict(anchor="m0", controller="static", lambda_con=0, lambda_com=0, follower_init="scratch")
    udi_run = prepare(build_config(_udi(base, select_on="follower", **zero)))
    udi = execute(udi_run)
    assert _weights_equal(udi_run.method.model.units["m1"], uni_run.method.model)
    uni_rows, udi_rows = _stage_rows(uni, "unimodal:m1"), _stage_rows(udi, "udi:follower:m1")
    assert len(uni_rows) == len(udi_rows) == 3
    for u, d in zip(uni_rows, udi_rows):
        assert u["train_loss"] == d["train_loss"] == d["train_cls"]
        assert u["val_accuracy"] == d["val_accuracy"]
    assert udi["metrics"]["unimodal_accuracy"]["m1"] == uni["metrics"]["accuracy"]
    # with the default selection (the fused validation accuracy) the training itself is the same
    fused = execute(prepare(build_config(_udi(base, **zero))))
    assert [r["train_loss"] for r in _stage_rows(fused, "udi:follower:m1")] == [r["train_loss"] for r in uni_rows]
    # and a non-zero weight does change it (the comparison can fail)
    con = execute(prepare(build_config(_udi(base, **dict(zero, lambda_con=0.5)))))
    assert [r["train_cls"] for r in _stage_rows(con, "udi:follower:m1")] != [r["train_loss"] for r in uni_rows]


def test_record_holds_anchor_choice_and_controller_trace_on_three_modalities(tiny: dict, tmp_path: Path) -> None:
    record = execute(prepare(build_config(_udi(dict(tiny, **{"dataset.modalities": 3}), controller_every="2"))),
                     cache_dir=str(tmp_path))
    facts = record["method_record"]
    acc = facts["unimodal_val_accuracy"]
    assert set(acc) == {"m0", "m1", "m2"} and set(facts["unimodal_val_entropy"]) == set(acc)
    assert acc[facts["anchor"]] >= max(acc.values()) - 0.005
    assert sorted(facts["followers"]) == [m for m in ("m0", "m1", "m2") if m != facts["anchor"]]
    assert facts["followers"] == facts["follower_order"]  # progressive: by validation accuracy, best first
    assert [acc[m] for m in facts["followers"]] == sorted((acc[m] for m in facts["followers"]), reverse=True)
    assert facts["reused"] == {"m0": False, "m1": False, "m2": False}
    for m in facts["followers"]:
        trace = facts["controller"]["trace"][m]
        assert [row["epoch"] for row in trace] == list(range(tiny["epochs"]))
        for row in trace:
            assert row["lambda_con"] + row["lambda_com"] == pytest.approx(1.0, abs=1e-6) or row[
                "controller_kept_previous"]
            assert row["controller_updates"] >= 1 and math.isfinite(row["ip_con"]) and math.isfinite(row["ip_com"])
            s_con, s_com = max(0.0, row["ip_con"]), max(0.0, row["ip_com"])
            if not row["controller_kept_previous"]:  # the recorded weights follow from the recorded products
                assert row["lambda_con"] == pytest.approx(s_con / (s_con + s_com), rel=1e-9)
            for key in ("train_cls", "train_con", "train_com", "train_club_nll"):
                assert math.isfinite(row[key])
            assert 0.0 <= row["train_con"] <= math.log(2)
    rows = [r for r in record["history"] if r["stage"].startswith("udi:follower:")]
    assert rows and all("lambda_con" in r and "ip_com" in r for r in rows)
    assert set(record["metrics"]["unimodal_accuracy"]) == {"m0", "m1", "m2"}
    assert set(record["metrics"]["probe_accuracy"]) == {"m0", "m1", "m2"}
    assert record["config"]["method_options"]["controller_every"] == "2"


def test_static_mode_keeps_the_given_weights_and_computes_no_inner_products(tiny: dict) -> None:
    record = execute(prepare(build_config(_udi(tiny, controller="static", lambda_con=0.2, lambda_com=0.7))))
    for row in record["method_record"]["controller"]["trace"]["m1"]:
        assert (row["lambda_con"], row["lambda_com"]) == (0.2, 0.7)
        assert row["ip_con"] is None and row["controller_updates"] == 0


def test_anchor_reuses_the_unimodal_baselines_checkpoints(tiny: dict, tmp_path: Path) -> None:
    cache = str(tmp_path)
    uni = {m: execute(prepare(build_config(dict(tiny, method="unimodal", **{"method.modality": m}))),
                      cache_dir=cache) for m in ("m0", "m1")}
    record = execute(prepare(build_config(_udi(tiny, anchor="m1"))), cache_dir=cache)
    facts = record["method_record"]
    assert facts["reused"] == {"m0": True, "m1": True}
    assert facts["anchor"] == "m1" and facts["anchor_rule"] == "forced"
    for m in ("m0", "m1"):
        assert facts["unimodal"][m]["checkpoint"] == uni[m]["method_record"]["unimodal"][m]["checkpoint"]
        assert facts["unimodal_val_accuracy"][m] == uni[m]["metrics"]["val_accuracy"]
    # the frozen anchor predicts exactly as the unimodal run of its modality
    assert record["metrics"]["unimodal_accuracy"]["m1"] == uni["m1"]["metrics"]["accuracy"]


def test_unimodal_initialisation_starts_from_the_phase1_weights(tiny: dict) -> None:
    method, trainer = _phase1(_udi(tiny, anchor="m0", follower_init="unimodal"))
    phase = FollowerPhase(method, trainer, "m1")
    assert _weights_equal(phase.follower, method.phase1["m1"])
    assert phase.follower is not method.phase1["m1"]
    method, trainer = _phase1(_udi(tiny, anchor="m0"))
    assert not _weights_equal(FollowerPhase(method, trainer, "m1").follower, method.phase1["m1"])


@pytest.mark.parametrize("rule", ["logit_sum", "prob_mean", "entropy"])
def test_eval_forward_fuses_every_modality(tiny: dict, rule: str) -> None:
    run = prepare(build_config(_udi(tiny, fusion_rule=rule, controller="static")))
    record = execute(run)
    batch = {k: v[:5] for k, v in run.data.splits["test"].inputs.items()}
    with torch.no_grad():
        out = run.method.eval_forward(batch)
    assert set(out.unimodal) == set(out.features) == {"m0", "m1"}
    assert out.logits.shape == (5, run.data.info.num_classes)
    if rule == "logit_sum":
        assert torch.allclose(out.logits, out.unimodal["m0"] + out.unimodal["m1"])
    assert record["config"]["method_options"]["fusion_rule"] == rule


@pytest.mark.parametrize("key, value, match", [
    ("controller", "adaptive", "method.controller"),
    ("controller_every", "0", "controller_every"),
    ("controller_every", "often", "controller_every"),
    ("lambda_con", "-1", "lambda_con"),
    ("tie_tol", "nan", "tie_tol"),
    ("club_mode", "pairs", "club_mode"),
    ("club_direction", "up", "club_direction"),
    ("club_hidden", "0", "club_hidden"),
    ("club_lr", "0", "club_lr"),
    ("fusion_rule", "vote", "fusion_rule"),
    ("follower_init", "random", "follower_init"),
    ("select_on", "test", "select_on"),
    ("anchor", "m7", "not a modality"),
    ("club_hiden", "3", "unknown option"),
])
def test_bad_options_are_refused(tiny: dict, key: str, value: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        prepare(build_config(_udi(tiny, **{key: value})))


def test_command_line_run_writes_the_controller_trace(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [sys.executable, "-m", "benchmark", "run", "--method", "udi", "--dataset", "synthetic",
            "--epochs", "2", "--out", str(tmp_path), "--set", "dataset.n_train=128", "--set", "dataset.n_val=64",
            "--set", "dataset.n_test=64", "--set", "probe=false"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.glob("udi-synthetic-*.json")
    facts = json.loads(path.read_text())["method_record"]
    assert facts["controller"]["mode"] == "dynamic" and len(facts["controller"]["trace"]["m1"]) == 2
    # a bad option: one line on stderr, exit status 2, no record
    code = main(args[3:] + ["--set", "method.controller=sometimes", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method.controller" in err[0]
    assert not (tmp_path / "bad").exists()


# --- host-device synchronisation -----------------------------------------------------------------



@pytest.mark.parametrize("options", [
    dict(),
    dict(controller="static"),
    dict(club_mode="sampled", club_direction="anchor_given_follower", controller_every="3"),
])
def test_follower_steps_never_wait_for_the_device_outside_the_controller(tiny: dict, options: dict) -> None:
    """Only a step that computes the controller reads values (its inner products) on the host;
    every other follower step (losses, the estimator's update, sampled negatives) stays on the
    device."""
    method, trainer = _phase1(_udi(tiny, **options))
    phase = FollowerPhase(method, trainer, method.followers[0])
    stage = phase.stage()
    quiet, controller_steps = [], []
    step = stage.step

    def guarded(batch, ctx):
        due = phase.controller is not None and phase.controller.due(ctx.step)
        with host_syncs() as calls:
            out = step(batch, ctx)
        (controller_steps if due else quiet).append(calls)
        return out

    stage.step = guarded
    trainer.fit(stage)
    assert len(quiet) + len(controller_steps) == 2 * 6
    assert quiet and all(calls == [] for calls in quiet), quiet
    if phase.controller is not None:  # the guard does see the controller's reads
        assert controller_steps and all(any("controller.py" in c for c in calls) for calls in controller_steps)


@pytest.mark.parametrize("direction", ["follower_given_anchor", "anchor_given_follower"])
def test_estimator_steps_on_its_likelihood_and_the_bound_trains_the_follower_only(tiny: dict, direction: str) -> None:
    method, trainer = _phase1(_udi(tiny, club_direction=direction, controller="static"))
    phase = FollowerPhase(method, trainer, method.followers[0])
    batch = next(trainer.batches("train", shuffle=False))
    with torch.no_grad():
        _, f_a = phase.anchor(batch[phase.anchor_name])
        f_m = phase.follower(batch[phase.modality])[1]
    x, y = (f_a, f_m) if direction == "follower_given_anchor" else (f_m, f_a)
    nll_before = phase.club.learning_loss(x, y).item()
    out = phase.step(batch, StepContext(trainer, phase.stage(), 0, 0, 6, []))
    # one step of the estimator's own optimizer, on the detached features, raised their likelihood
    assert out["club_nll"].item() == pytest.approx(nll_before, rel=1e-6)
    assert phase.club.learning_loss(x, y).item() < nll_before
    estimator_grads = [p.grad.clone() for p in phase.club.parameters()]
    # the follower's loss (CE + JS + CLUB bound) adds nothing to φ's gradients, and reaches the follower
    out["loss"].backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(phase.club.parameters(), estimator_grads))
    com_grads = torch.autograd.grad(phase.complementarity(f_a, phase.follower(batch[phase.modality])[1]),
                                    list(phase.follower.encoder.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in com_grads)
    assert all(p.grad is None for p in phase.anchor.parameters())
