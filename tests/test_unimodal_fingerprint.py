"""A unimodal checkpoint is reused only by the code and architecture that made it; unimodal
training stops early on validation accuracy; precise BatchNorm leaves training untouched."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmark.config import build_config
from benchmark.models.encoders import MLPEncoder
from benchmark.precise_bn import recompute_batchnorm
from benchmark.registry import ENCODERS
from benchmark.runner import execute, prepare
from benchmark.unimodal import code_fingerprint


class EncoderV1(MLPEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderV2(MLPEncoder):
    """The same architecture and parameters as V1; its forward pass differs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 2.0


def _facts(record: dict) -> dict:
    return record["method_record"]["unimodal"]["m0"]


def test_checkpoint_of_other_encoder_code_is_retrained_and_the_record_says_why(tiny, tmp_path: Path,
                                                                             monkeypatch) -> None:
    cfg = dict(tiny, method="unimodal")
    cache = str(tmp_path)
    monkeypatch.setitem(ENCODERS._entries, "mlp", EncoderV1)
    first = execute(prepare(build_config(cfg)), cache_dir=cache)
    again = execute(prepare(build_config(cfg)), cache_dir=cache)
    assert _facts(first)["reused"] is False and _facts(again)["reused"] is True  # same code: reused
    monkeypatch.setitem(ENCODERS._entries, "mlp", EncoderV2)
    changed = execute(prepare(build_config(cfg)), cache_dir=cache)
    facts = _facts(changed)
    assert facts["reused"] is False
    assert "other code or architecture" in facts["retrained"] and "fingerprint" in facts["retrained"]
    assert len(list((tmp_path / "unimodal").glob("*.pt"))) == 1  # replaced, not kept beside it
    # the retrained checkpoint is the one reused from now on
    assert _facts(execute(prepare(build_config(cfg)), cache_dir=cache))["reused"] is True


def test_fingerprint_sees_code_and_architecture() -> None:
    from benchmark.data.base import ModalitySpec

    spec = ModalitySpec("m0", "vector", (6,), "mlp")
    base = code_fingerprint(nn.Sequential(EncoderV1(spec)))
    assert code_fingerprint(nn.Sequential(EncoderV1(spec))) == base  # fresh weights: same fingerprint
    assert code_fingerprint(nn.Sequential(EncoderV2(spec))) != base  # other code
    assert code_fingerprint(nn.Sequential(EncoderV1(spec, hidden=64))) != base  # other shapes


def test_unimodal_training_stops_early_and_says_whether_it_converged(tiny) -> None:
    cfg = dict(tiny, method="unimodal", epochs=1, unimodal_epochs=40, unimodal_patience=2, lr=0.05)
    record = execute(prepare(build_config(cfg)))
    facts = _facts(record)
    conv = record["convergence"]["unimodal:m0"]
    assert facts["epochs_run"] < 40 and conv["stopped_early"] and not conv["still_improving"]
    assert facts["epochs_run"] == facts["best_epoch"] + 1 + 2  # best epoch, then `patience` epochs
    assert conv["budget"] == 40 and conv["patience"] == 2
    lrs = [row["lr"] for row in record["history"] if row["stage"] == "unimodal:m0"]
    assert lrs == [0.05] * len(lrs)  # unimodal_lr_decay (4) never came before the patience (2)
    env = record["environment"]
    assert env["threads"] == torch.get_num_threads() and env["deterministic"] is True and env["cpu"]


def test_unimodal_learning_rate_falls_on_a_plateau_at_most_twice(tiny) -> None:
    cfg = dict(tiny, method="unimodal", epochs=30, unimodal_patience=4, unimodal_lr_decay=1, lr=0.05)
    record = execute(prepare(build_config(cfg)))
    rows = [row for row in record["history"] if row["stage"] == "unimodal:m0"]
    lrs = sorted({round(row["lr"], 8) for row in rows}, reverse=True)
    assert lrs[0] == 0.05 and len(lrs) >= 2 and lrs[-1] >= 0.0005 - 1e-12  # tenfold, at most twice
    # the first decay follows an epoch (unimodal_lr_decay = 1) that did not beat the best before it
    first_low = next(i for i, row in enumerate(rows) if row["lr"] < 0.05)
    val = [row["val_accuracy"] for row in rows]
    assert val[first_low - 1] <= max(val[:first_low - 1])


def test_precise_batchnorm_recomputes_only_trained_layers() -> None:
    torch.manual_seed(0)
    trained, frozen = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    frozen.requires_grad_(False)
    model = nn.Sequential(trained, frozen, nn.Dropout(0.5))
    x = torch.randn(64, 3) * 3 + 1
    before = frozen.running_mean.clone()
    used = recompute_batchnorm(model, [{"x": x[:32], "label": x[:32, 0]}, {"x": x[32:], "label": x[32:, 0]}],
                               lambda b: model(b["x"]), max_samples=1000)
    assert used == 64 and model.training and trained.momentum == 0.1  # modes and momentum restored
    torch.testing.assert_close(trained.running_mean, x.mean(0))  # the exact mean, not a moving average
    torch.testing.assert_close(frozen.running_mean, before)


def test_fingerprint_reads_every_helper_of_the_optimiser() -> None:
    """A change to the fused step or its zero momentum buffers changes the weights a unimodal
    training produces, so their source is part of the fingerprint, as make_optimizer's is."""
    from benchmark.unimodal import _training_code

    names = {f.__name__ for f in _training_code()}
    assert {"make_optimizer", "fused_on_cpu", "zero_momentum", "recompute_batchnorm"} <= names
