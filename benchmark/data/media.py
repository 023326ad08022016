"""Decoding and preprocessing of on-disk media: wav audio, JPEG frames, spectrogram recipes, and
the split type that reads cached arrays and applies the train-time augmentation.

Every decoding failure becomes a one-line :class:`UsageError` naming the file and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmark.errors import UsageError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
JPEG_SUFFIXES = (".jpg", ".jpeg", ".png")


def bad_file(path: Path, what: str, exc: BaseException | str) -> UsageError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UsageError(f"cannot decode {what} {path} ({reason}); replace the file or drop its entry "
                      "from the split list, then run `python -m benchmark data prepare` again")


# --- audio --------------------------------------------------------------------------------------
def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of a wav file at ``sample_rate`` (resampled when needed)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise bad_file(path, "audio file", exc) from None
    if data.size == 0:
        raise bad_file(path, "audio file", "no samples")
    wave = data.mean(axis=1)
    if rate != sample_rate:
        import torchaudio

        wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return wave.astype(np.float32)


def stft_log_spectrogram(wave: np.ndarray, sample_rate: int, seconds: float, n_fft: int,
                         hop: int) -> np.ndarray:
    """The OGM-GE recipe: tile the clip to ``seconds``, clip to [-1, 1], STFT (Hann window),
    log(|X| + 1e-7) → 1 × (n_fft/2+1) × frames."""
    length = int(round(sample_rate * seconds))
    tiled = np.tile(wave, math.ceil(length / len(wave)))[:length]
    tiled = np.clip(tiled, -1.0, 1.0)
    spec = torch.stft(torch.from_numpy(tiled), n_fft=n_fft, hop_length=hop, win_length=n_fft,
                      window=torch.hann_window(n_fft), center=True, pad_mode="constant",
                      return_complex=True)
    return torch.log(spec.abs() + 1e-7).unsqueeze(0).numpy()


FBANK_MEAN, FBANK_STD = -4.50, 5.14


def fbank_spectrogram(wave: np.ndarray, sample_rate: int, n_mels: int, frames: int) -> np.ndarray:
    """Kaldi filter banks (Hanning window, 10 ms shift, ``n_mels`` bins), padded or cut to ``frames``,
    normalised as (x + 4.50) / (2 · 5.14) → 1 × n_mels × frames."""
    import torchaudio

    waveform = torch.from_numpy(wave - wave.mean()).unsqueeze(0)
    fb = torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sample_rate,
                                           use_energy=False, window_type="hanning", num_mel_bins=n_mels,
                                           dither=0.0, frame_shift=10)
    return normalise_fbank(fb.numpy(), n_mels, frames)


def normalise_fbank(fb: np.ndarray, n_mels: int, frames: int, normalised: bool = False) -> np.ndarray:
    """(time × mel) filter banks → padded/cut, normalised 1 × mel × frames."""
    fb = fb[:frames]
    if len(fb) < frames:
        fb = np.concatenate([fb, np.zeros((frames - len(fb), n_mels), dtype=fb.dtype)])
    if not normalised:
        fb = (fb - FBANK_MEAN) / (2 * FBANK_STD)
    return fb.T[None].astype(np.float32)


def read_fbank_npy(path: Path, n_mels: int, frames: int, normalised: bool = False) -> np.ndarray:
    """A precomputed per-clip fbank ``.npy`` (time × mel or mel × time)."""
    try:
        fb = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise bad_file(path, "filter-bank array", exc) from None
    fb = np.squeeze(fb)
    if fb.ndim != 2 or n_mels not in fb.shape:
        raise bad_file(path, "filter-bank array", f"shape {fb.shape}, expected time × {n_mels}")
    if fb.shape[1] != n_mels:
        fb = fb.T
    return normalise_fbank(fb.astype(np.float32), n_mels, frames, normalised)


# --- frames -------------------------------------------------------------------------------------
def list_frames(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``count`` items (repeats when there are fewer)."""
    if count <= 0:
        return []
    return [min(count - 1, int((i + 0.5) * count / wanted)) for i in range(wanted)]


def read_frame(path: Path, size: int, mode: str = "RGB") -> np.ndarray:
    """One image decoded with Pillow, resized to size × size: uint8 C×H×W."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert(mode).resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises UnidentifiedImageError / OSError on bad files
        raise bad_file(path, "image", exc) from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_frames(paths: list[Path], size: int, mode: str = "RGB") -> np.ndarray:
    return np.stack([read_frame(p, size, mode) for p in paths])


# --- the split that reads a cache ---------------------------------------------------------------
class FrameTransform:
    """uint8 T×C×H×W frames → normalised float frames at ``size``: RandomResizedCrop + horizontal
    flip (one draw per clip, the same for all its frames) when training, Resize otherwise.
    For optical flow (``flow=True``, channels u, v) a flip also mirrors the horizontal flow u."""

    def __init__(self, size: int, train: bool, mean: torch.Tensor, std: torch.Tensor,
                 flow: bool = False) -> None:
        self.size, self.train, self.flow = size, train, flow
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import functional as F

        x = frames.float() / 255.0
        if self.train:
            top, left, h, w = RandomResizedCrop.get_params(x, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
            if torch.rand(()) < 0.5:
                x = F.horizontal_flip(x)
                if self.flow:
                    x = torch.cat([1.0 - x[:, :1], x[:, 1:]], dim=1)
        elif x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.resize(x, [self.size, self.size], antialias=True)
        return (x - self.mean) / self.std


class CachedSplit(Dataset):
    """One split of a prepared on-disk dataset: arrays read from the cache (in memory, or memory-
    mapped when large) and a per-modality transform applied per sample."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray,
                 transforms: dict[str, Any]) -> None:
        self.arrays = arrays
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample: dict[str, torch.Tensor] = {}
        for name, array in self.arrays.items():
            x = torch.from_numpy(np.array(array[index]))
            transform = self.transforms.get(name)
            sample[name] = transform(x) if transform else x.float()
        sample["label"] = torch.tensor(int(self.labels[index]))
        return sample
