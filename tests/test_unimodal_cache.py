"""Unimodal trainings are shared: a second method (or process) reuses the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmark.config import build_config
from benchmark.runner import execute, prepare


def test_ensemble_reuses_the_unimodal_runs_checkpoint(tiny: dict, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    first = execute(prepare(build_config(dict(tiny, method="unimodal", **{"method.modality": "m1"}))),
                    cache_dir=cache)
    assert first["method_record"]["unimodal"]["m1"]["reused"] is False
    ens = execute(prepare(build_config(dict(tiny, method="ensemble"))), cache_dir=cache)
    facts = ens["method_record"]["unimodal"]
    assert facts["m1"]["reused"] is True and facts["m0"]["reused"] is False
    assert facts["m1"]["val_accuracy"] == first["method_record"]["unimodal"]["m1"]["val_accuracy"]
    assert ens["metrics"]["unimodal_accuracy"]["m1"] == first["metrics"]["accuracy"]
    # a different optimiser setting is a different model: no reuse
    other = execute(prepare(build_config(dict(tiny, method="ensemble", lr=0.02))), cache_dir=cache)
    assert not any(f["reused"] for f in other["method_record"]["unimodal"].values())


def test_reused_model_equals_a_fresh_training(tiny: dict, tmp_path: Path) -> None:
    cfg = dict(tiny, method="unimodal")
    fresh = execute(prepare(build_config(cfg)))
    execute(prepare(build_config(cfg)), cache_dir=str(tmp_path))
    reused = execute(prepare(build_config(cfg)), cache_dir=str(tmp_path))
    assert reused["method_record"]["unimodal"]["m0"]["reused"] is True
    assert reused["metrics"]["accuracy"] == fresh["metrics"]["accuracy"]
    assert reused["metrics"]["probe_accuracy"] == fresh["metrics"]["probe_accuracy"]


SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from benchmark.config import build_config
from benchmark.runner import execute, prepare
cfg = json.loads(sys.argv[1])
r = execute(prepare(build_config(cfg)), cache_dir=sys.argv[2])
print(json.dumps(r["method_record"]["unimodal"]["m0"]["reused"]))
"""


def test_two_processes_train_one_unimodal_model_once(tiny: dict, tmp_path: Path) -> None:
    cfg = json.dumps(dict(tiny, method="unimodal", epochs=4))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, cfg, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ["false", "true"]
    assert len(list((tmp_path / "unimodal").glob("*.pt"))) == 1
    assert not list((tmp_path / "unimodal").glob("*.lock"))
    assert torch.load(next((tmp_path / "unimodal").glob("*.pt")), weights_only=True)["info"]["epochs_run"] == 4


def test_a_changed_dataset_default_or_content_is_not_reused(tiny: dict, tmp_path: Path, monkeypatch) -> None:
    from benchmark.data import synthetic

    cache = str(tmp_path)
    cfg = dict(tiny, method="unimodal")
    execute(prepare(build_config(cfg)), cache_dir=cache)
    # the same options, but the generator's preset changed (a new version of the data): no reuse
    preset = [tuple(row) for row in synthetic.PRESETS["imbalanced"]]
    preset[0] = (0.9, *preset[0][1:])
    monkeypatch.setitem(synthetic.PRESETS, "imbalanced", preset)
    again = execute(prepare(build_config(cfg)), cache_dir=cache)
    assert again["method_record"]["unimodal"]["m0"]["reused"] is False


def test_noisy_logits_of_a_checkpoint_are_shared_and_equal_a_fresh_evaluation(tiny: dict, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """The unimodal runs write their checkpoint's noisy-input logits beside it; the ensemble of the
    same seed reads them instead of evaluating its heads again, and gets the same diagnostics as
    an ensemble evaluated without any cache."""
    import benchmark.diagnostics as diag

    cache = str(tmp_path / "cache")
    uni = {m: execute(prepare(build_config(dict(tiny, method="unimodal", **{"method.modality": m}))),
                      cache_dir=cache) for m in ("m0", "m1")}
    memos = sorted((tmp_path / "cache" / "unimodal").glob("*.noise/*.pt"))
    assert len(memos) == 2 * len(diag.NOISE_LEVELS)  # one per (checkpoint, σ): each reads one modality
    for m, record in uni.items():
        d = record["metrics"]["diagnostics"]
        other = "m1" if m == "m0" else "m0"  # not read by the model: the clean accuracy, no pass
        assert d["noise_accuracy"][other] == [record["metrics"]["accuracy"]] * len(diag.NOISE_LEVELS)

    calls = []
    original_stream = diag._noise_stream
    monkeypatch.setattr(diag, "_noise_stream", lambda *a: calls.append(a) or original_stream(*a))
    shared = execute(prepare(build_config(dict(tiny, method="ensemble"))), cache_dir=cache)
    assert calls == []  # every noisy head came from the checkpoints' memos
    monkeypatch.setattr(diag, "_noise_stream", original_stream)
    fresh = execute(prepare(build_config(dict(tiny, method="ensemble"))))  # no cache: computed here
    assert shared["metrics"]["diagnostics"]["noise_accuracy"] == fresh["metrics"]["diagnostics"]["noise_accuracy"]

    # a retrained checkpoint (another file version) is not matched by the old memo
    ckpt = Path(uni["m0"]["method_record"]["unimodal"]["m0"]["checkpoint"])
    data = ckpt.read_bytes()
    ckpt.write_bytes(data)  # same content, new mtime: the memo key no longer fits
    calls.clear()
    monkeypatch.setattr(diag, "_noise_stream", lambda *a: calls.append(a) or original_stream(*a))
    again = execute(prepare(build_config(dict(tiny, method="ensemble"))), cache_dir=cache)
    assert {c[1] for c in calls} == {"m0"}  # m0's noisy logits computed again, m1's read
    assert again["metrics"]["diagnostics"]["noise_accuracy"] == fresh["metrics"]["diagnostics"]["noise_accuracy"]
