"""``python -m benchmark perf``: training throughput, step time and peak memory of every method,
each as a ratio to a floor measured in the same process.

The floor is a minimal hand-written PyTorch loop (zero_grad, forward, cross-entropy, backward,
step) over the same model as the reference method (joint), the same in-memory data and the same batch size, with
nothing else. Every method is run through its own ``run()`` (all its phases) for a few epochs;
its training epochs are timed by the trainer (validation excluded) and the first epoch of each
stage is dropped as warm-up. The whole ``run()`` is also timed, per epoch of the method's own
stages ("run s / epoch": training, validation and anything a method does between steps, such as
G-Blending's extra copies or D&R's diagnoses; the shared unimodal phases, trained in the first
repeat and reused, left out by taking the later repeats). Methods and the floor are interleaved over repeats, and the median
over repeats is reported, so that load on the machine affects all of them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.config import RunConfig, build_config
from benchmark.data import DataInfo, ModalitySpec, MultimodalData, TensorSplit, create_dataset
from benchmark.device import pick_device, seed_everything, set_determinism
from benchmark.method import build_method, create_method, make_optimizer
from benchmark.registry import METHODS, list_methods
from benchmark.trainer import Trainer

# What each method declares for timing (benchmark.method.Method): the configurations timed
# (perf_variants), the bound of its step time as a ratio to the reference method's (perf_bound)
# and, for a method that trains one modality at a time, to a single-modality model's
# (perf_bound_vs_single). The reference method's own target is against the hand-written floor.
FLOOR_BOUND = 0.95  # reference throughput / floor throughput
SINGLE = "single-modality (last modality)"  # the row of the single-modality method's step
RUN_PER_EPOCH = "run_seconds_per_epoch"  # time_method's whole-run figure (not a stage)
META = ("data_wait_fraction", RUN_PER_EPOCH)


def reference() -> str:
    return next(name for name in list_methods() if METHODS.get(name).fact("reference"))


def single_modality() -> str | None:
    return next((name for name in list_methods() if METHODS.get(name).fact("single_modality")), None)


SETTINGS = ("small", "resnet", "crema-d")


@dataclass
class Setting:
    name: str
    data: MultimodalData
    batch_size: int
    key: str = ""  # its name in --settings (a fresh process rebuilds it from this for the memory probe)


def shaped_data(audio: tuple[int, ...], visual: tuple[int, ...], n_train: int, classes: int = 6) -> MultimodalData:
    """Random tensors of CREMA-D's shapes (audio C×F×T, visual T×C×H×W), held in memory."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit({"audio": torch.randn(n, *audio, generator=gen),
                            "visual": torch.randn(n, *visual, generator=gen)},
                           torch.randint(0, classes, (n,), generator=gen))

    info = DataInfo("crema-d-shaped", [ModalitySpec("audio", "spectrogram", audio, "resnet18_audio"),
                                       ModalitySpec("visual", "frames", visual, "resnet18_visual")],
                    classes, [str(c) for c in range(classes)])
    return MultimodalData(info, {"train": split(n_train), "val": split(8), "test": split(8)})


def settings(device: torch.device, which: list[str]) -> list[Setting]:
    out = []
    if "small" in which:
        out.append(Setting("small (synthetic, MLP)", create_dataset("synthetic", {}), 64, "small"))
    if "resnet" in which:
        if device.type == "cuda":  # CREMA-D's full sizes: audio 1×257×188, 3 frames of 224×224
            out.append(Setting("resnet18 (CREMA-D shape)", shaped_data((1, 257, 188), (3, 3, 224, 224), 1024), 64, "resnet"))
        else:  # reduced on the CPU
            out.append(Setting("resnet18 (CREMA-D shape, reduced: 1×64×48, 1×3×48×48)",
                               shaped_data((1, 64, 48), (1, 3, 48, 48), 128), 16, "resnet"))
    if "crema-d" in which:  # the comparison set's step-time targets: CREMA-D's audio, one 112-pixel frame
        out.append(Setting("resnet18 (CREMA-D audio 1×257×188, one 112-pixel frame, B = 16)",
                           shaped_data((1, 257, 188), (1, 3, 112, 112), 64), 16, "crema-d"))
    return out


def _config(setting: Setting, method: str, overrides: dict[str, Any], epochs: int, device: str) -> RunConfig:
    items = {"method": method, "dataset": setting.data.info.name, "epochs": epochs,
             "batch_size": setting.batch_size, "device": device, "probe": False}
    items.update(overrides)
    return build_config(items)


def time_method(setting: Setting, method: str, overrides: dict[str, Any], epochs: int,
                device: torch.device, cache_dir: str | None) -> dict[str, float]:
    """Median training-epoch seconds per stage of one full ``run()`` (first epoch dropped)."""
    cfg = _config(setting, method, overrides, epochs, str(device))
    seed_everything(cfg.seed)
    trainer = Trainer(cfg, setting.data, device, cache_dir=cache_dir)
    m = create_method(method, setting.data.info, cfg)
    m.device = device
    build_method(m)
    m.model.to(device)
    _sync(device)
    start = time.perf_counter()
    m.run(trainer)
    _sync(device)
    run_seconds = time.perf_counter() - start
    per_stage: dict[str, list[float]] = {}
    for row in trainer.history:
        per_stage.setdefault(row["stage"], []).append(row["epoch_seconds"])
    out = {stage: statistics.median(times[1:] or times) for stage, times in per_stage.items()}
    out["data_wait_fraction"] = trainer.data_wait_seconds / max(sum(trainer.epoch_seconds), 1e-9)
    # the whole run per epoch of the method's own stages: training, validation and whatever the
    # method does between steps (extra copies, diagnoses), the shared unimodal phases aside
    own = sum(1 for row in trainer.history if not str(row["stage"]).startswith("unimodal:"))
    out[RUN_PER_EPOCH] = run_seconds / max(own, 1)
    return out


def time_floor(setting: Setting, epochs: int, device: torch.device) -> float:
    """Median epoch seconds of the minimal loop over the reference method's model."""
    cfg = _config(setting, reference(), {}, epochs, str(device))
    seed_everything(cfg.seed)
    method = create_method(reference(), setting.data.info, cfg)
    model = build_method(method).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(list(model.parameters()), cfg)
    train = setting.data.splits["train"]
    inputs = {m: t.to(device) for m, t in train.inputs.items()}
    labels = train.labels.to(device)
    encoders, head = model.encoders, model.head
    times = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(labels), device=device)
        for i in range(0, len(labels), setting.batch_size):
            idx = order[i:i + setting.batch_size]
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                logits = head({m: enc(inputs[m][idx]) for m, enc in encoders.items()})
                loss = F.cross_entropy(logits, labels[idx])
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def follower_stage(times: dict[str, float]) -> str | None:
    names = [s for s in times if s not in META and not s.startswith("unimodal:")]
    return names[-1] if names else None


def measure(setting: Setting, device: torch.device, methods: list[str], repeats: int, epochs: int) -> list[dict[str, Any]]:
    info = setting.data.info
    variants = [(label, name, over) for name in methods
                for label, over in METHODS.get(name).perf_variants(info.modality_names)]
    last = info.modality_names[-1]  # the modality a one-modality-at-a-time method trains last
    single = single_modality()
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    samples["floor"] = []
    if single:
        samples[SINGLE] = []
    with tempfile.TemporaryDirectory() as cache:
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            samples["floor"].append({"floor": time_floor(setting, epochs, device)})
            if single:
                samples[SINGLE].append(time_method(setting, single, {"method.modality": last}, epochs, device, None))
            for label, name, over in order:
                # a shared cache: phases shared between methods (unimodal training that some
                # methods start from) run once, and the method's own stage is what is timed
                samples[label].append(time_method(setting, name, over, epochs, device, cache))
    n_train = len(setting.data.splits["train"])
    steps = -(-n_train // setting.batch_size)
    rows = []
    for label, runs in samples.items():
        stage = "floor" if label == "floor" else follower_stage(runs[0]) or next(iter(runs[0]))
        epoch_s = statistics.median(run[stage] for run in runs)
        row = {"method": label, "stage": stage, "samples_per_s": n_train / epoch_s,
               "step_ms": 1000 * epoch_s / steps,
               "data_wait": statistics.median(run.get("data_wait_fraction", 0.0) for run in runs)}
        # the first repeat may train the shared unimodal phases for the later ones: left out
        whole = [run[RUN_PER_EPOCH] for run in (runs[1:] or runs) if RUN_PER_EPOCH in run]
        if whole:
            row["run_epoch_s"] = statistics.median(whole)
        rows.append(row)
    by = {row["method"]: row for row in rows}
    methods_of = {label: name for label, name, _ in variants}
    ref = reference()
    for row in rows:
        row["throughput_vs_floor"] = row["samples_per_s"] / by["floor"]["samples_per_s"]
        name = methods_of.get(row["method"])
        row["name"] = name or row["method"]
        if ref in by:
            row["step_vs_reference"] = row["step_ms"] / by[ref]["step_ms"]
            if "run_epoch_s" in row and "run_epoch_s" in by[ref]:
                row["run_vs_reference"] = row["run_epoch_s"] / by[ref]["run_epoch_s"]
        if name and METHODS.get(name).fact("perf_bound_vs_single") is not None and SINGLE in by:
            row["step_vs_single"] = row["step_ms"] / by[SINGLE]["step_ms"]
    return rows


def peak_memory(setting_name: str, method: str, device: str) -> float:
    """Peak memory of 2 epochs of ``method`` in a fresh process (MB): on CUDA the peak allocated;
    on the CPU the growth of the peak resident size over the size once the data are loaded."""
    code = ("import json,sys;from benchmark.perf import _memory_probe;"
            "print(json.dumps(_memory_probe(*sys.argv[1:])))")
    proc = subprocess.run([sys.executable, "-c", code, setting_name, method, device],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return float("nan")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _memory_probe(which: str, method: str, device_name: str) -> float:
    device = pick_device(device_name)
    torch.set_num_threads(1)
    (setting,) = settings(device, [which])
    label_opts = dict(METHODS.get(method).perf_variants(setting.data.info.modality_names)[0][1]) \
        if method in METHODS.names() else {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: reset the peak resident size, so that it measures training alone
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_mb("VmRSS")
    if method == "floor":
        time_floor(setting, 2, device)
    else:
        time_method(setting, method, label_opts, 2, device, None)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM") - before


def format_table(title: str, rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"### {title}", "", f"device: {device}", "",
             f"| method | samples/s | step ms | × floor throughput | step × {reference()} | step × single-modality "
             f"| run s / epoch | run × {reference()} | data wait | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    def fmt(row: dict[str, Any], key: str, spec: str = ".2f") -> str:
        return format(row[key], spec) if key in row else ""

    for row in rows:
        lines.append(f"| {row['method']} | {row['samples_per_s']:.0f} | {row['step_ms']:.2f} | "
                     f"{fmt(row, 'throughput_vs_floor')} | {fmt(row, 'step_vs_reference')} | "
                     f"{fmt(row, 'step_vs_single')} | {fmt(row, 'run_epoch_s')} | {fmt(row, 'run_vs_reference')} | "
                     f"{100 * row['data_wait']:.1f}% | "
                     f"{fmt(row, 'peak_mb', '.0f')} |")
    return "\n".join(lines)


def check_bounds(rows: list[dict[str, Any]]) -> list[str]:
    ref = reference()
    verdicts = []
    for row in rows:
        label, name = row["method"], row.get("name", row["method"])
        if name == ref:
            value = row["throughput_vs_floor"]
            verdicts.append(f"{label} throughput / floor = {value:.3f} (target >= {FLOOR_BOUND}): "
                            f"{'met' if value >= FLOOR_BOUND else 'MISSED'}")
        if name not in METHODS.names():
            continue
        bound = METHODS.get(name).fact("perf_bound")
        if bound is not None and "step_vs_reference" in row:
            value = row["step_vs_reference"]
            verdicts.append(f"{label} step / {ref} step = {value:.3f} (target <= {bound}): "
                            f"{'met' if value <= bound else 'MISSED'}")
        bound = METHODS.get(name).fact("perf_bound_vs_single")
        if bound is not None and "step_vs_single" in row:
            value = row["step_vs_single"]
            verdicts.append(f"{label} last stage's step / single-modality step = {value:.3f} (target <= {bound}): "
                            f"{'met' if value <= bound else 'MISSED'}")
    return verdicts


OFFLINE_DATASETS = ("synthetic", "cg-digits", "av-digits")


def data_wait(device: torch.device, epochs: int) -> list[str]:
    """Share of each training epoch the loop spends waiting for batches, the reference method on
    each offline dataset (first epoch dropped)."""
    lines = []
    ref = reference()
    for name in OFFLINE_DATASETS:
        data = create_dataset(name, {})
        setting = Setting(name, data, 64)
        cfg = _config(setting, ref, {}, epochs, str(device))
        trainer = Trainer(cfg, data, device)
        method = create_method(ref, data.info, cfg)
        build_method(method)
        method.run(trainer)
        rows = trainer.history[1:] or trainer.history
        share = sum(r["data_wait_seconds"] for r in rows) / sum(r["epoch_seconds"] for r in rows)
        lines.append(f"data wait, {ref} on {name}: {100 * share:.2f}% of the training epoch "
                     f"(target < 5%): {'met' if share < 0.05 else 'MISSED'}")
    return lines


def perf_command(args: argparse.Namespace) -> int:
    """``python -m benchmark perf`` (its arguments: benchmark.commands)."""
    from benchmark.errors import UsageError
    from benchmark.procs import keep_freed_memory
    from benchmark.registry import METHODS

    keep_freed_memory()  # as every training process does (runner.execute): the floor's loop too
    device = pick_device(args.device)
    which = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not which or any(s not in SETTINGS for s in which):
        raise UsageError(f"--settings takes {', '.join(SETTINGS)} (comma-separated), got {args.settings!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list_methods()
    for name in methods:
        METHODS.get(name)
    if reference() not in methods:
        methods.insert(0, reference())
    if args.repeats < 1 or args.epochs < 2:
        raise UsageError("--repeats must be >= 1 and --epochs >= 2 (the first epoch is warm-up)")
    out = Path(args.out)
    if not str(args.out).strip() or out.is_dir():
        raise UsageError(f"--out {args.out!r} must name a file (the table), not a folder; e.g. --out reports/perf.md")
    if not out.parent.is_dir():
        raise UsageError(f"folder {str(out.parent)!r} for --out does not exist; create it or change --out")
    from benchmark.files import check_writable_dir

    check_writable_dir(out.parent, "--out")  # before minutes of measuring
    set_determinism(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    sections = [f"# Throughput (`python -m benchmark perf {' '.join(sys.argv[2:])}`)".rstrip()]
    for setting in settings(device, which):
        print(f"measuring {setting.name} ...", file=sys.stderr, flush=True)
        rows = measure(setting, device, methods, args.repeats, args.epochs)
        if not args.no_memory:
            key = setting.key
            for row in rows:
                name = row.get("name", row["method"])
                if name == SINGLE:
                    row["peak_mb"] = peak_memory(key, single_modality() or "", str(device))
                elif name == "floor" or name in methods:
                    row["peak_mb"] = peak_memory(key, name, str(device))
        table = format_table(setting.name, rows, device_name)
        verdicts = check_bounds(rows)
        print(table + "\n\n" + "\n".join(verdicts) + "\n", flush=True)
        sections += ["", table, "", *[f"- {v}" for v in verdicts]]
    waits = data_wait(device, args.epochs)
    print("\n".join(waits), flush=True)
    sections += ["", "### Data loading", "", *[f"- {w}" for w in waits]]
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text("\n".join(sections) + "\n")
        tmp.replace(out)
    except OSError as exc:
        from benchmark.files import os_error_line

        tmp.unlink(missing_ok=True)
        raise UsageError(os_error_line(exc, out)) from None
    print(f"written to {out}", file=sys.stderr)
    return 0
