"""``crema-d``: CREMA-D (audio + visual, 6 emotions) in the layout OGM-GE reads.

Layout under the root::

    AudioWAV/<clip>.wav                  one wav per clip
    Image-01-FPS/<clip>/*.jpg            frames extracted at 1 fps (option frames_folder)
    train.csv, test.csv                  rows "<clip>,<LABEL>", LABEL one of NEU HAP SAD FEA DIS ANG

Audio recipe (OGM-GE): 22,050 Hz, tiled to ``audio_seconds`` (3 s), STFT n_fft 512 hop 353,
log(|X| + 1e-7) → 1×257×188; ``audio_frames=N`` tiles the clip to (N − 1) · 353 samples instead,
giving 1×257×N (299 in the UDI paper's setting, about 4.8 s). Visual: ``frames`` evenly spaced frames (1 by default, as OGM-GE),
RandomResizedCrop + flip on train, Resize on val/test, ImageNet normalisation. The release has
no validation list: it is carved from train (stratified, seeded) and written to the manifest.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.config import opt
from benchmark.data.base import ModalitySpec
from benchmark.data.media import evenly_spaced, list_frames, read_frames, read_wav, stft_log_spectrogram
from benchmark.data.ondisk import SOURCES, Item, OnDiskDataset, OnDiskOptions, require
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
SAMPLE_RATE, N_FFT, HOP = 22050, 512, 353


@dataclass
class CremaDOptions(OnDiskOptions):
    audio_seconds: float = opt(3.0, "clip length the audio is tiled to (3 s gives 1×257×188)")
    audio_frames: int = opt(0, "spectrogram time frames: 0 = what audio_seconds gives, N = the clip tiled "
                               "to (N-1)*353 samples, giving 1x257xN (UDI's 257x299: 299)")
    frames_folder: str = opt("Image-01-FPS", "folder of the extracted frames under the root")

    def validate(self) -> None:
        super().validate()
        if not self.audio_seconds > 0:
            raise UsageError(f"dataset.audio_seconds must be > 0, got {self.audio_seconds}")
        if self.audio_frames < 0 or self.audio_frames == 1:
            raise UsageError(f"dataset.audio_frames must be 0 (from audio_seconds) or >= 2, got {self.audio_frames}")

    def seconds(self) -> float:
        """The length the clip is tiled to."""
        return (self.audio_frames - 1) * HOP / SAMPLE_RATE if self.audio_frames else self.audio_seconds


def read_label_csv(path: Path, classes: list[str]) -> list[Item]:
    items = []
    with open(path, newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or row[1].strip() not in classes:
                raise UsageError(f"{path} line {line_no}: expected '<clip>,<LABEL>' with LABEL one of "
                                 f"{' '.join(classes)}, got {','.join(row)!r}; fix that row")
            items.append(Item(row[0].strip(), classes.index(row[1].strip()), str(path)))
    return items


@register_dataset("crema-d")
class CremaD(OnDiskDataset):
    Options = CremaDOptions
    summary = "CREMA-D audio-visual emotions, 6 classes (on disk: OGM-GE layout)"
    display = "CREMA-D"
    folder = "CREMA-D"
    layout = "AudioWAV/<clip>.wav, Image-01-FPS/<clip>/*.jpg, train.csv and test.csv rows '<clip>,<LABEL>'"
    num_classes = 6

    def class_names(self, root: Path) -> list[str]:
        return list(CLASSES)

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        out = {}
        for split in ("train", "test"):
            path = root / f"{split}.csv"
            if not path.is_file():
                raise UsageError(f"crema-d split file {path} is missing; expected layout: {self.layout}")
            out[split] = read_label_csv(path, classes)
        return out

    def audio_frames(self) -> int:
        return 1 + int(round(SAMPLE_RATE * self.options.seconds())) // HOP

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        s = self.options.stored_size
        return {"audio": ((1, N_FFT // 2 + 1, self.audio_frames()), np.float16),
                "visual": ((self.options.frames, 3, s, s), np.uint8)}

    def modality_specs(self) -> list[ModalitySpec]:
        s = self.options.image_size
        return [ModalitySpec("audio", "spectrogram", (1, N_FFT // 2 + 1, self.audio_frames()), "resnet18_audio"),
                ModalitySpec("visual", "frames", (self.options.frames, 3, s, s), "resnet18_visual")]

    def decode(self, root: Path, item: Item) -> dict[str, np.ndarray]:
        wav = require(root / "AudioWAV" / f"{item.name}.wav", item.listed_in)
        folder = require(root / self.options.frames_folder / item.name, item.listed_in)
        frames = list_frames(folder)
        if not frames:
            raise UsageError(f"{folder} (listed in {item.listed_in}) has no .jpg frames; extract its frames "
                             "or remove its row")
        wave = read_wav(wav, SAMPLE_RATE)
        spec = stft_log_spectrogram(wave, SAMPLE_RATE, self.options.seconds(), N_FFT, HOP)
        picked = [frames[i] for i in evenly_spaced(len(frames), self.options.frames)]
        return {"audio": spec.astype(np.float16), "visual": read_frames(picked, self.options.stored_size),
                SOURCES: [wav, *picked]}
