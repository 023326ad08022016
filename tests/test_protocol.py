"""The shared protocol: splits, best-validation checkpoint, no dropped samples, repeatability."""

from __future__ import annotations

import numpy as np
import torch

from benchmark.config import build_config
from benchmark.data import TensorSplit, create_dataset, iterate_batches, stratified_split
from benchmark.runner import execute, prepare


def test_evaluation_batches_drop_nothing() -> None:
    split = TensorSplit({"a": torch.arange(10).float()[:, None]}, torch.zeros(10))
    batches = list(iterate_batches(split, 4, shuffle=False))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["a"] for b in batches])[:, 0], torch.arange(10).float())


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    kept, carved = stratified_split(labels, 0.2, seed=3)
    assert len(set(kept) & set(carved)) == 0 and len(kept) + len(carved) == 100
    assert np.bincount(labels[carved]).tolist() == [10, 6, 4]
    again = stratified_split(labels, 0.2, seed=3)[1]
    assert np.array_equal(carved, again)


def test_synthetic_is_deterministic_and_has_three_disjoint_splits() -> None:
    a = create_dataset("synthetic", {"n_train": 50, "n_val": 20, "n_test": 30})
    b = create_dataset("synthetic", {"n_train": 50, "n_val": 20, "n_test": 30})
    assert a.split_sizes() == {"train": 50, "val": 20, "test": 30}
    assert torch.equal(a.splits["train"].inputs["m0"], b.splits["train"].inputs["m0"])
    c = create_dataset("synthetic", {"n_train": 50, "n_val": 20, "n_test": 30, "seed": 1})
    assert not torch.equal(a.splits["train"].inputs["m0"], c.splits["train"].inputs["m0"])


def test_two_runs_with_one_seed_are_identical_to_the_bit(tiny: dict) -> None:
    records = [execute(prepare(build_config(dict(tiny, method="joint", seed=5)))) for _ in range(2)]
    for key in ("accuracy", "macro_f1", "val_accuracy", "probe_accuracy", "unimodal_accuracy"):
        assert records[0]["metrics"][key] == records[1]["metrics"][key]
    losses = [[row["train_loss"] for row in r["history"]] for r in records]
    assert losses[0] == losses[1]
    other = execute(prepare(build_config(dict(tiny, method="joint", seed=6))))
    assert [row["train_loss"] for row in other["history"]] != losses[0]


def test_best_validation_epoch_is_restored(tiny: dict) -> None:
    # lr so high that later epochs get worse: the restored weights must be those of the best epoch
    record = execute(prepare(build_config(dict(tiny, method="joint", epochs=4, lr=0.5))))
    history = record["history"]
    best = max(history, key=lambda row: row["val_accuracy"])
    assert record["stages"]["joint"]["best_epoch"] == best["epoch"]
    assert record["metrics"]["val_accuracy"] == best["val_accuracy"]


def test_record_holds_config_history_commit_and_versions(tiny: dict) -> None:
    record = execute(prepare(build_config(dict(tiny, method="multi_loss", **{"method.lambda_uni": 0.5}))))
    assert record["config"]["method_options"] == {"lambda_uni": 0.5}
    assert record["config"]["dataset_options"]["preset"] == "imbalanced"
    assert record["config"]["encoder"] == {"m0": "mlp", "m1": "mlp"}
    assert record["git_commit"]
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert len(record["history"]) == tiny["epochs"]
    assert {"train_loss", "val_accuracy", "epoch_seconds"} <= set(record["history"][0])
