"""``av-digits``: an AV-MNIST-style audio-visual set built offline.

Visual (``image``, 1×8×8): the scikit-learn digit images in [0, 1], plus Gaussian noise of std
``image_noise``. Audio (``audio``, 1×n_mels×101): the digit's word ("zero" … "nine") spoken by
eSpeak NG (see :mod:`benchmark.data.speech`). Every sample gets its own clip, so each image is
paired with a random clip of its class; per clip, the voice (one of several English accents ×
speaker variants), pitch, pitch range, speaking rate, loudness and position in the 1 s window are
drawn at random, and colored Gaussian noise is added at an SNR drawn around ``audio_snr`` dB.
Clips are resampled from 22,050 Hz to 16 kHz, cut to 1 s, and turned into log-mel spectrograms
(torchaudio, 25 ms window, 10 ms hop), standardised with the train split's mean and std.

Any voice may appear in any split; the splits are carved from the 1,797 images, seeded and
stratified, and listed in the manifest with every clip's voice parameters and SNR. The whole set
is generated once per recipe into the dataset cache and read back (hash-checked) afterwards.

With ``audio_source=fsdd`` the words are real recordings of the Free Spoken Digit Dataset
instead (see :mod:`benchmark.data.fsdd`): its speakers are dealt to train / val / test (seeded,
disjoint), and each image gets a random recording of its digit by a speaker of its split, placed,
scaled and noised as the synthesized words are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData
from benchmark.data.builder import DatasetBuilder
from benchmark.data.cache import CacheWriter, DatasetCache
from benchmark.data.cg_digits import (
    SPLITS,
    carve_splits,
    check_fractions,
    recipe_of,
    sklearn_digits,
    splits_from_cache,
)
from benchmark.data.fsdd import LAYOUT as FSDD_LAYOUT
from benchmark.data.fsdd import fsdd_root, pair_recordings, recordings
from benchmark.data.media import read_wav
from benchmark.data.ondisk import check_sources, fingerprint, require
from benchmark.data.speech import LANGUAGES, SAMPLE_RATE, VARIANTS, synthesize, synthesize_many, voice_name
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TARGET_RATE = 16000
AUDIO_SOURCES = ("espeak", "fsdd")


@dataclass
class AVDigitsOptions:
    audio_snr: float = opt(10.0, "mean signal-to-noise ratio of the speech in dB (lower = harder audio)")
    snr_spread: float = opt(4.0, "clip SNRs are drawn uniformly in audio_snr ± snr_spread dB")
    image_noise: float = opt(0.3, "std of Gaussian noise added to the digit images (pixels in [0, 1])")
    n_mels: int = opt(40, "mel bands of the spectrogram")
    test_fraction: float = opt(0.2, "fraction of each class carved out as the test split")
    val_fraction: float = opt(0.1, "fraction of each class carved out as the validation split")
    seed: int = opt(0, "seed of the splits, voices, noise and pairing (the data, not the run)")
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    audio_source: str = opt("espeak", "espeak (words synthesized by eSpeak NG, offline) or fsdd (real "
                                      "recordings of the Free Spoken Digit Dataset)")
    fsdd_root: str = opt("", f"audio_source=fsdd: the FSDD folder ({FSDD_LAYOUT}); default $BMB_DATA_ROOT/FSDD", location=True)

    def validate(self) -> None:
        if self.audio_source not in AUDIO_SOURCES:
            raise UsageError(f"dataset.audio_source must be one of {', '.join(AUDIO_SOURCES)}, got "
                             f"{self.audio_source!r}")
        if self.image_noise < 0 or self.snr_spread < 0:
            raise UsageError(f"dataset.image_noise and dataset.snr_spread must be >= 0, got "
                             f"{self.image_noise} and {self.snr_spread}")
        if not 8 <= self.n_mels <= 128:
            raise UsageError(f"dataset.n_mels must be in 8..128, got {self.n_mels}")
        check_fractions(self.test_fraction, self.val_fraction)


def clip_parameters(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "voice": voice_name(LANGUAGES[rng.integers(len(LANGUAGES))], VARIANTS[rng.integers(len(VARIANTS))]),
        "pitch": int(rng.integers(15, 86)),
        "pitch_range": int(rng.integers(10, 91)),
        "rate": int(rng.integers(120, 260)),
        "gain_db": float(rng.uniform(-6.0, 0.0)),
    }


def trim_silence(wave: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > threshold * max(np.abs(wave).max(), 1e-8))
    return wave[loud[0]: loud[-1] + 1] if len(loud) else wave


def place_clip(speech: np.ndarray, params: dict[str, Any], snr_db: float,
               rng: np.random.Generator) -> np.ndarray:
    """One 1 s clip at 22,050 Hz: the trimmed word at a random position, scaled, plus colored noise
    (white noise through a random one-pole low-pass) at ``snr_db`` relative to the word."""
    speech = trim_silence(speech)
    length = SAMPLE_RATE
    if len(speech) > length:
        speech = speech[:length]
    speech = speech / max(float(np.abs(speech).max()), 1e-6) * 10 ** (params["gain_db"] / 20) * 0.8
    clip = np.zeros(length, dtype=np.float32)
    start = int(rng.integers(0, length - len(speech) + 1))
    clip[start: start + len(speech)] = speech
    white = rng.standard_normal(length + 256).astype(np.float32)
    colored = _one_pole(white, float(rng.uniform(0.0, 0.95)))[256:]
    noise_power = float(np.mean(speech**2)) / 10 ** (snr_db / 10)
    colored *= np.sqrt(noise_power / max(float(np.mean(colored**2)), 1e-12))
    return (clip + colored).astype(np.float32)


def request(word: str, params: dict[str, Any]) -> tuple[str, str, int, int, int]:
    return (word, params["voice"], params["rate"], params["pitch"], params["pitch_range"])


def speak_clip(word: str, params: dict[str, Any], snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """One clip synthesized in this process (see :func:`benchmark.data.speech.synthesize_many` for
    reproducible batches)."""
    return place_clip(synthesize(*request(word, params)), params, snr_db, rng)


def _one_pole(x: np.ndarray, a: float) -> np.ndarray:
    from scipy.signal import lfilter

    return lfilter([1.0 - a], [1.0, -a], x).astype(np.float32)


def log_mel(waves: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(N, 16000) waveforms → (N, 1, n_mels, 101) log-mel spectrograms."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=TARGET_RATE, n_fft=400, win_length=400,
                                               hop_length=160, n_mels=n_mels)
    return torch.log(mel(waves) + 1e-6).unsqueeze(1)


def resample_to_16k(waves: np.ndarray) -> torch.Tensor:
    import torchaudio

    out = torchaudio.functional.resample(torch.from_numpy(waves), SAMPLE_RATE, TARGET_RATE)
    return out[:, :TARGET_RATE]


@register_dataset("av-digits")
class AVDigits(DatasetBuilder):
    Options = AVDigitsOptions
    summary = "digit images + digit words spoken by eSpeak NG (AV-MNIST style; built offline), or from FSDD"
    VERSION = 3

    def fsdd_root(self) -> Path:
        return fsdd_root(self.options.fsdd_root, "dataset.fsdd_root", "av-digits with dataset.audio_source=fsdd")

    def cache(self) -> DatasetCache:
        recipe = recipe_of(self.options, self.VERSION)
        del recipe["audio_source"], recipe["fsdd_root"]  # eSpeak NG sets keep their keys
        if self.options.audio_source == "fsdd":
            recipe.update(audio_source="fsdd", fsdd_root=str(self.fsdd_root()))
        return DatasetCache("av-digits", recipe, self.options.cache_dir)

    def fsdd_clips(self, labels: np.ndarray, index: dict[str, np.ndarray],
                   rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Per sample in split order, a 1 s clip at 22,050 Hz of an FSDD recording of its digit."""
        o, root = self.options, self.fsdd_root()
        chosen, speakers = pair_recordings(recordings(root), {s: labels[index[s]] for s in SPLITS},
                                           o.test_fraction, o.val_fraction, rng, root)
        waves: dict[Path, np.ndarray] = {}
        clips, voices = [], []
        for split in SPLITS:
            for rec in chosen[split]:
                if rec.path not in waves:
                    waves[rec.path] = read_wav(require(rec.path, str(root / "recordings")), SAMPLE_RATE)
                gain = float(rng.uniform(-6.0, 0.0))
                snr = float(rng.uniform(o.audio_snr - o.snr_spread, o.audio_snr + o.snr_spread))
                clips.append(place_clip(waves[rec.path], {"gain_db": gain}, snr, rng))
                voices.append({"file": rec.path.name, "speaker": rec.speaker, "gain_db": round(gain, 3),
                               "snr_db": round(snr, 3)})
        extra = {"speakers": speakers, "sources": fingerprint(root, set(waves)),
                 "source": f"sklearn.datasets.load_digits + FSDD recordings ({root})"}
        return np.stack(clips), voices, extra

    def _fill(self, writer: CacheWriter) -> dict[str, Any]:
        o = self.options
        images, labels = sklearn_digits()
        index = carve_splits(labels, o.test_fraction, o.val_fraction, o.seed)
        rng = np.random.default_rng([o.seed, 3])
        extra = {"source": "sklearn.datasets.load_digits + eSpeak NG (espeakng-loader)"}
        if o.audio_source == "fsdd":
            clips, voices, extra = self.fsdd_clips(labels, index, rng)
        else:
            order = np.concatenate([index[s] for s in SPLITS])
            params = [clip_parameters(rng) for _ in order]
            snrs = rng.uniform(o.audio_snr - o.snr_spread, o.audio_snr + o.snr_spread, len(order))
            words = synthesize_many([request(WORDS[labels[i]], p) for i, p in zip(order, params)])
            clips = np.stack([place_clip(w, p, float(snr), rng) for w, p, snr in zip(words, params, snrs)])
            voices = [{**p, "snr_db": round(float(snr), 3)} for p, snr in zip(params, snrs)]
        spec = log_mel(resample_to_16k(clips), o.n_mels)
        n_train = len(index["train"])
        mean, std = spec[:n_train].mean(), spec[:n_train].std()
        spec = ((spec - mean) / std).numpy().astype(np.float16)
        start, sizes, clip_params = 0, {}, {}
        for split in SPLITS:
            idx = index[split]
            stop = start + len(idx)
            image = images[idx][:, None]
            if o.image_noise > 0:
                image = image + o.image_noise * rng.standard_normal(image.shape).astype(np.float32)
            writer.save_array(f"{split}.image", image.astype(np.float32))
            writer.save_array(f"{split}.audio", spec[start:stop])
            writer.save_array(f"{split}.labels", labels[idx])
            sizes[split] = len(idx)
            clip_params[split] = voices[start:stop]
            start = stop
        return {
            "classes": list(WORDS),
            "sizes": sizes,
            "splits": {k: v.tolist() for k, v in index.items()},
            "clips": clip_params,
            "normalisation": {"mean": float(mean), "std": float(std)},
            **extra,
        }

    def load(self) -> MultimodalData:
        cache = self.cache()
        manifest = cache.read_manifest() if cache.exists() else cache.build(self._fill)
        if "sources" in manifest:  # FSDD recordings: refuse a cache whose sources changed since
            root = self.fsdd_root()
            check_sources(root, manifest["sources"], cache.dir, "av-digits", "python -m benchmark data prepare "
                          f"av-digits --set audio_source=fsdd --set fsdd_root={root}")
        n_frames = TARGET_RATE // 160 + 1
        info = DataInfo(
            name="av-digits",
            modalities=[ModalitySpec("audio", "spectrogram", (1, self.options.n_mels, n_frames), "small_cnn"),
                        ModalitySpec("image", "image", (1, 8, 8), "small_cnn")],
            num_classes=10,
            classes=manifest["classes"],
        )
        return MultimodalData(info, splits_from_cache(cache, manifest, ["audio", "image"]),
                              {**manifest, "cache": str(cache.dir)})

    def describe(self) -> dict[str, Any]:
        return {"modalities": ["audio", "image"], "classes": 10, "size": 1797, "present": True,
                "prepared": self.cache().exists(), "where": "built offline from scikit-learn + eSpeak NG"}

    def prepare(self) -> str:
        data = self.load()
        return f"av-digits: {data.split_sizes()} in {data.manifest['cache']}"
