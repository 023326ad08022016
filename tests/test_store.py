"""The result store: exclusive claims, atomic records, corrupt files, unimodal reuse counts."""

from __future__ import annotations

import json
import os

import pytest

from benchmark.errors import UsageError
from benchmark.store import Store, count_unimodal_reuse, key_of, read_record


def test_claim_is_exclusive_and_released(tmp_path):
    store = Store(tmp_path)
    first = store.claim("abc")
    assert first is not None
    assert store.claim("abc") is None  # another open file (another process) cannot take it
    assert store.claim("other") is not None
    first.release()
    assert not (tmp_path / "claims" / "abc.lock").exists()
    again = store.claim("abc")
    assert again is not None
    again.release()


def test_claim_dies_with_its_holder(tmp_path):
    store = Store(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child takes the claim and dies without releasing it
        store.claim("k")
        os._exit(0)
    os.waitpid(pid, 0)
    claim = store.claim("k")
    assert claim is not None
    claim.release()


def test_records_are_keyed_read_whole_and_corrupt_files_are_flagged(tmp_path):
    store = Store(tmp_path)
    path = store.record_path("synthetic", "joint", 3, "0123456789abcdef")
    assert path.name == "joint-synthetic-seed3-0123456789abcdef.json" and key_of(path) == "0123456789abcdef"
    store.write(path, {"status": "ok", "key": "0123456789abcdef", "method": "joint", "dataset": "synthetic",
                        "seed": 3, "metrics": {"accuracy": 0.5}})
    bad = store.record_path("synthetic", "mla", 0, "ffffffffffffffff")
    bad.write_text('{"status": "ok", "metrics": {')  # a half-written file from elsewhere
    assert read_record(bad) is None
    assert store.status_by_key() == {"0123456789abcdef": "ok", "ffffffffffffffff": "corrupt"}
    assert [r["key"] for r in store.records()] == ["0123456789abcdef"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert json.loads(path.read_text())["metrics"]["accuracy"] == 0.5


def test_store_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        Store(tmp_path / "file").check_writable()
    with pytest.raises(UsageError, match="parent folder"):
        Store(tmp_path / "missing" / "store").check_writable()
    with pytest.raises(UsageError, match="does not exist"):
        Store(tmp_path / "nothing").check_readable()
    Store(tmp_path / "new").check_writable()
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())


def test_count_unimodal_reuse_walks_method_records():
    record = {"method_record": {
        "unimodal": {"m0": {"reused": True, "checkpoint": "a"}, "m1": {"reused": False, "checkpoint": "b"}},
        "reused": {"m0": True, "m1": False},  # a summary mapping is not counted twice
        "phases": [{"reused": True}],
    }}
    assert count_unimodal_reuse(record) == (1, 2)
    assert count_unimodal_reuse({"method_record": {}}) == (0, 0)
