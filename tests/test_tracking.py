"""Experiment tracking: TensorBoard logs read back and compared with the record; MLflow through
its client API (a stand-in client here) and refused with one line when the package is absent."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.config import build_config
from benchmark.errors import DivergedError, UsageError
from benchmark.runner import prepare, run_and_record


def _f32(value: float) -> float:
    """TensorBoard keeps scalars as float32."""
    return float(np.float32(value))


def _read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at one step"
        out[tag] = {e.step: e.value for e in events}
    return out


def test_tensorboard_logs_match_the_record(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = build_config({**tiny, "method": "udi", "log": "tensorboard", "device": "cpu"})
    path, record = run_and_record(prepare(cfg), tmp_path / "runs")
    folder = tmp_path / "runs" / f"{path.stem}.tensorboard"
    assert record["tracking"] == {"log": "tensorboard", "folder": str(folder)}
    scalars = _read_scalars(folder)

    # every numeric field of every history row, at its stage's epoch
    expected: dict[str, dict[int, float]] = {}
    for row in record["history"]:
        for key, value in row.items():
            if key not in ("stage", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{row['stage']}/{key}", {})[row["epoch"]] = _f32(value)
    assert len({s["stage"] for s in record["history"]}) >= 3  # two unimodal stages and a follower's
    for tag, by_step in expected.items():
        assert scalars.get(tag) == by_step, tag
    follower = record["method_record"]["followers"][0]
    assert f"udi:follower:{follower}/lambda_con" in expected  # the controller's weights per epoch

    # UDI's controller trace from the method record
    trace = record["method_record"]["controller"]["trace"][follower]
    for name in ("lambda_con", "lambda_com"):
        logged = scalars[f"udi/controller/{follower}/{name}"]
        assert logged == {row["epoch"]: _f32(row[name]) for row in trace}

    # test metrics and the diagnostics at the end
    metrics = record["metrics"]
    assert scalars["test/accuracy"] == {0: _f32(metrics["accuracy"])}
    diag = metrics["diagnostics"]
    for m, phi in diag["shapley"].items():
        assert scalars[f"diagnostics/shapley/{m}"] == {0: _f32(phi)}
    if diag["imbalance_degree"] is not None:
        assert scalars["diagnostics/imbalance_degree"] == {0: _f32(diag["imbalance_degree"])}
    for m, accs in diag["noise_accuracy"].items():
        for sigma, acc in zip(diag["noise_levels"], accs):
            assert scalars[f"diagnostics/noise_accuracy/{m}/sigma_{sigma:g}"] == {0: _f32(acc)}
    for entry in diag["rho"]:
        for m, value in entry["rho"].items():
            if value is not None:
                assert scalars[f"{entry['stage']}/rho/{m}"][entry["epoch"]] == _f32(value)


def test_log_dir_gets_the_logs_and_the_key_ignores_tracking(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    plain = prepare(build_config({**tiny, "method": "joint", "device": "cpu"}))
    cfg = build_config({**tiny, "method": "joint", "device": "cpu", "log": "tensorboard",
                        "log_dir": str(tmp_path / "tb"), "save_checkpoint": "true"})
    run = prepare(cfg)
    assert run.key == plain.key  # where logs and checkpoints go never changes a run's key
    path, record = run_and_record(run, tmp_path / "runs")
    scalars = _read_scalars(tmp_path / "tb" / f"{path.stem}.tensorboard")
    assert scalars["joint/train_loss"] == {r["epoch"]: _f32(r["train_loss"]) for r in record["history"]}
    assert not list((tmp_path / "runs").glob("*.tensorboard"))


def test_tracking_options_are_checked_before_training(tiny, tmp_path, capsys):
    with pytest.raises(UsageError, match="log must be tensorboard, mlflow or empty"):
        build_config({**tiny, "log": "wandb"})
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UsageError, match="log_dir .* is a file"):
        prepare(build_config({**tiny, "log": "tensorboard", "log_dir": str(afile)}))


def test_mlflow_without_its_package_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = ["run", "--method", "joint", "--out", str(tmp_path / "runs"), "--quiet", "--set", "log=mlflow"]
    args += [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "log=mlflow needs the package mlflow; pip install mlflow" in err[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


class _FakeClient:
    """Stands in for mlflow.tracking.MlflowClient: keeps what it is given."""

    instances: list[_FakeClient] = []

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        self.metrics: dict[str, dict[int, float]] = {}
        self.params: dict[str, str] = {}
        self.status = None
        _FakeClient.instances.append(self)

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.experiment = name
        return "7"

    def create_run(self, experiment_id, run_name):
        self.run_name = run_name
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_param(self, run_id, key, value):
        self.params[key] = value

    def log_metric(self, run_id, key, value, step=0):
        self.metrics.setdefault(key, {})[step] = value

    def set_terminated(self, run_id, status):
        self.status = status


@pytest.fixture
def fake_mlflow(monkeypatch):
    """A stand-in ``mlflow`` package whose client keeps what it is given."""
    mlflow = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = _FakeClient
    mlflow.tracking = tracking
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace() if name == "mlflow" else real(name, *a))
    _FakeClient.instances.clear()
    return _FakeClient.instances


def test_mlflow_run_through_its_client(tiny, tmp_path, fake_mlflow):
    cfg = build_config({**tiny, "method": "udi", "log": "mlflow", "device": "cpu", "diagnostics": "false"})
    path, record = run_and_record(prepare(cfg), tmp_path / "runs")
    (client,) = fake_mlflow
    assert client.uri == (tmp_path / "runs" / "mlruns").resolve().as_uri()
    assert client.run_name == path.stem and client.status == "FINISHED"
    assert client.params["method"] == "udi"
    follower = record["method_record"]["followers"][0]
    rows = [r for r in record["history"] if r["stage"] == f"udi:follower:{follower}"]
    # ':' is not allowed in MLflow names: the stage's becomes '_'
    assert client.metrics[f"udi_follower_{follower}/lambda_con"] == {r["epoch"]: r["lambda_con"] for r in rows}
    assert client.metrics["test/accuracy"] == {0: record["metrics"]["accuracy"]}


def test_a_diverging_run_ends_its_logs_as_failed_and_keeps_no_checkpoint(tiny, tmp_path, fake_mlflow):
    cfg = build_config({**tiny, "method": "joint", "log": "mlflow", "device": "cpu", "lr": "1e30",
                        "weight_decay": "0", "save_checkpoint": "true"})
    with pytest.raises(DivergedError):
        run_and_record(prepare(cfg), tmp_path / "runs")
    (client,) = fake_mlflow
    assert client.status == "FAILED"
    (record_file,) = (tmp_path / "runs").glob("*.json")
    assert json.loads(record_file.read_text())["status"] == "failed"
    assert not list((tmp_path / "runs").glob("*.pt"))
