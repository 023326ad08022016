"""``food-101``: UPMC Food-101 (image + the text of the recipe page, 101 classes).

Layout under the root::

    images/train/<class>/<image>.jpg      the release's images, one folder per class
    images/test/<class>/<image>.jpg
    texts/train_titles.csv                rows "<image>,<text>,<class>" (also accepted, first found:
    texts/test_titles.csv                 texts/<split>.csv, <split>_titles.csv, <split>.csv)

``<image>`` is the file name inside ``images/<split>/<class>/`` (or a path relative to
``images/<split>/``); a text with unquoted commas is everything between the first and the last
cell; a first row that names columns (image, text, class, ...) is skipped. The classes are the
folders of ``images/train``, in sorted order. The release has no validation list: it is carved
from train (stratified, seeded) and written to the manifest.

Text: at most ``max_tokens`` (40, the UDI paper's) token ids per page. With ``bert_dir`` (a local
Hugging Face BERT folder) its tokenizer makes them and the default text encoder is ``bert``;
without it, a word-level vocabulary built from the train split's texts alone (lower-cased words,
numbers and punctuation marks, within the first ``max_tokens`` of each page; words seen at least
``min_count`` times, at most ``vocab_size``)
makes them and the default encoder is ``text_transformer``, trained from scratch. Either ends
with a linear map to ``text_features`` (512, the image encoder's size). Images:
ResNet18 (``resnet18_visual``) on ``image_size`` (256) squares, RandomResizedCrop + flip on train,
Resize elsewhere, ImageNet normalisation; ``image_weights`` names a local torchvision ResNet18
``state_dict`` to start from.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import ModalitySpec, MultimodalData
from benchmark.data.cache import CacheWriter
from benchmark.data.media import IMAGENET_MEAN, IMAGENET_STD, FrameTransform, read_frame
from benchmark.data.ondisk import SOURCES, Item, OnDiskDataset, require
from benchmark.data.specs import TokenSpec, WeightsSpec
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

TEXT_FILES = ("texts/{split}_titles.csv", "texts/{split}.csv", "{split}_titles.csv", "{split}.csv")
HEADER_WORDS = {"image", "image_name", "img", "name", "file", "filename", "path", "id"}
PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass
class Food101Options:
    root: str = opt("", "folder holding the release (default $BMB_DATA_ROOT/food-101)", location=True)
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    image_size: int = opt(256, "image side after RandomResizedCrop (train) or Resize (val/test); 256 as UDI")
    cache_size: int = opt(0, "image side stored in the cache (0 = image_size × 8/7)")
    max_tokens: int = opt(40, "token ids kept per text (the UDI paper: 40)")
    bert_dir: str = opt("", "local Hugging Face BERT folder: its tokenizer makes the ids and the text "
                            "encoder defaults to bert (empty: word vocabulary + text_transformer)")
    vocab_size: int = opt(30000, "largest word vocabulary built from the train texts (without bert_dir)")
    min_count: int = opt(2, "a word enters the vocabulary when seen this often in train (without bert_dir)")
    text_features: int = opt(512, "feature size the text encoder ends with (a linear map from its width; "
                                  "512 = ResNet18's, which methods sharing a head need; 0 = its own)")
    image_weights: str = opt("", "local torchvision ResNet18 state_dict the image encoder starts from")
    val_fraction: float = opt(0.1, "fraction of each class of train carved out as validation")
    seed: int = opt(0, "seed of the carved validation split")

    def validate(self) -> None:
        if self.image_size < 8 or self.max_tokens < 2:
            raise UsageError(f"dataset.image_size must be >= 8 and dataset.max_tokens >= 2, got "
                             f"{self.image_size} and {self.max_tokens}")
        if self.cache_size and self.cache_size < self.image_size:
            raise UsageError(f"dataset.cache_size ({self.cache_size}) must be 0 or >= dataset.image_size "
                             f"({self.image_size})")
        if self.vocab_size < 4 or self.min_count < 1:
            raise UsageError(f"dataset.vocab_size must be >= 4 and dataset.min_count >= 1, got "
                             f"{self.vocab_size} and {self.min_count}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.text_features < 0:
            raise UsageError(f"dataset.text_features must be >= 0, got {self.text_features}")
        for name in ("bert_dir", "image_weights"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().exists():
                raise UsageError(f"dataset.{name} {path} does not exist; give a local "
                                 f"{'folder' if name == 'bert_dir' else 'file'} or leave it empty")

    @property
    def stored_size(self) -> int:
        return self.cache_size or max(self.image_size, round(self.image_size * 8 / 7))


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def build_vocabulary(texts: list[str], size: int, min_count: int) -> list[str]:
    """Special tokens, then the words of ``texts`` by decreasing count (ties alphabetical)."""
    counts = Counter(w for text in texts for w in words(text))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK, CLS, *ranked[: size - 3]]


class WordTokenizer:
    """Word ids from :func:`build_vocabulary`: [CLS], the text's words (unknown ones as [UNK]),
    cut to ``max_tokens`` and padded with [PAD] (id 0)."""

    def __init__(self, vocabulary: list[str], max_tokens: int) -> None:
        self.ids = {w: i for i, w in enumerate(vocabulary)}
        self.max_tokens = max_tokens

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.ids[CLS], *(self.ids.get(w, self.ids[UNK]) for w in words(text))][: self.max_tokens]
        out = np.zeros(self.max_tokens, dtype=np.int32)
        out[: len(ids)] = ids
        return out


class BertTokenizer:
    """The token ids of a local Hugging Face tokenizer, cut and padded to ``max_tokens``."""

    def __init__(self, folder: str, max_tokens: int) -> None:
        from benchmark.models.sequence import require_transformers

        transformers = require_transformers()
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot load a tokenizer from dataset.bert_dir {folder} ({reason}); point it at "
                             "a Hugging Face BERT folder saved with save_pretrained") from None
        self.max_tokens = max_tokens
        self.pad_id = int(self.tok.pad_token_id or 0)
        self.vocab_size = int(len(self.tok))

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tok(text, max_length=self.max_tokens, truncation=True, padding="max_length")["input_ids"]
        return np.asarray(ids, dtype=np.int32)


class ImageTransform:
    """FrameTransform on one C×H×W image."""

    def __init__(self, size: int, train: bool) -> None:
        self.frames = FrameTransform(size, train, IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.frames(image.unsqueeze(0))[0]


def as_token_ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.long()


def read_text_csv(path: Path, split: str, classes: list[str]) -> list[tuple[str, str, int, int]]:
    """(image path under images/<split>/, text, class index, line) for every row of ``path``."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # recipe pages can be long
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            label = row[-1].strip() if len(row) >= 3 else ""
            if label not in classes:
                if line_no == 1 and row[0].strip().lower() in HEADER_WORDS:
                    continue
                raise UsageError(f"{path} line {line_no}: expected '<image>,<text>,<class>' with a class "
                                 f"that is a folder of images/train, got {','.join(row)[:80]!r}; fix that row")
            name = row[0].strip()
            rel = name if "/" in name else f"{label}/{name}"
            rows.append((f"{split}/{rel}", ",".join(row[1:-1]), classes.index(label), line_no))
    return rows


@register_dataset("food-101")
class Food101(OnDiskDataset):
    Options = Food101Options
    summary = "UPMC Food-101 image + recipe text, 101 classes (on disk: images/<split>/<class>/, text CSVs)"
    display = "Food-101 (UPMC)"
    folder = "food-101"
    layout = ("images/{train,test}/<class>/<image>.jpg and texts/{train,test}_titles.csv rows "
              "'<image>,<text>,<class>'")
    num_classes = 101

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self.texts: dict[str, str] = {}
        self.tokenizer: Any = None

    def recipe(self, root: Path) -> dict[str, Any]:
        recipe = super().recipe(root)
        recipe.pop("image_weights")  # the encoder's starting point and size, not the data
        recipe.pop("text_features")
        return recipe

    def class_names(self, root: Path) -> list[str]:
        folder = root / "images" / "train"
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not classes:
            raise UsageError(f"food-101: {folder} has no class folders; expected layout: {self.layout}")
        return classes

    def text_file(self, root: Path, split: str) -> Path:
        for pattern in TEXT_FILES:
            path = root / pattern.format(split=split)
            if path.is_file():
                return path
        raise UsageError(f"food-101 text file {root / TEXT_FILES[0].format(split=split)} is missing; "
                         f"expected layout: {self.layout}")

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        out = {}
        for split in ("train", "test"):
            path = self.text_file(root, split)
            items = []
            for name, text, label, _ in read_text_csv(path, split, classes):
                # only the start of a page is tokenized: every whitespace-separated chunk gives at
                # least one token, so max_tokens chunks are enough (and pages can be long)
                self.texts[name] = " ".join(text.split()[: self.options.max_tokens])
                items.append(Item(name, label, str(path)))
            out[split] = items
        return out

    def before_decode(self, root: Path, index: dict[str, list[Item]], writer: CacheWriter) -> dict[str, Any]:
        o = self.options
        if o.bert_dir:
            self.tokenizer = BertTokenizer(str(Path(o.bert_dir).expanduser().resolve()), o.max_tokens)
            return {"tokenizer": {"kind": "bert", "folder": o.bert_dir, "vocab_size": self.tokenizer.vocab_size,
                                  "pad_id": self.tokenizer.pad_id}}
        vocabulary = build_vocabulary([self.texts[it.name] for it in index["train"]], o.vocab_size, o.min_count)
        writer.save_array("vocabulary", np.array(vocabulary, dtype=str))
        self.tokenizer = WordTokenizer(vocabulary, o.max_tokens)
        return {"tokenizer": {"kind": "words", "vocab_size": len(vocabulary), "pad_id": 0}}

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        s = self.options.stored_size
        return {"image": ((3, s, s), np.uint8), "text": ((self.options.max_tokens,), np.int32)}

    def decode(self, root: Path, item: Item) -> dict[str, Any]:
        path = require(root / "images" / item.name, item.listed_in)
        return {"image": read_frame(path, self.options.stored_size), "text": self.tokenizer(self.texts[item.name]),
                SOURCES: [path]}

    def transforms(self, split: str) -> dict[str, Any]:
        return {"image": ImageTransform(self.options.image_size, split == "train"), "text": as_token_ids}

    def modality_specs(self, tokenizer: dict[str, Any] | None = None) -> list[ModalitySpec]:
        o, tokenizer = self.options, tokenizer or {}
        s = o.image_size
        bert = str(Path(o.bert_dir).expanduser().resolve()) if o.bert_dir else ""
        weights = str(Path(o.image_weights).expanduser().resolve()) if o.image_weights else ""
        return [WeightsSpec("image", "image", (3, s, s), "resnet18_visual", weights=weights),
                TokenSpec("text", "tokens", (o.max_tokens,), "bert" if bert else "text_transformer",
                          vocab_size=int(tokenizer.get("vocab_size", 0)), pad_id=int(tokenizer.get("pad_id", 0)),
                          pretrained=bert, features=o.text_features)]

    def load(self) -> MultimodalData:
        data = super().load()
        data.info.modalities = self.modality_specs(data.manifest["tokenizer"])
        return data
