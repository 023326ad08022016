"""PMR: prototype logits, the coefficients of Eq. 11 (paper and binary), PER, the prototype pass
(class means of the first tenth of a shuffled training pass, in eval mode, from the method's own
stream), absent classes and smoothing, and equivalence with ``joint`` when the method is neutral."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_run, host_syncs

from baselines.pmr import per_weights, prototype_logits, prototype_scores, rebalance_coefficients
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.device import derive_seed
from benchmark.errors import DivergedError, UsageError
from benchmark.losses import entropy
from benchmark.method import StepContext, create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

# --- the formulas ------------------------------------------------------------------------------


def test_hand_check_rho_and_coefficients() -> None:
    """Σp_0 = 20, Σp_1 = 25 ⇒ ρ = 0.8, β = 0.25 (paper) or 1 (binary: the loss weight is α), γ = 0."""
    scores = torch.tensor([20.0, 25.0])
    assert (scores[0] / scores[1]).item() == pytest.approx(0.8)
    beta, gamma = rebalance_coefficients(scores, "paper").tolist()
    assert beta == pytest.approx(0.25, abs=1e-4) and gamma == 0.0
    assert rebalance_coefficients(scores, "binary").tolist() == [1.0, 0.0]
    # the other side: ρ = 1.25 ⇒ β = 0, γ = clip(ρ − 1) = 0.25; a large ratio is clipped at 1
    assert rebalance_coefficients(torch.tensor([25.0, 20.0]), "paper").tolist() == pytest.approx([0.0, 0.25])
    assert rebalance_coefficients(torch.tensor([30.0, 10.0]), "paper").tolist() == [0.0, 1.0]
    assert rebalance_coefficients(torch.tensor([25.0, 20.0]), "binary").tolist() == [0.0, 1.0]


@pytest.mark.parametrize("rule", ["paper", "binary"])
def test_rho_of_one_gives_no_coefficient(rule: str) -> None:
    assert rebalance_coefficients(torch.tensor([17.5, 17.5]), rule).tolist() == [0.0, 0.0]
    assert per_weights(torch.zeros(2), torch.tensor([17.5, 17.5])).tolist() == [0.0, 0.0]


def test_three_modalities_use_the_ratio_to_the_best() -> None:
    scores = torch.tensor([10.0, 20.0, 25.0])
    coefs = rebalance_coefficients(scores, "paper")
    assert coefs.tolist() == pytest.approx([1.0, 0.25, 0.0])  # clip(2.5 − 1) = 1, 25/20 − 1, best
    assert rebalance_coefficients(scores, "binary").tolist() == [1.0, 1.0, 0.0]
    # PER: the best modality's entropy, weighted by the mean β of the others
    assert per_weights(coefs, scores).tolist() == pytest.approx([0.0, 0.0, 0.625])
    # two modalities: Eq. 13's γ on modality 0 when it leads, β on modality 1 when it leads
    for s in (torch.tensor([20.0, 25.0]), torch.tensor([25.0, 20.0])):
        coefs = rebalance_coefficients(s, "paper")
        assert per_weights(coefs, s).tolist() == coefs.flip(0).tolist()  # the step's two-modality shortcut
    s = torch.tensor([20.0, 25.0])
    assert per_weights(rebalance_coefficients(s, "paper"), s).tolist() == pytest.approx([0.0, 0.25])


def test_prototype_logits_are_negative_unsquared_distances() -> None:
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert prototype_logits(f, c).tolist() == [[-5.0, -4.0], [-0.0, -3.0]]
    y = torch.tensor([1, 0])
    u = prototype_logits(f, c)
    expected = u.softmax(1)[0, 1] + u.softmax(1)[1, 0]
    assert prototype_scores(u[None], y).tolist() == pytest.approx([expected.item()])
    # many classes × large features: the matrix-product path, equal to the differences' to ~1e-6
    g = torch.Generator().manual_seed(0)
    big_f, big_c = torch.randn(2, 16, 512, generator=g), torch.randn(2, 31, 512, generator=g)
    exact = -torch.stack([torch.tensor([[torch.dot(a - b, a - b).sqrt().item() for b in cs] for a in fs])
                          for fs, cs in zip(big_f, big_c)])
    torch.testing.assert_close(prototype_logits(big_f, big_c), exact, rtol=1e-5, atol=0)
    # stacked modalities (M×B×d against M×C×d) give each modality's own distances
    both = prototype_logits(torch.stack([f, 2 * f]), torch.stack([c, c]))
    assert torch.equal(both[0], u) and torch.equal(both[1], prototype_logits(2 * f, c))


# --- the method on small models ----------------------------------------------------------------


def _vector_method(**options):
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"), ModalitySpec("v", "vector", (6,), "mlp")],
                    num_classes=3)
    cfg = build_config({"method": "pmr", **{f"method.{k}": v for k, v in options.items()}})
    m = create_method("pmr", info, cfg)
    m.build()
    return m


def _batch(seed: int = 0, n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 6, generator=g), "v": torch.randn(n, 6, generator=g) * 2,
            "label": torch.arange(n) % 3}


def test_loss_is_joint_ce_plus_weighted_prototype_terms() -> None:
    """Eq. 11–13 for two modalities, written out with ρ, β, γ."""
    alpha, mu = 2.0, 0.01
    m = _vector_method(alpha=str(alpha), mu=str(mu))
    g = torch.Generator().manual_seed(3)
    m.set_prototypes({"a": torch.randn(3, 128, generator=g), "v": torch.randn(3, 128, generator=g)})
    batch = _batch()
    m.model.eval()  # BatchNorm with running statistics: the same features in both computations
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    feats = m.encode(batch)
    y = batch["label"]
    ce = F.cross_entropy(m.model.head(feats), y)
    u_a, u_v = (-torch.cdist(feats[k], m.prototypes[k]) for k in ("a", "v"))
    rho = (u_a.softmax(1)[torch.arange(12), y].sum() / u_v.softmax(1)[torch.arange(12), y].sum()).item()
    beta = min(max(1 / rho - 1, 0), 1) if rho < 1 else 0.0
    gamma = min(max(rho - 1, 0), 1) if rho >= 1 else 0.0
    assert beta + gamma > 0
    expected = (ce + alpha * beta * F.cross_entropy(u_a, y) + alpha * gamma * F.cross_entropy(u_v, y)
                - mu * gamma * entropy(u_a).mean() - mu * beta * entropy(u_v).mean())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["joint_ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    # past per_epochs PER is gone; outside the window the loss is the joint CE alone
    m.options.per_epochs = 0
    no_per = m.training_step(batch, SimpleNamespace(epoch=0))["loss"]
    assert no_per.item() == pytest.approx((ce + alpha * beta * F.cross_entropy(u_a, y)
                                           + alpha * gamma * F.cross_entropy(u_v, y)).item(), rel=1e-5)
    outside = m.training_step(batch, SimpleNamespace(epoch=m.cfg.epochs))["loss"]
    assert torch.equal(outside, out["joint_ce"])


def test_prototype_cross_entropy_reaches_only_its_encoder() -> None:
    m = _vector_method(alpha="1", per="false")
    m.set_prototypes({"a": torch.randn(3, 128), "v": torch.randn(3, 128)})
    batch = _batch(1)
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    joint = m.training_step(batch, SimpleNamespace(epoch=m.cfg.epochs))  # the same forward, CE only
    params = dict(m.model.named_parameters())
    g_pmr = torch.autograd.grad(out["loss"], list(params.values()))
    g_joint = torch.autograd.grad(joint["loss"], list(params.values()))
    changed = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("encoders") else n.split(".")[0]
               for n, a, b in zip(params, g_pmr, g_joint) if not torch.allclose(a, b, atol=1e-7)}
    assert len(changed) == 1 and next(iter(changed)).startswith("encoders.")  # the slower one only


def test_rho_of_one_adds_no_prototype_term() -> None:
    """Identical modalities (same encoder weights, inputs, prototypes) ⇒ ρ = 1 exactly ⇒ the loss
    and every gradient are the joint CE's."""
    m = _vector_method(alpha="2", mu="0.01")
    m.model.encoders["v"].load_state_dict(m.model.encoders["a"].state_dict())
    proto = torch.randn(3, 128)
    m.set_prototypes({"a": proto, "v": proto.clone()})
    batch = _batch(2)
    batch["v"] = batch["a"].clone()
    params = list(m.model.parameters())
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    assert m._sums[1].tolist() == [0.0, 0.0]  # β_a = β_v = 0 (rows: scores, β, −PCE)
    grads = torch.autograd.grad(out["loss"], params)
    plain = m.training_step(batch, SimpleNamespace(epoch=m.cfg.epochs))
    assert torch.equal(out["loss"], plain["loss"])
    for a, b in zip(grads, torch.autograd.grad(plain["loss"], params)):
        assert torch.equal(a, b)


def test_window_and_per_epochs() -> None:
    m = _vector_method(modulation_start="2", modulation_end="5", window="epochs", per_epochs="4")
    assert [e for e in range(8) if m.active(e)] == [2, 3, 4, 5]
    assert [e for e in range(8) if m.active(e) and m.per_active(e)] == [2, 3]
    m = _vector_method()  # default: the first 70% of the budget (the scripts: epochs 0–70 of 100)
    assert [e for e in range(m.cfg.epochs) if m.active(e)] == list(range(14))
    assert not _vector_method(per="false").per_active(0)


# --- the prototype pass ------------------------------------------------------------------------


def _prepared(tiny: dict, **options):
    run = prepare(build_config(dict(tiny, method="pmr", **{f"method.{k}": v for k, v in options.items()})))
    run.method.build()
    trainer = Trainer(run.cfg, run.data, run.device)
    stage = run.method.stage()
    num_batches = math.ceil(len(run.data.splits["train"]) / run.cfg.batch_size)
    return run, trainer, (lambda epoch: StepContext(trainer, stage, epoch, 0, num_batches, []))


def _expected_means(run, trainer, generator: torch.Generator, batches: int):
    model = run.method.model
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    with torch.no_grad():
        for batch in itertools.islice(trainer.batches("train", shuffle=True, generator=generator), batches):
            for k, f in run.method.encode(batch).items():
                feats.setdefault(k, []).append(f)
            labels.append(batch["label"])
    model.train()
    y = torch.cat(labels)
    classes = run.data.info.num_classes
    return {k: torch.stack([torch.cat(v)[y == c].mean(0) for c in range(classes)]) for k, v in feats.items()}, y


def test_prototypes_are_class_means_of_a_tenth_of_train_in_eval_mode(tiny: dict) -> None:
    tiny = dict(tiny, **{"dataset.n_train": 640})  # 20 batches of 32: the subset is 2 batches
    run, trainer, ctx = _prepared(tiny)
    method = run.method
    bn_before = {k: v.clone() for k, v in method.model.state_dict().items()}
    rng_before = torch.get_rng_state()
    method.on_epoch_start(ctx(0))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    assert all(torch.equal(bn_before[k], v) for k, v in method.model.state_dict().items())  # BN stats too
    assert method.model.training and method._subset_batches == 2
    gen = torch.Generator().manual_seed(derive_seed(run.cfg.seed, "method/pmr/prototypes"))
    expected, y = _expected_means(run, trainer, gen, 2)
    assert len(y) == 64 and set(y.tolist()) == set(range(run.data.info.num_classes))
    for k in expected:
        torch.testing.assert_close(method.prototypes[k], expected[k], rtol=1e-5, atol=1e-6)
    # the next epoch draws the next shuffle of the same stream: a different subset
    method.on_epoch_start(ctx(1))
    again, _ = _expected_means(run, trainer, gen, 2)
    for k in again:
        torch.testing.assert_close(method.prototypes[k], again[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", ["every", "code"])
def test_momentum_smooths_the_prototypes(tiny: dict, smoothing: str) -> None:
    """c ← ε·c_old + (1−ε)·c_new, with c_new the raw class means (ε = 0, same weights and stream);
    the update after epoch 0 is smoothed with "every" and replaces with "code" (the reference)."""
    run, _, ctx = _prepared(tiny, momentum_coef="0.25", smoothing=smoothing)
    plain, _, plain_ctx = _prepared(tiny)
    for epoch in range(3):
        previous = run.method.prototypes
        run.method.on_epoch_start(ctx(epoch))
        plain.method.on_epoch_start(plain_ctx(epoch))
        for k, raw in plain.method.prototypes.items():
            smoothed = epoch >= (1 if smoothing == "every" else 2)
            want = 0.25 * previous[k] + 0.75 * raw if smoothed else raw
            torch.testing.assert_close(run.method.prototypes[k], want)


def test_an_absent_class_keeps_its_prototype(tiny: dict) -> None:
    tiny = dict(tiny, **{"dataset.num_classes": 40})  # 32 samples in the subset: some classes are missing
    run, _, ctx = _prepared(tiny)
    method = run.method
    method.on_epoch_start(ctx(0))
    first = {k: v.clone() for k, v in method.prototypes.items()}
    assert all(torch.isfinite(v).all() for v in first.values())
    assert method._absent.item() > 0
    sentinel = {k: torch.full_like(v, 7.0) for k, v in first.items()}
    method.set_prototypes({k: v.clone() for k, v in sentinel.items()})
    method.on_epoch_start(ctx(1))
    kept = (method.prototypes["m0"] == 7.0).all(dim=1)
    assert 0 < int(kept.sum()) < 40  # the absent ones kept the sentinel, the others were recomputed
    assert ((method.prototypes["m1"] == 7.0).all(dim=1) == kept).all()
    run, _, ctx = _prepared(tiny, absent_class="error")
    with pytest.raises(DivergedError, match="absent from the prototype subset"):
        run.method.on_epoch_start(ctx(0))


# --- whole runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_alpha_zero_and_mu_zero_is_identical_to_joint(tiny: dict, fusion: str) -> None:
    base = dict(tiny, fusion=fusion, seed=5, diagnostics=False)
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    run = prepare(build_config(dict(base, method="pmr", **{"method.alpha": 0, "method.mu": 0})))
    record = execute(run)
    assert_same_run(joint, record)
    state_j, state_p = joint_run.method.model.state_dict(), run.method.model.state_dict()
    assert state_j.keys() == state_p.keys() and all(torch.equal(state_j[k], state_p[k]) for k in state_j)
    assert record["history"][0]["pmr_modulated_steps"] > 0 and "pmr_rho" in record["history"][0]
    assert record["method_record"]["prototype_updates"] == tiny["epochs"]
    changed = execute(prepare(build_config(dict(base, method="pmr"))))
    assert changed["history"][-1]["train_loss"] != joint["history"][-1]["train_loss"]


def test_a_step_reads_nothing_from_the_device(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="pmr")))
    run.method.build()
    stage = run.method.stage()
    per_step: list[list[str]] = []
    step = stage.step

    def guarded(batch, ctx):
        with host_syncs() as calls:
            out = step(batch, ctx)
        per_step.append(calls)
        return out

    stage.step = guarded
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert len(per_step) == 2 * 6 and all(calls == [] for calls in per_step), per_step


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "pmr", "--dataset", "synthetic", "--set", "epochs=2",
            "--set", "dataset.n_train=128", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", f"dataset.modalities={modalities}", "--set", "method.coef=binary",
            "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("pmr-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"]["coef"] == "binary"
    names = [f"m{i}" for i in range(modalities)]
    for row in record["history"]:
        for key in ("ratio", "beta", "pce", "proto_acc"):
            assert all(math.isfinite(row[f"pmr_{key}_{m}"]) for m in names)
        assert ("pmr_rho" in row) == (modalities == 2)
        assert all(row[f"pmr_beta_{m}"] in (0.0, 1.0) or 0 < row[f"pmr_beta_{m}"] < 1 for m in names)


def test_bad_options_are_refused(tmp_path, capsys) -> None:
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"), ModalitySpec("v", "vector", (6,), "mlp")],
                    num_classes=3)
    for key, value in (("alpha", "-1"), ("mu", "-0.1"), ("coef", "ratio"), ("momentum_coef", "1"),
                       ("smoothing", "never"), ("absent_class", "zero"), ("window", "steps"),
                       ("modulation_end", "70"), ("per_epochs", "-1")):
        with pytest.raises(UsageError, match=f"method.{key}|modulation_start"):
            create_method("pmr", info, build_config({"method": "pmr", f"method.{key}": value}))
    assert main(["run", "--method", "pmr", "--set", "method.coef=ratio", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path)]) == 2
    assert "method.coef" in capsys.readouterr().err
