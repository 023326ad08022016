"""``kinetics-sounds``: Kinetics-Sounds (audio + visual) from extracted per-clip audio and frames.

Layout under the root::

    train.txt, test.txt [, val.txt]      lines "<name> <label>", label a class name or its index
    audio/<name>.wav  or  audio/<name>.npy   (.npy: a precomputed kaldi fbank, time × 128)
    visual/<name>/*.jpg                   frames extracted at 1 fps

Audio recipe: kaldi filter banks (128 mel, Hanning window, 10 ms shift) of the 16 kHz mono clip,
padded or cut to ``audio_frames`` (1024) frames, normalised (x + 4.50) / (2 · 5.14) → 1×128×1024.
``audio_features=stft`` (the UDI paper's 257×1004) takes instead log(|STFT| + 1e-7) of the wav,
n_fft 512, hop 160 (10 ms), the clip tiled to (audio_frames − 1) · 160 samples → 1×257×audio_frames.
Visual: ``frames`` (3) evenly spaced frames, RandomResizedCrop + flip on train, Resize elsewhere.
Without ``val.txt`` the validation split is carved from train (stratified, seeded).

The class list is pinned (:data:`CLASSES`, 31 classes; its hash is in the manifest): the
Kinetics-Sounds classes of Arandjelović & Zisserman (2017) that are Kinetics-400 class names.
Releases with another list (papers use 31 to 34 classes) pass ``dataset.classes_file``, a text
file with one class name per line, in label-index order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmark.config import opt
from benchmark.data.base import ModalitySpec
from benchmark.data.media import (
    evenly_spaced,
    fbank_spectrogram,
    list_frames,
    read_fbank_npy,
    read_frames,
    read_wav,
    stft_log_spectrogram,
)
from benchmark.data.ondisk import SOURCES, Item, OnDiskDataset, OnDiskOptions, require
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

CLASSES = [
    "blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball",
    "fingerpicking", "laughing", "mowing lawn", "playing accordion", "playing bagpipes",
    "playing bass guitar", "playing clarinet", "playing drums", "playing guitar", "playing harmonica",
    "playing keyboard", "playing organ", "playing piano", "playing saxophone", "playing trombone",
    "playing trumpet", "playing violin", "playing xylophone", "ripping paper", "shoveling snow",
    "shuffling cards", "singing", "tap dancing", "tapping guitar", "tapping pen", "tickling",
]
SAMPLE_RATE = 16000
STFT_N_FFT, STFT_HOP = 512, 160
AUDIO_FEATURES = ("fbank", "stft")


def class_list_hash(classes: list[str]) -> str:
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16]


@dataclass
class AudioVisualOptions(OnDiskOptions):
    frames: int = opt(3, "frames per clip, evenly spaced over the clip's 1 fps frames")
    n_mels: int = opt(128, "mel bins of the filter banks")
    audio_frames: int = opt(1024, "filter-bank frames kept (10 ms each; padded or cut)")
    classes_file: str = opt("", "text file with one class name per line (default: the pinned list)")
    npy_normalised: bool = opt(False, "the .npy filter banks are already normalised (skip (x + 4.50) / (2 · 5.14))")
    audio_features: str = opt("fbank", "audio input: fbank (kaldi filter banks, n_mels x audio_frames) or stft "
                                       "(log |STFT|, 257 x audio_frames, from the wav; UDI's 257x1004)")

    def validate(self) -> None:
        super().validate()
        if self.n_mels < 8 or self.audio_frames < 8:
            raise UsageError(f"dataset.n_mels and dataset.audio_frames must be >= 8, got {self.n_mels} "
                             f"and {self.audio_frames}")
        if self.audio_features not in AUDIO_FEATURES:
            raise UsageError(f"dataset.audio_features must be one of {', '.join(AUDIO_FEATURES)}, "
                             f"got {self.audio_features!r}")

    def audio_bins(self) -> int:
        return STFT_N_FFT // 2 + 1 if self.audio_features == "stft" else self.n_mels


class AudioVisualClips(OnDiskDataset):
    """Clips with a per-clip audio file (wav or fbank npy) and a folder of frames."""

    Options = AudioVisualOptions
    pinned: ClassVar[list[str]] = []

    def class_names(self, root: Path) -> list[str]:
        if not self.options.classes_file:
            return list(self.pinned)
        path = Path(self.options.classes_file).expanduser()
        if not path.is_file():
            raise UsageError(f"dataset.classes_file {path} does not exist; give a text file with one class "
                             "per line, or leave it empty for the pinned list")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def recipe(self, root: Path) -> dict[str, Any]:
        return {**super().recipe(root), "classes_hash": class_list_hash(self.class_names(root))}

    def label_of(self, text: str, classes: list[str], where: str) -> int:
        text = text.strip()
        if text in classes:
            return classes.index(text)
        if text.isdigit() and int(text) < len(classes):
            return int(text)
        raise UsageError(f"{where}: unknown class {text!r}; use one of the {len(classes)} classes (or their "
                         "index), or give the release's class list with dataset.classes_file")

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        s, o = self.options.stored_size, self.options
        return {"audio": ((1, o.audio_bins(), o.audio_frames), np.float16), "visual": ((o.frames, 3, s, s), np.uint8)}

    def modality_specs(self) -> list[ModalitySpec]:
        s, o = self.options.image_size, self.options
        return [ModalitySpec("audio", "spectrogram", (1, o.audio_bins(), o.audio_frames), "resnet18_audio"),
                ModalitySpec("visual", "frames", (o.frames, 3, s, s), "resnet18_visual")]

    def audio_path(self, root: Path, item: Item) -> Path:
        base = root / "audio" / item.name
        for suffix in (".wav", ".npy"):
            if base.with_name(base.name + suffix).exists():
                return base.with_name(base.name + suffix)
        return require(base.with_name(base.name + ".wav"), item.listed_in,
                       f"provide audio/{item.name}.wav or .npy, or remove its entry from {item.listed_in}")

    def decode(self, root: Path, item: Item) -> dict[str, np.ndarray]:
        o = self.options
        audio = self.audio_path(root, item)
        folder = require(root / "visual" / item.name, item.listed_in)
        frames = list_frames(folder)
        if not frames:
            raise UsageError(f"{folder} (listed in {item.listed_in}) has no .jpg frames; extract its frames "
                             "or remove its entry")
        if o.audio_features == "stft":
            if audio.suffix == ".npy":
                raise UsageError(f"{audio}: dataset.audio_features=stft needs the clip's wav, not a precomputed "
                                 "filter bank; provide audio/<name>.wav or use audio_features=fbank")
            seconds = (o.audio_frames - 1) * STFT_HOP / SAMPLE_RATE
            spec = stft_log_spectrogram(read_wav(audio, SAMPLE_RATE), SAMPLE_RATE, seconds, STFT_N_FFT, STFT_HOP)
        elif audio.suffix == ".npy":
            spec = read_fbank_npy(audio, o.n_mels, o.audio_frames, normalised=o.npy_normalised)
        else:
            spec = fbank_spectrogram(read_wav(audio, SAMPLE_RATE), SAMPLE_RATE, o.n_mels, o.audio_frames)
        picked = [frames[i] for i in evenly_spaced(len(frames), o.frames)]
        return {"audio": spec.astype(np.float16), "visual": read_frames(picked, o.stored_size),
                SOURCES: [audio, *picked]}


@register_dataset("kinetics-sounds")
class KineticsSounds(AudioVisualClips):
    summary = "Kinetics-Sounds audio-visual actions, 31 classes (on disk: audio/, visual/, list files)"
    display = "Kinetics-Sounds"
    folder = "kinetics-sounds"
    layout = "train.txt/test.txt lines '<name> <label>', audio/<name>.wav|.npy, visual/<name>/*.jpg"
    num_classes = len(CLASSES)
    pinned = CLASSES

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        out = {}
        for split in ("train", "val", "test"):
            path = root / f"{split}.txt"
            if not path.is_file():
                if split == "val":
                    continue
                raise UsageError(f"kinetics-sounds list file {path} is missing; expected layout: {self.layout}")
            items = []
            for line_no, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                name, _, label = line.strip().partition(" ")
                items.append(Item(name, self.label_of(label, classes, f"{path} line {line_no}"), str(path)))
            out[split] = items
        return out
