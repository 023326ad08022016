"""MMPareto: the hand checks of the integration rule (conflict, no conflict, cos = 0 under both
rules, the solver's boundary cases, per-tensor rescaling), the routing of each loss's gradient
to its encoder and the plain summed gradient of the heads, equivalence with ``multi_loss`` when
γ = 1 and no step integrates a conflict, the per-epoch trace, the options and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import host_syncs

import baselines.mmpareto as mmpareto_module
from baselines.mmpareto import min_norm_weight, pareto_integrate
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.errors import UsageError
from benchmark.method import build_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

T = torch.tensor


def _integrate(g_mm: torch.Tensor, g_u: torch.Tensor, **kw):
    """pareto_integrate on one parameter tensor."""
    (h,), cos, clash, alpha = pareto_integrate([g_mm], [g_u], **kw)
    return h, cos, clash, alpha


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_conflict_hand_check(rescale: str) -> None:
    """g_mm = (1, 0), g_u = (−1, 1): α_mm = 0.6, h' = (0.4, 0.8), ‖g_mm+g_u‖ = 1, h = 1.5 h'/‖h'‖;
    with a single tensor the code's rescaling gives the same h."""
    g_mm, g_u = T([1.0, 0.0]), T([-1.0, 1.0])
    h, cos, clash, alpha = _integrate(g_mm, g_u, gamma=1.5, rescale=rescale)
    assert bool(clash) and cos.item() == pytest.approx(-2 ** -0.5, abs=1e-6)
    assert alpha.item() == pytest.approx(0.6, abs=1e-6)
    assert h.tolist() == pytest.approx([0.6708, 1.3416], abs=1e-4)
    direction = 2 * alpha * g_mm + 2 * (1 - alpha) * g_u
    assert direction.tolist() == pytest.approx([0.4, 0.8], abs=1e-6)
    # the common descent direction: equal, positive inner products with both gradients
    assert direction.dot(g_mm).item() == pytest.approx(0.4, abs=1e-6)
    assert direction.dot(g_u).item() == pytest.approx(0.4, abs=1e-6)
    assert h.dot(g_mm).item() > 0 and h.dot(g_u).item() > 0


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_no_conflict_hand_check(rescale: str) -> None:
    """g_u = (1, 1): α = ½ and h = γ (g_mm + g_u) = (3, 1.5) under both rules."""
    h, cos, clash, alpha = _integrate(T([1.0, 0.0]), T([1.0, 1.0]), gamma=1.5, rescale=rescale)
    assert not bool(clash) and cos.item() > 0 and alpha.item() == 0.5
    assert h.tolist() == pytest.approx([3.0, 1.5], abs=1e-6)


def test_code_rescale_is_per_tensor_and_never_shrinks() -> None:
    """The same conflict as the hand check, each coordinate its own tensor: h' = (0.4, 0.8),
    g_mm+g_u = (0, 1); tensor 1 keeps γ·0.4 (ratio 0 < 1), tensor 2 gets γ·0.8·(1/0.8)."""
    h, _, clash, _ = pareto_integrate([T([1.0]), T([0.0])], [T([-1.0]), T([1.0])], gamma=1.5, rescale="code")
    assert bool(clash)
    assert torch.cat(h).tolist() == pytest.approx([0.6, 1.5], abs=1e-6)
    # the paper's rule on the same two tensors: one norm over the whole encoder
    h, *_ = pareto_integrate([T([1.0]), T([0.0])], [T([-1.0]), T([1.0])], gamma=1.5, rescale="paper")
    assert torch.cat(h).tolist() == pytest.approx([0.6708, 1.3416], abs=1e-4)


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_cos_zero_is_a_conflict_only_under_the_code_rule(rescale: str) -> None:
    """g_mm = (2, 0), g_u = (0, 1): cos = 0. Paper: no conflict, h = 1.5·(2, 1). Code: the
    min-norm weight α = 1/5, h' = (0.8, 1.6), ‖g_mm+g_u‖/‖h'‖ = √5/√3.2 = 1.25, h = (1.5, 3)."""
    g_mm, g_u = T([2.0, 0.0]), T([0.0, 1.0])
    h, cos, clash, alpha = _integrate(g_mm, g_u, gamma=1.5, rescale=rescale, conflict="paper")
    assert cos.item() == 0 and not bool(clash) and alpha.item() == 0.5
    assert h.tolist() == pytest.approx([3.0, 1.5], abs=1e-6)
    h, cos, clash, alpha = _integrate(g_mm, g_u, gamma=1.5, rescale=rescale, conflict="code")
    assert bool(clash) and alpha.item() == pytest.approx(0.2, abs=1e-6)
    assert h.tolist() == pytest.approx([1.5, 3.0], abs=1e-5)


def test_min_norm_weight_and_the_solvers_boundary_cases() -> None:
    # interior: (‖g_u‖² − ⟨g_mm,g_u⟩)/‖g_mm − g_u‖² with ‖g_mm‖² = 1, ⟨·,·⟩ = −1, ‖g_u‖² = 2
    assert min_norm_weight(T(1.0), T(-1.0), T(2.0)).item() == pytest.approx(0.6, abs=1e-6)
    assert min_norm_weight(T(1.0), T(1.0), T(4.0)).item() == pytest.approx(0.999)  # ⟨·,·⟩ ≥ ‖g_mm‖²
    assert min_norm_weight(T(4.0), T(1.0), T(1.0)).item() == pytest.approx(0.001)  # ⟨·,·⟩ ≥ ‖g_u‖²
    assert min_norm_weight(T(0.0), T(0.0), T(0.0)).item() == pytest.approx(0.999)  # zero gradients: no NaN


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_degenerate_gradients_stay_finite(rescale: str) -> None:
    for g_mm, g_u in ((T([0.0, 0.0]), T([0.0, 0.0])), (T([1.0, -2.0]), T([-1.0, 2.0])), (T([0.0, 0.0]), T([1.0, 0.0]))):
        h, *_ = _integrate(g_mm, g_u, rescale=rescale, conflict="code")
        assert torch.isfinite(h).all(), (g_mm, g_u)
    opposite, *_ = _integrate(T([1.0, -2.0]), T([-1.0, 2.0]), rescale=rescale)
    assert opposite.tolist() == [0.0, 0.0]  # h' = 0: nothing to scale


def test_channels_last_and_strided_gradients_give_the_same_result_in_their_own_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    g_mm = [torch.randn(8, 3, 5, 5, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(7, generator=gen)]
    g_u = [-0.5 * g_mm[0] + torch.randn(8, 3, 5, 5, generator=gen), torch.randn(6, 4, generator=gen),
           torch.randn(7, generator=gen)]
    want, *_ = pareto_integrate(g_mm, g_u, rescale="code")

    def relayout(gs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [gs[0].contiguous(memory_format=torch.channels_last), gs[1].t().contiguous().t(), gs[2]]

    got, *_ = pareto_integrate(relayout(g_mm), relayout(g_u), rescale="code")
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].stride() == (1, 6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- the model and the gradient hook ---------------------------------------------------------------

def _method(tiny: dict, **settings):
    run = prepare(build_config(dict(tiny, method="mmpareto", **settings)))
    build_method(run.method)
    return run.method, run


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_each_encoder_pairs_the_fused_gradient_with_its_own_and_heads_get_the_sum(tiny: dict, rescale: str) -> None:
    """Three modalities, arbitrary per-loss gradients: encoder m gets pareto_integrate(g_mm, g_m)
    over its flattened parameters (no other loss enters), every head the plain sum of all losses."""
    method, run = _method(tiny, **{"dataset.modalities": 3, "method.rescale": rescale})
    stage = method.stage()
    assert stage.losses == ["loss_fused", "loss_m0", "loss_m1", "loss_m2"]
    params = stage.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    grads = {name: [torch.randn(p.shape, generator=gen) for p in params] for name in stage.losses}
    kept = {name: [g.clone() for g in values] for name, values in grads.items()}  # combine consumes its input
    combined = method.combine_gradients(grads, type("Ctx", (), {"stage": stage})())
    owner = {id(p): m for m in method.modalities for p in method.model.encoders[m].parameters()}
    heads = [i for i, p in enumerate(params) if id(p) not in owner]
    assert heads and all(torch.allclose(combined[i], sum(kept[n][i] for n in stage.losses)) for i in heads)
    for m in method.modalities:
        idx = [i for i, p in enumerate(params) if owner.get(id(p)) == m]
        want, *_ = pareto_integrate([kept["loss_fused"][i] for i in idx], [kept[f"loss_{m}"][i] for i in idx],
                                    gamma=1.5, rescale=rescale)
        for i, w in zip(idx, want):
            torch.testing.assert_close(combined[i], w, rtol=0, atol=0)
        # the same by hand on the flattened encoder (the paper's rule)
        if rescale == "paper":
            g_mm, g_u = (torch.cat([kept[n][i].reshape(-1) for i in idx]).double() for n in ("loss_fused", f"loss_{m}"))
            cos = g_mm.dot(g_u) / (g_mm.norm() * g_u.norm())
            alpha = (g_u.dot(g_u) - g_mm.dot(g_u)) / (g_mm - g_u).square().sum() if cos < 0 else 0.5
            direction = 2 * alpha * g_mm + 2 * (1 - alpha) * g_u
            by_hand = 1.5 * (g_mm + g_u).norm() * direction / direction.norm()
            torch.testing.assert_close(torch.cat([combined[i].reshape(-1) for i in idx]).double(), by_hand,
                                       rtol=1e-5, atol=1e-5)
        assert all(combined[i].shape == params[i].shape for i in idx)
    row = method.epoch_log()
    assert set(row) == {f"mmpareto_{k}_{m}" for k in ("conflict", "cos", "alpha_mm") for m in method.modalities}


def test_without_conflict_encoders_get_gamma_times_the_sum_and_heads_the_plain_sum(tiny: dict, monkeypatch) -> None:
    """Real per-loss gradients of one batch through the loop's hook, conflicts neutralised
    (α = ½ on every step): encoders receive γ·∇(L_mm + Σ L_m), heads ∇(L_mm + Σ L_m)."""
    monkeypatch.setattr(mmpareto_module, "min_norm_weight", lambda a, b, c: torch.full_like(a, 0.5))
    method, run = _method(tiny, **{"method.gamma": 2.5})
    stage = method.stage()
    params = stage.trainable_parameters()
    split = run.data.splits["train"]
    batch = {m: x[:32] for m, x in split.inputs.items()}
    batch["label"] = split.labels[:32]
    trainer = Trainer(run.cfg, run.data, run.device)
    out = method.training_step(batch, None)
    plain = torch.autograd.grad(out["loss"], params, retain_graph=True)
    trainer.combined_backward(stage, out, params, type("Ctx", (), {"stage": stage})())
    encoder_ids = {id(p) for p in method.model.encoders.parameters()}
    for p, g in zip(params, plain):
        scale = 2.5 if id(p) in encoder_ids else 1.0
        torch.testing.assert_close(p.grad, scale * g, rtol=1e-4, atol=1e-6)


def test_same_initial_weights_and_batches_as_multi_loss(tiny: dict) -> None:
    ours, _ = _method(tiny)
    theirs = prepare(build_config(dict(tiny, method="multi_loss"))).method
    build_method(theirs)
    a, b = ours.model.state_dict(), theirs.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.stream() == theirs.stream() == "method/multi_loss"


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_gamma_one_without_conflict_is_multi_loss(tiny: dict, rescale: str, monkeypatch) -> None:
    """γ = 1 and no conflict on any step ⇒ multi_loss with λ_uni = 1, up to float rounding (the
    loop differentiates each loss on its own). Synthetic data has conflicts from the first step
    (cos ≈ 0 with freshly initialised heads), so the conflict weights are set to the no-conflict
    ½ for this run: every other part (losses, routing, rescaling, heads, streams) is the method's."""
    base = dict(tiny, seed=3)
    reference = execute(prepare(build_config(dict(base, method="multi_loss"))))
    natural = execute(prepare(build_config(dict(base, method="mmpareto", **{"method.gamma": 1.0}))))
    assert any(row["mmpareto_conflict_m0"] > 0 for row in natural["history"])  # conflicts do occur
    assert natural["history"][-1]["train_loss"] != reference["history"][-1]["train_loss"]
    monkeypatch.setattr(mmpareto_module, "min_norm_weight", lambda a, b, c: torch.full_like(a, 0.5))
    run = prepare(build_config(dict(base, method="mmpareto", **{"method.gamma": 1.0, "method.rescale": rescale})))
    record = execute(run)
    for a, b in zip(reference["history"], record["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_accuracy"] == a["val_accuracy"]
        assert b["mmpareto_alpha_mm_m0"] == 0.5
    for key in ("accuracy", "val_accuracy"):
        assert record["metrics"][key] == reference["metrics"][key]


def test_options_are_checked(tiny: dict) -> None:
    for key, value in (("gamma", "0"), ("gamma", "-1"), ("rescale", "tensor"), ("conflict", "strict")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            prepare(build_config(dict(tiny, method="mmpareto", **{f"method.{key}": value})))


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, capsys, modalities: int) -> None:
    tiny = ["--dataset", "synthetic", "--set", "dataset.n_train=96", "--set", "dataset.n_val=32",
            "--set", "dataset.n_test=32", "--set", "epochs=2", "--set", f"dataset.modalities={modalities}",
            "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "--method", "mmpareto", "--set", "method.rescale=code", *tiny]) == 0
    (path,) = tmp_path.glob("mmpareto-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"] == {"gamma": 1.5, "rescale": "code", "conflict": "paper"}
    names = [f"m{k}" for k in range(modalities)]
    assert len(record["history"]) == 2
    for row in record["history"]:
        for m in names:
            assert 0 <= row[f"mmpareto_conflict_{m}"] <= 1 and -1 <= row[f"mmpareto_cos_{m}"] <= 1
            assert 0 <= row[f"mmpareto_alpha_mm_{m}"] <= 1
        assert {"train_loss_fused", *(f"train_loss_{m}" for m in names)} <= row.keys()
    facts = record["method_record"]
    assert facts["steps"] == 2 * 2 and set(facts["conflict_rate"]) == set(names)
    assert main(["run", "--method", "mmpareto", "--set", "method.gamma=-2", *tiny]) == 2
    assert "method.gamma" in capsys.readouterr().err


@pytest.mark.parametrize("rescale", ["paper", "code"])
def test_a_training_step_never_waits_for_the_device(tiny: dict, rescale: str) -> None:
    """The branch on the conflict is a torch.where and the trace stays on the device: no host
    read in a step or in the gradient hook (one per epoch, in epoch_log)."""
    method, run = _method(tiny, **{"method.rescale": rescale})
    stage = method.stage()
    per_step: list[list[str]] = []
    step, combine = stage.step, stage.combine_gradients

    def guarded_step(batch, ctx):
        with host_syncs() as calls:
            out = step(batch, ctx)
        per_step.append(calls)
        return out

    def guarded_combine(grads, ctx):
        with host_syncs() as calls:
            out = combine(grads, ctx)
        per_step[-1].extend(calls)
        return out

    stage.step, stage.combine_gradients = guarded_step, guarded_combine
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert len(per_step) == 2 * 6 and all(calls == [] for calls in per_step), per_step
