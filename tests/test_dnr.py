"""D&R: purity, the strength a = tanh(λ·|P_train − P_val|), the soft re-initialisation towards the
construction-time snapshot (exact at a = 0 and a = 1, heads and BN buffers untouched), the
diagnosis schedule, and equivalence with ``joint`` when λ = 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run

from baselines.dnr import cluster_purity, eval_view, minmax, purity, relearn, strength
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import DataInfo, ModalitySpec
from benchmark.data.media import CachedSplit, FrameTransform
from benchmark.errors import UsageError
from benchmark.method import StepContext, create_method
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer

# --- the formulas ------------------------------------------------------------------------------


def test_purity_of_two_clusters() -> None:
    """Clusters {0, 0, 1} and {1, 1, 1} over 6 samples: (2 + 3) / 6 = 5/6."""
    labels = np.array([0, 0, 1, 1, 1, 1])
    clusters = np.array([0, 0, 0, 1, 1, 1])
    assert purity(labels, clusters) == pytest.approx(5 / 6, abs=1e-4)
    # cluster ids and label values are only names
    assert purity(labels + 7, np.array([4, 4, 4, 9, 9, 9])) == pytest.approx(5 / 6, abs=1e-4)
    assert purity(labels, np.arange(6)) == 1.0  # singletons are pure


def test_hand_check_strength() -> None:
    """P_train = 0.9, P_val = 0.6, λ = 3 ⇒ a = tanh(0.9) = 0.7163."""
    assert strength(0.9, 0.6, 3.0) == pytest.approx(0.7163, abs=1e-4)
    assert strength(0.6, 0.9, 3.0) == strength(0.9, 0.6, 3.0)  # the gap is absolute
    assert strength(0.9, 0.6, 0.0) == 0.0


def test_minmax_scales_each_dimension_to_minus_one_one() -> None:
    x = np.array([[0.0, 5.0, 2.0], [2.0, 7.0, 2.0], [1.0, 9.0, 2.0]], dtype=np.float32)
    y = minmax(x)
    assert y[:, 0].tolist() == [-1.0, 1.0, 0.0]
    assert y[:, 1].tolist() == [-1.0, 0.0, 1.0]
    assert y[:, 2].tolist() == [-1.0, -1.0, -1.0]  # a constant dimension


def test_kmeans_purity_on_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = centres[labels] + rng.normal(scale=0.1, size=(60, 2))
    assert cluster_purity(feats, labels, 3, n_init=10) == 1.0
    # a fixed random_state: the same answer twice, whatever the global stream
    torch.manual_seed(1)
    noisy = rng.normal(size=(60, 4))
    assert cluster_purity(noisy, labels, 3, 10) == cluster_purity(noisy, labels, 3, 10)


def test_relearn_is_exact_at_zero_and_one_and_a_lerp_between() -> None:
    theta = [torch.randn(4, 3), torch.randn(5)]
    init = [torch.randn(4, 3), torch.randn(5)]
    kept = [t.clone() for t in theta]
    relearn(theta, init, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(theta, kept))
    mid = [t.clone() for t in theta]
    relearn(mid, init, 0.25)
    assert all(torch.allclose(m, 0.75 * k + 0.25 * i) for m, k, i in zip(mid, kept, init))
    relearn(theta, init, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(theta, init))


def test_the_diagnosis_reads_the_training_split_without_augmentation() -> None:
    frames = np.random.default_rng(0).integers(0, 255, size=(4, 1, 3, 20, 20), dtype=np.uint8)
    augment = FrameTransform(16, True, torch.zeros(3), torch.ones(3))
    split = CachedSplit({"visual": frames}, np.arange(4) % 2, {"visual": augment})
    view = eval_view(split)
    assert view is not split and not view.transforms["visual"].train
    assert split.transforms["visual"] is augment and augment.train  # the training split keeps its augmentation
    rng = torch.get_rng_state()
    first, again = view[1]["visual"], view[1]["visual"]
    assert torch.equal(first, again) and first.shape == (1, 3, 16, 16)
    assert torch.equal(torch.get_rng_state(), rng)  # a resize draws nothing
    plain = CachedSplit({"a": frames}, np.arange(4) % 2, {})
    assert eval_view(plain) is plain


# --- the method on a model ---------------------------------------------------------------------


def _image_info() -> DataInfo:
    return DataInfo("img", [ModalitySpec("a", "vector", (6,), "mlp"),
                            ModalitySpec("v", "image", (1, 16, 16), "small_cnn")], num_classes=3)


def test_a_of_one_restores_the_snapshot_and_touches_nothing_else() -> None:
    method = create_method("dnr", _image_info(), build_config({"method": "dnr", "seed": 3}))
    model = method.build()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    x = {"a": torch.randn(8, 6), "v": torch.randn(8, 1, 16, 16), "label": torch.randint(0, 3, (8,))}
    for _ in range(3):
        opt.zero_grad()
        method.training_step(x, None)["loss"].backward()
        opt.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    method.relearn_encoders({"a": 1.0, "v": 1.0})
    state = model.state_dict()
    enc_params = {f"encoders.{n}" for n, _ in model.encoders.named_parameters()}
    assert any("bn" in n or "norm" in n or n.endswith(".weight") for n in enc_params)
    for k, v in state.items():
        if k in enc_params:
            assert torch.equal(v, init[k]), k  # every encoder parameter, BN affine included
        else:
            assert torch.equal(v, trained[k]), k  # heads and BN running buffers untouched
    buffers = [k for k in state if "running_mean" in k]
    assert buffers and not all(torch.equal(state[k], init[k]) for k in buffers)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), momenta))
    # a = 0 on one encoder leaves it as it was
    method2 = create_method("dnr", _image_info(), build_config({"method": "dnr", "seed": 3}))
    m2 = method2.build()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with torch.no_grad():
        for p in m2.encoders.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in m2.state_dict().items()}
    method2.relearn_encoders({"a": 0.0, "v": 1.0})
    for k, v in m2.state_dict().items():
        if k.startswith("encoders.a."):
            assert torch.equal(v, moved[k])
        elif k.startswith("encoders.v.") and k in {f"encoders.{n}" for n, _ in m2.encoders.named_parameters()}:
            assert torch.equal(v, before[k])


def test_schedule_follows_the_code(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="dnr", epochs=100)))
    run.method.build()
    due = [e for e in range(100) if run.method.due(e)]
    assert due == [20, 40, 60, 80]  # e mod 20 = 0 and e > 0 (the count caps the run, below)
    run.method.diagnoses = [{}] * 3
    assert not run.method.due(80)


def test_diagnosis_runs_in_eval_mode_and_keeps_bn_and_rng(tiny: dict) -> None:
    run = prepare(build_config(dict(tiny, method="dnr")))
    method = run.method
    model = method.build()
    trainer = Trainer(run.cfg, run.data, run.device)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ctx = StepContext(trainer, method.stage(), 2, 0, 6, [])
    method.options.every = 1
    method.on_epoch_start(ctx)  # after epoch 1: diagnosis
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    (d,) = method.diagnoses
    assert d["after_epoch"] == 1
    for m in method.modalities:
        assert 0 < d["purity_train"][m] <= 1 and 0 < d["purity_val"][m] <= 1
        assert d["a"][m] == pytest.approx(math.tanh(3 * abs(d["purity_train"][m] - d["purity_val"][m])))
    changed = [k for k in state if not torch.equal(state[k], model.state_dict()[k])]
    assert all(k.startswith("encoders.") and "running" not in k for k in changed)
    log = method.epoch_log()
    assert log["dnr_reinits"] == 1 and "dnr_a_m0" in log and "dnr_purity_val_m1" in log


def _image_run(lam: float):
    from benchmark.data.base import MultimodalData, TensorSplit

    gen = torch.Generator().manual_seed(0)
    info = _image_info()

    def split(n: int) -> TensorSplit:
        return TensorSplit({"a": torch.randn(n, 6, generator=gen), "v": torch.randn(n, 1, 16, 16, generator=gen)},
                           torch.arange(n) % 3)

    data = MultimodalData(info, {"train": split(24), "val": split(12), "test": split(12)})
    cfg = build_config({"method": "dnr", "method.lambda_": lam, "method.every": 1, "epochs": 3})
    method = create_method("dnr", info, cfg)
    model = method.build()
    return method, model, Trainer(cfg, data, torch.device("cpu"))


@pytest.mark.parametrize("lam", [0.0, 50.0])
def test_diagnosis_keeps_batchnorm_statistics_with_a_cnn(lam: float) -> None:
    method, model, trainer = _image_run(lam)
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.5)  # away from the snapshot
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.on_epoch_start(StepContext(trainer, method.stage(), 2, 0, 1, []))
    after = model.state_dict()
    (d,) = method.diagnoses
    assert set(d["a"]) == {"a", "v"} and model.training
    params = {f"encoders.{n}" for n, _ in model.encoders.named_parameters()}
    for k, v in after.items():
        moved = not torch.equal(v, before[k])
        if lam == 0.0 or k not in params:
            assert not moved, k  # BN running statistics, head: untouched; a = 0: nothing moves
    if lam > 0:
        assert any(not torch.equal(after[k], before[k]) for k in params if d["a"][k.split(".")[1]] > 0)


# --- whole runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_lambda_zero_is_identical_to_joint(tiny: dict, fusion: str) -> None:
    base = dict(tiny, seed=5, epochs=3, diagnostics=False, fusion=fusion)
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    run = prepare(build_config(dict(base, method="dnr", **{"method.lambda_": 0, "method.every": 1})))
    record = execute(run)
    assert_same_run(joint, record)
    state_j, state_d = joint_run.method.model.state_dict(), run.method.model.state_dict()
    assert state_j.keys() == state_d.keys() and all(torch.equal(state_j[k], state_d[k]) for k in state_j)
    assert record["method_record"]["reinits"] == 1  # the diagnosis ran, with a = 0
    assert record["history"][2]["dnr_a_m0"] == 0.0
    changed = execute(prepare(build_config(dict(base, method="dnr", **{"method.lambda_": 50,
                                                                           "method.every": 1}))))
    assert changed["method_record"]["diagnoses"][0]["a"]["m0"] > 0
    assert changed["history"][-1]["train_loss"] != joint["history"][-1]["train_loss"]


@pytest.mark.parametrize("modalities", [2, 3])
def test_command_line_run_records_the_trace(tmp_path, modalities: int) -> None:
    args = ["run", "--method", "dnr", "--dataset", "synthetic", "--set", "epochs=3",
            "--set", "dataset.n_train=128", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", f"dataset.modalities={modalities}", "--set", "method.every=1",
            "--set", "method.n_init=2", "--set", "diagnostics=false", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("dnr-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["method_options"]["every"] == 1
    names = [f"m{i}" for i in range(modalities)]
    history = record["history"]
    assert [row["dnr_reinits"] for row in history] == [0, 0, 1]
    row = history[2]  # the diagnosis after epoch 1, at the start of epoch 2
    for m in names:
        for key in ("purity_train", "purity_val", "gap", "a"):
            assert math.isfinite(row[f"dnr_{key}_{m}"])
        assert 0 <= row[f"dnr_a_{m}"] < 1
    assert "dnr_a_m0" not in history[0]
    facts = record["method_record"]
    assert facts["reinits"] == 1 and facts["diagnoses"][0]["after_epoch"] == 1


def test_bad_options_are_refused(tmp_path, capsys) -> None:
    info = DataInfo("vec", [ModalitySpec("a", "vector", (6,), "mlp"), ModalitySpec("v", "vector", (6,), "mlp")],
                    num_classes=3)
    for key, value in (("lambda_", "-1"), ("every", "0"), ("max_reinits", "-1"), ("n_init", "0")):
        with pytest.raises(UsageError, match=f"method.{key}"):
            create_method("dnr", info, build_config({"method": "dnr", f"method.{key}": value}))
    assert main(["run", "--method", "dnr", "--set", "method.every=0", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path)]) == 2
    assert "method.every" in capsys.readouterr().err


# --- early stopping after a re-initialisation -----------------------------------------------------


@pytest.mark.parametrize("restart_at", [None, 2])
def test_restart_patience_counts_from_the_epoch_it_is_called_in(restart_at: int | None) -> None:
    """The loop's rule (StepContext.restart_patience): with a loss of zero gradient (weight decay
    only scales the logits) validation never improves after
    epoch 0, so patience 2 stops after epoch 2; a restart at the start of epoch 2 moves the stop
    to after epoch 2 + 2 = 4. The best epoch is still epoch 0."""
    from benchmark.data.base import MultimodalData, TensorSplit
    from benchmark.method import Stage

    gen = torch.Generator().manual_seed(0)
    info = DataInfo("toy", [ModalitySpec("a", "vector", (4,), "mlp")], 2)

    def split(n: int) -> TensorSplit:
        return TensorSplit({"a": torch.randn(n, 4, generator=gen)}, torch.arange(n) % 2)

    data = MultimodalData(info, {"train": split(32), "val": split(16), "test": split(16)})
    cfg = build_config({"method": "joint", "epochs": 20, "patience": 2, "batch_size": 16,
                        "precise_bn": 0})
    model = torch.nn.Linear(4, 2)

    def on_epoch_start(ctx: StepContext) -> None:
        if ctx.epoch == restart_at:
            ctx.restart_patience()

    stage = Stage(name="toy", module=model, step=lambda b, ctx: {"loss": 0.0 * model(b["a"]).sum()},
                  predict=lambda b: model(b["a"]), seed_key="toy", on_epoch_start=on_epoch_start)
    result = Trainer(cfg, data, torch.device("cpu")).fit(stage)
    assert result.best_epoch == 0 and result.stopped_early
    assert result.epochs_run == (3 if restart_at is None else 5)


def test_a_reinitialisation_that_moves_weights_restarts_patience(tiny: dict) -> None:
    """λ = 0 moves nothing and leaves early stopping as joint's (the λ = 0 invariance); λ > 0
    restarts the count at the epoch after the diagnosis, unless restart_patience is off."""
    calls = []
    run = prepare(build_config(dict(tiny, method="dnr", **{"method.lambda_": 50, "method.every": 1})))
    method = run.method
    method.build()
    trainer = Trainer(run.cfg, run.data, run.device)
    trainer.restart_patience = lambda epoch: calls.append(epoch)  # type: ignore[method-assign]
    method.on_epoch_start(StepContext(trainer, method.stage(), 2, 0, 1, []))
    assert max(method.diagnoses[0]["a"].values()) > 0 and calls == [2]
    method.options.restart_patience = False
    method.on_epoch_start(StepContext(trainer, method.stage(), 3, 0, 1, []))
    assert len(method.diagnoses) == 2 and calls == [2]
    zero = prepare(build_config(dict(tiny, method="dnr", **{"method.lambda_": 0, "method.every": 1})))
    zero.method.build()
    trainer = Trainer(zero.cfg, zero.data, zero.device)
    trainer.restart_patience = lambda epoch: calls.append(epoch)  # type: ignore[method-assign]
    zero.method.on_epoch_start(StepContext(trainer, zero.method.stage(), 2, 0, 1, []))
    assert calls == [2]
