"""The UDI paper's settings: the `udi-paper` preset in sweeps, the readers' spectrogram and frame
counts, and CG-MNIST's 4-conv encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_ondisk import KS_CLASSES, builder, crema_d, kinetics_sounds

from benchmark.data.base import ModalitySpec
from benchmark.errors import UsageError
from benchmark.models import create_encoder
from benchmark.presets import preset_settings
from benchmark.store import Store
from benchmark.sweep import load_sweep, plan_sweep


def test_crema_d_takes_the_papers_257_by_299_spectrogram_and_two_frames(tmp_path: Path) -> None:
    root = crema_d(tmp_path / "release", per_class=1)
    options = {k: v for k, v in preset_settings("udi-paper", "crema-d").items() if k.startswith("dataset.")}
    data = builder("crema-d", root, tmp_path / "cache", **{k.split(".", 1)[1]: v for k, v in options.items()}).load()
    sample = data.splits["test"][0]
    assert sample["audio"].shape == (1, 257, 299)
    assert sample["visual"].shape == (2, 3, 32, 32)
    assert [s.shape for s in data.info.modalities] == [(1, 257, 299), (2, 3, 32, 32)]
    with pytest.raises(UsageError, match="audio_frames"):
        builder("crema-d", root, tmp_path / "cache", audio_frames=1)


def test_kinetics_sounds_stft_features_give_257_by_audio_frames(tmp_path: Path) -> None:
    root = kinetics_sounds(tmp_path / "release", KS_CLASSES, per_class=1)
    data = builder("kinetics-sounds", root, tmp_path / "cache", audio_features="stft", audio_frames=1004,
                   frames=3).load()
    sample = data.splits["train"][0]
    assert sample["audio"].shape == (1, 257, 1004) and sample["visual"].shape == (3, 3, 32, 32)
    assert data.info.num_classes == 31
    npy = kinetics_sounds(tmp_path / "npy", KS_CLASSES, per_class=1, npy_audio=True)
    with pytest.raises(UsageError, match="audio_features=stft needs"):
        builder("kinetics-sounds", npy, tmp_path / "cache2", audio_features="stft").load()
    with pytest.raises(UsageError, match="audio_features"):
        builder("kinetics-sounds", root, tmp_path / "cache", audio_features="mfcc")


def test_cgmnist_cnn_is_four_convolutions_and_an_average_pool() -> None:
    enc = create_encoder("cgmnist_cnn", ModalitySpec("color", "image", (3, 28, 28), "small_cnn"))
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and isinstance(enc.net[-2], torch.nn.AdaptiveAvgPool2d)
    assert enc(torch.randn(2, 3, 28, 28)).shape == (2, enc.out_dim)


def test_paper_preset_per_dataset() -> None:
    crema = preset_settings("udi-paper", "crema-d")
    assert (crema["optimizer"], crema["momentum"], crema["weight_decay"], crema["batch_size"], crema["lr"],
            crema["epochs"]) == ("sgd", 0.9, 1e-4, 64, 1e-2, 100)
    assert preset_settings("udi-paper", "ucf101")["lr"] == 1e-3
    cg = preset_settings("udi-paper", "cgmnist")
    assert cg["epochs"] == 20 and cg["encoder.gray"] == cg["encoder.color"] == "cgmnist_cnn"
    assert "lr" not in preset_settings("udi-paper", "synthetic")
    with pytest.raises(UsageError, match="unknown preset"):
        preset_settings("udi-papr", "crema-d")


def test_a_sweep_applies_the_preset_under_the_methods_own_settings(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('seeds = [0]\n[settings]\nlr = 0.5\nepochs = 3\n[datasets.synthetic]\n'
                    '[methods.udi]\npreset = "udi-paper"\nsettings = { epochs = 2 }\n'
                    'variants = [{ "method.controller" = "static" }, { "method.guidance" = "anchor", '
                    'datasets = ["synthetic"] }]\n')
    plan = plan_sweep(load_sweep(str(path)), Store(tmp_path / "store"))
    assert len(plan.runs) == 2
    for run in plan.runs:
        a = run.assignments
        assert (a["optimizer"], a["batch_size"], a["lr"], a["epochs"]) == ("sgd", 64, 0.5, 2)
    top = tmp_path / "top.toml"  # a top-level preset applies to every method that names none
    top.write_text('preset = "udi-paper"\nseeds = [0]\n[datasets.synthetic]\n[methods.joint]\n')
    (run,) = plan_sweep(load_sweep(str(top)), Store(tmp_path / "store")).runs
    assert (run.assignments["optimizer"], run.assignments["epochs"]) == ("sgd", 100)
    bad = tmp_path / "bad.toml"
    bad.write_text('[datasets.synthetic]\n[methods.udi]\npreset = "nope"\n')
    with pytest.raises(UsageError, match="unknown preset"):
        load_sweep(str(bad))
    bad.write_text('[datasets.synthetic]\n[methods.udi]\nvariants = [{ datasets = ["cg-digits"] }]\n')
    with pytest.raises(UsageError, match="datasets must list"):
        load_sweep(str(bad))
