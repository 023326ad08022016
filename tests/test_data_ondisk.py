"""The on-disk readers on miniature copies of each release layout (written here: a few short wav
files with soundfile, a few JPEG frames with Pillow, the split lists, idx files): ``prepare`` and
one epoch of ``joint`` through the real reader with the real encoders at a reduced input size."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.config import build_config
from benchmark.data.builder import resolve_dataset_options
from benchmark.registry import DATASETS
from benchmark.runner import execute, prepare


def write_wav(path: Path, seconds: float, rate: int, freq: float, seed: int) -> None:
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave.astype(np.float32), rate)


def write_jpegs(folder: Path, count: int, seed: int, mode: str = "RGB", size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze() if channels == 1 else pixels, mode).save(
            folder / f"frame_{i:04d}.jpg", quality=85)


def crema_d(root: Path, per_class: int = 3, test_per_class: int = 1) -> Path:
    classes = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    rows = {"train": [], "test": []}
    k = 0
    for c, label in enumerate(classes):
        for split, count in (("train", per_class), ("test", test_per_class)):
            for _ in range(count):
                clip = f"10{k:02d}_IEO_{label}_HI"
                write_wav(root / "AudioWAV" / f"{clip}.wav", 0.3, 22050, 200 + 80 * c, k)
                write_jpegs(root / "Image-01-FPS" / clip, 2, k)
                rows[split].append(f"{clip},{label}")
                k += 1
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def kinetics_sounds(root: Path, classes: list[str], per_class: int = 3, npy_audio: bool = False) -> Path:
    k = 0
    for split, count in (("train", per_class), ("test", 1)):
        lines = []
        for c, label in enumerate(classes):
            for _ in range(count):
                name = f"clip{k:03d}"
                if npy_audio:
                    (root / "audio").mkdir(parents=True, exist_ok=True)
                    fb = np.random.default_rng(k).normal(-4.5, 5.0, (50, 128)).astype(np.float32)
                    np.save(root / "audio" / f"{name}.npy", fb)
                else:
                    write_wav(root / "audio" / f"{name}.wav", 0.4, 16000, 300 + 90 * c, k)
                write_jpegs(root / "visual" / name, 4, k)
                lines.append(f"{name} {label}")
                k += 1
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def ave(root: Path, classes: list[str], per_class: int = 3) -> Path:
    k = 0
    files = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
    for split, count in (("train", per_class), ("val", 1), ("test", 1)):
        lines = ["Category&VideoID&Quality&StartTime&EndTime"]
        for c, label in enumerate(classes):
            for _ in range(count):
                vid = f"AVE{k:04d}xyz"
                write_wav(root / "audio" / f"{vid}.wav", 0.4, 16000, 300 + 90 * c, k)
                write_jpegs(root / "visual" / vid, 3, k)
                lines.append(f"{label}&{vid}&good&0&10")
                k += 1
        (root / files[split]).write_text("\n".join(lines) + "\n")
    return root


def ucf101(root: Path, classes: list[str], per_class: int = 3) -> Path:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    train, test = [], []
    for c, name in enumerate(classes):
        for g in range(per_class + 1):
            video = f"v_{name}_g{g + 1:02d}_c01"
            write_jpegs(root / "rgb" / video, 3, 10 * c + g)
            write_jpegs(root / "flow" / "u" / video, 2, 100 + 10 * c + g, mode="L")
            write_jpegs(root / "flow" / "v" / video, 2, 200 + 10 * c + g, mode="L")
            if g < per_class:
                train.append(f"{name}/{video}.avi {c + 1}")
            else:
                test.append(f"{name}/{video}.avi")
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    return root


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def mnist(root: Path, n_train: int = 60, n_test: int = 20, compress: bool = False) -> Path:
    """Tiny idx files: digit-like blobs whose position depends on the class."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 + 2 * y: 8 + 2 * y, 4:24] = 255
        _idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        _idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


KS_CLASSES = ["playing drums", "singing", "tapping pen"]
AVE_CLASSES = ["Church bell", "Bark", "Toilet flush"]
UCF_CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]

# per dataset: the layout writer and the options that shrink its inputs
SMALL = {
    "crema-d": (crema_d, {"image_size": 32, "frames": 1, "audio_seconds": 0.3}),
    "kinetics-sounds": (lambda r: kinetics_sounds(r, KS_CLASSES),
                        {"image_size": 32, "frames": 2, "n_mels": 32, "audio_frames": 48}),
    "ave": (lambda r: ave(r, AVE_CLASSES), {"image_size": 32, "frames": 2, "n_mels": 32, "audio_frames": 48}),
    "ucf101": (lambda r: ucf101(r, UCF_CLASSES), {"image_size": 32, "frames": 2}),
    "cgmnist": (mnist, {}),
}


def builder(name: str, root: Path, cache: Path, **extra) -> object:
    options = {"root": str(root), "cache_dir": str(cache), **SMALL[name][1], **extra}
    return DATASETS.get(name)(resolve_dataset_options(name, options))


def train_one_epoch(name: str, root: Path, cache: Path, tmp: Path) -> dict:
    assignments = {"method": "joint", "dataset": name, "epochs": 1, "batch_size": 4, "eval_batch_size": 8,
                   "cache_dir": str(tmp / "unimodal")}
    assignments.update({f"dataset.{k}": v for k, v in
                        {"root": str(root), "cache_dir": str(cache), **SMALL[name][1]}.items()})
    run = prepare(build_config(assignments))
    return run, execute(run)


@pytest.mark.parametrize("name", list(SMALL))
def test_prepare_then_train_one_epoch_of_joint(name: str, tmp_path: Path) -> None:
    root = SMALL[name][0](tmp_path / "release")
    cache = tmp_path / "cache"
    summary = builder(name, root, cache).prepare()
    assert summary.startswith(f"{name}: prepared")
    prepared = [p for p in (cache / name).iterdir()]
    assert len(prepared) == 1 and (prepared[0] / "manifest.json").is_file()  # no temporary folder left
    again = builder(name, root, cache).prepare()
    assert "already prepared" in again

    run, record = train_one_epoch(name, root, cache, tmp_path)
    data = run.data
    sizes = data.split_sizes()
    assert all(sizes[s] > 0 for s in ("train", "val", "test"))
    assert set(data.manifest["splits"]) == {"train", "val", "test"}
    # the real encoders of the reader, on inputs of the reduced size
    for spec in data.info.modalities:
        sample = data.splits["train"][0][spec.name]
        assert tuple(sample.shape) == spec.shape, (spec.name, sample.shape, spec.shape)
        assert torch.isfinite(sample).all()
        assert record["config"]["encoder"][spec.name] == spec.encoder
    if name != "cgmnist":
        assert {s.encoder for s in data.info.modalities} <= {"resnet18_audio", "resnet18_visual"}
    assert record["status"] == "ok" and len(record["history"]) == 1
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert set(record["metrics"]["probe_accuracy"]) == set(data.info.modality_names)


def test_train_frames_are_augmented_and_test_frames_are_not(tmp_path: Path) -> None:
    root = crema_d(tmp_path / "release")
    data = builder("crema-d", root, tmp_path / "cache").load()
    torch.manual_seed(0)
    train_a, train_b = data.splits["train"][0]["visual"], data.splits["train"][0]["visual"]
    test_a, test_b = data.splits["test"][0]["visual"], data.splits["test"][0]["visual"]
    assert not torch.equal(train_a, train_b)  # a fresh crop and flip per draw
    assert torch.equal(test_a, test_b)
    assert train_a.shape == test_a.shape == (1, 3, 32, 32)


def test_crema_d_spectrogram_follows_the_ogm_ge_recipe(tmp_path: Path) -> None:
    root = crema_d(tmp_path / "release", per_class=2)
    data = builder("crema-d", root, tmp_path / "cache", audio_seconds=3.0).load()
    spec = data.splits["test"][0]["audio"]
    assert spec.shape == (1, 257, 188)
    assert spec.min() >= np.log(1e-7) - 1e-2 and spec.max() > 0  # log(|X| + 1e-7), a loud tone
    # the tone of the clip's class dominates: its STFT bin is the loudest on average
    label = int(data.splits["test"].labels[0])
    freq_bin = round((200 + 80 * label) * 512 / 22050)
    assert abs(int(spec[0].mean(dim=1).argmax()) - freq_bin) <= 1


def test_kinetics_sounds_reads_precomputed_fbank_npy(tmp_path: Path) -> None:
    root = kinetics_sounds(tmp_path / "release", KS_CLASSES, npy_audio=True)
    data = builder("kinetics-sounds", root, tmp_path / "cache", n_mels=128, audio_frames=64).load()
    spec = data.splits["train"][0]["audio"]
    assert spec.shape == (1, 128, 64)
    source = np.load(root / "audio" / f"{data.manifest['splits']['train'][0]}.npy")  # 50 frames × 128
    expected = (source - -4.50) / (2 * 5.14)
    assert np.allclose(spec[0, :, :50].numpy(), expected.T, atol=2e-2)  # float16 cache
    assert torch.allclose(spec[0, :, 50:], torch.tensor(4.50 / (2 * 5.14)), atol=1e-3)  # padding
    assert data.info.num_classes == 31 and data.info.classes[:2] == ["blowing nose", "blowing out candles"]


def test_cgmnist_reads_gzipped_idx_and_builds_the_color_shortcut(tmp_path: Path) -> None:
    root = mnist(tmp_path / "release", n_train=200, n_test=50, compress=True)
    data = builder("cgmnist", root, tmp_path / "cache", bias=1.0).load()
    train = data.splits["train"]
    assert train.inputs["gray"].shape[1:] == (1, 28, 28) and train.inputs["color"].shape[1:] == (3, 28, 28)
    # with bias 1 every train color image carries its class's tint: the channel mix is a function of y
    mix = train.inputs["color"].sum(dim=(2, 3))
    mix = mix / mix.sum(dim=1, keepdim=True)
    for cls in range(10):
        rows = mix[train.labels == cls]
        assert torch.allclose(rows, rows[0].expand_as(rows), atol=0.02)
    assert data.manifest["val_carved_from_train"] and data.split_sizes()["test"] == 50
