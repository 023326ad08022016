"""Sweep files: reading and checking a sweep's TOML (the format is described in
:mod:`benchmark.sweep`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SWEEP_DIR = Path(__file__).resolve().parent / "sweeps"
MODALITIES = "@modalities"
TOP_KEYS = {"description", "seeds", "settings", "datasets", "methods", "use_recommended", "preset"}
DATASET_KEYS = {"settings"}
METHOD_KEYS = {"settings", "variants", "datasets", "use_recommended", "preset"}
VARIANT_DATASETS = "datasets"  # a variant's own dataset filter (not an option)


# --- sweep files --------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    name: str
    source: str
    description: str
    seeds: list[int]
    settings: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    use_recommended: bool = False
    preset: str = ""


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.toml"))


def sweep_path(name: str) -> Path:
    """The file of sweep ``name``: a packaged sweep, or a path to a TOML file."""
    if name.endswith(".toml") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"sweep file {name!r} does not exist; give a packaged sweep "
                             f"({', '.join(list_sweeps())}) or the path of a .toml file")
        return path
    path = SWEEP_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown sweep {name!r}; known sweeps: {', '.join(list_sweeps())} "
                         "(or give the path of a .toml file)")
    return path


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a table, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")


def load_sweep(name: str) -> SweepSpec:
    """Parse and check the structure of a sweep file (its values are checked when planning)."""
    path = sweep_path(name)
    label = path.stem if path.parent == SWEEP_DIR else str(path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"sweep {label}: not valid TOML ({exc}); fix the file") from None
    _check_keys(data, TOP_KEYS, f"sweep {label}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UsageError(f"sweep {label}: seeds must be a non-empty list of integers, got {seeds!r}")
    datasets = _table(data.get("datasets", {}), f"sweep {label}: [datasets]")
    methods = _table(data.get("methods", {}), f"sweep {label}: [methods]")
    if not datasets or not methods:
        raise UsageError(f"sweep {label}: needs at least one [datasets.<name>] and one [methods.<name>] table")
    for dname, entry in datasets.items():
        where = f"sweep {label}: [datasets.{dname}]"
        _check_keys(_table(entry, where), DATASET_KEYS, where)
        _table(entry.get("settings", {}), f"{where} settings")
    for mname, entry in methods.items():
        where = f"sweep {label}: [methods.{mname}]"
        _check_keys(_table(entry, where), METHOD_KEYS, where)
        _table(entry.get("settings", {}), f"{where} settings")
        variants = entry.get("variants", [{}])
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise UsageError(f"{where}: variants must be a list of tables, got {variants!r}")
        only = entry.get("datasets", list(datasets))
        if not isinstance(only, list) or not set(only) <= set(datasets):
            raise UsageError(f"{where}: datasets must list datasets of this sweep ({', '.join(datasets)}), "
                             f"got {only!r}")
        for v_index, variant in enumerate(variants):
            only = variant.get(VARIANT_DATASETS, list(datasets))
            if not isinstance(only, list) or not set(only) <= set(datasets):
                raise UsageError(f"{where} variant {v_index + 1}: datasets must list datasets of this sweep "
                                 f"({', '.join(datasets)}), got {only!r}")
        if "preset" in entry:
            from benchmark.presets import check_preset
            check_preset(entry["preset"], f"{where}: preset")
    use_rec = data.get("use_recommended", False)
    if not isinstance(use_rec, bool):
        raise UsageError(f"sweep {label}: use_recommended must be true or false, got {use_rec!r}")
    preset = data.get("preset", "")
    if preset:
        from benchmark.presets import check_preset
        check_preset(preset, f"sweep {label}: preset")
    return SweepSpec(label, str(path), str(data.get("description", "")), list(seeds),
                     _table(data.get("settings", {}), f"sweep {label}: [settings]"), datasets, methods,
                     use_rec, preset)
