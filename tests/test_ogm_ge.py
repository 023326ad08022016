"""OGM-GE and OGM: coefficients, which gradients are modulated, the GE noise, the modulation
window, the two-modality limit, and equivalence with ``joint`` when the modulation is neutral."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_run, host_syncs

from baselines.ogm_ge import modulated_parameters, ogm_coefficients
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.errors import UsageError
from benchmark.method import create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer


def _score(z: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for row, label in zip(z.tolist(), y.tolist()):
        exps = [math.exp(v) for v in row]
        total += exps[label] / sum(exps)
    return total


@pytest.mark.parametrize("stronger", ["v", "a"])
def test_coefficients_match_the_formula_on_both_sides(stronger: str) -> None:
    y = torch.tensor([0, 1, 2, 1])
    confident = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, 2.0], [0.5, 1.5, 0.0]])
    unsure = torch.tensor([[0.2, 0.1, 0.0], [0.3, 0.0, 0.1], [0.0, 0.4, 0.2], [0.1, 0.0, 0.3]])
    z_a, z_v = (unsure, confident) if stronger == "v" else (confident, unsure)
    alpha = 0.8
    k_a, k_v, ratio_v = ogm_coefficients(z_a, z_v, y, alpha)
    rho_v = _score(z_v, y) / _score(z_a, y)
    assert ratio_v == pytest.approx(rho_v, rel=1e-12)
    if stronger == "v":
        assert rho_v > 1
        assert k_a == 1.0
        assert k_v == pytest.approx(1 - math.tanh(alpha * rho_v), rel=1e-12)
    else:
        assert rho_v < 1
        assert k_v == 1.0
        assert k_a == pytest.approx(1 - math.tanh(alpha / rho_v), rel=1e-12)
    assert 0 < min(k_a, k_v) < 1


def test_coefficients_at_exactly_one_damp_the_first_modality() -> None:
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    k_a, k_v, ratio_v = ogm_coefficients(z, z.clone(), y, 0.5)
    assert ratio_v == 1.0 and k_v == 1.0
    assert k_a == pytest.approx(1 - math.tanh(0.5))


def _image_method(method: str = "ogm_ge", **options: str):
    info = DataInfo("images", [ModalitySpec("a", "image", (1, 8, 8), "small_cnn"),
                               ModalitySpec("v", "image", (1, 8, 8), "small_cnn")], num_classes=3)
    cfg = build_config({"method": method, **{f"method.{k}": v for k, v in options.items()}})
    m = create_method(method, info, cfg)
    torch.manual_seed(0)
    m.build()
    return m


def _backward(m, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"a": torch.randn(16, 1, 8, 8, generator=g), "v": torch.randn(16, 1, 8, 8, generator=g) * 3,
             "label": torch.randint(0, 3, (16,), generator=g)}
    m.model.zero_grad(set_to_none=True)
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    out["loss"].backward()
    m.last_outputs = out  # what the trainer hands to after_backward
    return {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


def test_only_the_encoders_conv_kernels_change() -> None:
    m = _image_method("ogm_ge")
    before = _backward(m)
    m.after_backward(SimpleNamespace(epoch=0), m.last_outputs)
    after = {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    conv = {n for n, p in m.model.named_parameters() if n.startswith("encoders.") and p.dim() == 4}
    assert conv and changed == conv  # noise on both encoders: every conv kernel, nothing else
    # plain OGM: only the damped modality's kernels change (k = 1 leaves the other bitwise)
    m = _image_method("ogm")
    before = _backward(m)
    m.after_backward(SimpleNamespace(epoch=0), m.last_outputs)
    changed = {n for n, p in m.model.named_parameters() if not torch.equal(before[n], p.grad)}
    prefixes = {n.split(".")[1] for n in changed}
    assert len(prefixes) == 1 and all(m.model.get_parameter(n).dim() == 4 for n in changed)


def test_modulated_gradient_is_k_times_g() -> None:
    m = _image_method("ogm")
    m.options.alpha = 0.8
    before = _backward(m)
    z = m.last_outputs
    k_a, k_v, _ = ogm_coefficients(z["_z_a"], z["_z_v"], z["_y"], 0.8)
    m.after_backward(SimpleNamespace(epoch=0), m.last_outputs)
    for n, p in m.model.named_parameters():
        if n.startswith("encoders.") and p.dim() == 4:
            k = k_a if n.startswith("encoders.a.") else k_v
            torch.testing.assert_close(p.grad, before[n] * k)


def test_ge_noise_has_the_unmodulated_gradients_std() -> None:
    m = _image_method("ogm_ge")
    before = _backward(m)
    z = m.last_outputs
    k_a, k_v, _ = ogm_coefficients(z["_z_a"], z["_z_v"], z["_y"], m.options.alpha)
    m.after_backward(SimpleNamespace(epoch=0), m.last_outputs)
    checked = 0
    for n, p in m.model.named_parameters():
        if n.startswith("encoders.") and p.dim() == 4 and p.numel() > 20000:
            k = k_a if n.startswith("encoders.a.") else k_v
            noise = p.grad - k * before[n]
            assert noise.std().item() == pytest.approx(before[n].std().item(), rel=0.03)
            assert abs(noise.mean().item()) < 0.03 * before[n].std().item()
            checked += 1
    assert checked == 2  # the largest kernel of each encoder


def test_nothing_is_modulated_outside_the_window() -> None:
    m = _image_method("ogm_ge", modulation_start="2", modulation_end="3", window="epochs")
    for epoch, inside in ((0, False), (1, False), (2, True), (3, True), (4, False)):
        before = _backward(m)
        m.after_backward(SimpleNamespace(epoch=epoch), m.last_outputs)
        same = all(torch.equal(before[n], p.grad) for n, p in m.model.named_parameters())
        assert same != inside, epoch


def test_mlp_encoders_modulate_their_weight_matrices() -> None:
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"),
                            ModalitySpec("v", "vector", (6,), "mlp")], num_classes=3)
    m = create_method("ogm", info, build_config({"method": "ogm"}))
    m.build()
    params, rule = modulated_parameters(m.model.encoders["a"], "auto")
    assert rule == "weights" and len(params) == 2 and all(p.dim() == 2 for p in params)
    assert modulated_parameters(m.model.encoders["a"], "conv")[0] == []


def test_more_than_two_modalities_and_nonlinear_fusion_are_refused(tiny: dict) -> None:
    with pytest.raises(UsageError, match="modalities"):
        prepare(build_config(dict(tiny, method="ogm_ge", **{"dataset.modalities": 3})))
    with pytest.raises(UsageError, match="fusion"):
        prepare(build_config(dict(tiny, method="ogm_ge", fusion="film")))
    with pytest.raises(UsageError, match="modulate"):
        prepare(build_config(dict(tiny, method="ogm_ge", **{"method.modulate": "bias"})))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_neutral_modulation_is_identical_to_joint(tiny: dict, fusion: str) -> None:
    base = dict(tiny, fusion=fusion, seed=3)
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    for method, extra in (("ogm", {}), ("ogm_ge", {"method.noise": "false"})):
        run = prepare(build_config(dict(base, method=method, **{"method.alpha": 0, **extra})))
        record = execute(run)
        assert_same_run(joint, record)
        state_j, state_o = joint_run.method.model.state_dict(), run.method.model.state_dict()
        assert state_j.keys() == state_o.keys()
        assert all(torch.equal(state_j[k], state_o[k]) for k in state_j)
        assert record["history"][0]["ogm_modulated_steps"] > 0  # the hook ran, with k = 1
    # and a real modulation does change the run
    changed = execute(prepare(build_config(dict(base, method="ogm"))))
    assert changed["history"][-1]["train_loss"] != joint["history"][-1]["train_loss"]


def test_training_loss_is_the_joint_cross_entropy() -> None:
    m = _image_method("ogm_ge")
    g = torch.Generator().manual_seed(1)
    batch = {"a": torch.randn(4, 1, 8, 8, generator=g), "v": torch.randn(4, 1, 8, 8, generator=g),
             "label": torch.tensor([0, 1, 2, 0])}
    m.model.eval()
    out = m.training_step(batch, SimpleNamespace(epoch=0))
    logits = m.model.head(m.encode(batch))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch["label"]))


def test_command_line_sets_and_records_the_options(tmp_path, capsys) -> None:
    tiny = ["--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "--method", "ogm", "--set", "method.alpha=0.3", "--set", "method.modulation_end=7",
                 "--set", "method.window=epochs", *tiny]) == 0
    (path,) = tmp_path.glob("ogm-*.json")
    options = json.loads(path.read_text())["config"]["method_options"]
    assert options == {"alpha": 0.3, "modulation_start": 0, "modulation_end": 7, "window": "epochs", "noise": False,
                       "modulate": "auto"}
    assert main(["run", "--method", "ogm_ge", "--set", "method.alpha=-1", *tiny]) == 2
    assert "method.alpha" in capsys.readouterr().err
    assert not list(tmp_path.glob("ogm_ge-*.json"))


# --- host-device synchronisation -----------------------------------------------------------------



def test_a_step_reads_one_value_from_the_device_the_ratio(tiny: dict) -> None:
    """The coefficients' branch needs ρ on the host (one read per step); the noise's std, one per
    modulated tensor, stays on the device."""
    run = prepare(build_config(dict(tiny, method="ogm_ge")))
    torch.manual_seed(0)
    run.method.build()
    stage = run.method.stage()
    per_step: list[list[str]] = []
    step, after = stage.step, stage.after_backward

    def guarded_step(batch, ctx):
        with host_syncs() as calls:
            out = step(batch, ctx)
        per_step.append(calls)
        return out

    def guarded_after(ctx, outputs):
        with host_syncs() as calls:
            after(ctx, outputs)
        per_step[-1].extend(calls)

    stage.step, stage.after_backward = guarded_step, guarded_after
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert run.method._rules["m0"] == "weights" and len(run.method._targets["m0"]) > 1  # noise on several
    assert len(per_step) == 2 * 6
    for calls in per_step:
        assert len(calls) == 1 and calls[0].startswith("item at ogm_ge.py"), calls


@pytest.mark.parametrize("epochs", [20, 7])
def test_default_window_is_the_first_half_of_the_epoch_budget(epochs: int) -> None:
    info = DataInfo("images", [ModalitySpec("a", "image", (1, 8, 8), "small_cnn"),
                               ModalitySpec("v", "image", (1, 8, 8), "small_cnn")], num_classes=3)
    m = create_method("ogm_ge", info, build_config({"method": "ogm_ge", "epochs": epochs}))
    active = [e for e in range(epochs) if m.active(e)]
    assert active == list(range(math.ceil(epochs / 2)))  # 0–9 of 20 (the reference: 0–50 of 100)
    with pytest.raises(UsageError, match="window=epochs"):
        create_method("ogm_ge", info, build_config({"method": "ogm_ge", "method.modulation_end": "50"}))
