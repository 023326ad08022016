"""Plug-ins written outside the suite: a method and a dataset in a module named in $BMB_PLUGINS run
through `run`, a local sweep (spawned workers) and submitit's debug executor (the SLURM path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"
SWEEP = """seeds = [0]
[settings]
epochs = 2
batch_size = 32
[datasets.two-blobs]
settings = { "dataset.n" = 64 }
[methods.mean_logits]
variants = [{ "method.scale" = [1.0, 2.0] }]
[methods.joint]
"""


def bench(*args: str, plugins: str = "outside_plugin", timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(PLUGIN_DIR), str(ROOT)]))
    env.pop("BMB_PLUGINS", None)
    if plugins:
        env["BMB_PLUGINS"] = plugins
    return subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _records(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "records").glob("*/*.json"))]


def test_run_reads_a_plugin_method_and_dataset(tmp_path):
    out = tmp_path / "runs"
    done = bench("run", "--method", "mean_logits", "--dataset", "two-blobs", "--epochs", "2",
                 "--set", "method.scale=2.0", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["method"] == "mean_logits" and record["dataset"] == "two-blobs"
    assert record["config"]["method_options"] == {"scale": 2.0} and record["metrics"]["accuracy"] > 0.5
    # its options are listed like the suite's own
    shown = bench("run", "--help", "--method", "mean_logits")
    assert shown.returncode == 0 and "multiplier of the averaged logits" in shown.stdout
    listed = bench("list", "mean_logits")
    assert listed.returncode == 0 and "scale" in listed.stdout
    # without the variable the names are unknown: one line, exit 2
    missing = bench("run", "--method", "mean_logits", "--dataset", "two-blobs", "--out", str(out), plugins="")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "unknown dataset 'two-blobs'" in missing.stderr or "unknown method 'mean_logits'" in missing.stderr


def test_a_plugin_that_cannot_be_imported_is_one_line():
    done = bench("list", "methods", plugins="no_such_plugin_module")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no_such_plugin_module" in done.stderr and "PYTHONPATH" in done.stderr


def test_local_sweep_workers_import_the_plugins(tmp_path):
    sweep = tmp_path / "plugin.toml"
    sweep.write_text(SWEEP)
    store = tmp_path / "store"
    done = bench("sweep", str(sweep), "--store", str(store), "--jobs", "2", "--no-live")
    assert done.returncode == 0, done.stdout + done.stderr
    recs = _records(store)
    assert sorted((r["method"], r["config"]["method_options"].get("scale")) for r in recs) == \
        [("joint", None), ("mean_logits", 1.0), ("mean_logits", 2.0)]
    assert all(r["status"] == "ok" and r["dataset"] == "two-blobs" for r in recs)


def test_slurm_jobs_import_the_plugins(tmp_path):
    sweep = tmp_path / "plugin.toml"
    sweep.write_text(SWEEP)
    store = tmp_path / "store"
    done = bench("sweep", str(sweep), "--store", str(store), "--slurm", "1", "--slurm-cluster", "debug",
                 "--slurm-wait", "--slurm-opt", "timeout_min=5")
    assert done.returncode == 0, done.stdout + done.stderr
    recs = _records(store)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    assert {r["method"] for r in recs} == {"joint", "mean_logits"}
