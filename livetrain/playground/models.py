"""The CNNs the trainer can train, and the helpers it needs around them.

No database knowledge here: train.py builds a model by name, changes its dropout while it
trains, and hooks the layers from monitored_layers() to record their activations.

Every model has a `classifier` (or, for ResNet, an `fc`) holding at least one nn.Dropout, so
the board's dropout control always has something to act on. ReLUs are never in-place, so a
forward hook may keep a layer's output without it being overwritten by the next ReLU.

torchvision is imported by the builders that use it, not here: importing it takes 1.2 s
(it loads torch._dynamo), as long as torch itself, and most runs never need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from livetrain.trainer.layers import monitored_layers, set_dropout

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = [
    "INIT_SCHEMES", "MODEL_NAMES", "ConvNet", "ModelUnavailable", "build_model", "initialize",
    "monitored_layers", "set_dropout",
]

MODEL_NAMES = ("smallcnn", "tinycnn", "alexnet", "vgg16", "resnet18")
SMALL_IMAGE = 64  # below this side length the small-image variants are used
# VGG16's conv widths, "M" marking a 2x2 max-pool.
VGG16_WIDTHS = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, "M"),
    *(512, 512, 512, "M"),
    *(512, 512, 512, "M"),
)


class ModelUnavailable(RuntimeError):  # noqa: N818 - the name train.py expects
    """The pretrained model asked for cannot be had; the message says why, or how to get it."""


class ConvNet(nn.Module):
    """features -> pool -> flatten -> classifier, the layout of AlexNet and VGG."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def small_cnn(num_classes: int, in_channels: int, dropout: float) -> ConvNet:
    """The default: tens of milliseconds a training step on 2 CPU cores, so the board moves live.

    Features are pooled to MNIST's 7x7 grid (the identity at 28x28), so any image size fits.
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    )
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(128, num_classes),
    )
    return ConvNet(features, nn.AdaptiveAvgPool2d(7), classifier)


def tiny_cnn(num_classes: int, in_channels: int, dropout: float) -> ConvNet:
    """One conv layer and a small head: a millisecond or two a step, for smoke tests and
    runs of a hundred thousand steps (the memory benchmark)."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    )
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, num_classes),
    )
    return ConvNet(features, nn.AdaptiveAvgPool2d(4), classifier)


def small_alexnet(num_classes: int, in_channels: int, dropout: float) -> ConvNet:
    """AlexNet for 8..63 pixel images: a 3x3 stride-1 first conv and a 512-wide classifier."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(64, 192, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    )
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(256 * 2 * 2, 512),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )
    return ConvNet(features, nn.AdaptiveAvgPool2d(2), classifier)


def small_vgg16(num_classes: int, in_channels: int, dropout: float) -> ConvNet:
    """VGG16's 13 convs for 8..63 pixel images: ceil-mode pools and a 512-wide classifier."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in VGG16_WIDTHS:
        if width == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    classifier = nn.Sequential(
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(512, num_classes),
    )
    return ConvNet(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), classifier)


def load_pretrained(
    builder: Callable[..., nn.Module], weights: WeightsEnum, **kwargs: float
) -> nn.Module:
    """Build a torchvision model with its weights, turning a failed download into one message."""
    try:
        return builder(weights=weights, **kwargs)
    except (OSError, RuntimeError) as e:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise ModelUnavailable(
            f"Could not load the pretrained weights {weights} ({e}). They need network access "
            f"to download.pytorch.org once, or the file {cached} already in place."
        ) from e


def classic(
    name: str, num_classes: int, in_channels: int, dropout: float, pretrained: bool
) -> nn.Module:
    """torchvision's AlexNet or VGG16 with their ImageNet shapes, for images of 64 pixels and up."""
    from torchvision import models as tvm  # on use: see the module docstring

    builder, weights = {
        "alexnet": (tvm.alexnet, tvm.AlexNet_Weights.DEFAULT),
        "vgg16": (tvm.vgg16, tvm.VGG16_Weights.DEFAULT),
    }[name]
    if not pretrained:
        model = builder(num_classes=num_classes, dropout=dropout)
    else:
        model = load_pretrained(builder, weights, dropout=dropout)
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    if in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(
            in_channels, first.out_channels, first.kernel_size, first.stride, first.padding
        )
    return model


def resnet18(
    num_classes: int, in_channels: int, image_size: int, dropout: float, pretrained: bool
) -> nn.Module:
    """torchvision's ResNet-18 with a dropout head; small images get a 3x3 stride-1 stem.

    Pretrained weights keep the ImageNet stem they were trained with, whatever the image size.
    """
    from torchvision import models as tvm  # on use: see the module docstring

    if pretrained:
        model = load_pretrained(tvm.resnet18, tvm.ResNet18_Weights.DEFAULT)
    else:
        model = tvm.resnet18()
        if image_size < SMALL_IMAGE:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    dropout: float,
    pretrained: bool = False,
    transfer: bool = False,
) -> nn.Module:
    """Build a model by name for the dataset's shape.

    `transfer` implies `pretrained` and freezes everything except the new classification head.
    Pretrained weights exist only for ImageNet-like input: 3 channels, and for AlexNet/VGG16
    images of at least SMALL_IMAGE pixels; asking for them otherwise raises ModelUnavailable,
    as does a failed weights download. A bad name or dropout is a ValueError.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout}")
    pretrained = pretrained or transfer
    small = image_size < SMALL_IMAGE
    if pretrained:
        if name in ("smallcnn", "tinycnn"):
            raise ModelUnavailable(f"{name} has no pretrained weights; train it from scratch")
        if in_channels != 3:
            raise ModelUnavailable(f"pretrained {name} needs 3-channel images, got {in_channels}")
        if small and name != "resnet18":
            raise ModelUnavailable(
                f"pretrained {name} needs images of at least {SMALL_IMAGE} pixels, got {image_size}"
            )

    if name == "smallcnn":
        model = small_cnn(num_classes, in_channels, dropout)
    elif name == "tinycnn":
        model = tiny_cnn(num_classes, in_channels, dropout)
    elif name == "resnet18":
        model = resnet18(num_classes, in_channels, image_size, dropout, pretrained)
    elif small:
        model = {"alexnet": small_alexnet, "vgg16": small_vgg16}[name](
            num_classes, in_channels, dropout
        )
    else:
        model = classic(name, num_classes, in_channels, dropout, pretrained)

    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if transfer:
        head = model.fc if name == "resnet18" else model.classifier[-1]
        for param in model.parameters():
            param.requires_grad = False
        for param in head.parameters():
            param.requires_grad = True
    return model


INIT_SCHEMES = ("default", "kaiming", "xavier", "normal:STD")


def initialize(model: nn.Module, scheme: str) -> None:
    """Re-initialize every conv/linear weight (biases to zero); a playground knob.

    `normal:STD` draws from N(0, STD^2): a large STD is seed 003's exploding
    initial loss, a tiny one its vanishing activations.
    """
    if scheme == "default":
        return
    for module in model.modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif scheme.startswith("normal:"):
            nn.init.normal_(module.weight, 0.0, float(scheme.split(":", 1)[1]))
        else:
            raise ValueError(f"unknown init scheme {scheme!r}; one of {', '.join(INIT_SCHEMES)}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
