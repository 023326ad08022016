"""Launching a planned sweep: worker placement over GPUs and cores, the local process pool,
what is lacking at the end, and SLURM through submitit."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError
from benchmark.procs import start_workers
from benchmark.store import Store, check_record
from benchmark.sweep_plan import Plan, PlannedRun, Smoke
from benchmark.sweep_progress import Progress
from benchmark.sweep_workers import WorkerSpec, _worker_main, work


# --- the runner ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    total: int
    already: int  # records the store had before (ok, or failed when not retrying)
    ran: int  # runs this process finished
    failed_now: int
    ok_in_store: int
    failed_in_store: int
    missing: int  # no record at the end (a worker was killed, or the holder of its claim)
    trained: int
    reused: int
    seconds: float
    lacking: list[tuple[PlannedRun | None, str]] = field(default_factory=list)  # no ok record: why
    errors: list[str] = field(default_factory=list)  # workers stopped by a filesystem error


def visible_gpus(count: int, env: dict[str, str] | None = None) -> list[str]:
    """The physical ids of the ``count`` GPUs this process sees, as CUDA_VISIBLE_DEVICES names them
    (``cuda:i`` is the i-th of these); without the variable, 0..count-1."""
    listed = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in listed.split(",") if part.strip()]
    return ids[:count]


@dataclass
class Placement:
    """Where each local worker runs: its device ("" = the run's own, i.e. the CPU) and its threads."""
    devices: list[str]
    threads: int
    labels: list[str]  # what each worker is told it runs on, e.g. "cuda:0 (GPU 3)"

    @property
    def jobs(self) -> int:
        return len(self.devices)


def place_workers(gpus: list[str], cores: int, jobs: int | None = None, runs_per_gpu: int = 1,
                  threads_per_run: int | None = None) -> Placement:
    """Workers for a local sweep. With GPUs (their physical ids in ``gpus``): ``runs_per_gpu`` workers
    share each GPU, spread over the GPUs first (``--jobs`` may take fewer). On the CPU: ``jobs`` x
    ``threads_per_run`` never exceeds the cores (one thread per run and one run per core by default,
    at most 8 runs)."""
    if runs_per_gpu < 1:
        raise UsageError(f"--runs-per-gpu must be >= 1, got {runs_per_gpu}")
    if threads_per_run is not None and threads_per_run < 1:
        raise UsageError(f"--threads-per-run must be >= 1, got {threads_per_run}")
    if gpus:
        slots = [(f"cuda:{i}", phys) for _ in range(runs_per_gpu) for i, phys in enumerate(gpus)]
        jobs = len(slots) if jobs is None else jobs
        if jobs > len(slots):  # more workers than slots: keep cycling over the GPUs
            slots = [slots[i % len(slots)] for i in range(jobs)]
        slots = slots[:jobs]
        threads = threads_per_run or max(1, cores // max(1, jobs))
        return Placement([d for d, _ in slots], threads, [f"{d} (GPU {phys})" for d, phys in slots])
    if runs_per_gpu != 1:
        raise UsageError("--runs-per-gpu needs a GPU; on the CPU use --jobs and --threads-per-run")
    if jobs is None:
        threads = threads_per_run or 1
        jobs = max(1, min(8, cores // threads))
    else:
        threads = threads_per_run or max(1, cores // jobs)
    if jobs * threads > cores:
        raise UsageError(f"--jobs {jobs} x --threads-per-run {threads} = {jobs * threads} threads on "
                         f"{cores} CPU cores; lower --jobs or --threads-per-run")
    return Placement([""] * jobs, threads, ["cpu"] * jobs)


def default_placement(jobs: int | None = None, runs_per_gpu: int = 1,
                      threads_per_run: int | None = None) -> Placement:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if threads_per_run is None:  # OMP_NUM_THREADS, when set, is the user's threads per process
        with contextlib.suppress(ValueError):
            threads_per_run = int(os.environ.get("OMP_NUM_THREADS", "")) or None
    cores = os.cpu_count() or 1
    if threads_per_run is not None and jobs is None:
        threads_per_run = min(threads_per_run, cores)
    return place_workers(visible_gpus(count), cores, jobs, runs_per_gpu, threads_per_run)


def run_plan(plan: Plan, store: Store, jobs: int | None = None, retry_failed: bool = False,
             live: bool | None = None, placement: Placement | None = None) -> SweepResult:
    """Run what the store lacks, over ``jobs`` workers (processes when more than one); then wait
    for the runs that other processes hold, and say why each run still without an ok record lacks it."""
    start = time.perf_counter()
    for tmp in store.sweep_temporary():
        print(f"note: removed {tmp}, left by a writer that was killed", file=sys.stderr)
    status = {}
    for run in plan.runs:
        record, problem = check_record(Path(run.path)) if Path(run.path).exists() else (None, "")
        if problem:
            print(f"note: record {run.path} is left aside ({problem}): the run is done again",
                  file=sys.stderr)
        status[run.key] = None if record is None else record["status"]
    already = sum(1 for s in status.values() if s == "ok" or (s == "failed" and not retry_failed))
    todo = [r for r in plan.runs if status[r.key] is None or (status[r.key] == "failed" and retry_failed)]
    placement = placement or default_placement(jobs)
    jobs = max(1, min(placement.jobs, max(len(todo), 1)))
    devices, threads = placement.devices[:jobs], placement.threads
    retry_before = time.time() if retry_failed else 0.0
    progress = Progress(len(plan.runs), already, todo, jobs, live)
    crashed: dict[int, int] = {}
    try:
        if jobs == 1:
            work(todo, WorkerSpec(str(store.root), devices[0], threads, plan.smoke, retry_before),
                 progress.update)
        else:
            crashed = _run_processes(todo, store, jobs, devices, threads, plan.smoke, retry_before, progress)
    finally:
        progress.close()
    lost = {key: pid for key, pid in progress.started.items() if pid in crashed}
    for r in plan.runs:  # a worker killed before its "start" event left: its claim file names it
        if crashed and r.key not in lost and store.read(Path(r.path)) is None:
            pid = _holder_pid(store.holder(r.key))
            if pid in crashed:
                lost[r.key] = pid
    ended = _wait_for_holders(plan, store, set(lost))
    lacking = []
    for r in plan.runs:
        reason = _lacks(store, r, lost, crashed, ended)
        if reason:
            lacking.append((r, reason))
    lacking += [(None, why) for why in plan.left_out]
    final = [store.read(Path(r.path)) for r in plan.runs]
    ok = sum(1 for r in final if r and r["status"] == "ok")
    failed = sum(1 for r in final if r and r["status"] == "failed")
    return SweepResult(len(plan.runs), already, progress.finished, progress.failed, ok, failed,
                       len(plan.runs) - ok - failed, progress.trained, progress.reused,
                       time.perf_counter() - start, lacking, sorted(progress.errors))


def _holder_pid(text: str) -> int:
    """The pid in a claim's ``host:pid since ...`` when the host is this one, else 0."""
    host, _, rest = text.split(" ", 1)[0].rpartition(":")
    return int(rest) if host == socket.gethostname() and rest.isdigit() else 0


def _wait_for_holders(plan: Plan, store: Store, lost: set[str]) -> dict[str, str]:
    """Wait for the runs without a record that another process (another sweep, a SLURM job) still
    holds; returns {key: holder} for those whose holder ended without writing one."""
    ended = {}
    for r in plan.runs:
        if r.key in lost or store.read(Path(r.path)) is not None:
            continue
        claim = store.claim(r.key)
        if claim is None:
            who = store.holder(r.key)
            claim = store.wait(r.key, lambda msg: print(f"note: {msg}", file=sys.stderr, flush=True),
                               f"{r.label} on {r.dataset} seed {r.seed}")
            if store.read(Path(r.path)) is None:
                ended[r.key] = who
        claim.release()
    return ended


def _lacks(store: Store, run: PlannedRun, lost: dict[str, int], crashed: dict[int, int],
           ended: dict[str, str]) -> str:
    """Why ``run`` has no ok record at the end of the sweep ("" when it has one)."""
    path = Path(run.path)
    record, problem = check_record(path) if path.exists() else (None, "")
    if record is not None:
        return "" if record["status"] == "ok" else f"failed: {str(record.get('error', ''))[:200]}"
    if problem:
        return f"its record {path} is {problem}"
    if run.key in lost:
        pid = lost[run.key]
        return f"lost: its worker (pid {pid}) ended abnormally (exit code {crashed[pid]}) while running it"
    if run.key in ended:
        return f"lost: {ended[run.key]} held it and ended without writing a record"
    return "not run (a worker stopped early; see the errors above)"


def _run_processes(todo: list[PlannedRun], store: Store, jobs: int, devices: list[str], threads: int,
                   smoke: Smoke | None, retry_before: float, progress: Progress) -> dict[int, int]:
    """Run the workers; returns {pid: exit code} of those that ended abnormally."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs = []
    for i in range(jobs):
        spec = WorkerSpec(str(store.root), devices[i % len(devices)], threads, smoke, retry_before)
        # Every worker walks the same ordered list; claims keep them apart.
        procs.append(ctx.Process(target=_worker_main, args=(todo, spec, events), daemon=True))
    start_workers(procs)
    exited = 0
    try:
        while exited < len(procs):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    # drain what is left, then stop
                    while True:
                        try:
                            event = events.get_nowait()
                        except queue.Empty:
                            break
                        if event["event"] != "exit":
                            progress.update(event)
                    break
                continue
            if event["event"] == "exit":
                exited += 1
            else:
                progress.update(event)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
    crashed = {p.pid: p.exitcode for p in procs if p.exitcode not in (0, None, 2, -signal.SIGTERM)}
    if crashed:
        print(f"warning: {len(crashed)} worker(s) ended abnormally (exit codes {list(crashed.values())}); "
              "re-run the sweep to finish their runs", file=sys.stderr)
    return crashed


# --- SLURM ---------------------------------------------------------------------------------------------
SLURM_CLUSTERS = ("slurm", "local", "debug")


def slurm_executor(plan: Plan, store: Store, options: dict[str, str], cluster: str | None = None,
                   folder: str | None = None) -> Any:
    """A submitit executor with the sweep's parameters, its logs in ``folder`` (default: the store's
    ``slurm/<job id>``); UsageError for a bad cluster or parameter. Some submitit versions create
    the folder here: check the options with :func:`check_slurm` before the store may be touched."""
    import submitit

    if cluster is not None and cluster not in SLURM_CLUSTERS:
        raise UsageError(f"--slurm-cluster must be one of {', '.join(SLURM_CLUSTERS)}, got {cluster!r}")
    try:
        executor = submitit.AutoExecutor(folder=folder or str(store.root / "slurm" / "%j"), cluster=cluster)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--slurm-cluster {cluster or 'auto'}: {str(exc).splitlines()[0]}") from None
    params: dict[str, Any] = {"timeout_min": 24 * 60, "gpus_per_node": 1, "cpus_per_task": 8,
                              "tasks_per_node": 1, "nodes": 1, "name": f"sweep-{plan.sweep.name}"}
    for key, value in options.items():
        params[key] = int(value) if str(value).isdigit() else value
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError) as exc:
        raise UsageError(f"--slurm-opt: {str(exc).splitlines()[0]}; see submitit's executor parameters "
                         "(e.g. slurm_partition=gpu, timeout_min=600)") from None
    return executor


def check_slurm(plan: Plan, store: Store, options: dict[str, str], cluster: str | None = None) -> None:
    """Every SLURM option checked by building the executor in a throw-away folder: nothing is
    created in the store (UsageError as :func:`slurm_executor`)."""
    with tempfile.TemporaryDirectory(prefix="bmb-slurm-check-") as tmp:
        slurm_executor(plan, store, options, cluster, folder=os.path.join(tmp, "%j"))


def submit_slurm(plan: Plan, store: Store, jobs: int, options: dict[str, str], cluster: str | None = None,
                 wait: bool = False, retry_failed: bool = False, executor: Any = None) -> list[str]:
    """Submit ``jobs`` SLURM jobs (through submitit), each a worker over the whole plan on one GPU;
    claims in the shared store keep them apart. Returns the job ids."""
    executor = executor or slurm_executor(plan, store, options, cluster)
    retry_before = time.time() if retry_failed else 0.0
    from benchmark.registry import external_plugins

    spec = WorkerSpec(str(store.root.resolve()), "", 0, plan.smoke, retry_before, tuple(external_plugins()))
    submitted = [executor.submit(work, plan.runs, spec, _print_event) for _ in range(jobs)]
    if wait:
        for job in submitted:
            job.result()
    return [str(job.job_id) for job in submitted]


def _print_event(event: dict[str, Any]) -> None:
    if event["event"] == "done":
        print(json.dumps(event, default=str), flush=True)
