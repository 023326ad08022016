"""Faults: bad input, full or read-only disks, corrupt files, stale claims, killed workers.

Every case asserts the exit status, one line of output, and that nothing was written or lost.
We run as root, which writes through permission bits, so a read-only or full disk is simulated by
making the write call fail (``os.write`` or ``os.fsync`` raising the error the kernel would give).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.claims import holder, try_claim, wait_claim
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.errors import DivergedError
from benchmark.runner import execute, prepare, write_json_atomic
from benchmark.store import Store, read_record

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "dataset.n_train=64", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
        "--epochs", "1", "--set", "batch_size=32", "--set", "probe=false", "--quiet"]
ONE_WORKER = ["--no-live", "--jobs", "1", "--threads-per-run", "1"]  # in this process, one thread
TINY_DATA = '"dataset.n_train" = 96, "dataset.n_val" = 32, "dataset.n_test" = 32'


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def one_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def fail_writes(monkeypatch, code: int = errno.ENOSPC, call: str = "write") -> None:
    """Every ``os.<call>`` fails as on a full (ENOSPC) or read-only (EROFS) disk."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, refuse)


def no_training(monkeypatch) -> None:
    """Training must not start in these cases: fail loudly if it does."""
    import benchmark.runner as runner

    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "execute", boom)


def write_sweep(tmp_path: Path, body: str, name: str = "s", datasets: str = "synthetic") -> Path:
    path = tmp_path / f"{name}.toml"
    tables = "".join(f"[datasets.{d}]\nsettings = {{ {TINY_DATA if d == 'synthetic' else ''} }}\n"
                     for d in datasets.split(","))
    path.write_text("seeds = [0]\n[settings]\nepochs = 1\nbatch_size = 32\nprobe = false\n" + tables + body)
    return path


# --- 1. every bad value refused where it enters: exit 2, one line, nothing written ------------------
RUN_CASES = {
    "momentum=-1": (["--set", "momentum=-1"], "momentum must be in [0, 1)"),
    "weight_decay=-1": (["--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
    "huge seed": (["--seed", "99999999999999999999999"], "seed must be in [0, 4294967295]"),
    "negative seed": (["--seed", "-3"], "seed must be in"),
    "n_train=1": (["--set", "dataset.n_train=1"], "needs at least 2"),
    "small_cnn on vectors": (["--set", "encoder.m0=small_cnn"], "encoder small_cnn cannot read modality 'm0'"),
    "batch_size=1": (["--set", "batch_size=1"], "batch_size must be >= 2"),
    "lr=inf": (["--set", "lr=inf"], "lr must be a finite number > 0"),
    "lr=nan": (["--set", "lr=nan"], "lr must be a finite number > 0"),
    "gamma<0": (["--set", "gamma=-0.5"], "gamma must be a finite number > 0"),
    "negative noise": (["--set", "dataset.noise=-0.1,0.5"], "dataset.noise values must be finite and >= 0"),
    "negative image noise": (["--dataset", "cg-digits", "--set", "dataset.image_noise=-1"], "must be >= 0"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_refuses_bad_values_before_anything(tmp_path, capsys, monkeypatch, case):
    args, expected = RUN_CASES[case]
    no_training(monkeypatch)
    if "--dataset" in args:  # cg-digits: its own options
        base = ["--epochs", "1", "--quiet"]
    elif case == "n_train=1":
        base = TINY[2:]
    else:
        base = ["--dataset", "synthetic", *TINY]
    assert main(["run", "--method", "joint", *base, *args, "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, "error: ", expected)
    assert tree(tmp_path) == []


def test_run_refuses_bad_output_and_cache_paths(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--out", ""], "--out is empty"),
        (["--out", str(afile)], "is a file"),
        (["--out", str(afile / "sub")], "does not exist"),  # a file where a folder is expected
        (["--out", str(tmp_path / "no" / "out")], "does not exist"),
        (["--out", str(tmp_path / "o"), "--set", f"cache_dir={afile}"], "cache_dir"),
        (["--out", str(tmp_path / "o"), "--set", f"cache_dir={tmp_path / 'no' / 'cache'}"], "does not exist"),
    ]
    for args, expected in cases:
        assert main(["run", "--method", "joint", *TINY, *args]) == 2, args
        one_line(capsys, expected)
    assert tree(tmp_path) == ["afile"]
    assert afile.read_text() == "x"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_run_on_a_full_or_read_only_disk_fails_before_training(tmp_path, capsys, monkeypatch, code):
    no_training(monkeypatch)
    fail_writes(monkeypatch, code)
    assert main(["run", "--method", "joint", *TINY, "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, str(tmp_path / "out"), os.strerror(code))
    assert tree(tmp_path) == []


def test_disk_full_when_the_record_is_written_after_training(tmp_path, capsys, monkeypatch):
    import benchmark.runner as runner

    real_execute = runner.execute
    trained = []

    def execute_then_fill_the_disk(*args, **kwargs):
        record = real_execute(*args, **kwargs)
        trained.append(True)
        fail_writes(monkeypatch, errno.ENOSPC, "fsync")
        return record

    monkeypatch.setattr(runner, "execute", execute_then_fill_the_disk)
    out = tmp_path / "out"
    assert main(["run", "--method", "joint", *TINY, "--out", str(out)]) == 2
    one_line(capsys, "No space left on device", str(out), "free space")
    assert trained and tree(out) == []  # no record, no temporary file


def test_a_run_that_trains_no_batch_or_diverges_is_never_ok(tiny, tmp_path, capsys):
    run = prepare(build_config(dict(tiny, method="joint")))
    run.cfg.batch_size = 1  # past the check: every batch would be skipped
    with pytest.raises(DivergedError, match="no batch of two or more samples"):
        execute(run)
    out = tmp_path / "out"
    assert main(["run", "--method", "joint", *TINY, "--set", "lr=1e30", "--out", str(out)]) == 3
    one_line(capsys, "error: run diverged", "non-finite")
    (record,) = [read_record(p) for p in out.glob("*.json")]
    assert record["status"] == "failed"


def test_corrupt_cached_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--method", "unimodal", *TINY, "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    (ckpt,) = (out / "cache" / "unimodal").glob("*.pt")
    ckpt.write_bytes(b"\x80\x04not a checkpoint")
    records = sorted(out.glob("*.json"))
    assert main(args) == 2
    one_line(capsys, str(ckpt), "unreadable", "delete it")
    assert sorted(out.glob("*.json")) == records and not list(out.rglob("*.tmp"))


def test_records_respect_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o022)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


# --- sweeps ----------------------------------------------------------------------------------------
SWEEP_CASES = {
    "misspelt method": ("[methods.jiont]\n", [], "unknown method 'jiont'"),
    "misspelt dataset": ("[methods.joint]\n", ["datasets=synthetc"], "unknown dataset 'synthetc'"),
    "--slurm -1": ("[methods.joint]\n", ["--slurm", "-1"], "--slurm takes a number of jobs"),
    "--slurm-cluster": ("[methods.joint]\n", ["--slurm", "1", "--slurm-cluster", "nonsense"], "--slurm-cluster must be"),
    "--slurm-opt param": ("[methods.joint]\n", ["--slurm", "1", "--slurm-opt", "nonsense_param=3"], "--slurm-opt"),
    "--slurm-opt foo": ("[methods.joint]\n", ["--slurm", "1", "--slurm-opt", "foo"], "--slurm-opt expects KEY=VALUE"),
    "tuned for another method": ("[methods.joint]\n", ["tuned"], "which sweep"),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_sweep_refuses_bad_input_before_creating_the_store(tmp_path, capsys, case):
    body, extra, expected = SWEEP_CASES[case]
    datasets = extra[0].split("=")[1] if extra and extra[0].startswith("datasets=") else "synthetic"
    path = write_sweep(tmp_path, body, datasets=datasets)
    if extra and extra[0].startswith("datasets="):
        extra = []
    if extra == ["tuned"]:
        tuned = tmp_path / "t.json"
        tuned.write_text(json.dumps({"method": "mla", "dataset": "synthetic", "params": {"lr": 0.02}}))
        extra = ["--tuned", str(tuned)]
    before = tree(tmp_path)
    assert main(["sweep", str(path), "--store", str(tmp_path / "store"), "--no-live", *extra]) == 2
    one_line(capsys, "error: ", expected)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_sweep_on_a_full_or_read_only_disk(tmp_path, capsys, monkeypatch, code):
    path = write_sweep(tmp_path, "[methods.joint]\n")
    before = tree(tmp_path)
    fail_writes(monkeypatch, code)
    assert main(["sweep", str(path), "--store", str(tmp_path / "store"), *ONE_WORKER]) == 2
    one_line(capsys, str(tmp_path / "store"), os.strerror(code))
    assert tree(tmp_path) == before


def test_bad_records_are_run_again_and_reported_and_leftovers_swept(tmp_path, capsys):
    path = write_sweep(tmp_path, "[methods.joint]\n[methods.multi_loss]\n")
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), *ONE_WORKER]) == 0
    files = sorted((store / "records").glob("*/*.json"))
    assert len(files) == 2
    files[0].write_text("{}")  # parses, but is no record
    files[1].write_text(json.dumps({k: v for k, v in read_record(files[1]).items() if k != "status"}))
    leftover = files[0].parent / f".{files[0].name}.k2j3.tmp"  # a writer killed mid-write
    leftover.write_text('{"stat')
    capsys.readouterr()
    assert main(["sweep", str(path), "--store", str(store), *ONE_WORKER]) == 0
    err = capsys.readouterr().err
    assert f"removed {leftover}" in err
    for file in files:  # {} parses, but lacks every field; the other lacks its status
        assert f"record {file} is left aside (field 'status' is missing" in err
    assert all(read_record(f)["status"] == "ok" for f in files)
    assert not list(store.rglob("*.tmp"))


def test_unloadable_dataset_makes_the_sweep_fail_naming_it(tmp_path, capsys, monkeypatch):
    import benchmark.data as data
    from benchmark.errors import UsageError

    real = data.create_dataset

    def tampered(name, options):
        if name == "cg-digits":
            raise UsageError("cache manifest /x/manifest.json does not match its content hash (edited?)")
        return real(name, options)

    monkeypatch.setattr(data, "create_dataset", tampered)
    path = write_sweep(tmp_path, "[methods.joint]\n", datasets="synthetic,cg-digits")
    assert main(["sweep", str(path), "--store", str(tmp_path / "store"), *ONE_WORKER]) == 1
    err = capsys.readouterr().err
    lacking = [line for line in err.splitlines() if line.startswith("lacking:")]
    assert len(lacking) == 1 and "dataset cg-digits" in lacking[0] and "content hash" in lacking[0]
    assert len(list((tmp_path / "store" / "records").glob("synthetic/*.json"))) == 1


# --- report, perf, data prepare, tune ------------------------------------------------------------------
def _record(method: str, seed: int, acc) -> dict:
    return {"schema": 1, "status": "ok", "key": f"{method}{seed:013d}", "method": method, "dataset": "synthetic",
            "seed": seed, "config": {}, "metrics": {"accuracy": acc, "macro_f1": 0.5, "val_accuracy": 0.5,
                                                     "probe_accuracy": {}, "unimodal_accuracy": {},
                                                     "wall_seconds": 1.0}, "history": []}


def test_report_bad_out_and_bad_records(tmp_path, capsys, monkeypatch):
    store = Store(tmp_path / "store")
    for seed in range(2):
        store.write(store.record_path("synthetic", "joint", seed, f"joint{seed:011d}"), _record("joint", seed, 0.6))
    store.write(store.record_path("synthetic", "mla", 0, "a" * 16), _record("mla", 0, "0.7"))  # a string
    unlabelled = _record("mla", 1, 0.7)
    del unlabelled["method"]
    store.write(store.record_path("synthetic", "mla", 1, "b" * 16), unlabelled)
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["report", "--store", str(store.root), "--readme", "none", "--no-figures"]
    before = tree(tmp_path)
    for out, expected in ((afile, "is a file"), (tmp_path / "no" / "reports", "does not exist")):
        assert main([*base, "--out", str(out)]) == 2
        one_line(capsys, expected)
    with monkeypatch.context() as m:
        fail_writes(m, errno.ENOSPC)
        assert main([*base, "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write in") and "No space left" in err[-1]
    assert tree(tmp_path) == before and afile.read_text() == "x"
    assert main([*base, "--out", str(tmp_path / "reports")]) == 0
    note = one_line(capsys, "2 record(s) left out as unreadable or incomplete")
    assert "accuracy" in note or "method" in note
    assert "mla" not in (tmp_path / "reports" / "synthetic.csv").read_text()


def test_perf_out_naming_a_folder_is_refused_before_measuring(tmp_path, capsys):
    assert main(["perf", "--out", str(tmp_path), "--methods", "joint"]) == 2
    one_line(capsys, "must name a file")
    assert tree(tmp_path) == []


def test_data_prepare_paths_full_disk_and_leftovers(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cache, expected in ((tmp_path / "no" / "cache", "does not exist"), (afile, "is a file")):
        assert main(["data", "prepare", "cg-digits", "--cache-dir", str(cache)]) == 2
        one_line(capsys, expected)
    assert tree(tmp_path) == ["afile"]
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        fail_writes(m, errno.ENOSPC)
        assert main(["data", "prepare", "cg-digits", "--cache-dir", str(cache)]) == 2
    one_line(capsys, "No space left on device", str(cache))
    assert not list(cache.rglob("*.tmp"))
    # a build killed earlier left its hidden temporary folder: the next prepare removes it
    leftover = cache / "cg-digits" / ".0123456789abcdef.x7y8.tmp"
    leftover.mkdir(parents=True)
    (leftover / "train.x.npy").write_bytes(b"partial")
    assert main(["data", "prepare", "cg-digits", "--cache-dir", str(cache)]) == 0
    assert not leftover.exists() and not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.lock"))


def test_tune_bad_input_refused_before_creating_folders(tmp_path, capsys):
    base = ["tune", "--method", "joint", "--trials", "1", "--out", str(tmp_path / "tuned")]
    cases = [(["--sampler-seed", "-1"], "--sampler-seed must be in"),
             (["--storage", "nonsense://x"], "Optuna storage 'nonsense://x' cannot be opened"),
             (["--seed", "-1"], "seed must be in"),
             (["--set", "momentum=2"], "momentum must be in")]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2, extra
        one_line(capsys, expected)
    assert main(["tune", "--method", "joint", "--trials", "1", "--out", str(tmp_path / "no" / "tuned")]) == 2
    one_line(capsys, "does not exist")
    assert tree(tmp_path) == []


# --- 2. stale claims: taken over at once, or reported, in bounded time --------------------------------
STALE = {
    "another host's pid": "node-17.cluster:4242 since 2026-01-01T00:00:00+00:00\n",
    "an empty lock": "",
    "a live pid that is not the holder": f"{socket.gethostname()}:{os.getppid()} since 2026-01-01T00:00:00+00:00\n",
    "garbage": "\x00\x01 not a lock",
}


@pytest.mark.parametrize("case", list(STALE))
def test_stale_unimodal_lock_is_taken_over(tiny, tmp_path, case):
    cfg = dict(tiny, method="unimodal")
    folder = tmp_path / "unimodal"
    folder.mkdir()
    # find the checkpoint's lock path by training once elsewhere
    execute(prepare(build_config(cfg)), cache_dir=str(tmp_path / "probe"))
    (ckpt,) = (tmp_path / "probe" / "unimodal").glob("*.pt")
    lock = folder / ckpt.with_suffix(".lock").name
    lock.write_text(STALE[case])
    t0 = time.monotonic()
    record = execute(prepare(build_config(cfg)), cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 60
    assert record["method_record"]["unimodal"]["m0"]["reused"] is False
    assert (folder / ckpt.name).is_file() and not lock.exists()


def test_lock_left_by_a_full_disk_is_taken_over(tiny, tmp_path, monkeypatch):
    lock = tmp_path / "k.lock"
    with monkeypatch.context() as m:  # the holder's name cannot be written: the lock still holds
        fail_writes(m, errno.ENOSPC)
        claim = try_claim(lock)
    assert claim is not None and lock.read_text() == ""
    assert try_claim(lock) is None  # held, though empty
    claim.release(remove=False)  # its holder ends (a crash leaves the empty file)
    t0 = time.monotonic()
    again = try_claim(lock)
    assert again is not None and time.monotonic() - t0 < 1
    assert socket.gethostname() in lock.read_text()
    again.release()
    # a store claim whose file was left empty behaves the same
    store = Store(tmp_path / "store")
    store.claim_path("abc").parent.mkdir(parents=True)
    store.claim_path("abc").write_text("")
    claim = store.claim("abc")
    assert claim is not None
    claim.release()


def test_a_held_claim_is_reported_with_its_holder_and_the_wait_is_bounded(tmp_path):
    lock = tmp_path / "k.lock"
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time, pathlib; from benchmark.claims import try_claim; "
                              "c = try_claim(pathlib.Path(sys.argv[1])); pathlib.Path(sys.argv[2]).touch(); "
                              "time.sleep(60)", str(lock), str(ready)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        heard: list[str] = []
        t0 = time.monotonic()
        assert wait_claim(lock, heard.append, "model X", timeout=1.0) is None
        assert time.monotonic() - t0 < 5
        assert len(heard) == 1 and f"{socket.gethostname()}:{child.pid} since 20" in heard[0], heard
        assert "waiting for model X" in heard[0] and holder(lock) in heard[0]
        child.kill()  # SIGKILL: the kernel drops the lock
        child.wait(timeout=30)
        claim = wait_claim(lock, timeout=5.0)
        assert claim is not None
        claim.release()
    finally:
        child.kill()
        child.wait(timeout=30)


# --- 3. a sweep worker killed mid-run --------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.timeout(400)
def test_killed_sweep_worker_fails_the_sweep_naming_the_run_and_a_restart_completes(tmp_path, capsys):
    from benchmark.sweep import load_sweep, plan_sweep

    path = tmp_path / "slow.toml"
    path.write_text('seeds = [0, 1]\n[settings]\nepochs = 40\nbatch_size = 32\nprobe = false\n'
                    '[datasets.synthetic]\nsettings = { "dataset.n_train" = 1200, "dataset.n_val" = 200, '
                    '"dataset.n_test" = 100 }\n[methods.joint]\nvariants = [{ lr = [0.01, 0.02] }]\n')
    store = tmp_path / "store"
    order = [r.key for r in plan_sweep(load_sweep(str(path)), Store(store)).runs]
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "sweep", str(path), "--store", str(store),
                             "--jobs", "2", "--threads-per-run", "1", "--no-live"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    victim = victim_key = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and victim is None:
            done = {p.stem.rsplit("-", 1)[1] for p in (store / "records").glob("*/*.json")}
            running = {}
            for log in (store / "logs").glob("*.log") if (store / "logs").exists() else []:
                header = log.read_text().split("\n", 1)[0]
                if log.stem not in done and " pid " in header:
                    running[log.stem] = int(header.rsplit(" pid ", 1)[1])
            if len(set(running.values())) == 2:  # both workers busy: kill the one on the earlier run,
                victim_key = min(running, key=order.index)  # which its sibling has walked past
                victim = running[victim_key]
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.02)
        assert victim is not None, "the two workers never ran at once"
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    lacking = [line for line in err.splitlines() if line.startswith("lacking:")]
    assert len(lacking) == 1 and victim_key in lacking[0] and f"pid {victim}" in lacking[0], err
    assert "ended abnormally" in lacking[0]
    # the restart runs what was lost, once: exactly one record per run, no temporary file
    assert main(["sweep", str(path), "--store", str(store), *ONE_WORKER]) == 0
    files = sorted((store / "records").glob("*/*.json"))
    assert sorted(p.stem.rsplit("-", 1)[1] for p in files) == sorted(order)
    assert all(read_record(p)["status"] == "ok" for p in files)
    assert not list(store.rglob("*.tmp")) and not list(store.rglob(".*.tmp"))


# --- 4. tune: orphan trials, parent killed, Ctrl-C -------------------------------------------------------
FIXED = {"method": "joint", "dataset": "synthetic", "seed": 0, "epochs": 1, "batch_size": 32, "probe": False,
         "dataset.n_train": 96, "dataset.n_val": 32, "dataset.n_test": 32}


def test_orphan_running_trial_is_failed_and_retried(tmp_path, monkeypatch):
    import optuna
    from optuna.trial import TrialState

    import benchmark.tune as tune

    monkeypatch.setattr(tune, "LEASE_SECONDS", 2.0)
    monkeypatch.setattr(tune, "POLL_SECONDS", 0.2)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tune.open_study(url, "s", FIXED, 0)
    orphan = study.ask()  # RUNNING, no owner, no heartbeat: as left by a worker killed on another host
    orphan.suggest_float("lr", 1e-4, 1e-1, log=True)
    orphan.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    t0 = time.monotonic()
    tune.work(url, "s", FIXED, 2, 0, quiet=True)
    assert time.monotonic() - t0 < 90
    study = optuna.load_study(study_name="s", storage=url)
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in trials if tune.retried_from(t) == orphan.number]
    assert len(retry) == 1 and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry[0].params == trials[orphan.number].params
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2  # not one short
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _tune(tmp_path: Path) -> subprocess.Popen:
    args = ["tune", "--method", "joint", "--trials", "200", "--jobs", "2", "--out", str(tmp_path / "tuned"),
            "--quiet", "--epochs", "3", "--set", "dataset.n_train=2000", "--set", "batch_size=32"]
    # Ctrl-C restored to its default in the child: a shell starts background jobs with SIGINT
    # ignored, and Python then never turns it into KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_trials(tmp_path: Path, proc: subprocess.Popen) -> list[int]:
    import optuna

    deadline = time.monotonic() + 180
    db = tmp_path / "tuned" / "optuna.db"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if db.exists():
            try:
                study = optuna.load_study(study_name="joint-synthetic", storage=f"sqlite:///{db}")
                if len({t.user_attrs.get("owner") for t in study.get_trials() if t.user_attrs.get("owner")}) == 2:
                    return [p for p in _children(proc.pid) if _alive(p)]
            except Exception:  # not created yet, or being created by the tune process right now
                pass
        time.sleep(0.3)
    raise AssertionError("the tune workers never started")


@pytest.mark.timeout(300)
def test_killing_tunes_parent_ends_its_workers(tmp_path):
    proc = _tune(tmp_path)
    try:
        workers = _wait_for_trials(tmp_path, proc)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.timeout(300)
def test_ctrl_c_of_tune_with_two_jobs_prints_one_line(tmp_path):
    import optuna
    from optuna.trial import TrialState

    proc = _tune(tmp_path)
    try:
        workers = _wait_for_trials(tmp_path, proc)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "error: interrupted", err
    deadline = time.monotonic() + 20  # helper processes (the resource tracker) follow their parent
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    study = optuna.load_study(study_name="joint-synthetic", storage=f"sqlite:///{tmp_path / 'tuned' / 'optuna.db'}")
    assert not study.get_trials(states=(TrialState.RUNNING,))  # the workers gave their trials back


@pytest.mark.timeout(200)
def test_sigterm_during_data_prepare_leaves_no_temporary_folder(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "data", "prepare", "cg-digits", "--cache-dir",
                             str(cache)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 150
        while not list(cache.glob("cg-digits/.*.tmp")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # mid-build: the hidden folder exists
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip() == "error: terminated", err
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.lock"))
    assert not list(cache.glob("cg-digits/*/manifest.json"))  # nothing half-built was kept
