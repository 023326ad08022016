"""Bad data for Food-101, CMU-MOSEI, FSDD and av-digits' FSDD audio: one line naming the path and
the fix, exit status 2, and no partial cache (a missing root, a file listed but missing, a corrupt
JPEG, pickle or wav, a pickle that would run code, a source changed after ``prepare``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from test_data_errors import assert_no_cache, assert_one_line_error, cli
from test_data_paper_sets import SMALL, food101, fsdd, mosei


def prepare_cli(name: str, root: Path, cache: Path, capsys, *extra: str) -> tuple[int, str, str]:
    sets = [arg for k, v in SMALL[name][1].items() for arg in ("--set", f"{k}={v}")]
    return cli(["data", "prepare", name, "--root", str(root), "--cache-dir", str(cache), *sets, *extra], capsys)


def touch_later(path: Path, data: bytes | None = None) -> None:
    """Rewrite ``path`` (same bytes unless given) with a later modification time."""
    stat = path.stat()
    path.write_bytes(path.read_bytes() if data is None else data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


# --- food-101 -----------------------------------------------------------------------------------
def test_food101_missing_root(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = prepare_cli("food-101", missing, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(missing), "does not exist", "dataset.root", "images/{train,test}/<class>")
    assert_no_cache(tmp_path / "cache", "food-101")


def test_food101_missing_text_file(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    (root / "texts" / "test_titles.csv").unlink()
    code, _, err = prepare_cli("food-101", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(root / "texts" / "test_titles.csv"), "is missing", "expected layout")
    assert_no_cache(tmp_path / "cache", "food-101")


def test_food101_image_listed_but_missing(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    image = root / "images" / "test" / "sushi" / "sushi_1.jpg"
    image.unlink()
    code, _, err = prepare_cli("food-101", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(image), "test_titles.csv", "is missing", "remove its entry")
    assert_no_cache(tmp_path / "cache", "food-101")


def test_food101_corrupt_jpeg(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    bad = root / "images" / "train" / "tacos" / "tacos_2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    code, _, err = prepare_cli("food-101", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot decode image", "replace the file")
    assert_no_cache(tmp_path / "cache", "food-101")


def test_food101_row_with_an_unknown_class(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    csv = root / "texts" / "test_titles.csv"
    csv.write_text(csv.read_text() + "pizza_0.jpg,a pizza,pizza\n")
    code, _, err = prepare_cli("food-101", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, f"{csv} line 7", "fix that row")
    assert_no_cache(tmp_path / "cache", "food-101")


def test_food101_source_changed_after_prepare(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    cache = tmp_path / "cache"
    assert prepare_cli("food-101", root, cache, capsys)[0] == 0
    (folder,) = list((cache / "food-101").iterdir())
    csv = root / "texts" / "train_titles.csv"
    touch_later(csv, csv.read_bytes().replace(b"easy", b"quick"))
    code, _, err = prepare_cli("food-101", root, cache, capsys)
    assert_one_line_error(code, err, str(csv), "changed after the dataset was prepared", f"delete {folder}")
    code, _, err = cli(["run", "--method", "joint", "--dataset", "food-101", "--set", f"dataset.root={root}",
                        "--set", f"dataset.cache_dir={cache}", "--set", "dataset.image_size=32", "--set",
                        "dataset.max_tokens=12", "--set", "dataset.min_count=1", "--out", str(tmp_path / "runs"),
                        "--quiet"], capsys)
    assert_one_line_error(code, err, str(csv), "changed after the dataset was prepared")
    assert not (tmp_path / "runs").exists()


def test_food101_bad_bert_folder(tmp_path: Path, capsys) -> None:
    root = food101(tmp_path / "release")
    empty = tmp_path / "not-a-bert"
    empty.mkdir()
    code, _, err = prepare_cli("food-101", root, tmp_path / "cache", capsys, "--set", f"bert_dir={empty}")
    assert_one_line_error(code, err, str(empty), "cannot load a tokenizer", "save_pretrained")
    assert_no_cache(tmp_path / "cache", "food-101")
    code, _, err = cli(["run", "--method", "joint", "--dataset", "food-101", "--set", f"dataset.root={root}",
                        "--set", f"dataset.cache_dir={tmp_path / 'cache'}", "--set", "dataset.image_size=32",
                        "--set", "encoder.text=bert", "--set", "epochs=1", "--out", str(tmp_path / "runs"),
                        "--quiet"], capsys)
    assert_one_line_error(code, err, "encoder bert needs a local BERT folder", "dataset.bert_dir")


# --- cmu-mosei ----------------------------------------------------------------------------------
def test_mosei_missing_root_and_missing_pickle(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = prepare_cli("cmu-mosei", missing, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(missing), "does not exist", "mosei_senti_data.pkl")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = prepare_cli("cmu-mosei", empty, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(empty / "mosei_senti_data.pkl"), "is missing", "dataset.file")
    assert_no_cache(tmp_path / "cache", "cmu-mosei")


def test_mosei_corrupt_pickle(tmp_path: Path, capsys) -> None:
    root = mosei(tmp_path / "release")
    bad = root / "mosei_senti_data.pkl"
    bad.write_bytes(bad.read_bytes()[:5000])
    code, _, err = prepare_cli("cmu-mosei", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot read the feature pickle", "replace it")
    assert_no_cache(tmp_path / "cache", "cmu-mosei")


class RunsCode:
    """A pickle payload that would create a file when unpickled by a plain ``pickle.load``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_mosei_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    root = mosei(tmp_path / "release")
    target = tmp_path / "created-by-the-pickle"
    path = root / "mosei_senti_data.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"train": {"text": RunsCode(target)}}, fh)
    code, _, err = prepare_cli("cmu-mosei", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(path), "only numpy arrays, dicts and lists are loaded")
    assert not target.exists()
    assert_no_cache(tmp_path / "cache", "cmu-mosei")


def test_mosei_wrong_structure(tmp_path: Path, capsys) -> None:
    root = mosei(tmp_path / "release")
    path = root / "mosei_senti_data.pkl"
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    del data["test"]["vision"]
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    code, _, err = prepare_cli("cmu-mosei", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, f"{path} ['test']['vision']", "not a numeric array", "expected layout")
    data["test"]["vision"] = np.zeros((3, 6, 35), dtype=np.float32)  # 3 sequences for 8 labels
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    code, _, err = prepare_cli("cmu-mosei", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, f"{path} ['test']['vision']", "(3, 6, 35)", "one sequence per label")
    assert_no_cache(tmp_path / "cache", "cmu-mosei")


def test_mosei_source_changed_after_prepare(tmp_path: Path, capsys) -> None:
    root = mosei(tmp_path / "release")
    cache = tmp_path / "cache"
    assert prepare_cli("cmu-mosei", root, cache, capsys)[0] == 0
    (folder,) = list((cache / "cmu-mosei").iterdir())
    path = root / "mosei_senti_data.pkl"
    touch_later(path)
    code, _, err = prepare_cli("cmu-mosei", root, cache, capsys)
    assert_one_line_error(code, err, str(path), "changed after the dataset was prepared", f"delete {folder}",
                          "data prepare cmu-mosei")


# --- fsdd ---------------------------------------------------------------------------------------
def small_fsdd(root: Path) -> Path:
    return fsdd(root, takes=(0, 5))


def test_fsdd_missing_root(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = prepare_cli("fsdd", missing, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(missing), "does not exist", "recordings/<digit>_<speaker>_<index>.wav")
    (tmp_path / "empty").mkdir()
    code, _, err = prepare_cli("fsdd", tmp_path / "empty", tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(tmp_path / "empty" / "recordings"), "is missing", "expected layout")
    assert_no_cache(tmp_path / "cache", "fsdd")


def test_fsdd_listed_recording_missing(tmp_path: Path, capsys) -> None:
    root = small_fsdd(tmp_path / "release")
    link = root / "recordings" / "3_lucas_7.wav"
    link.symlink_to(root / "recordings" / "gone.wav")  # listed in the folder, its file is gone
    code, _, err = prepare_cli("fsdd", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(link), "is missing", "restore it")
    assert_no_cache(tmp_path / "cache", "fsdd")


def test_fsdd_corrupt_wav_and_bad_name(tmp_path: Path, capsys) -> None:
    root = small_fsdd(tmp_path / "release")
    bad = root / "recordings" / "4_george_5.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage, not a wave file" * 3)
    code, _, err = prepare_cli("fsdd", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(bad), "cannot decode audio file", "replace the file")
    assert_no_cache(tmp_path / "cache", "fsdd")
    odd = root / "recordings" / "four-george.wav"
    odd.write_bytes(b"")
    code, _, err = prepare_cli("fsdd", root, tmp_path / "cache", capsys)
    assert_one_line_error(code, err, str(odd), "<digit>_<speaker>_<index>.wav", "rename or remove it")


def test_fsdd_source_changed_after_prepare(tmp_path: Path, capsys) -> None:
    root = small_fsdd(tmp_path / "release")
    cache = tmp_path / "cache"
    assert prepare_cli("fsdd", root, cache, capsys)[0] == 0
    (folder,) = list((cache / "fsdd").iterdir())
    wav = root / "recordings" / "9_jackson_0.wav"
    touch_later(wav)
    code, _, err = prepare_cli("fsdd", root, cache, capsys)
    assert_one_line_error(code, err, str(wav), "changed after the dataset was prepared", f"delete {folder}")


# --- av-digits with FSDD audio --------------------------------------------------------------------
def av_fsdd_cli(cache: Path, capsys, *sets: str) -> tuple[int, str, str]:
    args = [arg for s in ("audio_source=fsdd", *sets) for arg in ("--set", s)]
    return cli(["data", "prepare", "av-digits", "--cache-dir", str(cache), *args], capsys)


def test_av_digits_fsdd_absent(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BMB_DATA_ROOT", raising=False)
    code, _, err = av_fsdd_cli(tmp_path / "cache", capsys)
    assert_one_line_error(code, err, "needs the Free Spoken Digit Dataset", "dataset.fsdd_root",
                          "recordings/<digit>_<speaker>_<index>.wav")
    code, _, err = av_fsdd_cli(tmp_path / "cache", capsys, f"fsdd_root={tmp_path}")
    assert_one_line_error(code, err, f"{tmp_path} has no recordings/ folder", "expected layout")
    monkeypatch.setenv("BMB_DATA_ROOT", str(tmp_path / "data"))
    code, _, err = cli(["run", "--method", "joint", "--dataset", "av-digits", "--set", "dataset.audio_source=fsdd",
                        "--set", f"dataset.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "runs"),
                        "--quiet"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "data" / "FSDD"), "recordings/<digit>_<speaker>_<index>.wav")
    assert not (tmp_path / "runs").exists()
    assert_no_cache(tmp_path / "cache", "av-digits")


def test_av_digits_fsdd_corrupt_wav_or_too_few_speakers(tmp_path: Path, capsys) -> None:
    root = fsdd(tmp_path / "FSDD", takes=(5,))
    for wav in (root / "recordings").glob("*_george_5.wav"):
        wav.write_bytes(b"RIFF\x00\x00garbage, not a wave file" * 3)
    code, _, err = av_fsdd_cli(tmp_path / "cache", capsys, f"fsdd_root={root}")
    assert_one_line_error(code, err, str(root / "recordings"), "_george_5.wav", "cannot decode audio file")
    assert_no_cache(tmp_path / "cache", "av-digits")
    two = fsdd(tmp_path / "FSDD2", speakers=["george", "theo"], takes=(5,))
    code, _, err = av_fsdd_cli(tmp_path / "cache", capsys, f"fsdd_root={two}")
    assert_one_line_error(code, err, str(two), "2 speaker(s)", "at least 3")
    assert_no_cache(tmp_path / "cache", "av-digits")


def test_food101_bad_image_weights(tmp_path: Path, capsys) -> None:
    import torch

    root = food101(tmp_path / "release")
    run = ["run", "--method", "joint", "--dataset", "food-101", "--set", f"dataset.root={root}", "--set",
           f"dataset.cache_dir={tmp_path / 'cache'}", "--set", "dataset.image_size=32", "--set", "epochs=1",
           "--out", str(tmp_path / "runs"), "--quiet"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    for weights, needle in ((garbage, "cannot read it"), (other, "Missing key"),
                            (tmp_path / "absent.pth", "does not exist")):
        code, _, err = cli([*run, "--set", f"dataset.image_weights={weights}"], capsys)
        assert_one_line_error(code, err, str(weights), needle)
        assert not (tmp_path / "runs").exists()
