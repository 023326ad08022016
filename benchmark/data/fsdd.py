"""``fsdd``: the Free Spoken Digit Dataset (real speech: ten digits, 8 kHz mono wav, CC BY-SA 4.0).

Layout under the root::

    recordings/<digit>_<speaker>_<index>.wav      e.g. recordings/7_jackson_32.wav

The official split: takes with index 0-4 are test, 5-49 train; validation is carved from train
(stratified by digit, seeded). Audio: the wav read with ``soundfile`` (resampled to 8 kHz when it
is not), cut or padded with silence to ``seconds`` (1 s), log-mel spectrogram (torchaudio
``MelSpectrogram``: 25 ms window, 10 ms hop, ``n_mels`` bands, log(x + 1e-6)) → 1×40×101.

FSDD has one modality, so the suite's methods (which fuse two or more) do not train on it
alone; it is the real-speech audio of ``av-digits`` (``dataset.audio_source=fsdd``), which
pairs each digit image with a recording of the same digit, speakers disjoint across splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import ModalitySpec
from benchmark.data.cache import DATA_ENV, data_root
from benchmark.data.media import read_wav
from benchmark.data.ondisk import SOURCES, Item, OnDiskDataset, require
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

SAMPLE_RATE = 8000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAME = re.compile(r"^(\d)_([^_/]+)_(\d+)\.wav$")
LAYOUT = "recordings/<digit>_<speaker>_<index>.wav (8 kHz mono wav; index 0-4 test, 5-49 train)"
FOLDER = "FSDD"
TEST_TAKES = 5  # the official split: takes 0-4 are the test set


@dataclass(frozen=True)
class Recording:
    path: Path
    digit: int
    speaker: str
    take: int


def recordings(root: Path) -> list[Recording]:
    """Every wav of ``root/recordings``, sorted; a wav whose name breaks the pattern is refused."""
    folder = root / "recordings"
    if not folder.is_dir():
        raise UsageError(f"FSDD folder {folder} is missing; expected layout under {root}: {LAYOUT}")
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".wav":
            continue
        match = NAME.match(path.name)
        if not match:
            raise UsageError(f"{path} does not follow <digit>_<speaker>_<index>.wav; rename or remove it")
        out.append(Recording(path, int(match[1]), match[2], int(match[3])))
    if not out:
        raise UsageError(f"FSDD folder {folder} has no recordings; expected layout under {root}: {LAYOUT}")
    return out


def fsdd_root(value: str, option: str, needed_by: str) -> Path:
    """The FSDD root from an option or ``$BMB_DATA_ROOT/FSDD``, with the one-line error naming the
    expected layout when it is absent."""
    root = data_root(value, FOLDER)
    if root is None or not (root / "recordings").is_dir():
        where = f"{root} has no recordings/ folder" if root else "no FSDD folder is given"
        raise UsageError(f"{needed_by} needs the Free Spoken Digit Dataset, but {where}; set {option}=PATH "
                         f"or {DATA_ENV} (its {FOLDER}/ folder); expected layout: {LAYOUT}")
    return root


def log_mel_8k(wave: np.ndarray, seconds: float, n_mels: int) -> np.ndarray:
    """Log-mel spectrogram of an 8 kHz clip cut or padded to ``seconds`` → 1 × n_mels × frames."""
    import torchaudio

    length = int(round(SAMPLE_RATE * seconds))
    clip = np.zeros(length, dtype=np.float32)
    clip[: min(length, len(wave))] = wave[:length]
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=256, win_length=200,
                                               hop_length=80, n_mels=n_mels)
    return torch.log(mel(torch.from_numpy(clip)) + 1e-6).unsqueeze(0).numpy()


@dataclass
class FSDDOptions:
    root: str = opt("", "folder holding recordings/ (default $BMB_DATA_ROOT/FSDD)", location=True)
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    seconds: float = opt(1.0, "clip length the recordings are cut or padded to")
    n_mels: int = opt(40, "mel bands of the spectrogram")
    val_fraction: float = opt(0.1, "fraction of each digit of train carved out as validation")
    seed: int = opt(0, "seed of the carved validation split")

    def validate(self) -> None:
        if not 0.1 <= self.seconds <= 10:
            raise UsageError(f"dataset.seconds must be in 0.1..10, got {self.seconds}")
        if not 8 <= self.n_mels <= 128:
            raise UsageError(f"dataset.n_mels must be in 8..128, got {self.n_mels}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")


@register_dataset("fsdd")
class FSDD(OnDiskDataset):
    Options = FSDDOptions
    summary = "Free Spoken Digit Dataset, real speech, 10 digits, audio only (on disk: recordings/)"
    display = "FSDD"
    folder = FOLDER
    layout = LAYOUT
    num_classes = 10

    def recipe(self, root: Path) -> dict[str, Any]:
        o = self.options
        return {"version": self.VERSION, "root": str(root), "seconds": o.seconds, "n_mels": o.n_mels,
                "val_fraction": o.val_fraction, "seed": o.seed}

    def class_names(self, root: Path) -> list[str]:
        return list(DIGITS)

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        listed = str(root / "recordings")
        out: dict[str, list[Item]] = {"train": [], "test": []}
        for rec in recordings(root):
            out["test" if rec.take < TEST_TAKES else "train"].append(Item(rec.path.name, rec.digit, listed))
        return out

    def frames(self) -> int:
        return int(round(SAMPLE_RATE * self.options.seconds)) // 80 + 1

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"audio": ((1, self.options.n_mels, self.frames()), np.float16)}

    def modality_specs(self) -> list[ModalitySpec]:
        return [ModalitySpec("audio", "spectrogram", (1, self.options.n_mels, self.frames()), "small_cnn")]

    def decode(self, root: Path, item: Item) -> dict[str, Any]:
        path = require(root / "recordings" / item.name, item.listed_in)
        wave = read_wav(path, SAMPLE_RATE)
        return {"audio": log_mel_8k(wave, self.options.seconds, self.options.n_mels).astype(np.float16),
                SOURCES: [path]}


def split_speakers(speakers: list[str], test_fraction: float, val_fraction: float,
                   rng: np.random.Generator) -> dict[str, list[str]]:
    """Speakers dealt to train / val / test (at least one each), seeded: no speaker in two splits."""
    order = [speakers[i] for i in rng.permutation(len(speakers))]
    n_test = max(1, round(len(order) * test_fraction))
    n_val = max(1, round(len(order) * val_fraction))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test: n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def pair_recordings(recs: list[Recording], labels: dict[str, np.ndarray], test_fraction: float,
                    val_fraction: float, rng: np.random.Generator,
                    root: Path) -> tuple[dict[str, list[Recording]], dict[str, list[str]]]:
    """For each split's labels, a random recording of the same digit by one of that split's
    speakers (speaker-disjoint splits)."""
    speakers = sorted({r.speaker for r in recs})
    if len(speakers) < 3:
        raise UsageError(f"FSDD under {root} has {len(speakers)} speaker(s) ({', '.join(speakers)}); "
                         "speaker-disjoint train/val/test splits need at least 3")
    dealt = split_speakers(speakers, test_fraction, val_fraction, rng)
    chosen = {}
    for split, wanted in labels.items():
        pool = [r for r in recs if r.speaker in dealt[split]]
        by_digit = {d: [r for r in pool if r.digit == d] for d in range(10)}
        missing = sorted({int(d) for d in wanted if not by_digit[int(d)]})
        if missing:
            raise UsageError(f"FSDD under {root}: the {split} speakers ({', '.join(dealt[split])}) have no "
                             f"recording of digit(s) {missing}; add them or change dataset.seed")
        chosen[split] = [by_digit[int(d)][rng.integers(len(by_digit[int(d)]))] for d in wanted]
    return chosen, dealt
