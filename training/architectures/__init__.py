"""A timm-style model registry: architectures register themselves by name, tasks and the CLI create them by name.

Every builder takes ``in_chans``, ``num_classes``, ``image_size`` and ``pretrained`` plus its own keyword options
(``depth``, ``width``, ``dropout``, ``init``, ...), and returns a module mapping float32 NCHW input to logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    _REGISTRY[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_options(name: str) -> list[str]:
    """The keyword options an architecture accepts beyond the common ones."""
    common = {"in_chans", "num_classes", "image_size", "pretrained"}
    return [p for p in inspect.signature(_REGISTRY[name]).parameters if p not in common]


def create_model(
    name: str, *, in_chans: int, num_classes: int, image_size: int, pretrained: bool = False, **options
) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(list_models())}")
    unknown = set(options) - set(model_options(name))
    if unknown:
        raise ValueError(f"architecture {name!r} has no option(s) {sorted(unknown)}; it takes {model_options(name)}")
    return _REGISTRY[name](
        in_chans=in_chans, num_classes=num_classes, image_size=image_size, pretrained=pretrained, **options
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the modules registers their architectures.
from training.architectures import autoencoder, cnn, transfer  # noqa: E402, F401
