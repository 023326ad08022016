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
    # short: the plug-ins' own options only on request, with a pointer to them
    assert "dataset synthetic options" not in out and "run --help --method M" in out


def test_help_shows_the_named_method_and_dataset_options(capsys) -> None:
    code, out, _ = run_cli(["run", "--help", "--method", "udi", "--dataset=synthetic"], capsys)
    assert code == 0
    assert "method udi options" in out and "lambda_con" in out and "[default 0.5]" in out
    assert "dataset synthetic options" in out and "n_train" in out
    assert "method mla options" not in out


def test_list_shows_one_method_or_dataset_with_defaults(capsys) -> None:
    code, out, _ = run_cli(["list", "udi"], capsys)
    assert code == 0 and "method udi options" in out and "lambda_con" in out and "dataset" not in out.split()[0]
    code, out, _ = run_cli(["list", "cg-digits"], capsys)
    assert code == 0 and "dataset cg-digits options" in out and "bias" in out
    code, _, err = run_cli(["list", "nope"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "got 'nope'" in err and "udi" in err


def test_diverging_run_exits_nonzero_with_a_failed_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--out", str(out), "--set", "lr=1e30",
                            "--set", "weight_decay=0", *TINY], capsys)
    assert code == 3
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["status"] == "failed" and "non-finite" in record["error"]


# --- run --config FILE.toml and --print-config --------------------------------------------------------
def print_config(argv: list[str], capsys) -> str:
    code, out, err = run_cli(["run", *argv, "--print-config"], capsys)
    assert code == 0, err
    return out


def test_print_config_round_trips_through_config(tmp_path: Path, capsys) -> None:
    from benchmark.config import read_config_file

    first = print_config(["--method", "udi", "--set", "method.lambda_con=0.25", "--set", "lr=0.02",
                          "--set", "dataset.n_train=96"], capsys)
    (tmp_path / "a.toml").write_text(first)
    second = print_config(["--config", str(tmp_path / "a.toml")], capsys)
    assert second == first
    resolved = read_config_file(str(tmp_path / "a.toml"))
    assert resolved["method"] == "udi" and resolved["method.lambda_con"] == 0.25 and resolved["lr"] == 0.02
    assert resolved["dataset.n_train"] == 96 and resolved["encoder.m0"] == "mlp"  # defaults resolved too
    assert "method.anchor" in resolved and "dataset.seed" in resolved
    assert not (tmp_path / "runs").exists() and not Path("runs").exists()  # nothing trained or written


def test_command_line_wins_over_the_config_file(tmp_path: Path, capsys) -> None:
    from benchmark.config import read_config_file

    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "udi"\nlr = 0.3\nepochs = 7\n"method.lambda_con" = 0.1\n"dataset.n_val" = 40\n')
    (tmp_path / "out.toml").write_text(print_config(
        ["--config", str(cfg), "--set", "lr=0.5", "--epochs", "2", "--set", "method.lambda_con=0.2"], capsys))
    got = read_config_file(str(tmp_path / "out.toml"))
    assert (got["lr"], got["epochs"], got["method.lambda_con"]) == (0.5, 2, 0.2)  # the command line's
    assert (got["method"], got["dataset.n_val"]) == ("udi", 40)  # the file's


def test_config_tables_are_dotted_keys(tmp_path: Path, capsys) -> None:
    from benchmark.config import read_config_file

    cfg = tmp_path / "c.toml"
    cfg.write_text('lr = 0.04\n[method]\nlambda_con = 0.7\n[dataset]\nn_test = 48\n')
    (tmp_path / "out.toml").write_text(print_config(["--method", "udi", "--config", str(cfg)], capsys))
    got = read_config_file(str(tmp_path / "out.toml"))
    assert (got["lr"], got["method.lambda_con"], got["dataset.n_test"]) == (0.04, 0.7, 48)


def test_a_run_trains_with_the_config_file(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('method = "joint"\nepochs = 1\nlr = 0.02\n"dataset.n_train" = 96\n"dataset.n_val" = 32\n'
                   '"dataset.n_test" = 32\n')
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--config", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    (record_file,) = out.glob("*.json")
    config = json.loads(record_file.read_text())["config"]
    assert config["lr"] == 0.02 and config["epochs"] == 1 and config["dataset_options"]["n_train"] == 96


BAD_FILES = {
    "missing": (None, "does not exist"),
    "corrupt": ("lr = \n", "not valid TOML"),
    "unknown key": ("learning_rate = 0.1\n", "unknown option 'learning_rate'"),
    "unknown method key": ('"method.alpha" = 1\n', "unknown option 'method.alpha'"),
    "unknown encoder": ('"encoder.m0" = "nope"\n', "unknown encoder 'nope'"),
    "missing modality": ('"encoder.zz" = "mlp"\n', "no modality 'zz'"),
    "wrong type": ('lr = "fast"\n', "lr expects a value of type float"),
    "array value": ("epochs = [1, 2]\n", "a value must be a string, number or boolean"),
    "table beside method": ('method = "udi"\n[method]\nanchor = "m0"\n', "quote its dotted keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_one_line_naming_the_file(case: str, tmp_path: Path, capsys) -> None:
    text, expected = BAD_FILES[case]
    cfg = tmp_path / "bad.toml"
    if text is not None:
        cfg.write_text(text)
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--config", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "bad.toml" in lines[0] and expected in lines[0]
    assert not out.exists()


def test_run_without_a_method_is_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--method" in err


# --- bench --------------------------------------------------------------------------------------------
def test_bench_runs_on_its_default_output_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """`bench` with its defaults writes into runs/ of the working folder (it once defaulted to a
    folder whose parent did not exist); one method keeps the test short."""
    import benchmark.registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark.registry, "list_methods", lambda: ["joint"])
    code, out, err = run_cli(["bench", "--epochs", "1"], capsys)
    assert code == 0, err
    assert out.startswith("joint") and "acc" in out
    (record_file,) = (tmp_path / "runs").glob("joint-synthetic-seed0-*.json")
    assert json.loads(record_file.read_text())["config"]["epochs"] == 1


# --- progress on screen -------------------------------------------------------------------------------
def test_screen_counts_epochs_as_the_record_and_announces_probes_and_diagnostics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--out", str(out), *TINY[:-3], "--epochs", "3",
                            "--set", "lr=0.05"], capsys)
    assert code == 0, err
    record = json.loads(next(out.glob("*.json")).read_text())
    lines = err.splitlines()
    for row in record["history"]:  # each epoch on screen under the number the record gives it
        assert any(line.startswith(f"[joint] epoch {row['epoch']} ({row['epoch'] + 1} of 3)") for line in lines), err
    best = record["stages"]["joint"]["best_epoch"]
    assert f"[joint] best epoch {best} (val acc {record['stages']['joint']['best_val_accuracy']:.4f})" in err
    probes = next(i for i, line in enumerate(lines) if line.startswith("fitting linear probes"))
    diagnostics = next(i for i, line in enumerate(lines) if line.startswith("diagnostics:"))
    assert probes < diagnostics and "m0, m1" in lines[probes]


def test_log_and_save_checkpoint_flags_write_beside_the_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--method", "joint", "--out", str(out), "--log", "tensorboard",
                            "--save-checkpoint", *TINY], capsys)
    assert code == 0, err
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["config"]["log"] == "tensorboard" and record["config"]["save_checkpoint"] is True
    assert (out / record["checkpoint"]).is_file()
    assert list(Path(record["tracking"]["folder"]).glob("events.out.tfevents.*"))
