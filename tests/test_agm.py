"""AGM: the hand check of the coefficients, the Shapley responses for two and three modalities, the
gradient paths on a BatchNorm-free model, the running means, the window, the clipping, the
padded passes' effect on BatchNorm and the RNG, and equivalence with ``joint`` (up to float
rounding) when α = 0 and clipping is off."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import host_syncs
from torch import nn

import baselines.agm as agm_module
from baselines.agm import agm_coefficients, agm_scores, default_cap, scale_grad, shapley_weights
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.method import build_method, create_method
from benchmark.models.fusion import ConcatFusion
from benchmark.registry import FUSIONS
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

EPOCH0 = SimpleNamespace(epoch=0)


# --- the formulas ---------------------------------------------------------------------------------
def test_hand_check_of_the_coefficients() -> None:
    """METHODS.md: S̄ = (1.0, 1.2), s = (0.8, 1.2), α = 1.5."""
    k, r, r_bar = agm_coefficients(torch.tensor([0.8, 1.2], dtype=torch.float64),
                                   torch.tensor([1.0, 1.2], dtype=torch.float64), 1.5, 10.0)
    assert r.tolist() == pytest.approx([1.4918, 0.6703], abs=1e-4)
    assert r_bar.tolist() == pytest.approx([1.2214, 0.8187], abs=1e-4)
    assert k.tolist() == pytest.approx([0.6666, 1.2493], abs=1e-4)
    # α = 0: every coefficient is exactly one
    k0, _, _ = agm_coefficients(torch.tensor([0.3, 2.0]), torch.tensor([1.0, 0.1]), 0.0, 10.0)
    assert torch.equal(k0, torch.ones(2))


def test_general_coefficients_use_the_mean_score_and_the_cap() -> None:
    s, S = [0.5, 1.0, 2.1], [1.0, 1.0, 1.0]
    k, r, r_bar = agm_coefficients(torch.tensor(s, dtype=torch.float64), torch.tensor(S, dtype=torch.float64),
                                   2.0, 7.0)
    mean = sum(s) / 3
    for j in range(3):
        r_j = math.exp(1.5 * (mean - s[j]))
        assert r[j].item() == pytest.approx(r_j, rel=1e-12)
        assert r_bar[j].item() == 1.0
        assert k[j].item() == pytest.approx(math.exp(2.0 * min(1.0 - r_j, 7.0)), rel=1e-12)
    # for M = 2 the general form M/(M−1)·(s̄ − s_a) is the pairwise s_v − s_a
    s2 = torch.tensor([0.8, 1.2], dtype=torch.float64)
    _, r2, _ = agm_coefficients(s2, torch.zeros(2, dtype=torch.float64), 1.5, 10.0)
    torch.testing.assert_close(r2, torch.exp(2 * (s2.mean() - s2)))
    # the cap binds: r̄_a − r_a = 41 − 21 = 20 > 10 ⇒ k_a = exp(α·10)
    capped, _, _ = agm_coefficients(torch.tensor([0.0, math.log(21.0)], dtype=torch.float64),
                                    torch.tensor([0.0, math.log(41.0)], dtype=torch.float64), 0.5, 10.0)
    assert capped[0].item() == pytest.approx(math.exp(5.0))
    assert default_cap(2) == 10.0 and default_cap(3) == default_cap(4) == 7.0


def _reference_two(F_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """run/CREMAD_main.py: out_a = ½(total − pad_audio + pad_visual), out_v likewise."""
    total, pad_a, pad_v = F_["av"], F_["v"], F_["a"]  # pad_audio_out = F(0, v), pad_visual_out = F(a, 0)
    return {"a": 0.5 * (total - pad_a + pad_v), "v": 0.5 * (total - pad_v + pad_a)}


def _reference_three(F_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model/URFunny_net.py Modality_Audio/Visual/Text (modalities a, v, t; F keyed by those present)."""
    total = F_["avt"]
    pad_a, pad_v, pad_t = F_["vt"], F_["at"], F_["av"]
    pad_va, pad_vt, pad_at = F_["t"], F_["a"], F_["v"]
    return {
        "a": (total - pad_a + pad_vt) / 3 + (pad_v - pad_at + pad_t - pad_va) / 6,
        "v": (total - pad_v + pad_at) / 3 + (pad_a - pad_vt + pad_t - pad_va) / 6,
        "t": (total - pad_t + pad_va) / 3 + (pad_v - pad_at + pad_a - pad_vt) / 6,
    }


@pytest.mark.parametrize("names", ["av", "avt"])
def test_shapley_responses_match_the_reference_forms(names: str) -> None:
    M = len(names)
    W = shapley_weights(M)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2**M - 1, 4, 5, generator=g, dtype=torch.float64)
    by_set = {"".join(n for i, n in enumerate(names) if mask >> i & 1): rows[mask - 1] for mask in range(1, 2**M)}
    m = torch.einsum("jk,kbc->jbc", W, rows)
    expected = (_reference_two if M == 2 else _reference_three)(by_set)
    for j, name in enumerate(names):
        torch.testing.assert_close(m[j], expected[name])
    torch.testing.assert_close(m.sum(0), rows[-1])  # Σ_j m_j = F(N)
    assert W.sum(0)[:-1].abs().max() < 1e-15 and W.sum(0)[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("M", [2, 3])
def test_with_unit_coefficients_the_padded_responses_get_exactly_zero_gradient(M: int) -> None:
    W = shapley_weights(M).float()
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2**M - 1, 6, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    m = (W[:, :, None, None] * rows.unsqueeze(0)).sum(1)
    F.cross_entropy(scale_grad(m, torch.ones(M, dtype=torch.float64)).sum(0), y).backward()
    assert torch.count_nonzero(rows.grad[:-1]) == 0
    full = rows[-1].detach().requires_grad_(True)
    F.cross_entropy(full, y).backward()
    torch.testing.assert_close(rows.grad[-1], full.grad)


def test_scores_floor_each_probability_at_1e_8() -> None:
    m = torch.tensor([[[0.0, 0.0], [0.0, 50.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    s = agm_scores(m, y)
    assert s[0].item() == pytest.approx((math.log(2) - math.log(1e-8)) / 2)
    assert s[1].item() == pytest.approx(math.log(2))


def test_scale_grad_is_an_identity_that_scales_each_rows_gradient() -> None:
    x = torch.randn(3, 2, 4, requires_grad=True)
    k = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    y = scale_grad(x, k)
    assert torch.equal(y, x)
    (y * torch.arange(24.0).view(3, 2, 4)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(24.0).view(3, 2, 4) * k.float().view(3, 1, 1))


# --- the method on hand-made models ---------------------------------------------------------------
def _vector_method(M: int = 2, **options: str):
    info = DataInfo("vec", [ModalitySpec(n, "vector", (6,), "mlp") for n in "avt"[:M]], num_classes=3)
    cfg = build_config({"method": "agm", **{f"method.{k}": v for k, v in options.items()}})
    m = create_method("agm", info, cfg)
    build_method(m)
    return m


def _batch(M: int = 2, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(n, 6, generator=g) * (1 + i) for i, name in enumerate("avt"[:M])}
    out["label"] = torch.randint(0, 3, (n,), generator=g)
    return out


class _Recorder(nn.Module):
    """A BatchNorm-free encoder that keeps every output it gives, with its gradient."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.out_dim = d_out
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.lin(x))
        if out.requires_grad:
            out.retain_grad()
        self.calls.append((x, out))
        return out


def test_gradient_paths_on_a_batchnorm_free_model() -> None:
    """∂L/∂ψ_a(a) = k_a W_aᵀg, and the zero-input path ψ_a(0) gets ½(k_v − k_a) W_aᵀg."""
    m = _vector_method(alpha="1.5", clip="none")
    torch.manual_seed(0)
    m.model.encoders = nn.ModuleDict({"a": _Recorder(6, 5), "v": _Recorder(6, 4)})
    m.model.head = ConcatFusion({"a": 5, "v": 4}, 3)
    m.training_step(_batch(seed=5), EPOCH0)  # the first step sets up the state
    m._running = torch.tensor([1.0, 1.2], dtype=torch.float64)  # k ≠ 1 on the next step
    for enc in m.model.encoders.values():
        enc.calls.clear()
    batch = _batch(seed=1)
    m.model.zero_grad(set_to_none=True)
    out = m.training_step(batch, EPOCH0)
    out["loss"].backward()
    k_a, k_v = m._k.tolist()
    assert abs(k_a - 1) > 0.05 and abs(k_v - 1) > 0.05
    with torch.no_grad():
        full = m.model.head(m.encode(batch))
    g = (full.softmax(1) - F.one_hot(batch["label"], 3)) / len(batch["label"])
    W = m.model.head.fc.weight.detach()
    for name, cols, k_self, k_other in (("a", slice(0, 5), k_a, k_v), ("v", slice(5, 9), k_v, k_a)):
        calls = [c for c in m.model.encoders[name].calls if c[1].requires_grad]
        real = [out for x, out in calls if x.shape[0] == len(batch["label"])]
        (zero,) = [out for x, out in calls if x.shape[0] == 1]
        assert len(real) == 2  # the train-mode pass F(N) and the eval-mode pass of the padded responses
        through_input = sum(o.grad for o in real)
        torch.testing.assert_close(through_input, k_self * g @ W[:, cols], rtol=1e-5, atol=1e-7)
        expected_zero = (0.5 * (k_other - k_self) * g @ W[:, cols]).sum(0, keepdim=True)
        torch.testing.assert_close(zero.grad, expected_zero, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], F.cross_entropy(full, batch["label"]))


def test_running_means_cover_every_step_and_come_after_the_coefficients(monkeypatch) -> None:
    seen: list[tuple[list[float], list[float]]] = []
    original = agm_module.agm_coefficients

    def spy(scores, running, alpha, cap):
        seen.append((scores.tolist(), running.tolist()))
        return original(scores, running, alpha, cap)

    monkeypatch.setattr(agm_module, "agm_coefficients", spy)
    m = _vector_method()
    for step in range(5):
        if step == 3:
            m.on_epoch_start(SimpleNamespace(epoch=1))  # an epoch boundary resets nothing
        m.training_step(_batch(seed=step), SimpleNamespace(epoch=int(step >= 3)))
    assert seen[0][1] == [0.0, 0.0]  # 0 before the first step
    for t in range(1, 5):
        mean = [sum(s[0][j] for s in seen[:t]) / t for j in range(2)]
        assert seen[t][1] == pytest.approx(mean, rel=1e-12)
    assert m.iterations == 5


def test_window_and_what_applies_outside_it() -> None:
    m = _vector_method(modulation_starts="1", modulation_ends="1")
    m.training_step(_batch(seed=0), SimpleNamespace(epoch=0))
    assert torch.equal(m._k, torch.ones(2, dtype=torch.float64))  # before the window: k = 1
    assert m._running.abs().sum() > 0  # the running means are kept outside the window too
    m.training_step(_batch(seed=1), SimpleNamespace(epoch=1))
    inside = m._k.clone()
    assert not torch.equal(inside, torch.ones(2, dtype=torch.float64))
    m.training_step(_batch(seed=2), SimpleNamespace(epoch=2))
    assert torch.equal(m._k, torch.ones(2, dtype=torch.float64))
    assert m.epoch_log()["agm_modulated_steps"] == 1
    assert m.record_facts()["modulated_epochs"] == [1]
    last = _vector_method(modulation_starts="1", modulation_ends="1", outside="last")
    for epoch in range(3):
        last.training_step(_batch(seed=epoch), SimpleNamespace(epoch=epoch))
        if epoch == 1:
            kept = last._k.clone()
    assert torch.equal(last._k, kept)  # the reference's hooks keep the last in-window coefficients


def _grads_of(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


def test_clipping_acts_only_when_a_head_weight_gradient_leaves_the_box() -> None:
    m = _vector_method()
    m.training_step(_batch(), EPOCH0)
    for p in m.model.parameters():
        p.grad = torch.full_like(p, 0.01)
    before = _grads_of(m)
    m.after_backward(EPOCH0, {})
    assert all(torch.equal(before[n], p.grad) for n, p in m.model.named_parameters())  # bitwise kept
    m.model.head.fc.weight.grad[0, 0] = -1.5  # outside [−1, 1]
    before = _grads_of(m)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before.values()]))
    m.after_backward(EPOCH0, {})
    after = _grads_of(m)
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in after.values()]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)
    for n in before:
        torch.testing.assert_close(after[n], before[n] / (norm + 1e-6))
    assert m.epoch_log()["agm_clipped_steps"] == 1
    off = _vector_method(clip="none")
    off.training_step(_batch(), EPOCH0)
    for p in off.model.parameters():
        p.grad = torch.full_like(p, 3.0)
    off.after_backward(EPOCH0, {})
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in off.model.parameters())


class _DropoutAfter(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.drop, self.out_dim = encoder, nn.Dropout(0.3), encoder.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.encoder(x))


@pytest.mark.parametrize("M", [2, 3])
def test_a_neutral_step_matches_joints_step(M: int) -> None:
    """α = 0, clip none: the same gradients as joint up to float rounding; the padded passes leave
    the BatchNorm statistics as joint's step does and draw nothing from the global RNG."""
    info = DataInfo("vec", [ModalitySpec(n, "vector", (6,), "mlp") for n in "avt"[:M]], num_classes=3)
    methods = {}
    for name, extra in (("joint", {}), ("agm", {"method.alpha": 0, "method.clip": "none"})):
        method = create_method(name, info, build_config({"method": name, **extra}))
        build_method(method)
        with seeded(0, "test/dropout"):
            method.model.encoders = nn.ModuleDict({n: _DropoutAfter(e) for n, e in method.model.encoders.items()})
        method.model.train()
        methods[name] = method
    joint, agm = methods["joint"], methods["agm"]
    batch = _batch(M, n=16, seed=3)
    states = {}
    for name, method in methods.items():
        torch.manual_seed(11)
        out = method.training_step(batch, EPOCH0)
        out["loss"].backward()
        states[name] = (out["loss"].detach(), torch.get_rng_state())
    assert torch.equal(states["joint"][1], states["agm"][1])  # the same draws (the train-mode dropout only)
    torch.testing.assert_close(states["agm"][0], states["joint"][0], rtol=1e-6, atol=1e-7)
    g_joint, g_agm = _grads_of(joint), _grads_of(agm)
    assert g_joint.keys() == g_agm.keys()
    for n in g_joint:
        torch.testing.assert_close(g_agm[n], g_joint[n], rtol=1e-5, atol=1e-7)
    buffers_j, buffers_a = dict(joint.model.named_buffers()), dict(agm.model.named_buffers())
    assert buffers_j.keys() == buffers_a.keys()
    assert all(torch.equal(buffers_j[k], buffers_a[k]) for k in buffers_j)  # running stats: F(N) only


@pytest.mark.parametrize("modalities", [2, 3])
def test_neutral_run_equals_joint_up_to_float_rounding(tiny: dict, modalities: int) -> None:
    base = dict(tiny, seed=3, diagnostics="false", probe="false", **{"dataset.modalities": modalities})
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    run = prepare(build_config(dict(base, method="agm", **{"method.alpha": 0, "method.clip": "none"})))
    record = execute(run)
    state_j, state_a = joint_run.method.model.state_dict(), run.method.model.state_dict()
    assert state_j.keys() == state_a.keys()
    for k in state_j:
        torch.testing.assert_close(state_a[k].float(), state_j[k].float(), rtol=1e-5, atol=1e-6)
    for row_j, row_a in zip(joint["history"], record["history"], strict=True):
        assert row_a["train_loss"] == pytest.approx(row_j["train_loss"], rel=1e-5)
        assert row_a["val_accuracy"] == row_j["val_accuracy"]
        assert all(row_a[f"agm_k_m{i}"] == 1.0 for i in range(modalities))
    for key in ("accuracy", "val_accuracy"):
        assert record["metrics"][key] == joint["metrics"][key]
    # and a real modulation changes the run
    changed = execute(prepare(build_config(dict(base, method="agm"))))
    assert changed["history"][-1]["train_loss"] != joint["history"][-1]["train_loss"]


def test_prediction_and_readouts_are_joints() -> None:
    m = _vector_method()
    joint = create_method("joint", m.info, build_config({"method": "joint"}))
    build_method(joint)
    joint.model.load_state_dict(m.model.state_dict())
    m.model.eval()
    joint.model.eval()
    batch = _batch()
    a, b = m.eval_forward(batch), joint.eval_forward(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(m.predict(batch), b.logits)
    assert a.unimodal is not None and all(torch.equal(a.unimodal[k], b.unimodal[k]) for k in b.unimodal)


def test_a_step_reads_nothing_from_the_device(tiny: dict) -> None:
    """Coefficients, running means and the clipping decision stay on the device."""
    run = prepare(build_config(dict(tiny, method="agm", epochs=1, **{"method.clip_value": 1e-4})))
    build_method(run.method)
    stage = run.method.stage()
    calls: list[str] = []
    step, after = stage.step, stage.after_backward

    def guarded_step(batch, ctx):
        with host_syncs() as seen:
            out = step(batch, ctx)
        calls.extend(seen)
        return out

    def guarded_after(ctx, outputs):
        with host_syncs() as seen:
            after(ctx, outputs)
        calls.extend(seen)

    stage.step, stage.after_backward = guarded_step, guarded_after
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert calls == []
    assert run.method.record_facts()["clipped_steps"] == 6  # every step clipped at this tiny threshold


# --- options and the command line -----------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("alpha", "-1"), ("cap", "-1"), ("cap", "inf"), ("modulation_starts", "-1"), ("outside", "keep"), ("clip", "norm"),
    ("clip_value", "0"),
])
def test_bad_options_are_refused(tiny: dict, option: str, value: str) -> None:
    with pytest.raises(UsageError, match=f"method.{option}"):
        prepare(build_config(dict(tiny, method="agm", **{f"method.{option}": value})))


def test_window_order_is_checked_and_a_head_without_output_layer_is_refused(tiny: dict, monkeypatch) -> None:
    with pytest.raises(UsageError, match="modulation_ends"):
        prepare(build_config(dict(tiny, method="agm", **{"method.modulation_starts": 3,
                                                          "method.modulation_ends": 2})))

    class NoLinear(nn.Module):
        def __init__(self, dims: dict[str, int], num_classes: int) -> None:
            super().__init__()

    monkeypatch.setitem(FUSIONS._entries, "nolinear", NoLinear)
    with pytest.raises(UsageError, match="method.clip=none"):
        prepare(build_config(dict(tiny, method="agm", fusion="nolinear")))


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "agm", "--dataset", "synthetic", "--set", "epochs=2",
            "--set", f"dataset.modalities={modalities}", "--set", "dataset.n_train=96", "--set", "dataset.n_val=32",
            "--set", "dataset.n_test=32", "--set", "batch_size=32", "--set", "method.alpha=2.5",
            "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("agm-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"] == {"alpha": 2.5, "cap": 0.0, "modulation_starts": 0,
                                                  "modulation_ends": -1, "outside": "one", "clip": "agm",
                                                  "clip_value": 1.0}
    names = [f"m{i}" for i in range(modalities)]
    for row in record["history"]:
        for n in names:
            assert row[f"agm_k_{n}"] > 0 and row[f"agm_score_{n}"] > 0 and row[f"agm_running_score_{n}"] > 0
        assert row["agm_modulated_steps"] == 3 and row["agm_clipped_steps"] >= 0
    facts = record["method_record"]
    assert facts["cap"] == default_cap(modalities) and facts["iterations"] == 6
    assert facts["padded_subsets"] == 2**modalities - 2 and facts["modulated_epochs"] == [0, 1]


def test_command_line_refuses_a_bad_option(tmp_path, capsys) -> None:
    assert main(["run", "--method", "agm", "--set", "method.alpha=-1", "--quiet", "--out", str(tmp_path)]) == 2
    assert "method.alpha" in capsys.readouterr().err
    assert not list(tmp_path.glob("agm-*.json"))
