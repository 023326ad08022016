"""Re-key a store's records to the location-free run keys (run once over the committed results/).

Keys used to hash the dataset's location options (``dataset.root``, ``dataset.cache_dir``) with the
rest of a run's configuration; they are left out now (``opt(location=True)``), so the key of every
record changes while what it holds does not. For each record under ``STORE/records``: the key is
recomputed from the record's own resolved configuration (``config``), the record rewritten under
its new name (atomically) and the old file removed; its sweep log follows it. Records whose key is
already the new one are left alone, so running it twice changes nothing. Smoke records (whose key
also hashes the smoke settings) are left alone.

    python tools/rekey_results.py results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmark.config import location_names
from benchmark.files import write_json_atomic
from benchmark.registry import DATASETS
from benchmark.runner import run_key
from benchmark.store import LOGS, RECORDS, record_name


def rekey(store: Path) -> tuple[int, int]:
    """(records re-keyed, records already keyed so)."""
    changed = same = 0
    for path in sorted((store / RECORDS).glob("*/*.json")):
        record = json.loads(path.read_text())
        if record.get("smoke") or not isinstance(record.get("config"), dict):
            continue
        dataset = record["dataset"]
        new = run_key(record["config"], location_names(DATASETS.get(dataset).Options))
        old = record.get("key")
        if old == new:
            same += 1
            continue
        record["key"] = new
        if record.get("run_key") == old:
            record["run_key"] = new
        target = path.parent / record_name(record["method"], record["dataset"], record["seed"], new)
        write_json_atomic(target, record)
        path.unlink()
        log = store / LOGS / f"{old}.log"
        if log.exists():
            log.rename(log.with_name(f"{new}.log"))
        changed += 1
    return changed, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="a sweep store (the folder holding records/)")
    args = parser.parse_args(argv)
    if not (args.store / RECORDS).is_dir():
        print(f"error: {args.store} holds no records/ folder; give a sweep store", file=sys.stderr)
        return 2
    changed, same = rekey(args.store)
    print(f"{changed} record(s) re-keyed, {same} already keyed without locations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
