"""The command line: a run writes one record; bad input gets one line, exit 2 and no record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main

TINY = ["--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
        "--epochs", "1", "--quiet"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_one_complete_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    code, stdout, _ = run_cli(["run", "--method", "joint", "--out", str(out), *TINY], capsys)
    assert code == 0
    records = list(out.glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok" and record["config"]["epochs"] == 1
    assert "test accuracy" in stdout


BAD_INPUTS = {
    "unknown method": (["--method", "nope"], "unknown method 'nope'"),
    "unknown dataset": (["--method", "joint", "--dataset", "nope"], "unknown dataset 'nope'"),
    "unknown encoder": (["--method", "joint", "--set", "encoder.m0=nope"], "unknown encoder 'nope'"),
    "encoder for a missing modality": (["--method", "joint", "--set", "encoder.zz=mlp"], "no modality 'zz'"),
    "unknown option": (["--method", "joint", "--set", "learning_rate=0.1"], "unknown option 'learning_rate'"),
    "unknown method option": (["--method", "joint", "--set", "method.alpha=1"], "unknown option 'method.alpha'"),
    "unknown dataset option": (["--method", "joint", "--set", "dataset.size=1"], "unknown option 'dataset.size'"),
    "wrong type": (["--method", "joint", "--set", "lr=fast"], "lr expects a value of type float"),
    "wrong type of flag": (["--method", "joint", "--epochs", "many"], "invalid int value"),
    "negative epochs": (["--method", "joint", "--epochs", "-3"], "epochs must be >= 0"),
    "bad choice": (["--method", "joint", "--set", "optimizer=lion"], "optimizer must be one of"),
    "bad dataset value": (["--method", "joint", "--set", "dataset.preset=odd"], "dataset.preset must be"),
    "malformed --set": (["--method", "joint", "--set", "lr"], "--set expects key=value"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_record(case: str, tmp_path: Path, capsys) -> None:
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", *args, "--out", str(out), *TINY[-1:]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert not out.exists()


def test_missing_output_parent_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "no" / "such" / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--out", str(out), *TINY], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "no").exists()


def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", "--method", "nope", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown method" in proc.stderr


def test_help_lists_every_shared_option(capsys) -> None:
    import dataclasses

    from benchmark.config import RunConfig

    code, out, _ = run_cli(["run", "--help"], capsys)
    assert code == 0
    for f in dataclasses.fields(RunConfig):
        if f.name not in ("method", "dataset", "method_options", "dataset_options"):
            assert f.name in out, f.name
    assert "dataset synthetic options" in out


def test_diverging_run_exits_nonzero_with_a_failed_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--out", str(out), "--set", "lr=1e30",
                            "--set", "weight_decay=0", *TINY], capsys)
    assert code == 3
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "failed" and "non-finite" in record["error"]
