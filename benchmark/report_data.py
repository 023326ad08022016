"""The records a report reads, and what makes two records the same configuration.

A report reads a sweep store (``records/<dataset>/*.json``) or any folder of the records that
``run --out`` writes (``*.json``): one layout, the run record. Records belong in one table row
only when their **configuration identity** is the same: every resolved option except the seed and
the fields that only say where things are or how fast they go (paths, device, worker counts), plus
whether the record comes from a smoke run (tiny subsets). A row's label is the method's name and
the options in which the row differs: its own options from the method's defaults, shared options
from the table's setting (the value most of its rows share).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchmark import method_facts
from benchmark.config import RunConfig, config_hash, flat_options
from benchmark.convergence import record_still_improving
from benchmark.store import RECORDS, check_record, read_record

# Shared options that say where a run went or how fast, never what it computed.
LOCATION_OPTIONS = ("seed", "device", "num_workers", "cache_dir", "log", "log_dir", "save_checkpoint")
# Nested options (method.*, dataset.*) that name places on disk.
LOCATION_SUFFIXES = ("_dir", "_path", "_root")
LOCATION_NAMES = ("root", "path", "cache_dir", "data_dir")


def record_files(root: Path) -> list[Path]:
    """The record files under ``root``: a sweep store's ``records/*/*.json`` and the ``*.json`` that
    ``run --out`` writes directly into a folder (one level of sub-folders too)."""
    files = set((root / RECORDS).glob("*/*.json"))
    files |= {p for p in root.glob("*.json")}
    files |= {p for p in root.glob("*/*.json") if p.parent.name != RECORDS}
    return sorted(p for p in files if not p.name.startswith("."))


def _candidate(root: Path, path: Path) -> bool:
    """A sweep store's record files are records; elsewhere, JSON that looks like one (another
    program's JSON beside ``run --out`` records is not a record)."""
    if path.parent.parent == root / RECORDS:
        return True
    rec = read_record(path)
    return rec is None or bool({"status", "metrics", "key"} & set(rec))


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every whole run record under ``root`` (see :func:`benchmark.store.check_record`), with its file."""
    out = []
    for path in record_files(root):
        rec, _ = check_record(path)
        if rec is not None:
            out.append(dict(rec, _file=str(path)))
    return out


def unreadable(root: Path) -> list[tuple[Path, str]]:
    """Record files under ``root`` that do not parse or lack a required field, with what is wrong
    (a reader leaves them out and says so)."""
    out = []
    for path in record_files(root):
        rec, why = check_record(path)
        if rec is None and _candidate(root, path):
            out.append((path, why))
    return out


def is_location(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if "." not in name:
        return leaf in LOCATION_OPTIONS
    return leaf in LOCATION_NAMES or leaf.endswith(LOCATION_SUFFIXES)


def identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes a record's configuration: every resolved option but seed and locations, and
    whether it is a smoke run."""
    opts = {k: v for k, v in flat_options(record.get("config") or {}).items() if not is_location(k)}
    opts.setdefault("method", record.get("method"))
    opts.setdefault("dataset", record.get("dataset"))
    opts["smoke"] = bool(record.get("smoke"))
    return opts


def identity_key(record: dict[str, Any]) -> str:
    return config_hash(identity(record))


SHARED_DEFAULTS = {k: v for k, v in flat_options(RunConfig().to_dict()).items()}


def defaults_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The method's and dataset's defaults stored in the record (None for records without them)."""
    defaults = record.get("defaults")
    return defaults if isinstance(defaults, dict) else None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def row_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """``identity key → label`` for the rows of one table. ``rows``: one entry per row with
    ``key``, ``method``, ``options`` (the identity) and ``defaults`` (or None).

    A label names the options in which the row differs: a method's own options (``method.*``)
    against the method's defaults, shared options against the table's setting (see
    ``table_settings``: the value most rows share, stated once in the table's note; without a
    majority, the default). Without stored defaults, a method's most common value stands for its
    default."""
    settings = table_settings(rows)
    labels: dict[str, str] = {}
    for row in rows:
        defaults = {**SHARED_DEFAULTS, **(row["defaults"] or _modal_defaults(rows, row["method"]))}
        parts = []
        for name, value in row["options"].items():
            if name in ("method", "dataset", "smoke"):
                continue
            reference = settings[name] if name in settings else defaults.get(name, _MISSING)
            if _same(reference, value):
                continue
            parts.append(f"{name.removeprefix('method.')}={_show(value)}")
        label = " ".join([row["method"], *parts]) + (" [smoke]" if row["options"].get("smoke") else "")
        module = method_facts.report_modules().get(str(row["method"]))
        if module is not None and hasattr(module, "row_label"):  # e.g. UDI's "Decoupled" baseline
            label = module.row_label(row["options"], label)
        labels[row["key"]] = label
    seen: Counter[str] = Counter()
    for key, label in labels.items():  # never two rows under one label
        seen[label] += 1
        if seen[label] > 1:
            labels[key] = f"{label} #{seen[label]}"
    return labels


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    return a is not _MISSING and json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def table_settings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The table's value of each shared (non-method) option: the value more rows have than any
    other (a tie falls back to the default, so that two budgets side by side are both named)."""
    counts: dict[str, Counter[str]] = {}
    raw: dict[str, Any] = {}
    for row in rows:
        for name, value in row["options"].items():
            if name.startswith("method.") or name in ("method", "smoke"):
                continue
            text = json.dumps(value, sort_keys=True, default=str)
            counts.setdefault(name, Counter())[text] += 1
            raw[text] = value
    settings = {}
    for name, c in counts.items():
        top = c.most_common(2)
        if len(top) == 1 or top[0][1] > top[1][1]:
            settings[name] = raw[top[0][0]]
    return settings


def _modal_defaults(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    counts: dict[str, Counter[str]] = {}
    raw: dict[str, Any] = {}
    for row in rows:
        if row["method"] != method:
            continue
        for name, value in row["options"].items():
            text = json.dumps(value, sort_keys=True, default=str)
            counts.setdefault(name, Counter())[text] += 1
            raw[text] = value
    return {name: raw[c.most_common(1)[0][0]] for name, c in counts.items()}


def common_note(rows: list[dict[str, Any]]) -> str:
    """The table's shared settings (``table_settings``) that differ from the defaults."""
    if not rows:
        return ""
    defaults = {**SHARED_DEFAULTS, **(rows[0]["defaults"] or {})}
    settings = table_settings(rows)
    shown = [f"{name}={_show(value)}" for name, value in sorted(settings.items())
             if name != "dataset" and not name.startswith("encoder.") and not _same(defaults.get(name, _MISSING), value)]
    return ", ".join(shown)


def still_improving(record: dict[str, Any]) -> bool:
    return record_still_improving(record)


def export_frame(records: list[dict[str, Any]], labels: dict[str, str]) -> Any:
    """One row per record (every status): identifiers, the row it belongs to, every resolved
    option as a column (``cfg.<name>``, ``method.<name>``, ``dataset.<name>``, ``encoder.<m>``),
    its metrics, environment and convergence."""
    import pandas as pd

    rows = []
    for rec in records:
        m = rec.get("metrics") or {}
        key = identity_key(rec)
        row: dict[str, Any] = {
            "dataset": rec.get("dataset"), "method": rec.get("method"), "seed": rec.get("seed"),
            "status": rec.get("status"), "row": labels.get(key, ""), "identity": key, "key": rec.get("key"),
            "smoke": bool(rec.get("smoke")), "still_improving": still_improving(rec) if rec.get("status") == "ok" else None,
            "variant": (rec.get("sweep") or {}).get("label"), "git_commit": rec.get("git_commit"),
            "finished": rec.get("finished"), "file": rec.get("_file"), "error": rec.get("error"),
        }
        for name in ("accuracy", "macro_f1", "val_accuracy", "wall_seconds", "seconds_per_epoch",
                     "peak_memory_mb", "parameters"):
            row[name] = m.get(name)
        for group in ("probe_accuracy", "unimodal_accuracy"):
            for mod, value in (m.get(group) or {}).items():
                row[f"{group.split('_')[0]}:{mod}"] = value
        for name, value in flat_options(rec.get("config") or {}).items():
            row[name if "." in name else f"cfg.{name}"] = value
        for name, value in (rec.get("environment") or {}).items():
            row[f"env.{name}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    for col in frame.columns:  # Parquet wants one type per column
        kinds = {type(v) for v in frame[col] if v is not None and not (isinstance(v, float) and v != v)}
        if len(kinds) > 1 or kinds & {dict, list}:
            frame[col] = [None if v is None else json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
                          for v in frame[col]]
    return frame
