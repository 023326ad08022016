"""Encoders from local pretrained weights: timm and torchvision backbones (``timm:<model>``,
``tv:<model>`` with ``encoder_weights.<modality>=<file>``) and Hugging Face text models from a
local folder (``hf``). Nothing is downloaded: every weights file and folder is written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark.config import build_config
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit
from benchmark.data.specs import TokenSpec
from benchmark.errors import UsageError
from benchmark.models.encoders import create_encoder
from benchmark.runner import execute, prepare


def _perturbed(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state_dict with every float tensor moved off its initialisation (seeded), so that a
    load that silently kept the fresh weights would show."""
    gen = torch.Generator().manual_seed(1)
    state = net.state_dict()
    return {k: (v + torch.randn(v.shape, generator=gen) * 0.05 if v.is_floating_point() else v)
            for k, v in state.items()}


def _timm_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    state = _perturbed(timm.create_model("resnet18", pretrained=False))
    path = tmp_path / "timm-resnet18.pth"
    torch.save(state, path)
    return path, state


def test_timm_resnet18_from_a_local_file(tmp_path):
    path, saved = _timm_file(tmp_path)
    spec = ModalitySpec("visual", "image", (3, 32, 32), "small_cnn")
    encoder = create_encoder("timm:resnet18", spec, str(path)).eval()
    assert encoder.out_dim == 512
    loaded = encoder.net.state_dict()
    assert not any(k.startswith("fc.") for k in loaded)  # the classifier is dropped
    assert set(loaded) == {k for k in saved if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        feats = encoder(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512) and torch.isfinite(feats).all()


def test_timm_first_convolution_adapts_to_one_channel_and_frames(tmp_path):
    path, saved = _timm_file(tmp_path)
    grey = create_encoder("timm:resnet18", ModalitySpec("audio", "spectrogram", (40, 24), "small_cnn"), str(path))
    grey.eval()
    # one channel: the RGB kernels summed, so that a grey image answers as it would copied into RGB
    assert torch.equal(grey.net.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(grey.net.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    rgb = create_encoder("timm:resnet18", ModalitySpec("v", "image", (3, 40, 24), "small_cnn"), str(path)).eval()
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.unsqueeze(1).repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
    frames = create_encoder("timm:resnet18", ModalitySpec("v", "frames", (2, 3, 32, 32), "small_cnn"), str(path))
    with torch.no_grad():
        assert frames.eval()(torch.randn(3, 2, 3, 32, 32)).shape == (3, 512)


def test_torchvision_resnet18_from_a_local_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    saved = _perturbed(resnet18(weights=None))
    path = tmp_path / "tv-resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)  # DataParallel, wrapped
    encoder = create_encoder("tv:resnet18", ModalitySpec("v", "image", (3, 32, 32), "small_cnn"), str(path)).eval()
    assert encoder.out_dim == 512
    for key, value in encoder.net.state_dict().items():
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    two = create_encoder("tv:resnet18", ModalitySpec("v", "image", (2, 32, 32), "small_cnn"), str(path))
    # two channels: the RGB kernels repeated cyclically (R, G), scaled by 3/2
    torch.testing.assert_close(two.net.conv1.weight, saved["conv1.weight"][:, [0, 1]] * 1.5)


def _image_data() -> MultimodalData:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        y = torch.arange(n) % 2
        return TensorSplit({"visual": torch.randn(n, 3, 16, 16, generator=gen),
                            "audio": torch.randn(n, 8, generator=gen) + y[:, None].float()}, y)

    specs = [ModalitySpec("visual", "image", (3, 16, 16), "small_cnn"), ModalitySpec("audio", "vector", (8,), "mlp")]
    return MultimodalData(DataInfo("images", specs, 2), {"train": split(8), "val": split(4), "test": split(4)})


def test_bad_weights_are_refused_before_training(tmp_path):
    path, saved = _timm_file(tmp_path)
    data = _image_data()

    def refused(match: str, **assign: str) -> None:
        cfg = build_config({"method": "joint", "epochs": 1, "batch_size": 4, "device": "cpu",
                            "encoder.visual": "timm:resnet18", **assign})
        with pytest.raises(UsageError, match=match) as info:
            prepare(cfg, data)
        assert "\n" not in str(info.value)

    refused("encoder_weights.visual: .*missing.pth is not a file", **{"encoder_weights.visual": str(tmp_path / "missing.pth")})
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:2000])  # a truncated file
    refused("encoder_weights.visual: cannot read .*corrupt.pth", **{"encoder_weights.visual": str(corrupt)})
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in saved.items() if not k.startswith("layer4.")}, partial)
    refused("does not fit the model: .* missing \\(e.g. layer4", **{"encoder_weights.visual": str(partial)})
    wrong = tmp_path / "wrong.pth"
    torch.save({**saved, "bn1.weight": torch.ones(32)}, wrong)
    refused("of another shape \\(e.g. bn1.weight: file \\(32,\\), model \\(64,\\)\\)", **{"encoder_weights.visual": str(wrong)})
    refused("unknown timm model 'resnet1800'", **{"encoder.visual": "timm:resnet1800"})
    refused("unknown encoder 'keras:resnet18'", **{"encoder.visual": "keras:resnet18"})
    refused("encoder mlp of modality 'audio' takes no encoder_weights", **{"encoder_weights.audio": str(path)})
    refused("encoder_weights.text: dataset 'images' has no modality 'text'", **{"encoder_weights.text": str(path)})
    # a good file passes, and the run trains from it
    cfg = build_config({"method": "joint", "epochs": 1, "batch_size": 4, "device": "cpu", "diagnostics": "false",
                        "probe": "false", "encoder.visual": "timm:resnet18", "encoder_weights.visual": str(path)})
    run = prepare(cfg, data)
    assert run.resolved["encoder_weights"] == {"visual": str(path)}
    record = execute(run)
    assert record["status"] == "ok" and record["config"]["encoder"]["visual"] == "timm:resnet18"


def tiny_bert_folder(folder: Path) -> tuple[Path, list[str]]:
    """A 2-layer BERT of width 32 with a 20-word vocabulary and its tokenizer, saved with
    save_pretrained (random weights, seeded)."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True)
    words = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sits", "the", "a"]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    import inspect

    fast = transformers.BertTokenizerFast
    arg = "vocab" if "vocab" in inspect.signature(fast.__init__).parameters else "vocab_file"
    tokenizer = fast(**{arg: str(folder / "vocab.txt")})
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder, words


def test_hugging_face_model_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, words = tiny_bert_folder(tmp_path / "bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    texts = ["the red cat sits", "a blue bird runs", "the green dog runs", "a red bird sits"] * 4
    ids = torch.tensor(tokenizer(texts, padding="max_length", max_length=8, truncation=True)["input_ids"])
    labels = torch.tensor([0, 1, 0, 1] * 4)

    spec = TokenSpec("text", "tokens", (8,), "text_transformer", vocab_size=len(tokenizer), pad_id=0)
    encoder = create_encoder("hf", spec, str(folder)).eval()
    saved = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    assert encoder.out_dim == 32
    assert torch.equal(encoder.bert.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    with torch.no_grad():
        feats = encoder(ids)
        reference = saved.eval()(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, reference)

    # the same folder through the run's configuration: encoder.text=hf, encoder_weights.text=<folder>
    gen = torch.Generator().manual_seed(0)

    def split() -> TensorSplit:
        return TensorSplit({"text": ids, "x": torch.randn(len(labels), 4, generator=gen)}, labels)

    data = MultimodalData(DataInfo("captions", [spec, ModalitySpec("x", "vector", (4,), "mlp")], 2),
                          {"train": split(), "val": split(), "test": split()})
    cfg = build_config({"method": "joint", "epochs": 1, "batch_size": 8, "device": "cpu", "diagnostics": "false",
                        "probe": "false", "encoder.text": "hf", "encoder_weights.text": str(folder)})
    record = execute(prepare(cfg, data))
    assert record["status"] == "ok" and record["config"]["encoder"]["text"] == "hf"
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0 and len(record["history"]) == 1

    with pytest.raises(UsageError, match="encoder hf: .*nowhere is not a folder"):
        create_encoder("hf", spec, str(tmp_path / "nowhere"))
    big = TokenSpec("text", "tokens", (8,), "hf", vocab_size=1000)
    with pytest.raises(UsageError, match="token ids up to 999, the model in .* knows 15"):
        create_encoder("hf", big, str(folder))


def test_cached_unimodal_models_are_keyed_by_their_starting_weights(tmp_path):
    import os

    from benchmark.method import create_method
    from benchmark.unimodal import unimodal_key

    path, saved = _timm_file(tmp_path)
    data = _image_data()

    def key(**assign: str) -> dict:
        cfg = build_config({"method": "unimodal", "method.modality": "visual", "encoder.visual": "timm:resnet18",
                            **assign})
        return unimodal_key(create_method("unimodal", data.info, cfg), "visual", data)

    scratch, first = key(), key(**{"encoder_weights.visual": str(path)})
    assert "encoder_weights" not in scratch and first["encoder_weights"]["path"] == str(path.resolve())
    assert key(**{"encoder_weights.visual": str(path)}) == first  # the same file: the same key
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in saved.items()}, path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key(**{"encoder_weights.visual": str(path)}) != first  # replaced under the same name
