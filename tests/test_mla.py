"""MLA: the OWM projector against a hand computation, orthogonality of the head's updates to
earlier features, M optimizer steps per batch, and the test-time fusions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import guard_steps, host_syncs, wide_mlp

from baselines.mla import MLA, OWMProjector, entropy_weights
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.errors import UsageError
from benchmark.method import StepContext
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer


def test_projector_update_matches_a_hand_computation_in_3d() -> None:
    proj = OWMProjector(3)
    feats = torch.tensor([[2.0, 0.0, 3.0], [0.0, 0.0, 1.0]])  # batch mean r = (1, 0, 2)
    r = [1.0, 0.0, 2.0]
    alpha = OWMProjector.alpha(3, 10)
    assert alpha == pytest.approx(0.1 ** 1.3)
    proj.update(feats, alpha)
    # P0 = I: k = r, P = I − r rᵀ / (α + |r|²), then P / ‖P‖_F
    denom = alpha + sum(v * v for v in r)
    raw = [[(1.0 if i == j else 0.0) - r[i] * r[j] / denom for j in range(3)] for i in range(3)]
    fro = math.sqrt(sum(v * v for row in raw for v in row))
    expected = [[v / fro for v in row] for row in raw]
    torch.testing.assert_close(proj.P, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # a second update starts from the normalised P: k = P rᵀ, P ← P − k kᵀ / (α + r k)
    r2 = [0.0, 1.0, 1.0]
    proj.update(torch.tensor([r2]), 0.1)
    k = [sum(expected[i][j] * r2[j] for j in range(3)) for i in range(3)]
    rk = sum(r2[i] * k[i] for i in range(3))
    raw2 = [[expected[i][j] - k[i] * k[j] / (0.1 + rk) for j in range(3)] for i in range(3)]
    fro2 = math.sqrt(sum(v * v for row in raw2 for v in row))
    torch.testing.assert_close(proj.P, torch.tensor([[v / fro2 for v in row] for row in raw2]),
                               rtol=1e-6, atol=1e-7)
    # the gradient projection: ∇W Pᵀ
    grad = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    want = [[sum(grad[a, j].item() * proj.P[i, j].item() for j in range(3)) for i in range(3)] for a in range(2)]
    torch.testing.assert_close(proj.project(grad), torch.tensor(want))


def test_first_update_is_skipped() -> None:
    proj = OWMProjector(3)
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    weight.grad = torch.ones(2, 3)
    feats = torch.ones(4, 3)
    assert proj.step(weight, feats, 0, 5) is False
    assert torch.equal(proj.P, torch.eye(3)) and torch.equal(weight.grad, torch.ones(2, 3))
    assert proj.step(weight, feats, 0, 5) is True
    assert not torch.equal(weight.grad, torch.ones(2, 3))


def test_projected_gradients_are_orthogonal_to_earlier_features() -> None:
    g = torch.Generator().manual_seed(0)
    proj = OWMProjector(16)
    means = []
    for b in range(6):
        feats = torch.randn(32, 16, generator=g) + torch.randn(1, 16, generator=g) * 2
        means.append(feats.mean(dim=0))
        proj.update(feats, OWMProjector.alpha(b, 6))
    grad = torch.randn(4, 16, generator=g)
    projected = proj.project(grad)
    for r in means:
        raw = (grad @ r).norm() / (grad.norm() * r.norm())
        after = (projected @ r).norm() / (projected.norm() * r.norm())
        assert raw > 0.05 and after < 0.05 * raw  # ≥ 95 % of the component removed


class _Recording(OWMProjector):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.seen: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, alpha: float) -> None:
        self.seen.append(features.detach().float().mean(dim=0))
        super().update(features, alpha)


def _prepared(tiny: dict, **extra):
    run = prepare(build_config(dict(tiny, method="mla", **extra)))
    run.method.build()
    return run, Trainer(run.cfg, run.data, torch.device("cpu"))


def test_head_updates_are_orthogonal_to_earlier_features_in_training(tiny: dict) -> None:
    run, trainer = _prepared(tiny, momentum=0.0, weight_decay=0.0, lr=0.5)
    method: MLA = run.method
    head = method.model.head
    method.projector = _Recording(head.in_features)
    deltas: list[torch.Tensor] = []
    plain_step = trainer.optimizer_step

    def recording_step(opt: torch.optim.Optimizer) -> None:
        before = head.weight.detach().clone()
        plain_step(opt)
        deltas.append(head.weight.detach() - before)

    trainer.optimizer_step = recording_step
    stage = method.stage()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)  # the head alone: ΔW = −lr ∇W Pᵀ
    batches = list(trainer.batches("train", shuffle=False))[:3]
    for i, batch in enumerate(batches):
        method.step(batch, StepContext(trainer, stage, 0, i, len(batches), [opt]))
    assert len(deltas) == 2 * len(batches) and len(method.projector.seen) == len(deltas) - 1
    for n, delta in enumerate(deltas[1:], start=1):  # every projected update ...
        for r in method.projector.seen[:n]:  # ... against every feature mean seen so far
            assert (delta @ r).norm() <= 0.02 * delta.norm() * r.norm()


@pytest.mark.parametrize("modalities", [2, 3])
def test_m_optimizer_steps_per_batch(tiny: dict, modalities: int) -> None:
    run, trainer = _prepared(tiny, epochs=1, **{"dataset.modalities": modalities})
    steps = []
    plain_step = trainer.optimizer_step
    trainer.optimizer_step = lambda opt: (steps.append(1), plain_step(opt))
    trainer.fit(run.method.stage())
    num_batches = math.ceil(tiny["dataset.n_train"] / tiny["batch_size"])
    assert len(steps) == modalities * num_batches


def test_each_step_trains_only_its_own_encoder(tiny: dict) -> None:
    run, trainer = _prepared(tiny, momentum=0.0, weight_decay=0.0)
    method: MLA = run.method
    snapshots = []
    plain_step = trainer.optimizer_step

    def recording_step(opt: torch.optim.Optimizer) -> None:
        before = {m: [p.detach().clone() for p in enc.parameters()] for m, enc in method.model.encoders.items()}
        plain_step(opt)
        snapshots.append({m: any(not torch.equal(b, p) for b, p in zip(before[m], enc.parameters()))
                          for m, enc in method.model.encoders.items()})

    trainer.optimizer_step = recording_step
    stage = method.stage()
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1)
    batch = next(trainer.batches("train", shuffle=False))
    method.step(batch, StepContext(trainer, stage, 0, 0, 6, [opt]))
    assert snapshots == [{"m0": True, "m1": False}, {"m0": False, "m1": True}]


def _entropy(row: list[float]) -> float:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return -sum(e / total * math.log(e / total) for e in exps)


def _mla(fusion: str, entropy: str):
    run = prepare(build_config({"method": "mla", "dataset.n_train": 64, "dataset.n_val": 16,
                                "dataset.n_test": 16, "method.fusion": fusion, "method.entropy": entropy}))
    return run.method


LOGITS = {"m0": torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.0]]),
          "m1": torch.tensor([[0.3, 0.1, 0.0], [0.0, 3.0, -2.0]])}


def test_per_sample_entropy_fusion_matches_a_hand_computation() -> None:
    fused = _mla("entropy", "sample").fuse(LOGITS)
    for i in range(2):
        ent = {m: _entropy(z[i].tolist()) for m, z in LOGITS.items()}
        top = max(ent.values())
        w = {m: math.exp(top - e) for m, e in ent.items()}
        s = sum(w.values())
        want = [sum(w[m] / s * LOGITS[m][i, c].item() for m in LOGITS) for c in range(3)]
        torch.testing.assert_close(fused[i], torch.tensor(want))
    # the more certain modality gets the larger weight, per sample
    w = entropy_weights(LOGITS, "sample")
    assert w["m0"][0].item() > 0.5 and w["m1"][1].item() > 0.5


def test_per_batch_entropy_fusion_matches_the_reference_computation() -> None:
    fused = _mla("entropy", "batch").fuse(LOGITS)
    ent = {}
    for m, z in LOGITS.items():  # softmax over the batch, entropy summed over the whole matrix
        total = 0.0
        for c in range(3):
            col = [z[i, c].item() for i in range(2)]
            exps = [math.exp(v) for v in col]
            total -= sum(e / sum(exps) * math.log(e / sum(exps)) for e in exps)
        ent[m] = total
    top = max(ent.values())
    w = {m: math.exp(top - e) for m, e in ent.items()}
    s = sum(w.values())
    want = sum(w[m] / s * LOGITS[m] for m in LOGITS)
    torch.testing.assert_close(fused, want)


def test_fixed_fusion_averages() -> None:
    torch.testing.assert_close(_mla("fixed", "sample").fuse(LOGITS), (LOGITS["m0"] + LOGITS["m1"]) / 2)


def test_bad_options_and_unequal_feature_sizes_are_refused(tiny: dict, monkeypatch) -> None:
    with pytest.raises(UsageError, match="entropy"):
        prepare(build_config(dict(tiny, method="mla", **{"method.entropy": "token"})))
    with pytest.raises(UsageError, match="fusion"):
        prepare(build_config(dict(tiny, method="mla", **{"method.fusion": "mean"})))
    with pytest.raises(UsageError, match="feature size"):
        prepare(build_config(dict(tiny, method="mla", **{"encoder.m1": wide_mlp(monkeypatch)})))


def test_projection_switch_changes_training_and_is_recorded(tiny: dict) -> None:
    on = execute(prepare(build_config(dict(tiny, method="mla"))))
    off = execute(prepare(build_config(dict(tiny, method="mla", **{"method.projection": "false"}))))
    assert on["config"]["method_options"]["projection"] is True
    assert off["config"]["method_options"]["projection"] is False
    assert on["method_record"]["projected_updates"] > 0 and off["method_record"]["projected_updates"] == 0
    assert on["history"][-1]["train_loss"] != off["history"][-1]["train_loss"]


def test_command_line_sets_and_records_the_options(tmp_path, capsys) -> None:
    tiny = ["--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "--method", "mla", "--set", "method.entropy=batch", "--set", "method.projection=off",
                 *tiny]) == 0
    (path,) = tmp_path.glob("mla-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"] == {"projection": False, "fusion": "entropy", "entropy": "batch"}
    assert set(record["metrics"]["unimodal_accuracy"]) == {"m0", "m1"}
    assert main(["run", "--method", "mla", "--set", "method.fusion=max", *tiny]) == 2
    assert "method.fusion" in capsys.readouterr().err


# --- host-device synchronisation -----------------------------------------------------------------



@pytest.mark.parametrize("projection", ["true", "false"])
def test_a_training_step_never_waits_for_the_device(tiny: dict, projection: str) -> None:
    """The projector's update and the M optimizer steps stay on the device: no host read or device
    copy in any step."""
    run = prepare(build_config(dict(tiny, method="mla", **{"method.projection": projection})))
    torch.manual_seed(0)
    run.method.build()
    stage = run.method.stage()
    per_step = guard_steps(stage)
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert len(per_step) == 2 * 6 and all(calls == [] for calls in per_step), per_step
    assert run.method.projected_updates == (2 * 6 * 2 - 1 if projection == "true" else 0)


def test_host_sync_guard_sees_a_read_in_method_code(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard above can fail: a value read inside the method's step is reported."""
    run = prepare(build_config(dict(tiny, method="mla")))
    torch.manual_seed(0)
    run.method.build()
    orig = OWMProjector.update

    def reading_update(self, features, alpha):
        orig(self, features, alpha)
        float(self.P.sum())

    monkeypatch.setattr(OWMProjector, "update", reading_update)
    stage = run.method.stage()
    batch = next(Trainer(run.cfg, run.data, run.device).batches("train", shuffle=False))
    ctx = StepContext(Trainer(run.cfg, run.data, run.device), stage, 0, 1, 6, [torch.optim.SGD(
        run.method.model.parameters(), lr=0.1)])
    with host_syncs(("baselines", "tests")) as calls:
        stage.step(batch, ctx)
    # two modalities: the very first projector update is skipped, the second one reads P once
    assert len(calls) == 1 and calls[0].startswith("__float__ at test_mla.py"), calls
