"""DGL: the fusion head trains on the detached fused loss only (its gradients are joint's on the
same features), the encoders on α Σ_m L_m only (unchanged when L_d is scaled, exactly zero when
α = 0), the single backward equals the reference's two backward passes, modality dropout with
the full bias, clipping, the per-epoch trace, the options and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import guard_steps
from torch.func import functional_call

from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.errors import UsageError
from benchmark.method import build_method, create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer


def _pair(tiny: dict, modalities: int = 2, **settings):
    """DGL and joint built for the same seed (the same initial weights), and a batch."""
    items = dict(tiny, **{"dataset.modalities": modalities}, **settings)
    run = prepare(build_config(dict(items, method="dgl")))
    joint = prepare(build_config(dict({k: v for k, v in items.items() if not k.startswith("method.")},
                                      method="joint"))).method
    build_method(run.method)
    build_method(joint)
    split = run.data.splits["train"]
    batch = {m: x[:32] for m, x in split.inputs.items()}
    batch["label"] = split.labels[:32]
    return run.method, joint, batch


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _image_method(fusion: str = "concat", modalities: int = 2, **options):
    specs = [ModalitySpec(f"x{k}", "image", (1, 8, 8), "small_cnn") for k in range(modalities)]
    info = DataInfo("images", specs, num_classes=3)
    cfg = build_config({"method": "dgl", "fusion": fusion, **{f"method.{k}": v for k, v in options.items()}})
    m = create_method("dgl", info, cfg)
    build_method(m)
    g = torch.Generator().manual_seed(1)
    batch = {s.name: torch.randn(12, 1, 8, 8, generator=g) * (k + 1) for k, s in enumerate(specs)}
    batch["label"] = torch.randint(0, 3, (12,), generator=g)
    return m, batch


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_head_gradients_equal_joints_on_the_same_features(tiny: dict, fusion: str) -> None:
    dgl, joint, batch = _pair(tiny, fusion=fusion)
    a, b = dgl.model.state_dict(), joint.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # joint's initial weights
    dgl.training_step(batch, None)["loss"].backward()
    joint.training_step(batch, None)["loss"].backward()
    ours, theirs = _grads(dgl.model.head), _grads(joint.model.head)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


@pytest.mark.parametrize("modalities", [2, 3])
def test_encoder_gradients_are_alpha_times_the_unimodal_losses(tiny: dict, modalities: int) -> None:
    """Concat: L_m = CE(W_m f_m + b, y) with the full bias, written out by hand; scaling L_d changes
    no encoder gradient."""
    dgl, _, batch = _pair(tiny, modalities, **{"method.alpha": 2.5})
    params = list(dgl.model.encoders.parameters())
    out = dgl.training_step(batch, None)
    got = torch.autograd.grad(out["loss"], params, retain_graph=True)
    scaled = torch.autograd.grad(7.0 * out["_loss_fused"] + 2.5 * out["_loss_unimodal"].sum(), params,
                                 retain_graph=True)
    for a, b in zip(got, scaled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    feats = dgl.encode(batch)
    fc = dgl.model.head.fc
    start, by_hand = 0, []
    for m in dgl.modalities:
        stop = start + feats[m].shape[1]
        by_hand.append(F.cross_entropy(feats[m] @ fc.weight[:, start:stop].t() + fc.bias, batch["label"]))
        start = stop
    torch.testing.assert_close(out["_loss_unimodal"], torch.stack(by_hand).detach())
    want = torch.autograd.grad(2.5 * sum(by_hand), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_alpha_zero_leaves_the_encoders_exactly_zero_gradients(tiny: dict) -> None:
    dgl, _, batch = _pair(tiny, **{"method.alpha": 0})
    dgl.training_step(batch, None)["loss"].backward()
    for p in dgl.model.encoders.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert any(torch.count_nonzero(p.grad) > 0 for p in dgl.model.head.parameters())


def test_alpha_zero_without_weight_decay_never_moves_the_encoders(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="dgl", weight_decay=0, **{"method.alpha": 0})))
    start = {}

    def remember(trainer):
        start.update({k: v.clone() for k, v in run.method.model.encoders.state_dict().items()})
        return type(run.method).run(run.method, trainer)

    run.method.run = remember
    execute(run)
    weights = [k for k in start if k.endswith(("weight", "bias"))]
    end = run.method.model.encoders.state_dict()
    assert weights and all(torch.equal(start[k], end[k]) for k in weights)


@pytest.mark.parametrize(("fusion", "modalities"), [("concat", 2), ("concat", 3), ("film", 2), ("gated", 3)])
def test_single_backward_equals_the_reference_two_backward_passes(fusion: str, modalities: int) -> None:
    """The reference: backward of α Σ L_m through the live head, drop the head's gradient, then
    backward of L_d. Here: one backward of L_d + α Σ L_m with the head detached in the L_m terms.
    Encoders with BatchNorm, two forward passes of the same batch in training mode."""
    m, batch = _image_method(fusion, modalities, alpha=3.0, clip_norm=0)
    m.model.zero_grad(set_to_none=True)
    m.training_step(batch, None)["loss"].backward()
    single = _grads(m.model)
    m.model.zero_grad(set_to_none=True)
    fused, unimodal = m.split_losses(batch, detach_head=False)
    (3.0 * unimodal.sum()).backward(retain_graph=True)
    for p in m.model.head.parameters():
        p.grad = None
    fused.backward()
    double = _grads(m.model)
    assert single.keys() == double.keys() == {n for n, _ in m.model.named_parameters()}
    for name in single:
        torch.testing.assert_close(single[name], double[name], rtol=0, atol=0)


def test_modality_dropout_keeps_the_full_bias_and_serves_as_the_unimodal_prediction(tiny: dict) -> None:
    dgl, _, batch = _pair(tiny)
    dgl.model.eval()
    out = dgl.eval_forward(batch)
    fc, feats = dgl.model.head.fc, out.features
    d0 = feats["m0"].shape[1]
    torch.testing.assert_close(out.unimodal["m0"], feats["m0"] @ fc.weight[:, :d0].t() + fc.bias)
    torch.testing.assert_close(out.unimodal["m1"], feats["m1"] @ fc.weight[:, d0:].t() + fc.bias)
    torch.testing.assert_close(out.logits, fc(torch.cat([feats["m0"], feats["m1"]], dim=1)))


@pytest.mark.parametrize("modalities", [2, 3])
def test_concat_shortcut_is_the_head_on_zero_filled_features(tiny: dict, modalities: int) -> None:
    """Concat heads compute W_m f_m + b without the zero blocks: the head on the zero-filled
    features, with detached parameters (up to float rounding), and no gradient to the head."""
    dgl, _, batch = _pair(tiny, modalities)
    feats = dgl.encode(batch)
    got = dgl.dropout_logits(feats)
    head = dgl.model.head
    for m in dgl.modalities:
        filled = {k: f if k == m else torch.zeros_like(f) for k, f in feats.items()}
        want = functional_call(head, {n: p.detach() for n, p in head.named_parameters()}, (filled,))
        torch.testing.assert_close(got[m], want)
    torch.stack(list(got.values())).sum().backward()
    assert all(p.grad is None for p in head.parameters())
    assert all(p.grad is not None for p in dgl.model.encoders.parameters())


def test_clipping_bounds_the_norm_of_all_gradients(tiny: dict) -> None:
    for clip, clipped in ((1e-3, True), (0, False)):
        dgl, _, batch = _pair(tiny, **{"method.clip_norm": clip})
        out = dgl.training_step(batch, None)
        out["loss"].backward()
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dgl.model.parameters()]))
        reference = {n: torch.nn.Parameter(p.detach().clone()) for n, p in dgl.model.named_parameters()}
        for n, p in dgl.model.named_parameters():
            reference[n].grad = p.grad.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(reference.values(), clip)  # what the reference calls
        dgl.after_backward(None, out)
        for n, p in dgl.model.named_parameters():
            torch.testing.assert_close(p.grad, reference[n].grad)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dgl.model.parameters()]))
        if clipped:
            assert before > 1e-3 and after.item() == pytest.approx(1e-3, rel=1e-4)
        else:
            assert after.item() == before.item()


def test_options_are_checked(tiny: dict) -> None:
    for key, value in (("alpha", "-1"), ("alpha", "inf"), ("clip_norm", "-5")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            prepare(build_config(dict(tiny, method="dgl", **{f"method.{key}": value})))


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, capsys, modalities: int) -> None:
    tiny = ["--dataset", "synthetic", "--set", "dataset.n_train=96", "--set", "dataset.n_val=32",
            "--set", "dataset.n_test=32", "--set", "epochs=2", "--set", f"dataset.modalities={modalities}",
            "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "--method", "dgl", "--set", "method.alpha=2", "--set", "method.clip_norm=0.5", *tiny]) == 0
    (path,) = tmp_path.glob("dgl-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"] == {"alpha": 2.0, "clip_norm": 0.5}
    assert len(record["history"]) == 2
    for row in record["history"]:
        losses = [row["dgl_loss_fused"], *(row[f"dgl_loss_m{k}"] for k in range(modalities))]
        assert all(0 < v < 10 for v in losses)
        # train_loss = L_d + α Σ L_m, the same sample-weighted means
        assert row["train_loss"] == pytest.approx(losses[0] + 2 * sum(losses[1:]), rel=1e-5)
        assert 0 <= row["dgl_clipped"] <= 1
    assert set(record["metrics"]["unimodal_accuracy"]) == {f"m{k}" for k in range(modalities)}
    assert record["method_record"]["clipped_steps"] >= 0
    assert main(["run", "--method", "dgl", "--set", "method.clip_norm=-1", *tiny]) == 2
    assert "method.clip_norm" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_a_training_step_never_waits_for_the_device(tiny: dict, fusion: str) -> None:
    """The trace and the clipping statistics stay on the device (one read per epoch)."""
    run = prepare(build_config(dict(tiny, method="dgl", fusion=fusion)))
    build_method(run.method)
    stage = run.method.stage()
    per_step = guard_steps(stage)
    after = stage.after_backward

    def guarded_after(ctx, outputs):
        from helpers import host_syncs

        with host_syncs() as calls:
            after(ctx, outputs)
        per_step[-1].extend(calls)

    stage.after_backward = guarded_after
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert len(per_step) == 2 * 6 and all(calls == [] for calls in per_step), per_step
