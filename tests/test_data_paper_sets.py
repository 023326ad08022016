"""Food-101 (UPMC), CMU-MOSEI and FSDD on miniature copies of their layouts written here (JPEGs and
text CSVs, a tiny feature pickle, a few generated wavs): ``prepare``, then one epoch of ``joint``
and of ``udi`` through the real readers and encoders; FSDD through ``av-digits`` (its audio from
the recordings); a tiny randomly initialised BERT written here (nothing is downloaded)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.config import build_config
from benchmark.data.builder import resolve_dataset_options
from benchmark.registry import DATASETS
from benchmark.runner import execute, prepare

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FOOD_CLASSES = ["apple_pie", "sushi", "tacos"]
FOOD_WORDS = {"apple_pie": "apple pie cinnamon crust", "sushi": "sushi rice nori salmon",
              "tacos": "tacos tortilla salsa beef"}
SPEAKERS = ["george", "jackson", "lucas"]


def write_jpeg(path: Path, seed: int, size: int = 40) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=85)


def food101(root: Path, per_class: int = 4, test_per_class: int = 2) -> Path:
    """images/<split>/<class>/<name>.jpg and texts/<split>_titles.csv (the train file has a header row
    and a text with commas)."""
    k = 0
    for split, count in (("train", per_class), ("test", test_per_class)):
        rows = ["image_name,text,class"] if split == "train" else []
        for label in FOOD_CLASSES:
            for i in range(count):
                name = f"{label}_{i}.jpg"
                write_jpeg(root / "images" / split / label / name, k)
                rows.append(f'{name},"How to make {FOOD_WORDS[label]}, page {i}: easy recipe!",{label}')
                k += 1
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    return root


def mosei_arrays(n: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    scores = np.round(rng.uniform(-3, 3, n) * 3) / 3
    scores[:2] = 0.0  # score-0 samples exist in the release
    sign = np.where(scores >= 0, 1.0, -1.0)[:, None, None]
    out = {"text": rng.normal(0, 1, (n, steps, 300)) + 0.5 * sign,
           "audio": rng.normal(0, 1, (n, steps, 74)),
           "vision": rng.normal(0, 1, (n, steps, 35)) + 0.2 * sign,
           "labels": scores.reshape(n, 1, 1).astype(np.float32),
           "id": np.array([f"clip{i}" for i in range(n)])}
    out["audio"][0, 0, :3] = [np.nan, -np.inf, np.inf]  # as in the release's COVAREP features
    return {k: v.astype(np.float32) if k in ("text", "audio", "vision") else v for k, v in out.items()}


def mosei(root: Path, sizes: tuple[int, int, int] = (24, 8, 8), steps: int = 6, protocol: int = 4) -> Path:
    rng = np.random.default_rng(0)
    data = {key: mosei_arrays(n, steps, rng) for key, n in zip(("train", "valid", "test"), sizes)}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mosei_senti_data.pkl", "wb") as fh:
        pickle.dump(data, fh, protocol=protocol)
    return root


def write_wav(path: Path, digit: int, seed: int, rate: int = 8000, seconds: float = 0.3) -> None:
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (250 + 120 * digit) * t) * np.hanning(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32), rate,
                    subtype="PCM_16")


def fsdd(root: Path, speakers: list[str] = SPEAKERS, takes: tuple[int, ...] = (0, 5, 6)) -> Path:
    """recordings/<digit>_<speaker>_<index>.wav: take 0 is test, 5 and 6 train (the official split)."""
    k = 0
    for speaker in speakers:
        for digit in range(10):
            for take in takes:
                write_wav(root / "recordings" / f"{digit}_{speaker}_{take}.wav", digit, k)
                k += 1
    return root


SMALL = {
    "food-101": (food101, {"image_size": 32, "max_tokens": 12, "min_count": 1}),
    "cmu-mosei": (mosei, {}),
    "fsdd": (fsdd, {}),
}


def builder(name: str, root: Path, cache: Path, **extra) -> object:
    options = {"root": str(root), "cache_dir": str(cache), **SMALL[name][1], **extra}
    return DATASETS.get(name)(resolve_dataset_options(name, options))


def train(method: str, dataset: str, options: dict, tmp: Path, **settings) -> tuple[object, dict]:
    assignments = {"method": method, "dataset": dataset, "epochs": 1, "batch_size": 8, "eval_batch_size": 16,
                   "cache_dir": str(tmp / f"unimodal-{method}"), **settings}
    assignments.update({f"dataset.{k}": v for k, v in options.items()})
    run = prepare(build_config(assignments))
    return run, execute(run)


def check_record(record: dict, modalities: list[str]) -> None:
    assert record["status"] == "ok"
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert set(record["metrics"]["probe_accuracy"]) == set(modalities)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["food-101", "cmu-mosei"])
def test_prepare_then_one_epoch_of_joint_and_udi(name: str, tmp_path: Path) -> None:
    root = SMALL[name][0](tmp_path / "release")
    cache = tmp_path / "cache"
    assert builder(name, root, cache).prepare().startswith(f"{name}: prepared")
    (folder,) = list((cache / name).iterdir())  # one folder, no temporary one left
    assert (folder / "manifest.json").is_file()
    assert "already prepared" in builder(name, root, cache).prepare()

    options = {"root": str(root), "cache_dir": str(cache), **SMALL[name][1]}
    run, record = train("joint", name, options, tmp_path)
    data = run.data
    assert all(n > 0 for n in data.split_sizes().values())
    for spec in data.info.modalities:
        sample = data.splits["train"][0][spec.name]
        assert tuple(sample.shape) == spec.shape
        assert record["config"]["encoder"][spec.name] == spec.encoder
    check_record(record, data.info.modality_names)
    _, udi = train("udi", name, options, tmp_path)
    check_record(udi, data.info.modality_names)
    if name == "cmu-mosei":
        assert data.info.modality_names == ["text", "audio", "vision"]
        assert {s.encoder for s in data.info.modalities} == {"seq_transformer"}
        assert record["config"]["fusion"] == "concat"
        assert len(udi["metrics"]["probe_accuracy"]) == 3


def test_food101_splits_tokens_and_images(tmp_path: Path) -> None:
    root = food101(tmp_path / "release", per_class=5)
    data = builder("food-101", root, tmp_path / "cache").load()
    m = data.manifest
    assert data.info.classes == FOOD_CLASSES and m["val_carved_from_train"]
    assert m["sizes"] == {"train": 12, "val": 3, "test": 6}  # one of five per class carved, stratified
    assert not set(m["splits"]["val"]) & set(m["splits"]["train"])
    assert m["splits"]["test"][0] == "test/apple_pie/apple_pie_0.jpg"
    # the vocabulary comes from the train split only (a word of a val page alone is not in it)
    vocab = list(np.load(Path(m["cache"]) / "vocabulary.npy"))
    assert vocab[:3] == ["<pad>", "<unk>", "<cls>"] and "salmon" in vocab and "," in vocab
    train_pages = {int(n.split("_")[-1].removesuffix(".jpg")) for n in m["splits"]["train"]}
    assert train_pages and all(str(i) in vocab for i in train_pages)
    sample = data.splits["test"][0]
    ids = sample["text"]
    assert ids.dtype == torch.int64 and ids.shape == (12,) and ids[0] == 2  # [CLS] first
    words = [vocab[i] for i in ids if i != 0]
    assert words[1:6] == ["how", "to", "make", "apple", "pie"]
    assert sample["image"].shape == (3, 32, 32)
    again = data.splits["test"][0]["image"]
    assert torch.equal(sample["image"], again)  # no augmentation on test
    spec = data.info.modality("text")
    assert spec.encoder == "text_transformer" and spec.vocab_size == len(vocab)


def tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT with a word-piece vocabulary, saved as a local folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    words = sorted({w for text in FOOD_WORDS.values() for w in text.split()} | {"how", "to", "make", "page"})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words,
                                                 *"0123456789,:!"]) + "\n")
    import inspect

    # the vocabulary argument is `vocab` from transformers 5 on, `vocab_file` before
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{arg: str(folder / "vocab.txt")})
    assert len(tokenizer) == len(words) + 18
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))
    return folder


def test_food101_with_a_local_bert(tmp_path: Path) -> None:
    bert = tiny_bert(tmp_path / "bert")
    root = food101(tmp_path / "release")
    options = {"root": str(root), "cache_dir": str(tmp_path / "cache"), "image_size": 32, "max_tokens": 10,
               "bert_dir": str(bert)}
    run, record = train("joint", "food-101", options, tmp_path)
    data = run.data
    assert data.manifest["tokenizer"]["kind"] == "bert"
    ids = data.splits["test"][0]["text"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert), local_files_only=True)
    assert ids[0] == tok.cls_token_id and ids.shape == (10,)
    assert tok.convert_ids_to_tokens(ids[1:4].tolist()) == ["how", "to", "make"]
    assert record["config"]["encoder"]["text"] == "bert"
    assert run.method.model.encoders["text"].out_dim == 512  # BERT's 32, mapped to text_features
    # the pretrained weights are loaded, not re-initialised: a fresh encoder matches the folder's model
    from transformers import BertModel

    from benchmark.models import create_encoder

    fresh = create_encoder("bert", data.info.modality("text"))
    assert fresh.bert.config.hidden_size == 32 and fresh.head.in_features == 32
    reference = BertModel.from_pretrained(str(bert), local_files_only=True)
    assert torch.equal(fresh.bert.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)
    check_record(record, ["image", "text"])


def test_food101_image_encoder_starts_from_local_resnet_weights(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    from benchmark.models import create_encoder

    torch.manual_seed(3)
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    root = food101(tmp_path / "release")
    data = builder("food-101", root, tmp_path / "cache", image_weights=str(tmp_path / "resnet18.pth")).load()
    encoder = create_encoder("resnet18_visual", data.info.modality("image"))
    assert torch.equal(encoder.net.conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.net.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)
    plain = builder("food-101", root, tmp_path / "cache").load()  # the weights do not key the cache
    assert plain.manifest["key"] == data.manifest["key"]


@pytest.mark.parametrize("protocol", [2, 5])
def test_mosei_labelings_and_nonfinite_features(tmp_path: Path, protocol: int) -> None:
    root = mosei(tmp_path / "release", protocol=protocol)  # as written by Python 2 era tools, and today
    with open(root / "mosei_senti_data.pkl", "rb") as fh:
        raw = pickle.load(fh)
    scores = raw["test"]["labels"].reshape(-1)
    binary = builder("cmu-mosei", root, tmp_path / "cache").load()
    assert binary.info.num_classes == 2 and binary.info.classes == ["negative", "non-negative"]
    assert np.array_equal(binary.splits["test"].labels.numpy(), (scores >= 0).astype(int))
    assert binary.manifest["nonfinite_replaced"] == {"text": 0, "audio": 9, "vision": 0}  # 3 per split
    audio = binary.splits["train"].inputs["audio"]
    assert torch.isfinite(audio).all() and audio[0, 0, :3].tolist() == [0.0, 0.0, 0.0]
    assert tuple(binary.info.modality("text").shape) == (6, 300)
    seven = builder("cmu-mosei", root, tmp_path / "cache", labels="7class").load()
    assert seven.info.num_classes == 7 and seven.info.classes[0] == "-3"
    assert np.array_equal(seven.splits["test"].labels.numpy(), np.round(scores).astype(int) + 3)
    nonzero = builder("cmu-mosei", root, tmp_path / "cache", exclude_zero=True).load()
    assert nonzero.split_sizes()["test"] == int((scores != 0).sum()) == 6
    assert len({binary.manifest["key"], seven.manifest["key"], nonzero.manifest["key"]}) == 3


def test_fsdd_official_split_and_log_mel(tmp_path: Path) -> None:
    root = fsdd(tmp_path / "release")
    assert builder("fsdd", root, tmp_path / "cache").prepare().startswith("fsdd: prepared")
    data = builder("fsdd", root, tmp_path / "cache").load()
    m = data.manifest
    assert m["sizes"]["test"] == 30 and m["sizes"]["train"] + m["sizes"]["val"] == 60
    assert all(name.split("_")[2] == "0.wav" for name in m["splits"]["test"])  # takes 0-4 are test
    assert all(name.split("_")[2] in ("5.wav", "6.wav") for name in m["splits"]["train"] + m["splits"]["val"])
    assert m["val_carved_from_train"] and data.info.classes[7] == "seven"
    sample = data.splits["test"][0]
    assert sample["audio"].shape == (1, 40, 101) == data.info.modality("audio").shape
    # the tone of the recording's digit is the loudest mel band region; the padding after 0.3 s is silent
    spec = sample["audio"][0]
    assert spec[:, :25].mean() > spec[:, 40:].mean() + 5


@pytest.fixture(scope="module")
def av_fsdd(tmp_path_factory) -> dict:
    """av-digits built once for this module with its audio from a miniature FSDD (3 speakers)."""
    base = tmp_path_factory.mktemp("av_fsdd")
    release = fsdd(base / "FSDD")
    options = {"audio_source": "fsdd", "fsdd_root": str(release), "cache_dir": str(base / "cache")}
    summary = DATASETS.get("av-digits")(resolve_dataset_options("av-digits", options)).prepare()
    assert summary.startswith("av-digits: {'train': 1259")
    return options


@pytest.mark.timeout(300)
def test_av_digits_with_fsdd_audio_trains_joint_and_udi(av_fsdd: dict, tmp_path: Path) -> None:
    run, record = train("joint", "av-digits", av_fsdd, tmp_path, batch_size=64, eval_batch_size=512)
    data = run.data
    m = data.manifest
    assert data.split_sizes() == {"train": 1259, "val": 179, "test": 359}
    assert data.splits["train"].inputs["audio"].shape[1:] == (1, 40, 101)
    # speaker-disjoint splits, and each image paired with a recording of its own digit
    speakers = m["speakers"]
    assert sorted(speakers["train"] + speakers["val"] + speakers["test"]) == SPEAKERS
    for split in ("train", "val", "test"):
        clips = m["clips"][split]
        labels = data.splits[split].labels.numpy()
        assert {c["speaker"] for c in clips} <= set(speakers[split])
        assert all(int(c["file"].split("_")[0]) == y for c, y in zip(clips, labels))
    assert "FSDD" in m["source"] and len(m["sources"]) == 90  # every recording of the miniature is used
    check_record(record, ["audio", "image"])
    _, udi = train("udi", "av-digits", av_fsdd, tmp_path, batch_size=64, eval_batch_size=512, probe=False)
    assert udi["status"] == "ok" and 0.0 <= udi["metrics"]["accuracy"] <= 1.0


def test_av_digits_fsdd_source_changed_after_prepare(av_fsdd: dict, capsys) -> None:
    from test_data_errors import assert_one_line_error, cli

    wav = Path(av_fsdd["fsdd_root"]) / "recordings" / "2_lucas_6.wav"
    stat, data = wav.stat(), wav.read_bytes()
    try:
        wav.write_bytes(data[:-100])
        code, _, err = cli(["data", "prepare", "av-digits", "--cache-dir", av_fsdd["cache_dir"], "--set",
                            "audio_source=fsdd", "--set", f"fsdd_root={av_fsdd['fsdd_root']}"], capsys)
        assert_one_line_error(code, err, str(wav), "changed after the dataset was prepared",
                              "--set audio_source=fsdd --set fsdd_root=")
    finally:  # the module's other tests read the same release
        wav.write_bytes(data)
        os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_paper_sweep_rows_follow_the_udi_presets_and_plan_on_the_miniatures(tmp_path: Path, monkeypatch) -> None:
    from benchmark.presets import UDI_PAPER
    from benchmark.store import Store
    from benchmark.sweep import Filters, load_sweep, plan_sweep

    spec = load_sweep("paper")
    for dataset in ("food-101", "cmu-mosei"):  # the dataset rows follow the paper's recipe
        assignments = UDI_PAPER[dataset]
        resolved = {**spec.settings, **spec.datasets[dataset].get("settings", {})}
        assert {k: resolved[k] for k in assignments} == assignments, dataset
    food101(tmp_path / "data" / "food-101")
    mosei(tmp_path / "data" / "CMU-MOSEI")
    monkeypatch.setenv("BMB_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("BMB_CACHE_DIR", str(tmp_path / "cache"))
    plan = plan_sweep(spec, Store(tmp_path / "store"), Filters(datasets=["cmu-mosei", "food-101"], seeds=[0]))
    by_dataset = {d: {r.method for r in plan.runs if r.dataset == d} for d in ("cmu-mosei", "food-101")}
    assert "udi" in by_dataset["cmu-mosei"] and not {"ogm", "ogm_ge"} & by_dataset["cmu-mosei"]
    assert {"ogm_ge", "udi", "joint"} <= by_dataset["food-101"]
    mosei_udi = [r for r in plan.runs if r.dataset == "cmu-mosei" and r.label.startswith("udi anchor=")]
    assert {r.label for r in mosei_udi} == {"udi anchor=auto", "udi anchor=text", "udi anchor=audio",
                                            "udi anchor=vision"}
    # the paper's 20 epochs on MOSEI (a method's own recommended budget, e.g. MLA's, still wins in a sweep)
    from benchmark.registry import METHODS

    own = {r.method for r in plan.runs if "epochs" in METHODS.get(r.method).recommended}
    assert "mla" in own and "joint" not in own
    assert all(r.assignments["epochs"] == (METHODS.get(r.method).recommended.get("epochs") or 20)
               for r in plan.runs if r.dataset == "cmu-mosei")


def test_sequence_encoders_stay_finite_on_an_absent_modality() -> None:
    """A modality zeroed out (how the diagnostics remove one) is all padding for token encoders."""
    from benchmark.data.base import ModalitySpec
    from benchmark.data.specs import TokenSpec
    from benchmark.models import create_encoder

    text = create_encoder("text_transformer", TokenSpec("text", "tokens", (8,), "text_transformer", vocab_size=20))
    seq = create_encoder("seq_transformer", ModalitySpec("audio", "sequence", (5, 7), "seq_transformer"))
    for encoder, x in ((text, torch.zeros(2, 8, dtype=torch.long)), (seq, torch.zeros(2, 5, 7))):
        for mode in (encoder.train, encoder.eval):
            mode()
            assert torch.isfinite(encoder(x)).all()
    assert text.out_dim == 128 and seq.out_dim == 64
    # padding is masked: the same words padded to 4 or to 8 tokens give the same features
    text.eval()
    with torch.no_grad():
        torch.testing.assert_close(text(torch.tensor([[2, 5, 6, 0]])), text(torch.tensor([[2, 5, 6, 0, 0, 0, 0, 0]])))
        assert not torch.allclose(text(torch.tensor([[2, 5, 6, 0]])), text(torch.tensor([[2, 5, 6, 7]])))


def test_data_list_shows_the_new_sets(tmp_path: Path, monkeypatch, capsys) -> None:
    from benchmark.cli import main

    mosei(tmp_path / "data" / "CMU-MOSEI")
    fsdd(tmp_path / "data" / "FSDD", takes=(0, 5))
    monkeypatch.setenv("BMB_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("BMB_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["data", "prepare", "cmu-mosei", "--set", "labels=7class"]) == 0
    assert main(["data", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "image+text" in rows["food-101"] and " 101 " in rows["food-101"] and " no " in rows["food-101"]
    assert "text+audio+vision" in rows["cmu-mosei"] and "yes, not prepared" in rows["cmu-mosei"]  # binary is not
    assert "audio " in rows["fsdd"] and " 10 " in rows["fsdd"] and "yes, not prepared" in rows["fsdd"]
    assert main(["data", "prepare", "cmu-mosei"]) == 0  # the default (binary) labeling
    capsys.readouterr()
    assert main(["data", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "yes, prepared" in rows["cmu-mosei"] and " 40 " in rows["cmu-mosei"]  # 24 + 8 + 8 samples


def test_food101_reads_only_the_start_of_each_page(tmp_path: Path) -> None:
    root = food101(tmp_path / "release")
    data = builder("food-101", root, tmp_path / "cache", max_tokens=5).load()
    vocab = set(np.load(Path(data.manifest["cache"]) / "vocabulary.npy"))
    assert {"how", "to", "make", "sushi", "apple"} <= vocab and not {"salmon", "recipe", "cinnamon", "nori"} & vocab
    ids = data.splits["train"][0]["text"]
    assert ids.shape == (5,) and (ids != 0).all()  # [CLS] and four words, no padding
