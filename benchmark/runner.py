"""Run one configuration end to end: resolve, train, evaluate once on test, write one record."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmark.config import RunConfig, config_hash, flat_options, location_names
from benchmark.convergence import RULE as CONVERGENCE_RULE
from benchmark.data import MultimodalData, create_dataset, resolve_dataset_options
from benchmark.device import pick_device, seed_everything, seeded, set_determinism
from benchmark.diagnostics import Diagnostics
from benchmark.errors import DivergedError, UsageError
from benchmark.files import check_writable_dir, current_umask, os_error_line, write_json_atomic  # noqa: F401  (re-exported)
from benchmark.method import EvalOutput, Method, build_method, create_method, options_of
from benchmark.metrics import accuracy, linear_probe_accuracy, macro_f1
from benchmark.models.encoders import encoder_factory
from benchmark.procs import keep_freed_memory
from benchmark.record import Record, record_name
from benchmark.trainer import Trainer

# Options that change where or how fast a run goes, or what it leaves beside its record, never
# its result: left out of its key.
NOT_IN_KEY = ("device", "num_workers", "cache_dir", "log", "log_dir", "save_checkpoint")
# Options left out of the key while they hold their default (so that older keys stay valid).
KEY_WHEN_SET = ("encoder_weights",)


def run_key(resolved: dict[str, Any], dataset_locations: Collection[str]) -> str:
    """A run's key: the hash of its resolved configuration without what does not change its
    result (NOT_IN_KEY) and without the dataset's location options (its root and cache folder,
    ``opt(location=True)``), so that the same run reads the same key on every machine."""
    kept = {k: v for k, v in resolved.items() if k not in NOT_IN_KEY and not (k in KEY_WHEN_SET and not v)}
    if isinstance(kept.get("dataset_options"), dict):
        kept["dataset_options"] = {k: v for k, v in kept["dataset_options"].items() if k not in dataset_locations}
    return config_hash(kept)


@dataclass
class PreparedRun:
    cfg: RunConfig
    data: MultimodalData
    method: Method
    device: torch.device
    resolved: dict[str, Any]
    dataset_locations: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        return run_key(self.resolved, self.dataset_locations)

    def handed(self) -> dict[str, Any]:
        """The resolved configuration as assignments (``build_config`` reads them), for the process
        that runs it: every option at its resolved value, but the dataset's locations, which are
        resolved where the run runs (its own $BMB_DATA_ROOT)."""
        def location(name: str) -> bool:
            return name.startswith("dataset.") and name.removeprefix("dataset.") in self.dataset_locations

        return {k: v for k, v in flat_options(self.resolved).items() if not location(k)}


def prepare(cfg: RunConfig, data: MultimodalData | None = None) -> PreparedRun:
    """Check and resolve everything a run needs before any training: raises UsageError.
    ``data``: the dataset already loaded with ``cfg.dataset_options`` (a sweep loads it once)."""
    cfg.validate()
    device = pick_device(cfg.device)
    dataset_options = resolve_dataset_options(cfg.dataset, cfg.dataset_options)
    for name in cfg.encoder.values():
        encoder_factory(name)
    from benchmark.tracking import check_tracking

    check_tracking(cfg.log, cfg.log_dir)
    if data is None:
        data = create_dataset(cfg.dataset, cfg.dataset_options)
    method = create_method(cfg.method, data.info, cfg)
    check_trainable(method, data)
    check_pretrained(method, data)
    if cfg.cache_dir:
        check_cache_dir(cfg.cache_dir)
    resolved = cfg.to_dict()
    resolved["method_options"] = options_of(method.options)
    resolved["dataset_options"] = options_of(dataset_options)
    resolved["encoder"] = {m: method.encoder_name(m) for m in data.info.modality_names}
    resolved["encoder_weights"] = {m: w for m, w in cfg.encoder_weights.items() if w}  # "" = none
    return PreparedRun(cfg, data, method, device, resolved, frozenset(location_names(dataset_options)))


def check_trainable(method: Method, data: MultimodalData) -> None:
    """Refuse, before any training, encoders that cannot read their modality and a training split
    too small for one batch of two samples (BatchNorm cannot train on one)."""
    from benchmark.models.encoders import check_encoder

    for m in data.info.modality_names:
        check_encoder(method.encoder_name(m), data.info.modality(m))
    n = len(data.splits["train"])
    if n < 2:
        raise UsageError(f"the training split of {data.info.name} has {n} sample(s); a run needs at least 2 "
                         "(raise dataset.n_train or the dataset's size option)")


def check_pretrained(method: Method, data: MultimodalData) -> None:
    """Build, once before any training, each encoder that reads local weights or comes from timm or
    torchvision: a missing, corrupt or mismatched weights file and an unknown model name are
    refused here (the global random state is left as it was)."""
    for m in data.info.modality_names:
        if method.cfg.encoder_weights.get(m) or ":" in method.encoder_name(m):
            with seeded(method.cfg.seed, f"prepare/check-encoder/{m}"):
                method.make_encoder(m)


def check_cache_dir(folder: str) -> None:
    """cache_dir must be a folder, or one that can be created in an existing parent."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"cache_dir {folder!r} is a file; give a folder with --set cache_dir=...")
    if not path.exists() and not path.resolve().parent.is_dir():
        raise UsageError(f"cache_dir's parent {str(path.resolve().parent)!r} does not exist; create it or "
                         "choose another cache_dir")


def defaults_of(run: PreparedRun) -> dict[str, Any]:
    """The suite's, the method's and the dataset's default options, flat as in the report
    (``method.<name>``, ``dataset.<name>``, ``encoder.<modality>``): a report labels each row by
    the options in which it differs from these."""
    defaults = RunConfig(method=run.cfg.method, dataset=run.cfg.dataset).to_dict()
    try:
        defaults["method_options"] = options_of(type(run.method.options)())
    except TypeError:  # an options class with required fields has no defaults to name
        defaults["method_options"] = {}
    try:
        defaults["dataset_options"] = options_of(resolve_dataset_options(run.cfg.dataset, {}))
    except UsageError:
        defaults["dataset_options"] = {}
    defaults["encoder"] = {m: run.data.info.modality(m).encoder for m in run.data.info.modality_names}
    return flat_options(defaults)


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("balanced-mm-bench", "torch", "torchvision", "torchaudio", "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What decides whether a run repeats to the bit: threads, processor, deterministic kernels."""
    env: dict[str, Any] = {
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "device_type": device.type,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def convergence(trainer: Trainer, facts: dict[str, Any]) -> dict[str, Any]:
    """Per stage: budget, patience, whether early stopping ended it and whether validation accuracy
    was still improving at its end (benchmark.convergence), for the stages this run trained and
    the unimodal checkpoints it reused."""
    out: dict[str, Any] = {name: {"budget": s.budget, "patience": s.patience, "epochs_run": s.epochs_run,
                                  "stopped_early": s.stopped_early, "still_improving": s.still_improving}
                           for name, s in trainer.stages.items()}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("reused") is True and isinstance(node.get("convergence"), dict):
                out.setdefault(f"unimodal:{node.get('modality')}",
                               dict(node["convergence"], epochs_run=node.get("epochs_run"), reused=True))
            for value in node.values():
                walk(value)

    walk(facts)
    return out


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20, "process_max_rss"


def evaluate(run: PreparedRun, trainer: Trainer) -> tuple[dict[str, Any], tuple[EvalOutput, torch.Tensor]]:
    """Test metrics of the trained method (test is evaluated here, once) and linear probes; and
    the test outputs themselves (the diagnostics start from them)."""
    method, info = run.method, run.data.info
    test, test_y = trainer.collect(method.eval_forward, method.model, "test")
    metrics: dict[str, Any] = {
        "accuracy": accuracy(test.logits, test_y),
        "macro_f1": macro_f1(test.logits, test_y, info.num_classes),
        "val_accuracy": trainer.accuracy(method.predict, method.model, "val"),
        "unimodal_accuracy": {m: accuracy(z, test_y) for m, z in (test.unimodal or {}).items()},
    }
    if run.cfg.probe:
        trainer.log(f"fitting linear probes on the frozen features of {', '.join(test.features)} "
                    f"({len(run.data.splits['train'])} training samples)")
        train, train_y = trainer.collect(method.eval_forward, method.model, "train")
        metrics["probe_accuracy"] = {
            m: linear_probe_accuracy(train.features[m], train_y, test.features[m], test_y)
            for m in test.features
        }
    else:
        metrics["probe_accuracy"] = {}
    return metrics, (test, test_y)


def execute(run: PreparedRun, log: Callable[[str], None] | None = None,
            cache_dir: str | None = None,
            on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
            writes_outputs: bool = False) -> dict[str, Any]:
    """Train and evaluate; returns the result record (status ok). Raises DivergedError.
    ``on_epoch_end(row)`` sees each per-epoch history row (tuning prunes from it).
    ``writes_outputs``: the caller writes the tracking logs and the checkpoint (:func:`execute_with_outputs`);
    any other caller (a tuning trial) is told, in its log, that ``log`` and ``save_checkpoint`` are not applied."""
    cfg = run.cfg
    if (cfg.log or cfg.save_checkpoint) and not writes_outputs and log is not None:
        log("note: log and save_checkpoint are applied by `run` and `sweep` (runner.execute_with_outputs); "
            "this run writes no tracking logs and no checkpoint")
    keep_freed_memory()  # every process that trains: run, sweep workers, SLURM jobs, tuning trials
    set_determinism(run.device)
    seed_everything(cfg.seed)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run.data, run.device, log=log, cache_dir=cache_dir)
    trainer.on_epoch_end = on_epoch_end
    diagnostics = Diagnostics(run.method, cfg, trainer) if cfg.diagnostics else None  # ρ per epoch; the rest after training
    method = run.method
    method.device = run.device
    build_method(method)
    method.model.to(run.device)
    facts = method.run(trainer)
    metrics, test_outputs = evaluate(run, trainer)
    wall = time.perf_counter() - t0 - (diagnostics.seconds if diagnostics is not None else 0.0)  # the run without them
    mem, mem_kind = peak_memory_mb(run.device)
    epochs = trainer.epoch_seconds
    metrics.update(
        wall_seconds=wall,
        seconds_per_epoch=sum(epochs) / len(epochs) if epochs else 0.0,
        data_wait_fraction=trainer.data_wait_seconds / sum(epochs) if epochs and sum(epochs) else 0.0,
        peak_memory_mb=mem,
        peak_memory_kind=mem_kind,
        parameters=sum(p.numel() for p in method.model.parameters()),
    )
    if diagnostics is not None:
        trainer.log(f"diagnostics: test accuracy of every subset of the {len(run.data.info.modality_names)} "
                    "modalities (Shapley values, utilisation) and under Gaussian noise")
        metrics["diagnostics"] = diagnostics.evaluate(test_outputs)
    return Record(
        status="ok", key=run.key, method=cfg.method, dataset=cfg.dataset, seed=cfg.seed, config=run.resolved,
        defaults=defaults_of(run), metrics=metrics, method_record=facts,
        stages={name: {k: v for k, v in vars(s).items() if k != "history"} for name, s in trainer.stages.items()},
        history=trainer.history, convergence=convergence(trainer, facts), convergence_rule=CONVERGENCE_RULE,
        smoke=False, environment=environment(run.device), device=str(run.device), git_commit=git_commit(),
        versions=package_versions(), started=started.isoformat(timespec="seconds"),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).to_json()


def failed_record(run: PreparedRun | None, error: BaseException, cfg: RunConfig | None = None,
                  assignments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a run that failed: prepared (``run``), or refused before (``cfg`` or the raw
    ``assignments``, whichever exists)."""
    if run is not None:
        key, method, dataset, seed, config = run.key, run.cfg.method, run.cfg.dataset, run.cfg.seed, run.resolved
    else:
        raw = assignments or {}
        key = ""
        method = cfg.method if cfg else str(raw.get("method", ""))
        dataset = cfg.dataset if cfg else str(raw.get("dataset", ""))
        seed = cfg.seed if cfg else int(raw.get("seed", 0))
        config = cfg.to_dict() if cfg else dict(raw)
    return Record(status="failed", key=key, method=method, dataset=dataset, seed=seed, config=config,
                  error=f"{type(error).__name__}: {error}", git_commit=git_commit(), versions=package_versions(),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds")).to_json()


def check_output_dir(out: str) -> Path:
    """The output folder, whose parent must exist (a typo in a path is refused, not created);
    created and test-written here, before any training, so a result is never lost for want of
    a place to write it."""
    if not str(out).strip():
        raise UsageError("--out is empty; give a folder for the result record")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {out!r} is a file; give a folder with --out")
    if not path.exists() and not path.resolve().parent.is_dir():
        raise UsageError(f"output folder's parent {str(path.resolve().parent)!r} does not exist; "
                         "create it or choose another --out")
    check_writable_dir(path, "--out")
    return path


def record_path(out: Path, run: PreparedRun) -> Path:
    return out / record_name(run.cfg.method, run.cfg.dataset, run.cfg.seed, run.key)


def run_and_record(run: PreparedRun, out: Path, log: Callable[[str], None] | None = None
                   ) -> tuple[Path, dict[str, Any]]:
    """Execute and write the record (ok or failed, never partial). Re-raises DivergedError.
    With ``log`` set the run is tracked (benchmark.tracking); with ``save_checkpoint`` the selected
    model is written beside the record first (benchmark.checkpoint)."""
    return execute_and_write(run, record_path(out, run), log=log, cache_dir=run.cfg.cache_dir or str(out / "cache"))


def execute_with_outputs(run: PreparedRun, path: Path, log: Callable[[str], None] | None = None,
                         cache_dir: str | None = None) -> dict[str, Any]:
    """:func:`execute`, with the tracking logs (``log``) and the checkpoint (``save_checkpoint``)
    beside ``path``, the record's file, which the caller writes (``run``: at once; a sweep worker:
    with its sweep facts added). Raises DivergedError."""
    from benchmark.tracking import open_tracker, tracker_location

    cfg = run.cfg
    tracker = open_tracker(cfg.log, cfg.log_dir, path, run.resolved)
    ok = False
    try:
        record = execute(run, log=log, cache_dir=cache_dir,
                         on_epoch_end=tracker.epoch if tracker is not None else None, writes_outputs=True)
        if cfg.save_checkpoint:
            from benchmark.checkpoint import checkpoint_path, save_checkpoint

            ckpt = checkpoint_path(path)
            save_checkpoint(ckpt, run.method, run.resolved, record, path)
            record["checkpoint"] = ckpt.name
        if tracker is not None:
            record["tracking"] = {"log": cfg.log, "folder": str(tracker_location(cfg.log, cfg.log_dir, path))}
            tracker.finish(record)
        ok = True
        return record
    finally:
        if tracker is not None:
            tracker.close(ok)


def execute_and_write(run: PreparedRun, path: Path, log: Callable[[str], None] | None = None,
                      cache_dir: str | None = None) -> tuple[Path, dict[str, Any]]:
    """:func:`execute_with_outputs`, then the record at ``path`` (a failed one when the run diverged)."""
    try:
        record = execute_with_outputs(run, path, log=log, cache_dir=cache_dir)
    except DivergedError as exc:
        write_json_atomic(path, failed_record(run, exc))
        raise
    write_json_atomic(path, record)
    return path, record
