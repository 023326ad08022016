"""Image backbones of timm and torchvision, built by name and started from local weights files.

``encoder.<modality>=timm:<model>`` builds ``timm.create_model(<model>, pretrained=False)`` and
``encoder.<modality>=tv:<model>`` builds ``torchvision.models.get_model(<model>, weights=None)``;
``encoder_weights.<modality>=<file>`` then loads a ``state_dict`` saved with ``torch.save``.
Nothing is ever downloaded: without a weights file the backbone starts from its random
initialisation.

The backbone is adapted to the modality:

- the classifier is dropped (timm: ``num_classes=0``; torchvision: the model's last linear layer
  becomes the identity), so the encoder ends with the pooled features and ``out_dim`` is their size;
  the file's classifier entries are ignored;
- the first convolution takes the modality's channels: a spectrogram F×T has one, an image C×H×W
  has C, frames T×C×H×W have C (the frames are folded into the batch and their features averaged).
  When the file's first convolution was trained on another number of channels (RGB, say), its
  kernels are adapted: for one channel they are summed over the file's channels, so that a grey
  input gives the response the RGB kernels give to that image copied into every channel; for C
  channels they are repeated cyclically and scaled by (file channels)/C, so that the kernels'
  total over the input channels keeps its size.

A weights file that is missing, unreadable, not a ``state_dict`` or does not fit the architecture
(missing or unexpected entries, other shapes) is refused with one line when the run is prepared.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.data.base import ModalitySpec
from benchmark.errors import UsageError
from benchmark.models.layout import channels_last, nhwc

FAMILIES = ("timm", "tv")
INPUT_RANKS = (2, 3, 4)  # spectrogram F×T, image C×H×W, frames T×C×H×W


def input_channels(spec: ModalitySpec) -> int:
    shape = tuple(spec.shape)
    if len(shape) == 2:
        return 1
    return int(shape[0] if len(shape) == 3 else shape[1])


def _close(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _require(package: str, encoder: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UsageError(f"encoder {encoder} needs the package {package}; pip install {package} "
                         f"(or 'balanced-mm-bench[{package}]')") from None


def _parent_and_leaf(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (net.get_submodule(parent_name) if parent_name else net), leaf


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def adapt_first_conv_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Kernels trained on ``weight.shape[1]`` input channels for an input of ``channels`` channels
    (see the module's docstring)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / channels)


def _timm_net(model: str, channels: int, encoder: str) -> tuple[nn.Module, int, str]:
    timm = _require("timm", encoder)
    if not timm.is_model(model):
        raise UsageError(f"unknown timm model {model!r}{_close(model, timm.list_models())}; "
                         "see timm.list_models() for the names")
    net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=channels)
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ""
    return net, int(net.num_features), classifier


def _tv_net(model: str, channels: int, encoder: str) -> tuple[nn.Module, int, str]:
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)  # the image classifiers (not detection, video, ...)
    if model not in known:
        raise UsageError(f"unknown torchvision classification model {model!r}{_close(model, known)}; "
                         "see torchvision.models.list_models(module=torchvision.models)")
    extra = {"aux_logits": False} if model in ("googlenet", "inception_v3") else {}
    net = tvm.get_model(model, weights=None, **extra)
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"torchvision model {model} has no linear classifier to drop; choose another model")
    classifier = linears[-1]
    parent, leaf = _parent_and_leaf(net, classifier)
    out_dim = int(getattr(parent, leaf).in_features)
    setattr(parent, leaf, nn.Identity())
    found = first_conv(net)
    if found is not None and found[1].in_channels != channels:
        name, conv = found
        if conv.groups != 1:
            raise UsageError(f"torchvision model {model} starts with a grouped convolution; it cannot take "
                             f"{channels} input channels")
        parent, leaf = _parent_and_leaf(net, name)
        setattr(parent, leaf, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation,
                                        bias=conv.bias is not None, padding_mode=conv.padding_mode))
    return net, out_dim, classifier


BUILDERS: dict[str, Callable[[str, int, str], tuple[nn.Module, int, str]]] = {"timm": _timm_net, "tv": _tv_net}


def read_state_dict(path: str, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a local file (also inside ``{"state_dict": ...}`` or ``{"model": ...}``,
    with DataParallel's ``module.`` prefix removed); UsageError naming the file otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{what}: {path} is {'a folder' if file.is_dir() else 'not a file'}; {fix}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, corrupt or non-PyTorch file, or one holding more than tensors
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UsageError(f"{what}: cannot read {path} with torch.load ({reason}); {fix}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UsageError(f"{what}: {path} holds no state_dict (a mapping of names to tensors); {fix}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(net: nn.Module, path: str, *, classifier: str, what: str, fix: str) -> None:
    """Load ``path`` into ``net``: the file's classifier entries ignored, its first convolution
    adapted to ``net``'s input channels; anything else that does not fit is refused."""
    state = read_state_dict(path, what, fix)
    own = net.state_dict()
    if classifier:
        state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    found = first_conv(net)
    if found is not None:
        key = f"{found[0]}.weight"
        saved, wanted = state.get(key), own.get(key)
        if (saved is not None and wanted is not None and saved.dim() == 4 and saved.shape[1] != wanted.shape[1]
                and saved.shape[0] == wanted.shape[0] and saved.shape[2:] == wanted.shape[2:]):
            state[key] = adapt_first_conv_weight(saved, wanted.shape[1])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    other = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or other:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entries missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if other:
            k = other[0]
            parts.append(f"{len(other)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise UsageError(f"{what}: {path} does not fit the model: {', '.join(parts)}; {fix}")
    net.load_state_dict(state, strict=True)


class ImageBackbone(nn.Module):
    """A timm or torchvision backbone without its classifier on one image modality."""

    takes_weights = True

    def __init__(self, family: str, model: str, spec: ModalitySpec, weights: str = "") -> None:
        super().__init__()
        encoder = f"{family}:{model}"
        if len(spec.shape) not in INPUT_RANKS:
            raise UsageError(f"encoder {encoder} reads spectrograms F×T, images C×H×W or frames T×C×H×W; "
                             f"modality {spec.name!r} has shape {tuple(spec.shape)}: choose another encoder")
        channels = input_channels(spec)
        net, self.out_dim, classifier = BUILDERS[family](model, channels, encoder)
        if weights:
            fix = (f"give a state_dict of {encoder} saved with torch.save(model.state_dict(), path), or leave "
                   f"encoder_weights.{spec.name} empty")
            load_backbone_weights(net, weights, classifier=classifier, what=f"encoder_weights.{spec.name}",
                                  fix=fix)
        self.net = channels_last(net)
        self._rank = len(spec.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rank == 2:  # a spectrogram: one channel
            x = x.unsqueeze(1)
        if x.dim() == 5:  # frames: folded into the batch, features averaged over time
            b, t = x.shape[:2]
            return self.net(nhwc(x.flatten(0, 1))).view(b, t, -1).mean(dim=1)
        return self.net(nhwc(x))


def backbone_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of a ``<family>:<model>`` encoder name (``timm:resnet18``, ``tv:resnet18``)."""
    family, _, model = name.partition(":")
    if family not in FAMILIES or not model.strip():
        raise UsageError(f"unknown encoder {name!r}; prefixed encoders are timm:<model> and tv:<model> "
                         "(see `python -m benchmark list encoders` for the others)")

    def factory(spec: ModalitySpec, weights: str = "") -> nn.Module:
        return ImageBackbone(family, model.strip(), spec, weights)

    factory.takes_weights = True  # type: ignore[attr-defined]
    return factory


__all__ = ["ImageBackbone", "adapt_first_conv_weight", "backbone_factory", "load_backbone_weights",
           "read_state_dict"]
