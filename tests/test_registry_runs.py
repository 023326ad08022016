"""Every registered method, encoder and fusion head, exercised through the registries."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmark.config import build_config
from benchmark.data import ModalitySpec
from benchmark.data.specs import TokenSpec
from benchmark.errors import UsageError
from benchmark.models import create_encoder, create_fusion
from benchmark.registry import METHODS, list_encoders, list_fusions, list_methods
from benchmark.runner import execute, prepare


def _finite_metrics(record: dict) -> None:
    m = record["metrics"]
    assert record["status"] == "ok"
    for key in ("accuracy", "macro_f1", "val_accuracy", "wall_seconds", "peak_memory_mb"):
        assert math.isfinite(m[key]), key
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["parameters"] > 0
    assert m["probe_accuracy"], "every method exposes features for linear probes"
    for value in list(m["probe_accuracy"].values()) + list(m["unimodal_accuracy"].values()):
        assert 0.0 <= value <= 1.0
    assert record["history"], "per-epoch history is recorded"


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains(method: str, modalities: int, tiny: dict, tmp_path) -> None:
    max_m = METHODS.get(method).max_modalities
    cfg_items = dict(tiny, method=method, **{"dataset.modalities": modalities}, cache_dir=str(tmp_path))
    if max_m is not None and modalities > max_m:
        with pytest.raises(UsageError, match="modalities"):
            prepare(build_config(cfg_items))
        return
    record = execute(prepare(build_config(cfg_items)), cache_dir=str(tmp_path))
    _finite_metrics(record)
    assert record["config"]["dataset_options"]["modalities"] == modalities


@pytest.mark.parametrize("fusion", list_fusions())
def test_joint_with_every_fusion_head(fusion: str, tiny: dict) -> None:
    record = execute(prepare(build_config(dict(tiny, method="joint", fusion=fusion))))
    _finite_metrics(record)
    has_readout = create_fusion(fusion, {"a": 4, "b": 4}, 3).has_unimodal_readout
    assert bool(record["metrics"]["unimodal_accuracy"]) == has_readout


SPECS = {
    "mlp": ModalitySpec("x", "vector", (10,), "mlp"),
    "small_cnn": ModalitySpec("x", "image", (3, 8, 8), "small_cnn"),
    "resnet18_audio": ModalitySpec("x", "spectrogram", (1, 32, 24), "resnet18_audio"),
    "resnet18_visual": ModalitySpec("x", "frames", (2, 3, 32, 32), "resnet18_visual"),
    "seq_transformer": ModalitySpec("x", "sequence", (6, 12), "seq_transformer"),
    "text_transformer": TokenSpec("x", "tokens", (10,), "text_transformer", vocab_size=50),
    "bert": TokenSpec("x", "tokens", (10,), "bert", features=16),  # its folder is written by the test
    "hf": TokenSpec("x", "tokens", (10,), "hf"),  # its folder (encoder_weights) is written by the test
    "cgmnist_cnn": ModalitySpec("x", "image", (3, 28, 28), "cgmnist_cnn"),
}


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_reports_its_feature_size(name: str, tmp_path) -> None:
    spec = SPECS.get(name)
    assert spec is not None, f"add an input spec for new encoder {name} to this test"
    if name == "bert":
        from test_data_paper_sets import tiny_bert

        spec = dataclasses.replace(spec, pretrained=str(tiny_bert(tmp_path / "bert")))
    weights = ""
    if name == "hf":
        from test_data_paper_sets import tiny_bert

        weights = str(tiny_bert(tmp_path / "hf"))
    encoder = create_encoder(name, spec, weights).eval()
    vocab = getattr(spec, "vocab_size", 0) or (30 if name in ("bert", "hf") else 0)
    x = torch.randint(0, vocab, (3, *spec.shape)) if vocab else torch.randn(3, *spec.shape)
    with torch.no_grad():
        feats = encoder(x)
    assert feats.shape == (3, encoder.out_dim)
    assert torch.isfinite(feats).all()


def test_visual_resnet_pools_over_frames() -> None:
    spec = SPECS["resnet18_visual"]
    encoder = create_encoder("resnet18_visual", spec).eval()
    frame = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        single = encoder(frame)
        repeated = encoder(frame.repeat(1, 2, 1, 1, 1))
    torch.testing.assert_close(single, repeated)


@pytest.mark.parametrize("name", list_fusions())
def test_fusion_heads_read_feature_sizes(name: str) -> None:
    head = create_fusion(name, {"a": 5, "b": 7, "c": 3}, 4)
    feats = {"a": torch.randn(2, 5), "b": torch.randn(2, 7), "c": torch.randn(2, 3)}
    logits = head(feats)
    assert logits.shape == (2, 4)
    readout = head.unimodal_logits(feats)
    if head.has_unimodal_readout:
        # linear heads: the unimodal readouts add up to the fused logits
        torch.testing.assert_close(sum(readout.values()), logits)
    else:
        assert readout is None
