"""Checkpoints of the selected model and ``python -m benchmark evaluate``: the saved model, rebuilt
from its configuration, gives exactly the record's accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.checkpoint import checkpoint_path, config_of, load_checkpoint
from benchmark.cli import main
from benchmark.config import build_config, config_hash
from benchmark.evaluate_cmd import evaluate_checkpoint
from benchmark.registry import list_methods
from benchmark.runner import prepare, run_and_record


def _run(tiny: dict, tmp_path: Path, method: str, **extra: str):
    cfg = build_config({**tiny, "method": method, "device": "cpu", "save_checkpoint": "true", **extra})
    run = prepare(cfg)
    path, record = run_and_record(run, tmp_path / "runs")
    return run, path, record


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", ["joint", "udi"])
def test_evaluate_gives_the_records_test_accuracy(method, tiny, tmp_path, capsys):
    run, path, record = _run(tiny, tmp_path, method)
    ckpt_file = checkpoint_path(path)
    assert record["checkpoint"] == ckpt_file.name and ckpt_file.is_file()
    assert not list(ckpt_file.parent.glob(".*.tmp"))  # written through a temporary file, renamed

    # the checkpoint holds the whole evaluated model, as it was after training
    ckpt = load_checkpoint(ckpt_file)
    trained = run.method.model.state_dict()
    assert set(ckpt["state_dict"]) == set(trained)
    for key, value in trained.items():
        assert torch.equal(ckpt["state_dict"][key], value.cpu()), key
    assert ckpt["key"] == record["key"] and ckpt["config"] == json.loads(json.dumps(record["config"]))
    if method == "udi":  # the anchor and every follower are in it
        for m in ("m0", "m1"):
            assert any(k.startswith(f"units.{m}.encoder.") for k in ckpt["state_dict"]), m
        assert ckpt["method_state"]["anchor"] == record["method_record"]["anchor"]
        assert ckpt["method_state"]["trained_followers"] == record["method_record"]["followers"]

    result_file = tmp_path / "eval.json"
    code, out, err = _evaluate(capsys, str(path), "--out", str(result_file))
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["accuracy"] == record["metrics"]["accuracy"]  # exactly, not approximately
    assert result["macro_f1"] == record["metrics"]["macro_f1"]
    assert result["unimodal_accuracy"] == record["metrics"]["unimodal_accuracy"]
    assert f"test accuracy {record['metrics']['accuracy']:.4f}" in out

    # the checkpoint given directly, and the validation split
    code, out, err = _evaluate(capsys, str(ckpt_file), "--split", "val", "--out", str(result_file))
    assert code == 0, err
    assert json.loads(result_file.read_text())["accuracy"] == record["metrics"]["val_accuracy"]


def test_evaluate_diagnostics_repeat_the_records(tiny, tmp_path, capsys):
    _, path, record = _run(tiny, tmp_path, "joint")
    result_file = tmp_path / "eval.json"
    code, out, err = _evaluate(capsys, str(path), "--diagnostics", "--out", str(result_file))
    assert code == 0, err
    got = json.loads(result_file.read_text())["diagnostics"]
    want = record["metrics"]["diagnostics"]
    for key in ("shapley", "imbalance_degree", "subset_accuracy", "noise_accuracy", "utilisation"):
        assert got[key] == want[key], key
    assert "Shapley [" in out and "noise [" in out


def test_evaluate_refuses_what_it_cannot_use(tiny, tmp_path, capsys):
    cfg = build_config({**tiny, "method": "joint", "device": "cpu", "diagnostics": "false", "probe": "false"})
    path, _ = run_and_record(prepare(cfg), tmp_path / "runs")

    def one_line(*needles: str, args: tuple[str, ...]) -> None:
        code, _, err = _evaluate(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])

    one_line("the run was made without save_checkpoint", "--set save_checkpoint=true", args=(str(path),))
    one_line("does not exist", args=(str(tmp_path / "missing.json"),))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    one_line("cannot read checkpoint", args=(str(corrupt),))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    one_line("is not a checkpoint of this suite", args=(str(other),))
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a split that is not val or test
        main(["evaluate", str(path), "--split", "train"])
    assert exit_.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(set(list_methods()) - {"joint", "udi"}))
def test_every_method_evaluates_to_its_records_accuracy(method, tiny, tmp_path):
    _, path, record = _run(tiny, tmp_path, method, diagnostics="false", probe="false")
    assert evaluate_checkpoint(path)["accuracy"] == record["metrics"]["accuracy"]
    assert evaluate_checkpoint(checkpoint_path(path), "val")["accuracy"] == record["metrics"]["val_accuracy"]


def test_rebuild_skips_backbone_weights_files_but_keeps_folders():
    ckpt = {"config": {"method": "joint", "encoder": {"visual": "timm:resnet18", "text": "hf"},
                       "encoder_weights": {"visual": "/gone/resnet18.pth", "text": "/models/bert"}}}
    cfg = config_of(ckpt, "cpu")
    # the checkpoint holds the backbone's trained weights; an hf folder defines the architecture
    assert cfg.encoder_weights == {"text": "/models/bert"} and cfg.device == "cpu"


def test_keys_of_runs_without_the_new_options_are_unchanged(tiny):
    run = prepare(build_config({**tiny, "method": "joint"}))
    new = ("device", "num_workers", "cache_dir", "log", "log_dir", "save_checkpoint", "encoder_weights")
    assert run.key == config_hash({k: v for k, v in run.resolved.items() if k not in new})
    weighted = prepare(build_config({**tiny, "method": "joint", "encoder_weights.m0": "", "save_checkpoint": "true"}))
    assert weighted.key == run.key
