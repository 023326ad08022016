"""InfoReg: which modality is regulated and how strongly (paper and code rules), the pull-back
update toward the epoch-start weights, the prime-learning-window rules, the trace, and
equivalence with ``joint`` when the window never opens."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_run, host_syncs

from baselines.inforeg import (
    code_window,
    paper_window,
    pull_back_,
    readout_log_probs,
    readout_scores,
    regulation_strength,
    score_gaps,
)
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.errors import UsageError
from benchmark.method import create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

# --- the formulas ------------------------------------------------------------------------------


def test_hand_check_paper_rule() -> None:
    """CE_a = 0.9, CE_v = 1.3 ⇒ audio regulated, Δ = 0.4, α = exp(0.9·tanh 0.4) = 1.4077."""
    gaps = score_gaps([-0.9, -1.3])
    assert gaps == pytest.approx([0.4, 0.0], abs=1e-12)
    alpha = regulation_strength(gaps, "paper", 0.9)
    assert alpha[0] == pytest.approx(1.4077, abs=1e-4) and alpha[1] == 0.0


def test_hand_check_code_rule() -> None:
    """Σp_a − Σp_v = 10 ⇒ 0.95·exp(tanh 10) = 2.5824 on audio; the reverse gives 0.1·e on visual."""
    assert regulation_strength(score_gaps([40.0, 30.0]), "code", 0.9) == pytest.approx([2.5824, 0.0], abs=1e-4)
    assert regulation_strength(score_gaps([30.0, 40.0]), "code", 0.9) == pytest.approx([0.0, 0.1 * math.e], abs=1e-4)
    assert regulation_strength(score_gaps([5.0, 5.0]), "code", 0.9) == [0.0, 0.0]


def test_scores_from_the_readouts() -> None:
    z = {"a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "v": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}
    y = torch.tensor([0, 1])
    log_probs = readout_log_probs(torch.stack(list(z.values())), y)
    ce = readout_scores(log_probs, "ce")
    assert ce.tolist() == pytest.approx([-F.cross_entropy(z["a"], y).item(), -F.cross_entropy(z["v"], y).item()])
    sums = readout_scores(log_probs, "prob_sum")
    assert sums[1].item() == pytest.approx(0.5 + 1 / (1 + math.e))


def test_three_modalities_gap_is_the_mean_over_the_weaker_ones() -> None:
    gaps = score_gaps([3.0, 1.0, 2.0])
    assert gaps == pytest.approx([1.5, 0.0, 1.0])
    alpha = regulation_strength(gaps, "paper", 0.9)
    assert alpha == pytest.approx([math.exp(0.9 * math.tanh(1.5)), 0.0, math.exp(0.9 * math.tanh(1.0))])
    assert all(a >= 1 for a in alpha if a)  # α ≥ 1 whenever regulated


def test_zero_gradient_sgd_step_pulls_back_to_the_snapshot() -> None:
    """L ≡ 0: one SGD step (no momentum, no weight decay) gives w ← w − η·α(w − w_prev)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    prev = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    moved = [p.detach().clone() for p in layer.parameters()]
    (0.0 * sum(p.sum() for p in layer.parameters())).backward()  # L ≡ 0: every gradient is zero
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())
    alpha, lr = 1.4077, 0.1
    params = list(layer.parameters())
    pull_back_([p.grad for p in params], params, prev, alpha)
    torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0).step()
    for p, w, w0 in zip(params, moved, prev):
        torch.testing.assert_close(p.detach(), w - lr * alpha * (w - w0))


def test_window_rules() -> None:
    assert paper_window([], 0.04) == (False, None) and paper_window([1.0], 0.04) == (False, None)
    is_open, change = paper_window([1.0, 1.1], 0.04)
    assert is_open and change == pytest.approx(0.1 / 1.1)
    assert not paper_window([1.0, 1.03], 0.04)[0]
    assert not paper_window([1.0, 0.5], 0.04)[0]  # a falling trace: closed
    assert not paper_window([1.0, 2.0], math.inf)[0]
    # the code: open at epoch 0 (a change of 1); then the 10-epoch moving average over ten zeros
    assert code_window([], 0.05) == (True, 1.0)
    assert code_window([5.0], 0.05) == (True, 1.0)  # (0.5 − 0) / 0.5
    assert code_window([4.0, 1.0], 0.05)[1] == pytest.approx(1.0 / 5.0)
    traces = [1.0] * 11 + [1.2]  # the window drops trace 0 and adds trace 11
    assert code_window(traces, 0.05)[1] == pytest.approx((1.02 - 1.0) / 1.02)
    assert not code_window([1.0] * 12, 0.05)[0]
    assert not code_window([], math.inf)[0]


# --- the method on small models ----------------------------------------------------------------


def _vector_method(modalities: int = 2, **options):
    info = DataInfo("vec", [ModalitySpec(f"m{i}", "vector", (6,), "mlp") for i in range(modalities)],
                    num_classes=3)
    m = create_method("inforeg", info, build_config({"method": "inforeg",
                                                     **{f"method.{k}": v for k, v in options.items()}}))
    m.build()
    return m


def test_after_backward_adds_alpha_times_the_drift_to_the_regulated_encoder_only() -> None:
    m = _vector_method(window="code")  # the code's window is open at epoch 0
    m.on_epoch_start(SimpleNamespace(epoch=0))
    assert m._open == [True, True]
    with torch.no_grad():  # the weights drift from the snapshot
        for p in m.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    batch = {"m0": torch.randn(16, 6, generator=g), "m1": torch.randn(16, 6, generator=g),
             "label": torch.arange(16) % 3}
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    out["loss"].backward()
    before = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    scores = out["_scores"].tolist()
    m.after_backward(SimpleNamespace(epoch=0), out)
    alpha = regulation_strength(score_gaps(scores), "paper", 0.9)
    regulated = 0 if alpha[0] > 0 else 1
    snapshot = dict(zip([n for n, _ in m.model.encoders[f"m{regulated}"].named_parameters()], m._prev[f"m{regulated}"]))
    for n, p in m.model.named_parameters():
        prefix = f"encoders.m{regulated}."
        if n.startswith(prefix):
            want = before[n] + alpha[regulated] * (p.detach() - snapshot[n[len(prefix):]])
            torch.testing.assert_close(p.grad, want)
        else:
            assert torch.equal(p.grad, before[n]), n
    assert m._regulated == [int(regulated == 0), int(regulated == 1)]
    assert m.epoch_log()[f"inforeg_alpha_m{regulated}"] == pytest.approx(alpha[regulated])


def test_paper_trace_is_the_mean_squared_gradient_norm_before_the_regulation() -> None:
    m = _vector_method()
    m.on_epoch_start(SimpleNamespace(epoch=0))
    totals = torch.zeros(2)
    for seed in range(3):
        m.model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(seed)
        batch = {"m0": torch.randn(8, 6, generator=g), "m1": torch.randn(8, 6, generator=g),
                 "label": torch.arange(8) % 3}
        out = m.training_step(batch, SimpleNamespace(epoch=0))
        out["loss"].backward()
        for i in range(2):
            totals[i] += sum(p.grad.pow(2).sum() for p in m.model.encoders[f"m{i}"].parameters())
        m.after_backward(SimpleNamespace(epoch=0), out)
    log = m.epoch_log()
    assert [log["inforeg_trace_m0"], log["inforeg_trace_m1"]] == pytest.approx((totals / 3).tolist(), rel=1e-5)
    assert log["inforeg_open_m0"] == 0.0 and log["inforeg_regulated_m0"] == 0.0  # epoch 0: closed (paper)


def test_readout_loss_adds_the_unimodal_cross_entropies() -> None:
    m = _vector_method(unimodal_loss="readout")
    batch = {"m0": torch.randn(8, 6), "m1": torch.randn(8, 6), "label": torch.arange(8) % 3}
    m.model.eval()
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    feats = m.encode(batch)
    z = m.model.head.unimodal_logits(feats)
    want = F.cross_entropy(m.model.head(feats), batch["label"]) + sum(F.cross_entropy(v, batch["label"])
                                                                       for v in z.values())
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


# --- whole runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["paper", "code"])
def test_a_window_that_never_opens_is_identical_to_joint(tiny: dict, window: str) -> None:
    base = dict(tiny, seed=4, diagnostics=False, epochs=3)
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    run = prepare(build_config(dict(base, method="inforeg", **{"method.window": window,
                                                                "method.threshold": "1e9"})))
    record = execute(run)
    assert_same_run(joint, record)
    state_j, state_i = joint_run.method.model.state_dict(), run.method.model.state_dict()
    assert all(torch.equal(state_j[k], state_i[k]) for k in state_j)
    assert all(row["inforeg_trace_m0"] > 0 and row["inforeg_open_m0"] == 0.0 for row in record["history"])
    # a window always open (K = −1e9; the paper's rule from epoch 2) regulates and changes the run
    changed = execute(prepare(build_config(dict(base, method="inforeg", **{"method.window": window,
                                                                            "method.threshold": "-1e9"}))))
    last = changed["history"][-1]
    assert last["inforeg_open_m0"] == 1.0 and last["inforeg_regulated_m0"] + last["inforeg_regulated_m1"] == 1.0
    assert last["train_loss"] != joint["history"][-1]["train_loss"]
    assert changed["method_record"]["open_epochs"]["m0"] == ([2] if window == "paper" else [0, 1, 2])


def test_a_step_reads_at_most_one_value_and_only_while_a_window_is_open(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="inforeg", epochs=3, **{"method.threshold": "-1e9"})))
    run.method.build()
    stage = run.method.stage()
    per_step: list[tuple[int, list[str]]] = []
    step, after = stage.step, stage.after_backward

    def guarded_step(batch, ctx):
        with host_syncs() as calls:
            out = step(batch, ctx)
        per_step.append((ctx.epoch, calls))
        return out

    def guarded_after(ctx, outputs):
        with host_syncs() as calls:
            after(ctx, outputs)
        per_step[-1][1].extend(calls)

    stage.step, stage.after_backward = guarded_step, guarded_after
    Trainer(run.cfg, run.data, run.device).fit(stage)
    opened = run.method.record_facts()["open_epochs"]["m0"]
    assert opened == [2]  # the paper's rule: closed in epochs 0 and 1
    for epoch, calls in per_step:
        if epoch in opened:
            assert len(calls) == 1 and calls[0].startswith("tolist at inforeg.py"), calls
        else:
            assert calls == [], calls


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "inforeg", "--dataset", "synthetic", "--set", "epochs=3",
            "--set", "dataset.n_train=128", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", f"dataset.modalities={modalities}", "--set", "method.threshold=-1e9", "--set", "method.window=code",
            "--set", "method.unimodal_loss=readout", "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("inforeg-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"]["unimodal_loss"] == "readout"
    names = [f"m{i}" for i in range(modalities)]
    for row in record["history"]:
        for key in ("trace", "open", "regulated", "alpha"):
            assert all(math.isfinite(row[f"inforeg_{key}_{m}"]) for m in names)
        assert "train_unimodal_ce" in row
    last = record["history"][-1]
    assert all(last[f"inforeg_open_{m}"] == 1.0 for m in names)
    assert 0 < sum(last[f"inforeg_regulated_{m}"] for m in names)
    assert record["method_record"]["threshold"] == -1e9


def test_bad_options_and_settings_are_refused(tiny: dict) -> None:
    with pytest.raises(UsageError, match="fusion"):
        prepare(build_config(dict(tiny, method="inforeg", fusion="gated")))
    with pytest.raises(UsageError, match="strength=code"):
        prepare(build_config(dict(tiny, method="inforeg", **{"dataset.modalities": 3, "method.strength": "code"})))
    for key, value in (("beta", "-1"), ("threshold", "nan"), ("score", "acc"), ("strength", "both"),
                       ("window", "always"), ("unimodal_loss", "separate")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            prepare(build_config(dict(tiny, method="inforeg", **{f"method.{key}": value})))
    assert _vector_method(window="code").options.k == 0.05 and _vector_method().options.k == 0.04
