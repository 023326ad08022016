"""cg-digits and av-digits: built offline, deterministic, cached with a manifest; the av-digits audio
is real synthesized speech; ``data list`` shows every dataset."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.cli import main
from benchmark.data import create_dataset
from benchmark.data.av_digits import WORDS, clip_parameters, log_mel, place_clip, request, resample_to_16k
from benchmark.data.speech import SAMPLE_RATE, synthesize, synthesize_many


@pytest.fixture(scope="module")
def av_cache(tmp_path_factory) -> tuple[Path, float]:
    """The whole av-digits set generated once for this module; returns its cache and the seconds."""
    cache = tmp_path_factory.mktemp("av_cache")
    start = time.perf_counter()
    create_dataset("av-digits", {"cache_dir": str(cache)})
    return cache, time.perf_counter() - start


def test_espeak_speaks_the_word_differently_per_voice() -> None:
    a = synthesize("three", "en-us+m3", rate=160, pitch=30)
    b = synthesize("three", "en-gb-scotland+f2", rate=200, pitch=75)
    for wave in (a, b):
        assert 0.2 * SAMPLE_RATE < len(wave) < 1.0 * SAMPLE_RATE  # a word, not silence, not a sentence
        assert np.abs(wave).max() > 0.1
    n = min(len(a), len(b))
    assert np.corrcoef(a[:n], b[:n])[0, 1] < 0.5


def test_clip_generation_is_deterministic_and_not_silent() -> None:
    rng = np.random.default_rng(7)
    params = [clip_parameters(rng) for _ in range(3)]
    requests = [request(word, p) for word, p in zip(("seven", "two", "seven"), params)]
    first, second = synthesize_many(requests), synthesize_many(requests)  # each in a fresh process
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    clips = [place_clip(first[0], params[0], 20.0, np.random.default_rng(1)) for _ in range(2)]
    assert np.array_equal(clips[0], clips[1])
    spec = log_mel(resample_to_16k(np.stack(clips)), 40)
    assert spec.shape == (2, 1, 40, 101)
    frame_energy = spec[0, 0].mean(dim=0)
    assert frame_energy.max() - frame_energy.median() > 2.0  # speech frames stand far above the noise


def test_av_digits_audio_is_speech_that_differs_across_voices(av_cache) -> None:
    cache, seconds = av_cache
    data = create_dataset("av-digits", {"cache_dir": str(cache)})
    train = data.splits["train"]
    audio = train.inputs["audio"]
    assert audio.shape[1:] == (1, 40, 101) and train.inputs["image"].shape[1:] == (1, 8, 8)
    assert data.split_sizes() == {"train": 1259, "val": 179, "test": 359}
    # not silent: in each clip the loudest frames stand above the quietest (the word vs the noise)
    energy = audio[:, 0].mean(dim=1)  # (N, frames)
    spread = energy.max(dim=1).values - energy.min(dim=1).values
    assert (spread > 0.5).float().mean() > 0.95
    # one digit, two voices: different spectrograms
    clips = data.manifest["clips"]["train"]
    labels = train.labels.numpy()
    same = np.flatnonzero(labels == 4)
    i = same[0]
    j = next(k for k in same[1:] if clips[k]["voice"] != clips[i]["voice"])
    a, b = audio[i].flatten(), audio[j].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] < 0.9
    assert data.info.classes == list(WORDS)
    voices = {c["voice"] for c in clips}
    assert len(voices) > 50


def test_av_digits_generation_and_cached_load_times(av_cache) -> None:
    cache, seconds = av_cache
    assert seconds < 120, f"generation took {seconds:.1f}s"
    start = time.perf_counter()
    data = create_dataset("av-digits", {"cache_dir": str(cache)})
    assert time.perf_counter() - start < 5.0
    assert data.manifest["cache"].startswith(str(cache))


def test_cg_digits_tint_follows_bias_on_train_only(tmp_path: Path) -> None:
    data = create_dataset("cg-digits", {"cache_dir": str(tmp_path), "bias": 0.9, "image_noise": 0.0})
    manifest = data.manifest
    for split, low, high in (("train", 0.85, 0.95), ("test", 0.0, 0.25)):
        labels = data.splits[split].labels.numpy()
        tint = np.array(manifest["splits"][f"{split}_tint"])
        assert low < np.mean(tint == labels) < high
        partner = np.array(manifest["splits"][f"{split}_color_partner"])
        own = np.array(manifest["splits"][split])
        assert np.all(partner != own)  # the color image is a different image of the same class
    color = data.splits["train"].inputs["color"]
    assert color.shape[1:] == (3, 8, 8) and data.splits["train"].inputs["gray"].shape[1:] == (1, 8, 8)


def test_cg_digits_cache_is_deterministic_and_keyed_by_recipe(tmp_path: Path) -> None:
    a = create_dataset("cg-digits", {"cache_dir": str(tmp_path / "a")})
    b = create_dataset("cg-digits", {"cache_dir": str(tmp_path / "b")})
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    assert torch.equal(a.splits["test"].inputs["color"], b.splits["test"].inputs["color"])
    c = create_dataset("cg-digits", {"cache_dir": str(tmp_path / "a"), "seed": 1})
    assert c.manifest["key"] != a.manifest["key"]
    assert len(list((tmp_path / "a" / "cg-digits").iterdir())) == 2
    again = create_dataset("cg-digits", {"cache_dir": str(tmp_path / "a")})  # read back, hash checked
    assert again.manifest == a.manifest


def test_data_list_shows_every_dataset(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BMB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BMB_DATA_ROOT", raising=False)
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"cg-digits", "av-digits", "crema-d", "kinetics-sounds", "ave", "cgmnist", "ucf101"} <= set(rows)
    assert "audio+visual" in rows["crema-d"] and " 6 " in rows["crema-d"] and " no " in rows["crema-d"]
    assert "rgb+flow" in rows["ucf101"] and " 101 " in rows["ucf101"]
    assert "yes, not prepared" in rows["cg-digits"] and "1797" in rows["av-digits"]
