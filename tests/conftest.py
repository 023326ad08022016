"""Shared fixtures: tiny configurations that train in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

# The machine is small and shared: one thread keeps tests predictable.
torch.set_num_threads(int(os.environ.get("BMB_TEST_THREADS", "1")))

TINY_SYNTHETIC = {
    "dataset": "synthetic",
    "dataset.n_train": 192,
    "dataset.n_val": 64,
    "dataset.n_test": 64,
    "epochs": 2,
    "batch_size": 32,
}


@pytest.fixture
def tiny() -> dict:
    """Flat assignments for a tiny synthetic run (copy and extend per test)."""
    return dict(TINY_SYNTHETIC)
