"""Per-loss gradients: a stage that names its losses gets each one's gradient and decides what the
parameters receive (the hook MMPareto, AGM and UDI's controller need)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.config import build_config
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.device import seed_everything
from benchmark.method import Stage
from benchmark.trainer import Trainer


def _data() -> MultimodalData:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        y = torch.arange(n) % 3
        x = nn.functional.one_hot(y, 6).float() + 0.5 * torch.randn(n, 6, generator=gen)
        return TensorSplit({"a": x, "b": torch.randn(n, 6, generator=gen)}, y)

    info = DataInfo("toy", [ModalitySpec(m, "vector", (6,), "mlp") for m in ("a", "b")], 3)
    return MultimodalData(info, {"train": split(96), "val": split(48), "test": split(48)})


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(6, 3), nn.Linear(6, 3), nn.Linear(6, 3)


def _train(losses: list[str] | None, combine=None, loss: str = "l1+l2", **settings) -> dict[str, torch.Tensor]:
    data = _data()
    cfg = build_config({"method": "joint", "epochs": 2, "batch_size": 16, "lr": 0.1, "precise_bn": 0, **settings})
    seed_everything(0)
    torch.manual_seed(0)
    model = TwoHeads()

    def step(batch, ctx):
        l1 = F.cross_entropy(model.a(batch["a"]), batch["label"])
        l2 = F.cross_entropy(model.b(batch["b"]) + model.a(batch["a"]), batch["label"])
        return {"loss": {"l1+l2": l1 + l2, "l1": l1}[loss], "l1": l1, "l2": l2}

    stage = Stage(name="toy", module=model, step=step, predict=lambda b: model.a(b["a"]), seed_key="toy",
                  losses=losses, combine_gradients=combine)
    Trainer(cfg, data, torch.device("cpu")).fit(stage)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _summed(grads, ctx):
    return [grads["l1"][i] + grads["l2"][i] for i in range(len(grads["l1"]))]


def test_summed_per_loss_gradients_train_like_the_summed_loss():
    plain = _train(None)
    combined = _train(["l1", "l2"], _summed)
    for name in plain:
        torch.testing.assert_close(combined[name], plain[name], rtol=1e-5, atol=1e-6)


def test_keeping_one_losss_gradient_trains_like_that_loss_alone():
    # without weight decay: head b, reached by l2, receives a zero gradient here and none there
    alone = _train(None, loss="l1", weight_decay=0.0)
    kept = _train(["l1", "l2"], lambda grads, ctx: grads["l1"], weight_decay=0.0)
    for name in alone:
        torch.testing.assert_close(kept[name], alone[name], rtol=1e-5, atol=1e-6)


def test_each_losss_gradient_is_its_own_and_zero_where_it_does_not_reach():
    seen = {}

    def inspect(grads, ctx):
        seen.update({k: [g.clone() for g in v] for k, v in grads.items()})
        return _summed(grads, ctx)

    _train(["l1", "l2"], inspect)
    # parameters in order: a.weight, a.bias, b.weight, b.bias, unused.weight, unused.bias
    assert all(float(g.abs().sum()) == 0.0 for g in seen["l1"][2:])  # l1 reaches only head a
    assert float(seen["l2"][2].abs().sum()) > 0 and float(seen["l2"][0].abs().sum()) > 0
    assert all(float(g.abs().sum()) == 0.0 for g in seen["l2"][4:])  # nothing reaches the unused head


def test_a_named_loss_the_step_does_not_return_is_an_error():
    with pytest.raises(KeyError, match="l3"):
        _train(["l1", "l3"], _summed)


def test_a_method_that_names_its_losses_gets_the_hook_through_its_stage(tiny):
    """multi_loss with λ_uni = 1 and its two cross-entropies combined by the default rule (their
    sum) trains like multi_loss itself: the Method hook is wired by the base stage."""
    from baselines.joint import MultiLoss
    from benchmark.runner import execute, prepare

    class SummedMultiLoss(MultiLoss):
        gradient_losses = ["joint_ce", "unimodal_ce"]

    cfg = build_config(dict(tiny, method="multi_loss", probe=False, diagnostics=False))
    plain = execute(prepare(cfg))
    run = prepare(cfg)
    run.method.__class__ = SummedMultiLoss
    run.method.build()
    stage = run.method.stage()
    assert stage.losses == ["joint_ce", "unimodal_ce"] and stage.combine_gradients is not None
    combined = execute(run)
    assert combined["metrics"]["accuracy"] == pytest.approx(plain["metrics"]["accuracy"], abs=1 / 32)
    rows = [(a["train_loss"], b["train_loss"]) for a, b in zip(plain["history"], combined["history"])]
    assert rows and all(a == pytest.approx(b, rel=1e-4) for a, b in rows)
