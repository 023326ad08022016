"""Sweeps: grid expansion, filters, bad input, smoke mode, failed runs, crash safety, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.errors import UsageError
from benchmark.store import Store, read_record
from benchmark.sweep import Filters, Smoke, list_sweeps, load_sweep, plan_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = '"dataset.n_train" = 160, "dataset.n_val" = 48, "dataset.n_test" = 48'


def write_sweep(tmp_path: Path, body: str, seeds: str = "[0, 1]", epochs: int = 2, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"seeds = {seeds}\n[settings]\nepochs = {epochs}\nbatch_size = 32\nprobe = false\n"
                    f"[datasets.synthetic]\nsettings = {{ {TINY_DATA} }}\n" + body)
    return path


GRID = """
[methods.joint]
[methods.unimodal]
variants = [{ "method.modality" = "@modalities", label = "unimodal {modality}" }]
[methods.ensemble]
[methods.multi_loss]
variants = [{ "method.lambda_uni" = [0.5, 1.0] }]
"""


def records(store: Path) -> list[Path]:
    return sorted((store / "records").glob("*/*.json"))


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def popen(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- planning -------------------------------------------------------------------------------------
def test_packaged_sweeps_parse_and_default_covers_every_method_and_udi_grid(tmp_path):
    assert {"default", "paper"} <= set(list_sweeps())
    spec = load_sweep("default")
    assert spec.seeds == [0, 1, 2]
    assert set(spec.datasets) == {"synthetic", "cg-digits", "av-digits"}
    from benchmark.registry import list_methods
    assert set(list_methods()) <= set(spec.methods)
    plan = plan_sweep(spec, Store(tmp_path / "s"), Filters(datasets=["synthetic"], seeds=[0]))
    labels = [r.label for r in plan.runs]
    assert {"udi anchor=auto", "udi anchor=m0", "udi anchor=m1", "udi static (0.5, 0.5)", "udi static (1, 0)",
            "udi static (0, 1)", "udi static (1, 1)", "unimodal m0", "unimodal m1", "joint"} <= set(labels)
    # unimodal models are trained first, then the ensemble, then everything else
    priorities = [r.priority for r in plan.runs]
    assert priorities == sorted(priorities) and plan.runs[0].method == "unimodal"
    static = next(r for r in plan.runs if r.label == "udi static (1, 0)")
    assert static.assignments["method.lambda_con"] == 1.0 and static.assignments["method.controller"] == "static"
    assert len({r.key for r in plan.runs}) == len(plan.runs)
    paper = load_sweep("paper")
    assert paper.use_recommended and paper.settings["epochs"] == 100


def test_grid_expansion_filters_and_keys(tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, GRID)))
    store = Store(tmp_path / "store")
    plan = plan_sweep(spec, store)
    # joint, unimodal ×2 modalities, ensemble, multi_loss ×2 values; × 2 seeds
    assert len(plan.runs) == 6 * 2
    assert sorted({r.label for r in plan.runs}) == ["ensemble", "joint", "multi_loss lambda_uni=0.5",
                                                    "multi_loss lambda_uni=1.0", "unimodal m0", "unimodal m1"]
    assert all(r.path.startswith(str(store.root / "records" / "synthetic")) for r in plan.runs)
    only = plan_sweep(spec, store, Filters(methods=["multi_loss"], seeds=[1], where={"method.lambda_uni": "0.5"}))
    assert [(r.label, r.seed) for r in only.runs] == [("multi_loss lambda_uni=0.5", 1)]
    globbed = plan_sweep(spec, store, Filters(labels=["unimodal*"]))
    assert {r.method for r in globbed.runs} == {"unimodal"} and len(globbed.runs) == 4
    # the same config planned again has the same key (the store finds it)
    assert [r.key for r in plan_sweep(spec, store).runs] == [r.key for r in plan.runs]
    smoke = plan_sweep(spec, store, smoke=Smoke(24, 1))
    assert {r.seed for r in smoke.runs} == {0} and not {r.key for r in smoke.runs} & {r.key for r in plan.runs}


def test_unregistered_method_in_a_sweep_file_is_refused_like_on_the_command_line(tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, GRID + "[methods.jiont]\n")))
    with pytest.raises(UsageError, match=r"\[methods.jiont\]: unknown method 'jiont'; known methods: "):
        plan_sweep(spec, Store(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# --- bad input: one line, exit 2, nothing touched --------------------------------------------------
@pytest.mark.parametrize("case", ["unknown_sweep", "unknown_key", "unknown_setting", "bad_value",
                                  "bad_method_option", "filter_nothing", "unwritable"])
def test_bad_input_is_one_line_exit_2_and_touches_no_record(tmp_path, capsys, case):
    store = tmp_path / "store"
    store.mkdir()
    (store / "records" / "synthetic").mkdir(parents=True)
    sentinel = store / "records" / "synthetic" / "joint-synthetic-seed0-0000000000000000.json"
    sentinel.write_text('{"status": "ok"}')
    before = sorted(p.name for p in store.rglob("*"))
    good = write_sweep(tmp_path, GRID, name="good")
    args = {
        "unknown_sweep": ["no_such_sweep"],
        "unknown_key": [str(write_sweep(tmp_path, GRID + "[methods.joint.extra]\n", name="k1"))],
        "unknown_setting": [str(write_sweep(tmp_path, GRID.replace("[methods.joint]", "[methods.joint]\nsettings = { epoch = 3 }"), name="k2"))],
        "bad_value": [str(write_sweep(tmp_path, GRID.replace("[methods.joint]", "[methods.joint]\nsettings = { lr = \"fast\" }"), name="k3"))],
        "bad_method_option": [str(write_sweep(tmp_path, GRID.replace("0.5, 1.0", "\"half\""), name="k4"))],
        "filter_nothing": [str(good), "--where", "method.lambda_uni=7"],
        "unwritable": [str(good)],
    }[case]
    target = store
    if case == "unwritable":
        store.chmod(0o500)
        if os.geteuid() == 0:  # root writes through permissions: use a folder no one can write
            target = Path("/proc/1")
    try:
        status = main(["sweep", *args, "--store", str(target), "--no-live"])
    finally:
        store.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert sorted(p.name for p in store.rglob("*")) == before
    assert sentinel.read_text() == '{"status": "ok"}'


def test_bad_input_messages_name_the_problem(tmp_path, capsys):
    main(["sweep", "no_such_sweep"])
    assert "known sweeps: " in capsys.readouterr().err
    path = write_sweep(tmp_path, GRID + "[methods.joint.extra]\n", name="k1")
    main(["sweep", str(path), "--store", str(tmp_path / "s")])
    assert "unknown key 'extra'" in capsys.readouterr().err
    path = write_sweep(tmp_path, GRID.replace("[methods.joint]", "[methods.joint]\nsettings = { lr = \"fast\" }"))
    main(["sweep", str(path), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert "lr" in err and "fast" in err and "[methods.joint]" in err
    main(["sweep", str(path), "--store", str(tmp_path / "s"), "--method", "mla_typo"])
    assert "mla_typo" in capsys.readouterr().err
    good = write_sweep(tmp_path, GRID, name="good")
    assert main(["sweep", str(good), "--store", str(tmp_path / "fresh"), "--where", "method.modality=m7"]) == 2
    assert "match no run" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_several_sweeps_plan_as_one_grid_with_shared_runs_once(tmp_path, capsys):
    from benchmark.sweep import plan_sweeps

    first = load_sweep(str(write_sweep(tmp_path, GRID, seeds="[0]", name="first")))
    second = load_sweep(str(write_sweep(tmp_path, "[methods.joint]\n[methods.mla]\n", seeds="[0]", name="second")))
    store = Store(tmp_path / "s")
    a, b = plan_sweep(first, store), plan_sweep(second, store)
    merged = plan_sweeps([first, second], store)
    shared = {r.key for r in a.runs} & {r.key for r in b.runs}
    assert len(shared) == 1  # joint, in both
    assert [r.key for r in merged.runs] == [r.key for r in a.runs] + [r.key for r in b.runs if r.key not in shared]
    assert merged.sweep.name == f"{first.name}+{second.name}"
    # a filter that selects none of one sweep's runs leaves that sweep out, with a note
    only_mla = plan_sweeps([first, second], store, Filters(methods=["mla"]))
    assert [r.method for r in only_mla.runs] == ["mla"] and any("left out" in n for n in only_mla.notes)
    with pytest.raises(UsageError, match="no method"):
        plan_sweeps([first, second], store, Filters(methods=["agm"]))
    # one command, one pool: each run once, the shared one under the first sweep's label
    out = tmp_path / "store"
    assert main(["sweep", str(tmp_path / "first.toml"), str(tmp_path / "second.toml"), "--store", str(out),
                 "--jobs", "1", "--no-live"]) == 0
    recs = [read_record(p) for p in records(out)]
    assert len(recs) == len(merged.runs) == 7 and all(r["status"] == "ok" for r in recs)
    assert f"sweep {first.name}+{second.name}: 7 runs" in capsys.readouterr().out


def test_a_run_that_resolves_to_another_planned_run_shares_its_training(tmp_path, capsys):
    """UDI's anchor=auto is, once the anchor is picked, the run with that anchor forced: the sweep
    trains it once and writes the other row's record from it (``same_run_as``), which equals the
    record of that run trained on its own in everything but the configuration and the anchor rule."""
    body = '[methods.udi]\nvariants = [{ "method.anchor" = ["auto", "@modalities"], label = "udi anchor={anchor}" }]\n'
    path = write_sweep(tmp_path, body, seeds="[0]")
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), "--jobs", "1", "--no-live"]) == 0
    recs = {r["sweep"]["label"]: r for r in map(read_record, records(store))}
    auto = recs["udi anchor=auto"]
    assert set(recs) == {"udi anchor=auto", "udi anchor=m0", "udi anchor=m1"}
    picked = recs[f"udi anchor={auto['method_record']['anchor']}"]
    other = next(r for lab, r in recs.items() if r is not auto and r is not picked)
    assert picked["same_run_as"] == auto["key"] and "same_run_as" not in auto and "same_run_as" not in other
    assert picked["method_record"]["anchor_rule"] == "forced" and picked["method_record"]["anchor_tied"] == []
    assert picked["config"]["method_options"]["anchor"] == auto["method_record"]["anchor"]
    assert "the same computation as udi anchor=auto" in (store / "logs" / f"{picked['key']}.log").read_text()
    # the forced run trained on its own gives the same record
    alone = tmp_path / "alone"
    assert main(["sweep", str(path), "--store", str(alone), "--jobs", "1", "--no-live",
                 "--where", f"method.anchor={auto['method_record']['anchor']}"]) == 0
    [trained] = [read_record(p) for p in records(alone)]
    assert trained["key"] == picked["key"] and "same_run_as" not in trained
    def untimed(x):  # timings and the unimodal cache's provenance (trained here, reused there) aside
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items()
                    if "seconds" not in k and k not in ("peak_memory_mb", "unimodal", "reused", "data_wait_fraction")}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    assert dict(trained["config"], cache_dir="") == dict(picked["config"], cache_dir="")  # stores apart
    for field in ("defaults", "stages", "convergence", "metrics", "history", "method_record"):
        assert untimed(trained[field]) == untimed(picked[field]), field
    assert trained["metrics"]["accuracy"] == picked["metrics"]["accuracy"]


# --- running ----------------------------------------------------------------------------------------
def test_sweep_runs_skips_what_it_has_and_records_nan_runs_as_failed(tmp_path, capsys):
    body = GRID.replace("[methods.joint]", '[methods.joint]\nvariants = [{}, { lr = 1e10, label = "joint lr=1e10" }]')
    path = write_sweep(tmp_path, body, seeds="[0]")
    store = tmp_path / "store"
    status = main(["sweep", str(path), "--store", str(store), "--jobs", "1", "--no-live"])
    out = capsys.readouterr()
    assert status == 1  # one run failed: reported, the rest completed
    recs = [read_record(p) for p in records(store)]
    assert len(recs) == 7 and all(r is not None for r in recs)
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 1 and "non-finite" in failed[0]["error"] and failed[0]["sweep"]["label"] == "joint lr=1e10"
    assert sum(r["status"] == "ok" for r in recs) == 6
    assert "trained 2, reused 2" in out.out  # unimodal m0, m1 trained once, reused by the ensemble
    # a second sweep has everything: nothing runs, the failure is still reported
    mtimes = {p: p.stat().st_mtime_ns for p in records(store)}
    assert main(["sweep", str(path), "--store", str(store), "--jobs", "1", "--no-live"]) == 1
    assert {p: p.stat().st_mtime_ns for p in records(store)} == mtimes
    assert "0 new, 7 already in the store" in capsys.readouterr().out
    # --retry-failed runs the failed one again (it fails again and keeps its earlier reason)
    assert main(["sweep", str(path), "--store", str(store), "--retry-failed", "--no-live"]) == 1
    again = [read_record(p) for p in records(store) if read_record(p)["status"] == "failed"]
    assert len(again) == 1 and len(again[0]["previous_errors"]) == 1
    assert sum(1 for p in records(store) if p.stat().st_mtime_ns != mtimes[p]) == 1


def test_smoke_mode_covers_every_cell_on_tiny_subsets(tmp_path, capsys):
    path = write_sweep(tmp_path, GRID, epochs=5)
    store = tmp_path / "smoke"
    assert main(["sweep", str(path), "--smoke", "--smoke-samples", "24", "--store", str(store), "--no-live", "--jobs", "1"]) == 0
    recs = [read_record(p) for p in records(store)]
    assert len(recs) == 6  # every cell once (first seed only)
    assert all(r["status"] == "ok" and r["smoke"] == {"samples": 24, "epochs": 1} for r in recs)
    assert all(r["config"]["epochs"] == 1 and r["seed"] == 0 for r in recs)
    assert all(len([h for h in r["history"] if h["stage"] == r["history"][-1]["stage"]]) == 1 for r in recs)


def test_tuned_parameters_file_is_applied_to_its_method(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"method": "joint", "dataset": "synthetic",
                                 "params": {"lr": 0.0321, "weight_decay": 0.002}}))
    path = write_sweep(tmp_path, "[methods.joint]\n[methods.multi_loss]\n", seeds="[0]")
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), "--tuned", str(tuned), "--no-live", "--jobs", "1"]) == 0
    recs = {r["method"]: r for r in map(read_record, records(store))}
    assert recs["joint"]["config"]["lr"] == 0.0321 and recs["joint"]["sweep"]["label"] == "joint [tuned]"
    assert recs["multi_loss"]["config"]["lr"] == 0.01


# --- crash safety -----------------------------------------------------------------------------------
def _slow_sweep(tmp_path: Path) -> Path:
    # 12 runs of about half a second each
    path = tmp_path / "slow.toml"
    path.write_text('seeds = [0, 1, 2]\n[settings]\nepochs = 4\nbatch_size = 32\nprobe = false\n'
                    '[datasets.synthetic]\nsettings = { "dataset.n_train" = 1200, "dataset.n_val" = 200, '
                    '"dataset.n_test" = 100 }\n[methods.joint]\n'
                    'variants = [{ lr = [0.01, 0.02, 0.03, 0.05] }]\n')
    return path


def _assert_complete(store: Path, n: int) -> None:
    files = records(store)
    keys = [p.stem.rsplit("-", 1)[1] for p in files]
    assert len(files) == n and len(set(keys)) == n
    recs = [read_record(p) for p in files]
    assert all(r is not None and r["status"] == "ok" for r in recs), "corrupt or failed record"
    # each key was run exactly once: one header per run in its log
    for key in keys:
        assert (store / "logs" / f"{key}.log").read_text().count("== ") == 1, key


def test_sigkill_mid_run_then_resume_gives_one_record_per_run(tmp_path):
    path, store = _slow_sweep(tmp_path), tmp_path / "store"
    proc = popen("sweep", str(path), "--store", str(store), "--jobs", "2", "--no-live")
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until some runs are done and another is in flight
        done = {p.stem.rsplit("-", 1)[1] for p in records(store)}
        started = {p.stem for p in (store / "logs").glob("*.log")} if (store / "logs").exists() else set()
        if len(done) >= 2 and started - done:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_with = len(records(store))
    assert 2 <= killed_with < 12
    time.sleep(2.0)  # the workers died with their parent: no record appears after the kill
    assert len(records(store)) == killed_with
    # the interrupted run left a log but no record: resume runs it (and the rest) once
    for log in (store / "logs").glob("*.log"):
        if not any(p.stem.endswith(log.stem) for p in records(store)):
            log.unlink()  # its partial log; the resumed run writes a fresh one
    result = cli("sweep", str(path), "--store", str(store), "--jobs", "2", "--no-live")
    assert result.returncode == 0, result.stderr
    assert f"{killed_with} already in the store" in result.stdout
    _assert_complete(store, 12)


def test_two_concurrent_sweeps_share_the_grid_without_duplicates(tmp_path):
    path, store = _slow_sweep(tmp_path), tmp_path / "store"
    store.mkdir()
    procs = [popen("sweep", str(path), "--store", str(store), "--jobs", "1", "--no-live") for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    _assert_complete(store, 12)
    ran = [int(o[0].split(" new,")[0].rsplit("(", 1)[1]) for o in outs]
    assert sum(ran) == 12 and min(ran) > 0, outs  # the work was shared


def test_slurm_launcher_runs_workers_through_submitit(tmp_path, capsys):
    # submitit's "debug" cluster runs the submitted worker in this process: the same code path as SLURM
    path = write_sweep(tmp_path, "[methods.joint]\n", seeds="[0, 1]")
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), "--slurm", "2", "--slurm-cluster", "debug",
                 "--slurm-wait", "--slurm-opt", "timeout_min=5"]) == 0
    assert "submitted 2 SLURM job(s) for 2 runs" in capsys.readouterr().out
    _assert_complete(store, 2)  # two workers, two runs, each run once


def test_progress_counts_sibling_and_foreign_finishes():
    from benchmark.sweep import PlannedRun, Progress

    todo = [PlannedRun({}, "joint", "synthetic", s, "joint", {}, key=f"k{s}") for s in range(3)]
    progress = Progress(3, 0, todo, jobs=2, live=False)
    done = {"event": "done", "status": "ok", "label": "joint", "dataset": "synthetic", "seed": 0, "seconds": 4.0}
    progress.update(dict(done, key="k0"))
    progress.update({"event": "skip", "key": "k0"})  # a sibling worker saw k0's record: not a new finish
    progress.update({"event": "skip", "key": "k1"})  # k1's "skip" arrives before its "done"
    progress.update(dict(done, key="k1", status="failed", error="boom"))
    assert (progress.to_run, progress.done, progress.failed, progress.remaining) == (3, 1, 1, 1)
    assert progress.eta() == pytest.approx(4.0 / 2)  # one run left at 4 s, two workers
    progress.update({"event": "skip", "key": "k2"})  # another sweep process finished k2
    assert (progress.to_run, progress.remaining) == (2, 0)


@pytest.mark.parametrize("width", [80, 120])
def test_live_bar_keeps_its_bar_at_80_columns(width: int):
    """A long run label goes on its own line, cut to the width; the bar, the counts and the
    times stay on the first line, whole."""
    import io

    from rich.console import Console

    from benchmark.sweep import PlannedRun, Progress

    label = "udi static (0.5, 0.5) anchor m1 guidance progressive order m2,m0 select_on fusion"
    todo = [PlannedRun({}, "udi", "synthetic-3m", s, label, {}, key=f"k{s}") for s in range(120)]
    out = io.StringIO()
    progress = Progress(120, 0, todo, jobs=2, live=True, console=Console(width=width, file=out))
    done = {"event": "done", "status": "ok", "label": label, "dataset": "synthetic-3m", "seconds": 4.0,
            "accuracy": 0.6123}
    for i in range(37):
        progress.update(dict(done, key=f"k{i}", seed=i))
    progress.update(dict(done, key="k37", seed=37, status="failed", error="boom " * 40))
    progress.close()  # prints the final state into `out`
    lines = out.getvalue().splitlines()
    assert lines and all(len(line) <= width for line in lines), lines
    bar = next(line for line in lines if "38/120" in line)
    assert "━" in bar and "failed 1" in bar and "elapsed" in bar and "eta " in bar
    assert bar.count("━") >= (width - 70) * 37 // 120  # the bar has room: a third of its width filled
    assert any(line.strip().startswith(f"last: {label[:30]}") for line in lines)


# --- worker placement -------------------------------------------------------------------------------
def test_visible_gpus_follow_cuda_visible_devices():
    from benchmark.sweep import visible_gpus

    assert visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpus(3, {}) == ["0", "1", "2"]
    assert visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "7, 2"}) == ["7"]


def test_several_runs_share_each_gpu_spread_over_gpus_first():
    from benchmark.sweep import place_workers, visible_gpus

    gpus = visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "3,5"})
    p = place_workers(gpus, cores=16, runs_per_gpu=3)
    assert p.devices == ["cuda:0", "cuda:1"] * 3
    assert p.labels[:2] == ["cuda:0 (GPU 3)", "cuda:1 (GPU 5)"]
    assert p.threads == 16 // 6
    fewer = place_workers(gpus, cores=16, jobs=3, runs_per_gpu=3)
    assert fewer.devices == ["cuda:0", "cuda:1", "cuda:0"]


def test_cpu_workers_never_oversubscribe_cores():
    from benchmark.errors import UsageError
    from benchmark.sweep import place_workers

    assert place_workers([], cores=8).devices == [""] * 8
    p = place_workers([], cores=8, threads_per_run=2)
    assert (p.jobs, p.threads) == (4, 2)
    p = place_workers([], cores=8, jobs=2)
    assert (p.jobs, p.threads) == (2, 4)
    with pytest.raises(UsageError, match="threads on 8 CPU cores"):
        place_workers([], cores=8, jobs=4, threads_per_run=4)
    with pytest.raises(UsageError, match="needs a GPU"):
        place_workers([], cores=8, runs_per_gpu=2)
    with pytest.raises(UsageError, match="--threads-per-run must be >= 1"):
        place_workers([], cores=8, threads_per_run=0)


def test_sweep_runs_keep_their_checkpoints_for_evaluate(tmp_path, capsys):
    """`save_checkpoint` in a sweep's settings: each record gets its model beside it, and
    `evaluate` on the record gives exactly its test accuracy."""
    path = tmp_path / "ckpt.toml"
    path.write_text("seeds = [0]\n[settings]\nepochs = 2\nbatch_size = 32\nprobe = false\nsave_checkpoint = true\n"
                    f"[datasets.synthetic]\nsettings = {{ {TINY_DATA} }}\n[methods.joint]\n[methods.udi]\n")
    store = tmp_path / "store"
    assert main(["sweep", str(path), "--store", str(store), "--jobs", "1", "--no-live"]) == 0
    capsys.readouterr()
    recs = records(store)
    assert len(recs) == 2
    for rec_path in recs:
        record = read_record(rec_path)
        assert record["checkpoint"] == rec_path.with_suffix(".pt").name and rec_path.with_suffix(".pt").is_file()
        out_file = tmp_path / f"{rec_path.stem}.eval.json"
        assert main(["evaluate", str(rec_path), "--out", str(out_file)]) == 0
        assert json.loads(out_file.read_text())["accuracy"] == record["metrics"]["accuracy"]
