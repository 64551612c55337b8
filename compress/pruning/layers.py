"""Which modules are conv-like, and where their channels sit: the one answer every method, stat and count uses.

A conv-like layer holds a weight that multiplies activations: `nn.Conv2d` (plain, grouped, depthwise),
`nn.ConvTranspose2d` (its weight is [in, out / groups, kh, kw], the other way round from Conv2d) and `nn.Linear`.
Pruners gate their weights, `model_stats` counts their parameters and MACs, coupling and slicing follow their
channels. A module of any other type that owns a parameter of two or more dimensions (a custom layer calling
`F.conv2d` with its own kernel, say) is something edgesr cannot prune or count truthfully, so `check_known_layers`
refuses it by name instead of leaving it out.
"""

from __future__ import annotations

import torch
from torch import nn

from edgesr.errors import BadInput

CONV_LIKE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
ConvLike = nn.Conv2d | nn.ConvTranspose2d | nn.Linear


def is_conv_like(module: nn.Module) -> bool:
    return isinstance(module, CONV_LIKE)


def conv_like_layers(model: nn.Module) -> dict[str, ConvLike]:
    """Every conv-like layer, by module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CONV_LIKE)}


def prunable_layers(model: nn.Module) -> dict[str, ConvLike]:
    """Conv-like layers whose weights train (EDSR's fixed MeanShift convs are left out)."""
    return {n: m for n, m in conv_like_layers(model).items() if m.weight.requires_grad}


def weight_dims(layer: ConvLike) -> tuple[int, int]:
    """(output-channel dim, input-channel dim) of the weight tensor."""
    return (1, 0) if isinstance(layer, nn.ConvTranspose2d) else (0, 1)


def out_channels(layer: ConvLike) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: ConvLike) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def groups_of(layer: ConvLike) -> int:
    return 1 if isinstance(layer, nn.Linear) else int(layer.groups)


def is_depthwise(layer: ConvLike) -> bool:
    """A conv with one input channel per group (groups == in_channels > 1): each output reads one input channel."""
    g = groups_of(layer)
    return g > 1 and g == in_channels(layer) and out_channels(layer) % g == 0


def check_known_layers(model: nn.Module, origin: str = "model") -> None:
    """BadInput naming the first module that owns a >= 2-D parameter without being a conv-like layer edgesr knows."""
    for name, module in model.named_modules():
        if isinstance(module, CONV_LIKE) or ".parametrizations." in f".{name}.":
            continue  # gates and hypernetworks hold their own tensors
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2:
                raise BadInput(
                    f"{origin}: module '{name}' ({type(module).__name__}) owns a {p.dim()}-D parameter '{pname}' "
                    f"{tuple(p.shape)} that edgesr cannot prune or count; use nn.Conv2d, nn.ConvTranspose2d or "
                    "nn.Linear for layers with weights"
                )


def probe_input(model: nn.Module, size: int = 16) -> torch.Tensor:
    """A (1, colors, size, size) probe on the model's device (colors: the config's n_colors, else RGB)."""
    colors = getattr(getattr(model, "config", None), "n_colors", 3)
    param = next(model.parameters(), None)
    return torch.rand(1, colors, size, size, device=param.device if param is not None else "cpu")
