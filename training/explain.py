"""Class activation maps computed inside the exported graph, so that serving explains without torch or a backward pass.

For a classifier whose last layers after a spatial feature map F are piecewise linear (global average pooling,
flatten, linear layers, ReLU, batch norm at inference, dropout), the gradient of each class logit with respect to F
is a product of weight matrices and ReLU masks, known after the forward pass. :class:`Explained` computes it in
closed form in the forward pass and outputs, beside the probabilities, one map per class::

    cam_k(i, j) = ReLU( sum_c dlogit_k/dF_c(i, j) * F_c(i, j) ), bilinearly upsampled to the input size

For a global-average-pooled linear head this is CAM (Zhou et al. 2016); for a pooled head with hidden layers it is
Grad-CAM (Selvaraju et al. 2017), whose weights are exactly these gradients; for a flattening head (no pooling) it is
gradient x activation at F; for a network that is all dense layers (the MNIST code classifier) F is the input itself
and the map is gradient x input.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as functional
from torch import nn

from contract.card import ExplanationInfo, InputSpec
from training.architectures.cnn import GaussianDropout
from training.ensemble import Ensemble, Resized, resize
from training.export import WithSoftmax
from training.mirror import MirrorAveraged

log = logging.getLogger("training")

EXPLANATION_OUTPUT = "cam"
FAITHFUL_ATOL = 1e-5  # the wrapper must give the model's own probabilities
_IDENTITY_AT_INFERENCE = (nn.Dropout, nn.Identity, GaussianDropout)
_DENSE = (nn.Linear, nn.ReLU, nn.BatchNorm1d, *_IDENTITY_AT_INFERENCE)
DESCRIPTION = (
    "One map per class: for each position of the feature map F named in `layer`, the sum over channels of "
    "d logit / d F times F (negative evidence clipped to 0), bilinearly upsampled to the input size. The layers "
    "after F are piecewise linear, so the gradient is computed in closed form inside the ONNX graph. For a "
    "global-average-pooled head this is CAM / Grad-CAM; for a flattening head, gradient x activation; on the "
    "input pixels, gradient x input. Serving scales each map to [0, 1] by its maximum."
)


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules `module` applies in order: nested nn.Sequential and modules declaring `layers()` are unrolled."""
    if type(module) is nn.Sequential:
        return [leaf for child in module for leaf in _leaves(child)]
    layers = getattr(module, "layers", None)
    if callable(layers):
        return [leaf for child in layers() for leaf in _leaves(child)]
    return [module]


def _is_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def _is_flatten(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _is_dense(module: nn.Module) -> bool:
    if isinstance(module, nn.BatchNorm1d):
        return module.running_var is not None and module.weight is not None
    return isinstance(module, _DENSE)


def _split(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]] | None:
    """The layers up to the last spatial map, and the head after it: [global average pool], flatten, dense layers.

    None when the model does not end in such a head.
    """
    leaves = _leaves(model)
    for start in range(len(leaves)):
        head = leaves[start:]
        flat = head[1:] if _is_pool(head[0]) else head
        if flat and _is_flatten(flat[0]) and all(map(_is_dense, flat[1:])):
            return leaves[:start], head
    return None


class Explained(nn.Module):
    """The classifier's probabilities and its class activation maps [N, classes, H, W], in one forward pass."""

    def __init__(self, features: list[nn.Module], head: list[nn.Module], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*features)
        self.head = nn.ModuleList(head)
        self.register_buffer("eye", torch.eye(num_classes), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.features(x)
        z, steps = feature_map, []
        for layer in self.head:  # forward, remembering each layer's local linear map
            if isinstance(layer, nn.AdaptiveAvgPool2d):
                steps.append(("scale", 1.0 / (z.shape[-2] * z.shape[-1])))
                z = layer(z)
            elif isinstance(layer, nn.Flatten):
                steps.append(("reshape", z.shape[1:]))
                z = layer(z)
            elif isinstance(layer, nn.Linear):
                steps.append(("matrix", layer.weight))
                z = layer(z)
            elif isinstance(layer, nn.ReLU):
                mask = (z > 0).to(z.dtype)
                steps.append(("scale", mask.unsqueeze(1)))
                z = z * mask
            elif isinstance(layer, nn.BatchNorm1d):
                steps.append(("scale", layer.weight / torch.sqrt(layer.running_var + layer.eps)))
                z = layer(z)
        gradient = self.eye  # d logits / d logits, then back through the head: [(N,) classes, *F.shape[1:]]
        for kind, value in reversed(steps):
            if kind == "matrix":
                gradient = gradient @ value
            elif kind == "scale":
                gradient = gradient * value
            else:
                gradient = gradient.reshape(*gradient.shape[:-1], *value)
        cam = torch.relu((gradient * feature_map.unsqueeze(1)).sum(dim=2))
        cam = functional.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return z.softmax(dim=1), cam


class MirrorExplained(nn.Module):
    """:class:`Explained` for a :class:`~training.mirror.MirrorAveraged` model: both views' probabilities and maps
    averaged, the mirror view's map flipped back onto the image."""

    def __init__(self, explained: Explained) -> None:
        super().__init__()
        self.explained = explained

    @property
    def features(self) -> nn.Sequential:
        return self.explained.features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities, cam = self.explained(x)
        mirror_probabilities, mirror_cam = self.explained(x.flip(-1))
        return (probabilities + mirror_probabilities) / 2, (cam + mirror_cam.flip(-1)) / 2


class EnsembleExplained(nn.Module):
    """:class:`Explained` for an :class:`~training.ensemble.Ensemble`: the members' probabilities and maps averaged."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def features(self) -> nn.Sequential:
        return self.members[0].features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities, cams = zip(*(member(x) for member in self.members), strict=True)
        return torch.stack(probabilities).mean(dim=0), torch.stack(cams).mean(dim=0)


class ResizedExplained(nn.Module):
    """:class:`Explained` for a :class:`~training.ensemble.Resized` member: its maps resized back to the input."""

    def __init__(self, explained: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.explained, self.height, self.width = explained, height, width

    @property
    def features(self) -> nn.Sequential:
        return self.explained.features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities, cam = self.explained(resize(x, self.height, self.width))
        return probabilities, resize(cam, *x.shape[-2:])


def explainable(model: nn.Module, num_classes: int) -> nn.Module | None:
    """`model` with a class-activation-map output, or None when its head is not piecewise linear after a spatial map.

    The result is an :class:`Explained`, or a wrapper of them (:class:`MirrorExplained`, :class:`EnsembleExplained`,
    :class:`ResizedExplained`).
    """
    if isinstance(model, MirrorAveraged):
        inner = explainable(model.model, num_classes)
        return MirrorExplained(inner).eval() if inner is not None else None
    if isinstance(model, Ensemble):
        members = [explainable(member, num_classes) for member in model.members]
        return EnsembleExplained(members).eval() if all(m is not None for m in members) else None
    if isinstance(model, Resized):
        inner = explainable(model.model, num_classes)
        return ResizedExplained(inner, model.height, model.width).eval() if inner is not None else None
    parts = _split(model)
    return Explained(*parts, num_classes).eval() if parts is not None else None


def check_faithful(explained: nn.Module, model: nn.Module, inputs: torch.Tensor) -> None:
    """The wrapper re-runs the model layer by layer: it must give the model's own probabilities."""
    with torch.no_grad():
        expected = model.eval()(inputs).softmax(dim=1)
        actual, cam = explained.eval()(inputs)
    worst = float((actual - expected).abs().max())
    if worst > FAITHFUL_ATOL or cam.shape[-2:] != inputs.shape[-2:]:
        raise ValueError(f"the explained model does not reproduce the model's probabilities (|diff| {worst:.1e})")


def explanation_info(explained: nn.Module, spec: InputSpec, parity: float) -> ExplanationInfo:
    with torch.no_grad():
        cells = explained.features(torch.zeros(1, spec.channels, spec.height, spec.width)).shape[-2:]
    where = "the input pixels" if len(explained.features) == 0 else "the last spatial feature map"
    means = []
    while not isinstance(explained, Explained):
        if isinstance(explained, MirrorExplained):
            means.append("of the image's map and its mirror image's map, flipped back")
            explained = explained.explained
        elif isinstance(explained, ResizedExplained):
            explained = explained.explained
        else:
            means.append(f"over the {len(explained.members)} ensemble members")
            explained = explained.members[0]
    if means:
        where += f" (mean {', and '.join(means)})"
    return ExplanationInfo(
        output=EXPLANATION_OUTPUT,
        method="cam",
        layer=f"{where}, {cells[0]}x{cells[1]} cells, upsampled to {spec.height}x{spec.width}",
        description=DESCRIPTION,
        parity_max_rel_diff=parity,
    )


def classifier_graph(model: nn.Module, num_classes: int, inputs: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """What a classifier exports: probabilities and class activation maps when its head allows, else probabilities."""
    explained = explainable(model, num_classes)
    if explained is None:
        log.warning("%s has no piecewise-linear head after a spatial map: exported without explanations",
                    type(model).__name__)  # fmt: skip
        return WithSoftmax(model), ["probabilities"]
    check_faithful(explained, model, inputs)
    return explained, ["probabilities", EXPLANATION_OUTPUT]
