"""Optuna tuning: an exact trial budget over two workers, resuming, pruning, the best-parameter file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from benchmark.cli import main
from benchmark.config import build_config
from benchmark.data import create_dataset
from benchmark.store import read_record
from benchmark.tune import run_trial, search_space, work

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "dataset.n_train=160", "--set", "dataset.n_val=48", "--set", "dataset.n_test=48",
        "--set", "batch_size=32", "--epochs", "2"]
FIXED = {"method": "joint", "dataset": "synthetic", "seed": 0, "epochs": 2, "batch_size": 32, "probe": False,
         "dataset.n_train": 160, "dataset.n_val": 48, "dataset.n_test": 48}


def tune_proc(out: Path, trials: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "benchmark", "tune", "--method", "multi_loss", "--trials",
                             str(trials), "--out", str(out), "--quiet", *TINY, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def counted(out: Path, name: str = "multi_loss-synthetic") -> list:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_two_workers_share_an_exact_budget_resume_and_feed_a_sweep(tmp_path):
    out = tmp_path / "tuned"
    procs = [tune_proc(out, 5) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-400:] for r in results]
    first = counted(out)
    assert len(first) == 5  # five in total, not five each
    best = json.loads((out / "synthetic-multi_loss.json").read_text())
    assert best["method"] == "multi_loss" and set(best["params"]) == {"lr", "weight_decay", "method.lambda_uni"}
    assert best["val_accuracy"] == max(t.value for t in first if t.state == TrialState.COMPLETE)
    # re-invoking resumes: the earlier trials stay, only the missing ones run
    proc = tune_proc(out, 7)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    again = counted(out)
    assert len(again) == 7 and {t.number for t in first} <= {t.number for t in again}
    # the best-parameter file is consumed by a sweep
    sweep = tmp_path / "s.toml"
    sweep.write_text('seeds = [0]\n[settings]\nepochs = 2\nbatch_size = 32\nprobe = false\n[datasets.synthetic]\n'
                     'settings = { "dataset.n_train" = 160, "dataset.n_val" = 48, "dataset.n_test" = 48 }\n'
                     '[methods.multi_loss]\n')
    store = tmp_path / "store"
    assert main(["sweep", str(sweep), "--store", str(store), "--tuned", str(out), "--jobs", "1", "--no-live"]) == 0
    (record,) = [read_record(p) for p in (store / "records").glob("*/*.json")]
    best = json.loads((out / "synthetic-multi_loss.json").read_text())
    assert record["config"]["lr"] == pytest.approx(best["params"]["lr"])
    assert record["config"]["method_options"]["lambda_uni"] == pytest.approx(best["params"]["method.lambda_uni"])


def test_pruning_stops_a_trial_at_the_epoch_it_is_told_to(monkeypatch):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    monkeypatch.setattr(trial, "should_prune", lambda: True)
    cfg = build_config(FIXED)
    data = create_dataset(cfg.dataset, cfg.dataset_options)
    with pytest.raises(optuna.TrialPruned, match="step 0"):
        run_trial(trial, FIXED, data, search_space("joint"))
    assert list(study.trials[0].intermediate_values) == [0]


def test_a_dead_workers_trial_is_failed_and_replaced(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr("fixed", FIXED)
    orphan = study.ask()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_pid = gone.pid  # a process of this host that has ended
    orphan.set_user_attr("owner", f"{socket.gethostname()}:{dead_pid}")
    orphan.set_user_attr("heartbeat", 1e18)
    assert work(url, "s", FIXED, 2, 0, quiet=True) == 2
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2


def test_tune_bad_input(tmp_path, capsys):
    assert main(["tune", "--method", "no_such", "--trials", "2", "--out", str(tmp_path / "t")]) == 2
    assert "unknown method" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["tune", "--method", "joint", "--trials", "0", "--out", str(tmp_path / "t")]) == 2
    out = tmp_path / "t2"
    assert main(["tune", "--method", "joint", "--trials", "1", "--out", str(out), "--quiet", *TINY]) == 0
    # the same study resumed with other fixed settings is refused
    assert main(["tune", "--method", "joint", "--trials", "2", "--out", str(out), "--quiet", *TINY[:-1], "3"]) == 2
    assert "other fixed settings" in capsys.readouterr().err


@pytest.mark.timeout(400)
def test_a_worker_killed_mid_trial_is_failed_and_retried_by_the_next(tmp_path):
    """The scenario `nox -s cluster` runs on PostgreSQL, here on SQLite."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cluster
    finally:
        sys.path.remove(str(ROOT / "tools"))
    message = cluster.killed_worker_is_retried(f"sqlite:///{tmp_path / 'k.db'}", tmp_path)
    assert "retried as" in message


def test_no_private_optuna_attribute_is_used():
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in ("benchmark", "baselines", "udi", "tools")
                 for path in (ROOT / folder).rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if "._storage" in line or "._trial_id" in line]
    assert not offenders, offenders


def test_a_trial_averages_its_seeds_and_datasets(tmp_path):
    from benchmark.tune import trial_value

    fixed = {**FIXED, "datasets": ["synthetic"], "seeds": [0, 1]}
    data = {"synthetic": create_dataset("synthetic", build_config(FIXED).dataset_options)}
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    value = trial_value(trial, fixed, data, search_space("joint"))
    params = study.trials[0].params
    singles = [run_trial(optuna.trial.FixedTrial(params), {**FIXED, "seed": seed}, data["synthetic"],
                         search_space("joint"), report_epochs=False) for seed in (0, 1)]
    assert value == pytest.approx(sum(singles) / 2)
    assert list(study.trials[0].intermediate_values) == [0, 1]  # reported after each run


def test_tune_over_seeds_writes_the_study_and_a_sweep_warns_about_another_budget(tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["tune", "--method", "joint", "--trials", "1", "--seeds", "0,1", "--out", str(out), "--quiet",
                 *TINY]) == 0
    best = json.loads((out / "synthetic-joint.json").read_text())
    assert best["fixed"]["seeds"] == [0, 1] and best["study"] == "joint-synthetic"
    sweep = tmp_path / "s.toml"
    sweep.write_text('seeds = [0]\n[settings]\nepochs = 3\nbatch_size = 32\nprobe = false\n[datasets.synthetic]\n'
                     'settings = { "dataset.n_train" = 160, "dataset.n_val" = 48, "dataset.n_test" = 48 }\n'
                     '[methods.joint]\n')
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--store", str(tmp_path / "store"), "--tuned", str(out), "--list"]) == 0
    err = capsys.readouterr().err
    assert "tuned with epochs 2 (sweep: 3)" in err


def test_every_method_declares_a_search_space_that_tune_accepts():
    from benchmark.registry import METHODS, list_methods

    for name in list_methods():
        trial = optuna.create_study(direction="maximize").ask()
        assignments = search_space(name)(trial)
        assert {"lr", "weight_decay"} <= set(assignments)
        build_config({"method": name, "dataset": "synthetic", **assignments})  # every key is a real option
        assert search_space(name) == METHODS.get(name).search_space
