"""Architectures, chosen by name; the input shape and the class count come from the data."""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a version's network before loading its weights."""

    architecture: str
    in_channels: int
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Three 3x3 convolutions with BatchNorm and a two-layer head: fast on the CPU for 8x8 to
    32x32 images (about 80k parameters)."""

    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet18 for small images: a 3x3 stride-1 stem and no max-pool, so that
    8x8 to 32x32 inputs are not shrunk away before the residual stages."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model: nn.Module = torchvision_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "small-cnn": small_cnn,
    "resnet18": resnet18,
}


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """A freshly initialised network; with a seed, the same initial weights every time."""
    if spec.architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {spec.architecture!r}; known: {known}")
    if seed is not None:
        torch.manual_seed(seed)
    return ARCHITECTURES[spec.architecture](spec.in_channels, spec.num_classes)


def tracked_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point state_dict entries (parameters and BatchNorm statistics): what a step
    changes and what a delta records. Integer counters such as num_batches_tracked are left out."""
    return {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if tensor.is_floating_point()
    }
