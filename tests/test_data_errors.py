"""Bad data gives one line naming the path and the fix, exit status 2, and no partial cache: a
missing root, a file listed in a split but missing, a corrupt wav, a corrupt JPEG, a corrupt idx
file, and a cache whose content no longer matches its manifest's hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_data_ondisk import SMALL, builder, crema_d, kinetics_sounds, mnist, ucf101

from benchmark.cli import main
from benchmark.data.builder import resolve_dataset_options
from benchmark.errors import UsageError
from benchmark.registry import DATASETS


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def prepare_cli(name: str, root: Path, cache: Path, capsys) -> tuple[int, str, str]:
    sets = [arg for k, v in SMALL[name][1].items() for arg in ("--set", f"{k}={v}")]
    return cli(["data", "prepare", name, "--root", str(root), "--cache-dir", str(cache), *sets], capsys)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_no_cache(cache: Path, name: str) -> None:
    folder = cache / name
    left = list(folder.iterdir()) if folder.exists() else []
    assert left == [], f"partial cache left behind: {left}"


def test_missing_root(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = prepare_cli("crema-d", missing, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(missing), "does not exist", "dataset.root", "AudioWAV/")
    assert_no_cache(tmp_path / "cache", "crema-d")


def test_no_root_given_names_the_options(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BMB_DATA_ROOT", raising=False)
    code, _, err = cli(["run", "--method", "joint", "--dataset", "ucf101", "--out", str(tmp_path / "runs"),
                        "--quiet"], capsys)
    assert_one_line_error(code, err, "no data root for ucf101", "BMB_DATA_ROOT", "--root")
    assert not (tmp_path / "runs").exists()


def test_root_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    crema_d(tmp_path / "data" / "CREMA-D")
    monkeypatch.setenv("BMB_DATA_ROOT", str(tmp_path / "data"))
    options = resolve_dataset_options("crema-d", {"cache_dir": str(tmp_path / "cache"), "image_size": 32,
                                                  "audio_seconds": 0.3})
    data = DATASETS.get("crema-d")(options).load()
    assert data.manifest["recipe"]["root"] == str((tmp_path / "data" / "CREMA-D").resolve())


def test_missing_file_listed_in_a_split(tmp_path: Path, capsys) -> None:
    root = crema_d(tmp_path / "release")
    clip = (root / "test.csv").read_text().splitlines()[2].split(",")[0]
    (root / "AudioWAV" / f"{clip}.wav").unlink()
    code, _, err = prepare_cli("crema-d", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(root / "AudioWAV" / f"{clip}.wav"), "test.csv", "is missing",
                          "remove its entry")
    assert_no_cache(tmp_path / "cache", "crema-d")


def test_missing_flow_folder_listed_in_a_split(tmp_path: Path, capsys) -> None:
    root = ucf101(tmp_path / "release", ["ApplyEyeMakeup", "YoYo"])
    target = root / "flow" / "v" / "v_YoYo_g02_c01"
    for f in target.iterdir():
        f.unlink()
    target.rmdir()
    code, _, err = prepare_cli("ucf101", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(target), "trainlist01.txt")
    assert_no_cache(tmp_path / "cache", "ucf101")


def test_corrupt_wav(tmp_path: Path, capsys) -> None:
    root = kinetics_sounds(tmp_path / "release", ["singing", "bowling"])
    bad = root / "audio" / "clip003.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage, not a wave file" * 3)
    code, _, err = prepare_cli("kinetics-sounds", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot decode audio file", "replace the file")
    assert_no_cache(tmp_path / "cache", "kinetics-sounds")


def test_corrupt_jpeg(tmp_path: Path, capsys) -> None:
    root = crema_d(tmp_path / "release")
    folder = sorted((root / "Image-01-FPS").iterdir())[4]
    bad = sorted(folder.iterdir())[-1]  # the frame that frames=1 picks of 2
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    code, _, err = prepare_cli("crema-d", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot decode image", "replace the file")
    assert_no_cache(tmp_path / "cache", "crema-d")


def test_corrupt_idx(tmp_path: Path, capsys) -> None:
    root = mnist(tmp_path / "release")
    bad = root / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    code, _, err = prepare_cli("cgmnist", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot decode MNIST idx file")
    assert_no_cache(tmp_path / "cache", "cgmnist")


def test_changed_cache_file_fails_its_hash(tmp_path: Path, capsys) -> None:
    root = crema_d(tmp_path / "release")
    cache = tmp_path / "cache"
    assert prepare_cli("crema-d", root, cache, capsys)[0] == 0
    (folder,) = list((cache / "crema-d").iterdir())
    target = folder / "train.audio.npy"
    array = np.load(target)
    array[0, 0, 0, 0] += 1
    np.save(target, array)
    code, _, err = prepare_cli("crema-d", root, cache, capsys)
    assert_one_line_error(code, err, str(target), "does not match the hash", f"delete {folder}",
                          "data prepare crema-d")
    with pytest.raises(UsageError, match="does not match the hash"):
        builder("crema-d", root, cache).load()


def test_edited_manifest_fails_its_content_hash(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    code, _, _ = cli(["data", "prepare", "cg-digits", "--cache-dir", str(cache)], capsys)
    assert code == 0
    (folder,) = list((cache / "cg-digits").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["test"] = manifest["splits"]["test"][1:]  # someone moves a sample
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(["run", "--method", "joint", "--dataset", "cg-digits", "--set",
                        f"dataset.cache_dir={cache}", "--out", str(tmp_path / "runs"), "--quiet"], capsys)
    assert_one_line_error(code, err, str(folder / "manifest.json"), "content hash", f"delete {folder}")


def test_source_changed_or_removed_after_prepare(tmp_path: Path, capsys) -> None:
    root = ucf101(tmp_path / "release", ["ApplyEyeMakeup", "YoYo"])
    cache = tmp_path / "cache"
    assert prepare_cli("ucf101", root, cache, capsys)[0] == 0
    (folder,) = list((cache / "ucf101").iterdir())
    frame = sorted((root / "rgb" / "v_YoYo_g01_c01").iterdir())[0]  # one of the frames read
    frame.write_bytes(frame.read_bytes() + b"\0")
    code, _, err = prepare_cli("ucf101", root, cache, capsys)
    assert_one_line_error(code, err, str(frame), "changed after the dataset was prepared", f"delete {folder}")
    frame.unlink()
    code, _, err = prepare_cli("ucf101", root, cache, capsys)
    assert_one_line_error(code, err, str(frame), "was removed after the dataset was prepared")
    listed = root / "ucfTrainTestlist" / "testlist01.txt"
    assert str(listed.relative_to(root)) in json.loads((folder / "manifest.json").read_text())["sources"]
