"""Named presets: a paper's shared settings per dataset, selectable in a sweep (``preset = "..."``
in a method's table).

A preset maps dataset names to assignments (as ``--set key=value``); ``"*"`` holds what every
dataset gets, a dataset's own entry is applied over it. Datasets a preset does not name get the
``"*"`` entry only.
"""

from __future__ import annotations

from typing import Any

from benchmark.errors import UsageError

# The UDI paper's settings (Wang et al., arXiv 2509.02281 v3, App. A.4 and A.6; METHODS.md, UDI,
# item 5). No learning-rate schedule is stated: none [choice]. The learning rate of CG-MNIST and
# CMU-MOSEI is not given: the sweep's own stays.
UDI_PAPER: dict[str, dict[str, Any]] = {
    "*": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
          "scheduler": "none"},
    # spectrogram 257×299, 2 frames at 1 fps
    "crema-d": {"lr": 1e-2, "dataset.frames": 2, "dataset.audio_frames": 299},
    # 31 classes (the reader's pinned list), spectrogram 257×1004, 3 frames
    "kinetics-sounds": {"lr": 1e-2, "dataset.frames": 3, "dataset.audio_features": "stft",
                        "dataset.audio_frames": 1004},
    # 3 RGB frames and 3 stacked flow frames
    "ucf101": {"lr": 1e-3, "dataset.frames": 3},
    # pretrained ResNet18 on 256×256 images and pretrained BERT on ≤ 40 tokens (local files:
    # dataset.image_weights, dataset.bert_dir; from scratch otherwise)
    "food-101": {"lr": 1e-3, "dataset.image_size": 256, "dataset.max_tokens": 40},
    # PMR's 4-conv + average-pool encoder on both images; 20 follower epochs
    "cgmnist": {"epochs": 20, "encoder.gray": "cgmnist_cnn", "encoder.color": "cgmnist_cnn"},
    # Transformers on the aligned features of the three modalities, concatenation fusion
    "cmu-mosei": {"epochs": 20, "dataset.labels": "binary", "fusion": "concat"},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"udi-paper": UDI_PAPER}


def check_preset(name: Any, where: str) -> None:
    if not isinstance(name, str) or name not in PRESETS:
        raise UsageError(f"{where}: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")


def preset_settings(name: str, dataset: str) -> dict[str, Any]:
    """The assignments preset ``name`` gives runs on ``dataset``."""
    check_preset(name, "preset")
    preset = PRESETS[name]
    return {**preset.get("*", {}), **preset.get(dataset, {})}
