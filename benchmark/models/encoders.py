"""Encoders: a module mapping one modality's batch to pooled features of size ``out_dim``.

Every encoder exposes ``out_dim`` so that heads read the feature size instead of assuming it.
ResNet18s are torchvision's architecture built from scratch (no weights are downloaded).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from benchmark.data.base import ModalitySpec
from benchmark.errors import UsageError
from benchmark.models.layout import channels_last, nhwc
from benchmark.registry import ENCODERS, register_encoder


class MLPEncoder(nn.Module):
    """Two hidden layers with BatchNorm and ReLU, for vector modalities."""

    def __init__(self, spec: ModalitySpec, hidden: int = 128) -> None:
        super().__init__()
        in_dim = math.prod(spec.shape)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Inputs larger than this many pixels (a spectrogram, say) start with a stride-2 convolution.
SMALL_CNN_STRIDE_ABOVE = 32 * 32


class _MeanOverPixels(torch.autograd.Function):
    """``adaptive_avg_pool2d(x, 1)`` (which the library computes as a mean over H and W) whose
    backward is a broadcast view of ``g / (H·W)``. The library's backward expands ``g`` and then
    divides: the same values (a test pins them to the bit), but written out in full in a layout
    that the ReLU backward before it must read across. On the CPU, a SmallCNN's last ReLU and
    pooling backward took 7 ms a batch of 64 on 128×5×13 features, and 1.8 ms so."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        return nn.functional.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.input_shape
        return (grad / (h * w)).expand(n, c, h, w)


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` (same output, same gradient); on the CPU in float32 its backward
    is :class:`_MeanOverPixels`'s."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
            return _MeanOverPixels.apply(x)
        return super().forward(x)


class SmallCNN(nn.Module):
    """Three conv blocks and global average pooling, for small images (C×H×W, e.g. 8×8 digits)
    and small spectrograms (the first convolution has stride 2 above 32×32 pixels)."""

    def __init__(self, spec: ModalitySpec, width: int = 32) -> None:
        super().__init__()
        channels = spec.shape[0] if len(spec.shape) == 3 else 1
        first_stride = 2 if math.prod(spec.shape[-2:]) > SMALL_CNN_STRIDE_ABOVE else 1
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=first_stride if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
            ]
            # Max-pooling before the ReLU: both are monotone, so max(relu(x)) = relu(max(x)) and the
            # gradients match to the bit (the pooling's winner gets the gradient when it is positive,
            # nothing when it is not); the ReLU and its backward then touch a quarter of the values.
            if i < 2:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        layers += [GlobalAvgPool(), nn.Flatten()]
        self.net = channels_last(nn.Sequential(*layers))
        self.out_dim = 4 * width
        self._two_d = len(spec.shape) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._two_d:
            x = x.unsqueeze(1)
        return self.net(nhwc(x))


class CGMNISTConvNet(nn.Module):
    """Four conv blocks (3×3 convolution, BatchNorm, ReLU; stride 2 from the second) and global
    average pooling: the "4-conv + average-pool" encoder the UDI paper uses on CG-MNIST (after PMR).
    The papers give no widths: 32, 64, 128, 128 here."""

    def __init__(self, spec: ModalitySpec, widths: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        c_in = spec.shape[0] if len(spec.shape) == 3 else 1
        layers: list[nn.Module] = []
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [GlobalAvgPool(), nn.Flatten()]
        self.net = channels_last(nn.Sequential(*layers))
        self.out_dim = widths[-1]
        self._two_d = len(spec.shape) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._two_d:
            x = x.unsqueeze(1)
        return self.net(nhwc(x))


def _resnet18_trunk(in_channels: int) -> nn.Module:
    # imported here: torchvision costs every process that imports the encoders a second or more
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def load_resnet_weights(net: nn.Module, path: str) -> None:
    """Load a torchvision ResNet18 ``state_dict`` (its ``fc`` entries ignored) from a local file."""
    fix = "give a torchvision resnet18 state_dict saved with torch.save, or leave the weights option empty"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a missing, unreadable or non-PyTorch file, or one that holds more than tensors
        raise UsageError(f"cannot load ResNet18 weights from {path} (torch.load(weights_only=True) cannot "
                         f"read it); {fix}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"cannot load ResNet18 weights from {path} (it holds no state_dict); {fix}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing or unexpected keys, other shapes
        reason = " ".join(str(exc).split())[:160]
        raise UsageError(f"cannot load ResNet18 weights from {path} ({reason}); {fix}") from None


class ResNet18Audio(nn.Module):
    """ResNet18 on a spectrogram (C×F×T, C = 1 for the usual log-magnitude input)."""

    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()
        in_channels = spec.shape[0] if len(spec.shape) == 3 else 1
        self.net = channels_last(_resnet18_trunk(in_channels))
        self.out_dim = 512
        self._two_d = len(spec.shape) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._two_d:
            x = x.unsqueeze(1)
        return self.net(nhwc(x))


class ResNet18Visual(nn.Module):
    """ResNet18 on T frames (T×C×H×W): frames are folded into the batch, features averaged over T."""

    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()
        if len(spec.shape) not in (3, 4):
            raise UsageError(f"resnet18_visual needs frames T×C×H×W or an image C×H×W, got {spec.shape}")
        in_channels = spec.shape[-3]
        self.net = _resnet18_trunk(in_channels)
        if getattr(spec, "weights", ""):  # a dataset that names local pretrained weights (WeightsSpec)
            load_resnet_weights(self.net, spec.weights)
        channels_last(self.net)
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a single image per sample
            return self.net(nhwc(x))
        b, t = x.shape[:2]
        feats = self.net(nhwc(x.flatten(0, 1)))
        return feats.view(b, t, -1).mean(dim=1)


register_encoder("mlp")(MLPEncoder)
register_encoder("small_cnn")(SmallCNN)
register_encoder("cgmnist_cnn")(CGMNISTConvNet)
register_encoder("resnet18_audio")(ResNet18Audio)
register_encoder("resnet18_visual")(ResNet18Visual)


# Per-sample input ranks each convolutional encoder accepts (mlp flattens anything).
INPUT_RANKS = {"small_cnn": (2, 3), "resnet18_audio": (2, 3), "resnet18_visual": (3, 4)}


def encoder_factory(name: str) -> Any:
    """The factory of encoder ``name``: a registered name, or ``timm:<model>`` / ``tv:<model>``
    (benchmark.models.pretrained). UsageError for an unknown one."""
    if ":" in name:
        from benchmark.models.pretrained import backbone_factory

        return backbone_factory(name)
    return ENCODERS.get(name)


def input_ranks(name: str) -> tuple[int, ...] | None:
    if ":" in name:
        from benchmark.models.pretrained import INPUT_RANKS as BACKBONE_RANKS

        return BACKBONE_RANKS
    return INPUT_RANKS.get(name)


def check_encoder(name: str, spec: ModalitySpec) -> None:
    """Refuse an encoder that cannot read the modality's samples (small_cnn on vectors, say)."""
    ranks = input_ranks(name)
    if ranks is not None and len(spec.shape) not in ranks:
        raise UsageError(f"encoder {name} cannot read modality {spec.name!r} ({spec.kind} of shape "
                         f"{tuple(spec.shape)}; it needs {' or '.join(f'{r}-D' for r in ranks)} samples); "
                         f"choose another with --set encoder.{spec.name}=<name>, e.g. mlp")


def create_encoder(name: str, spec: ModalitySpec, weights: str = "") -> nn.Module:
    """Encoder ``name`` for modality ``spec``; ``weights``: its local pretrained weights (a file, or
    a folder for ``hf``), for the encoders that take them."""
    check_encoder(name, spec)
    factory = encoder_factory(name)
    if weights:
        if not getattr(factory, "takes_weights", False):
            raise UsageError(f"encoder {name} of modality {spec.name!r} takes no encoder_weights; use a "
                             f"timm:<model>, tv:<model> or hf encoder, or leave encoder_weights.{spec.name} empty")
        encoder = factory(spec, weights=weights)
    else:
        encoder = factory(spec)
    if not isinstance(getattr(encoder, "out_dim", None), int):
        raise TypeError(f"encoder {name} does not expose an integer out_dim")
    return encoder
