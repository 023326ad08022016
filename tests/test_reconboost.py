"""ReconBoost: the reconcilement weight (hand check), phase 1 as plain unimodal training when
w₂ = 0, the inert memory consolidation, the stage schedule and the CLI on 2 and 3 modalities."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.reconboost import boost_weights, learner_loss
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.errors import UsageError
from benchmark.method import create_method
from benchmark.runner import execute, prepare


def _info(sizes=(6, 6)) -> DataInfo:
    specs = [ModalitySpec(f"m{i}", "vector", (s,), "mlp") for i, s in enumerate(sizes)]
    return DataInfo("vec", specs, num_classes=6)


def _method(sizes=(6, 6), **options):
    cfg = build_config({"method": "reconboost", **{f"method.{k}": v for k, v in options.items()}})
    m = create_method("reconboost", _info(sizes), cfg)
    m.build()
    return m


def _batch(sizes=(6, 6), n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {f"m{i}": torch.randn(n, s, generator=g) for i, s in enumerate(sizes)}
    batch["label"] = torch.arange(n) % 6
    return batch


def _grads(method, step, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.model.zero_grad(set_to_none=True)
    out = step(batch, None)
    out["loss"].backward()
    return out["loss"].detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                  for p in method.model.parameters()]


# --- the formulas ------------------------------------------------------------------------------


def test_hand_check_weight() -> None:
    """w₁ 5, w₂ 1, C = 6, softmax(F₋m)[y] = 0.8 ⇒ (5 − 0.8)/6 = 0.7."""
    logits = torch.log(torch.tensor([[0.8, 0.04, 0.04, 0.04, 0.04, 0.04]])) + 3.0  # a shift changes nothing
    w = boost_weights(logits, torch.tensor([0]), 5.0, 1.0, 6)
    assert w.item() == pytest.approx(0.7, abs=1e-4)
    # no other learner yet (init=scratch, stage 0): the constant c₀, softmax over one column is 1
    assert boost_weights(None, torch.tensor([0, 3]), 5.0, 1.0, 6).tolist() == pytest.approx([4 / 6] * 2)


def test_weight_has_no_gradient() -> None:
    others = torch.randn(4, 6, requires_grad=True)
    assert not boost_weights(others, torch.arange(4), 5.0, 1.0, 6).requires_grad


@pytest.mark.parametrize("init", ["unimodal", "scratch"])
def test_w2_zero_is_unimodal_training(init: str) -> None:
    """w₂ = 0, E₂ = 0: phase 1's loss and gradient are those of (w₁/C)·CE(z_m) on one learner."""
    method = _method(w1=5.0, w2=0.0, rectify_epochs=0, init=init)
    net, batch = method.model, _batch()
    net.set_flags(1, True, True)
    loss, grads = _grads(method, method.phase1_step(1, 1), batch)

    def reference(b, ctx):
        z, _ = net.learner(b, 1)
        return {"loss": 5.0 / 6 * F.cross_entropy(z, b["label"])}

    ref_loss, ref_grads = _grads(method, reference, batch)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # only learner 1 (its encoder) and the shared head receive a gradient
    names = [n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert all(n.startswith(("encoders.m1", "head.")) for n in names) and names


def test_learner_loss_is_weighted_ce() -> None:
    z, y = torch.randn(5, 6), torch.arange(5)
    w = torch.rand(5)
    expected = (w * -z.log_softmax(1).gather(1, y[:, None]).squeeze(1)).mean()
    assert learner_loss(z, y, w).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_consolidation_false_and_code_leave_gradients(alpha: float) -> None:
    """The reference's term detaches both operands: with consolidation=false or code the gradient
    is the same whatever α; consolidation=true changes it."""
    batch = _batch()
    base, ref = None, None
    for mode in ("false", "code"):
        method = _method(alpha=alpha, consolidation=mode)
        method.model.set_flags(1, True, True)
        _, grads = _grads(method, method.phase1_step(1, 1), batch)
        if ref is None:
            ref = grads
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)
    base = _method(alpha=0.0, consolidation="false")
    base.model.set_flags(1, True, True)
    _, base_grads = _grads(base, base.phase1_step(1, 1), batch)
    for g, r in zip(ref, base_grads):
        torch.testing.assert_close(g, r)
    method = _method(alpha=alpha, consolidation="true")
    method.model.set_flags(1, True, True)
    _, grads = _grads(method, method.phase1_step(1, 1), batch)
    assert any(not torch.allclose(g, r) for g, r in zip(grads, ref))


def test_ensemble_uses_beta_and_active_learners() -> None:
    method = _method(init="scratch", beta=2.0)
    net, batch = method.model, _batch()
    assert net.ensemble(batch) is None  # no learner yet
    net.set_flags(0, True, True)
    z0 = net.learner(batch, 0)[0]
    torch.testing.assert_close(method.predict(batch), 2.0 * z0)
    net.set_flags(1, True, True)
    torch.testing.assert_close(method.predict(batch), 2.0 * (z0 + net.learner(batch, 1)[0]))


@pytest.mark.parametrize("mode", ["eval", "code"])
def test_others_mode_and_batchnorm(mode: str) -> None:
    """F₋m's forward leaves the other learners' BatchNorm statistics alone with others_mode=eval
    and moves them with others_mode=code (the reference's train mode)."""
    method = _method(others_mode=mode)
    net = method.model
    net.set_flags(1, True, True)
    net.train()
    method.others_to_eval(1)
    bn = next(mod for mod in net.encoders["m0"].modules() if isinstance(mod, torch.nn.BatchNorm1d))
    before = bn.running_mean.clone()
    method.phase1_step(1, 1)(_batch(), None)
    after = bn.running_mean
    assert torch.equal(before, after) == (mode == "eval")
    assert net.encoders["m1"].training


def test_checkpoint_state_restores_the_flags() -> None:
    method = _method()
    method.model.set_flags(0, True, True)
    state = json.loads(json.dumps(method.checkpoint_state()))
    other = _method()
    other.load_checkpoint_state(state)
    other.model.load_state_dict(method.model.state_dict())
    batch = _batch()
    method.model.eval()
    other.model.eval()
    torch.testing.assert_close(other.predict(batch), method.predict(batch))
    assert other.model.flags == [(True, True), (True, False)]


def test_different_feature_sizes_project_or_refuse() -> None:
    """An MLP (128 features) and a ResNet18 (512): a linear map to the largest size, or a refusal."""
    info = DataInfo("mixed", [ModalitySpec("m0", "vector", (6,), "mlp"),
                              ModalitySpec("m1", "spectrogram", (1, 16, 16), "resnet18_audio")], num_classes=6)
    method = create_method("reconboost", info, build_config({"method": "reconboost"}))
    method.build()
    sizes = {m: method.model.encoders[m].out_dim for m in method.modalities}
    assert len(set(sizes.values())) == 2
    small = min(sizes, key=sizes.get)
    assert isinstance(method.model.projections[small], torch.nn.Linear)
    batch = {"m0": torch.randn(4, 6), "m1": torch.randn(4, 1, 16, 16), "label": torch.arange(4)}
    assert method.predict(batch).shape == (4, 6)
    with pytest.raises(UsageError, match="projection"):
        create_method("reconboost", info, build_config({"method": "reconboost", "method.projection": "refuse"}))


def test_options_are_checked() -> None:
    for key, value in (("consolidation", "maybe"), ("others_mode", "frozen"), ("init", "random"),
                       ("projection", "pad"), ("learner_epochs", "0"), ("rectify_epochs", "-1"),
                       ("lr_gamma", "0"), ("alpha", "-1"), ("hidden", "0")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            create_method("reconboost", _info(), build_config({"method": "reconboost", f"method.{key}": value}))


# --- runs ------------------------------------------------------------------------------------------


def test_schedule_and_selection(tiny) -> None:
    """epochs 6, E₁ = 2, E₂ = 1 ⇒ 2 stages (m0, m1); phases in order; the best stage restored."""
    cfg = build_config(dict(tiny, method="reconboost", epochs=6, **{"method.learner_epochs": 2,
                                                                     "method.rectify_epochs": 1}))
    run = prepare(cfg)
    record = execute(run)
    facts = record["method_record"]["reconboost"]
    assert facts["stage_budget"] == 2 and [s["modality"] for s in facts["schedule"]] == ["m0", "m1"]
    rows = [r for r in record["history"] if r["stage"].startswith("reconboost")]
    assert [(r["reconboost_stage"], r["reconboost_phase"]) for r in rows] == [(0, 1), (0, 1), (0, 2),
                                                                           (1, 1), (1, 1), (1, 2)]
    accs = [s["val_accuracy"] for s in facts["schedule"]]
    assert facts["best_val_accuracy"] == max(accs) and facts["best_stage"] == accs.index(max(accs))
    assert all(math.isfinite(s["learner_loss"]) and math.isfinite(s["beta"]) for s in facts["schedule"])


@pytest.mark.parametrize("modalities", [2, 3])
def test_cli_runs(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "reconboost", "--dataset", "synthetic", "--set", "epochs=6",
            "--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", "batch_size=32", "--set", "method.learner_epochs=1", "--set", "method.rectify_epochs=1",
            "--set", f"dataset.modalities={modalities}", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    record = json.loads(next(tmp_path.glob("reconboost-*.json")).read_text())
    rows = [r for r in record["history"] if r["stage"].startswith("reconboost")]
    assert len(rows) == 6 and all("reconboost_beta" in r for r in rows)
    assert [r["reconboost_modality"] for r in rows if r["reconboost_phase"] == 1] == [i % modalities
                                                                                     for i in range(3)]
    assert record["method_record"]["reconboost"]["stages_run"] == 3


def test_its_one_epoch_fits_ignore_the_run_scheduler(tiny: dict) -> None:
    """Each phase epoch is a fit of one epoch with a stage that turns cfg.scheduler off: a step
    scheduler of step 1 and γ 0.1 would otherwise cut every later epoch's rate tenfold."""
    settings = dict(tiny, method="reconboost", epochs=8, lr=0.05, scheduler="step", step_size=1, gamma=0.1,
                    diagnostics=False, **{"method.learner_epochs": 2, "method.rectify_epochs": 2})
    record = execute(prepare(build_config(settings)))
    rows = [r for r in record["history"] if str(r["stage"]).startswith("reconboost:")]
    assert len(rows) == 8 and {r["lr"] for r in rows} == {0.05}
