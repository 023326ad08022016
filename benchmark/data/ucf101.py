"""``ucf101``: UCF101 (RGB + optical flow, 101 actions) from extracted frames.

Layout under the root (the split lists may also sit in a subfolder such as ``ucfTrainTestlist/``)::

    classInd.txt                          lines "<index> <ClassName>", index from 1
    trainlist01.txt                       lines "<ClassName>/<video>.avi <index>"
    testlist01.txt                        lines "<ClassName>/<video>.avi"
    rgb/<video>/*.jpg                     RGB frames
    flow/u/<video>/*.jpg, flow/v/<video>/*.jpg   horizontal and vertical flow as grayscale JPEGs

``split`` picks the official split (1-3). Per clip, ``frames`` evenly spaced RGB frames
(T×3×H×W, ImageNet normalisation) and as many evenly spaced flow frames with u and v stacked as
channels (T×2×H×W, scaled to [-1, 1]); RandomResizedCrop + flip on train (the flip mirrors u),
Resize elsewhere. The validation split is carved from train (stratified, seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import ModalitySpec
from benchmark.data.media import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameTransform,
    evenly_spaced,
    list_frames,
    read_frames,
)
from benchmark.data.ondisk import SOURCES, Item, OnDiskDataset, OnDiskOptions, find_list, require
from benchmark.errors import UsageError
from benchmark.registry import register_dataset


@dataclass
class UCF101Options(OnDiskOptions):
    frames: int = opt(3, "RGB frames and flow frames per clip, evenly spaced")
    split: int = opt(1, "official train/test split: 1, 2 or 3")

    def validate(self) -> None:
        super().validate()
        if self.split not in (1, 2, 3):
            raise UsageError(f"dataset.split must be 1, 2 or 3, got {self.split}")


def video_name(entry: str) -> str:
    return Path(entry.replace("\\", "/")).stem


@register_dataset("ucf101")
class UCF101(OnDiskDataset):
    Options = UCF101Options
    summary = "UCF101 actions, RGB + optical flow, 101 classes (on disk: extracted frames, official lists)"
    display = "UCF101"
    folder = "UCF101"
    layout = ("classInd.txt, trainlist01.txt, testlist01.txt, rgb/<video>/*.jpg, "
              "flow/u/<video>/*.jpg, flow/v/<video>/*.jpg")
    num_classes = 101

    def _list(self, root: Path, name: str) -> Path:
        path = find_list(root, (name,))
        if path is None:
            raise UsageError(f"ucf101 list file {name} is missing under {root}; expected layout: {self.layout}")
        return path

    def class_names(self, root: Path) -> list[str]:
        path = self._list(root, "classInd.txt")
        rows = {}
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            index, _, name = line.strip().partition(" ")
            if not index.isdigit() or not name:
                raise UsageError(f"{path} line {line_no}: expected '<index> <ClassName>', got {line!r}; fix it")
            rows[int(index)] = name.strip()
        return [rows[i] for i in sorted(rows)]

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        out = {}
        for split, file in (("train", f"trainlist0{self.options.split}.txt"),
                            ("test", f"testlist0{self.options.split}.txt")):
            path = self._list(root, file)
            items = []
            for line_no, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                entry = line.split()[0]
                class_name = entry.replace("\\", "/").split("/")[0]
                if class_name not in classes:
                    raise UsageError(f"{path} line {line_no}: class {class_name!r} is not in classInd.txt; "
                                     "fix the line or the class list")
                items.append(Item(video_name(entry), classes.index(class_name), str(path)))
            out[split] = items
        return out

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        s, t = self.options.stored_size, self.options.frames
        return {"rgb": ((t, 3, s, s), np.uint8), "flow": ((t, 2, s, s), np.uint8)}

    def modality_specs(self) -> list[ModalitySpec]:
        s, t = self.options.image_size, self.options.frames
        return [ModalitySpec("rgb", "frames", (t, 3, s, s), "resnet18_visual"),
                ModalitySpec("flow", "frames", (t, 2, s, s), "resnet18_visual")]

    def transforms(self, split: str) -> dict[str, Any]:
        size, train = self.options.image_size, split == "train"
        half = torch.tensor([0.5, 0.5])
        return {"rgb": FrameTransform(size, train, IMAGENET_MEAN, IMAGENET_STD),
                "flow": FrameTransform(size, train, half, half, flow=True)}

    def _frames(self, folder: Path, item: Item) -> list[Path]:
        frames = list_frames(require(folder, item.listed_in))
        if not frames:
            raise UsageError(f"{folder} (listed in {item.listed_in}) has no .jpg frames; extract its frames "
                             "or remove its line")
        return [frames[i] for i in evenly_spaced(len(frames), self.options.frames)]

    def decode(self, root: Path, item: Item) -> dict[str, np.ndarray]:
        s = self.options.stored_size
        rgb_paths = self._frames(root / "rgb" / item.name, item)
        u_paths = self._frames(root / "flow" / "u" / item.name, item)
        v_paths = self._frames(root / "flow" / "v" / item.name, item)
        u, v = read_frames(u_paths, s, mode="L"), read_frames(v_paths, s, mode="L")
        return {"rgb": read_frames(rgb_paths, s), "flow": np.concatenate([u, v], axis=1),
                SOURCES: [*rgb_paths, *u_paths, *v_paths]}
