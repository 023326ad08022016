"""Location is not identity: a dataset's root and cache folder are left out of the run key and of the
unimodal checkpoint key, so the same run resumes and shares a store on any machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_data_paper_sets import fsdd

from benchmark.config import build_config, location_names
from benchmark.registry import DATASETS, list_datasets
from benchmark.report_data import is_location
from benchmark.runner import prepare, run_and_record, run_key
from benchmark.unimodal import unimodal_key

ROOT = Path(__file__).resolve().parents[1]


def _keys(dataset: str, method: str, modality: str, **options: str) -> tuple[str, dict]:
    run = prepare(build_config({"method": method, "dataset": dataset, "epochs": 1,
                                **{f"dataset.{k}": v for k, v in options.items()}}))
    return run.key, unimodal_key(run.method, modality, run.data)


def test_the_same_run_from_two_roots_and_caches_has_one_key(tmp_path):
    first = fsdd(tmp_path / "here" / "FSDD", takes=(0, 5))
    second = tmp_path / "there" / "copy-of-FSDD"
    shutil.copytree(first, second)
    a = _keys("fsdd", "unimodal", "audio", root=str(first), cache_dir=str(tmp_path / "cache-1"))
    b = _keys("fsdd", "unimodal", "audio", root=str(second), cache_dir=str(tmp_path / "cache-2"))
    assert a == b
    assert "root" not in json.dumps(a[1]["dataset_options"]) and "cache_dir" not in a[1]["dataset_options"]
    # an option that changes the data still changes the keys
    c = _keys("fsdd", "unimodal", "audio", root=str(first), cache_dir=str(tmp_path / "cache-1"), n_mels=32)
    assert c[0] != a[0] and c[1] != a[1]


def test_cache_folders_of_a_built_dataset_leave_the_key_alone(tmp_path):
    a = _keys("cg-digits", "joint", "gray", cache_dir=str(tmp_path / "one"))
    b = _keys("cg-digits", "joint", "gray", cache_dir=str(tmp_path / "two"))
    assert a == b


def test_location_markers_agree_with_the_reports_rule():
    """Every option the report treats as a location (left out of a row's identity) is marked so,
    except a folder of weights, whose content decides the result (bert_dir)."""
    for name in list_datasets():
        options = DATASETS.get(name).Options
        marked = location_names(options)
        by_name = {f for f in options.__dataclass_fields__ if is_location(f"dataset.{f}")}
        assert marked <= by_name, name
        assert by_name - marked <= {"bert_dir"}, name


def test_rekey_script_moves_old_records_to_the_new_keys(tmp_path):
    from benchmark.config import config_hash
    from benchmark.runner import KEY_WHEN_SET, NOT_IN_KEY
    from benchmark.store import record_name

    store = tmp_path / "store"
    run = prepare(build_config({"method": "joint", "dataset": "cg-digits", "epochs": 1, "probe": False,
                                "diagnostics": False}))
    folder = store / "records" / "cg-digits"
    path, record = run_and_record(run, folder)
    # as the earlier code keyed it: every resolved option but NOT_IN_KEY (locations included)
    old = config_hash({k: v for k, v in record["config"].items()
                       if k not in NOT_IN_KEY and not (k in KEY_WHEN_SET and not v)})
    record["key"] = old
    path.unlink()
    (folder / record_name("joint", "cg-digits", 0, old)).write_text(json.dumps(record))
    cfg = dict(record["config"], dataset_options=dict(record["config"]["dataset_options"], cache_dir="/x"))
    assert old != run.key  # the cache folder counted
    assert run_key(cfg, location_names(DATASETS.get("cg-digits").Options)) == run.key
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "rekey_results.py"), str(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    (moved,) = folder.glob("*.json")
    assert moved.name == record_name("joint", "cg-digits", 0, run.key) and json.loads(moved.read_text())["key"] == run.key
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "rekey_results.py"), str(store)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert "0 record(s) re-keyed, 1 already" in again.stdout
