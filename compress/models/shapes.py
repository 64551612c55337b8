"""Per-module shapes: how a channel-pruned network of any architecture is rebuilt from its recipe.

A pruned network has the modules of its architecture at other widths. Its checkpoint therefore records, for every
module that owns tensors, the shape attributes (in/out channels, groups, features) and the shape of each tensor it
owns; `apply_shapes` resizes a freshly built model to them, and the state dict then loads strictly. This is how
timm rebuilds its pruned models (`adapt_model_from_file`), and it needs no per-architecture code: an edgesr preset
and a user's factory model are rebuilt the same way. Tensors are replaced by zeros of the recorded shape and filled
by the state dict, so nothing is constructed through a module's own `__init__` (custom subclasses work too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgesr.errors import BadInput

SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_parameters")


def record_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {"type", "attrs": {shape attribute: value}, "tensors": {tensor name: shape}}} for every module
    that owns parameters or buffers directly."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        tensors = {n: list(t.shape) for n, t in _own_tensors(module)}
        if tensors:
            attrs = {a: int(getattr(module, a)) for a in SHAPE_ATTRS if isinstance(getattr(module, a, None), int)}
            shapes[name] = {"type": type(module).__name__, "attrs": attrs, "tensors": tensors}
    return shapes


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [(n, t) for n, t in own if t is not None]


@torch.no_grad()
def resize_tensor(module: nn.Module, name: str, shape: list[int] | tuple[int, ...]) -> None:
    """Replace one of `module`'s own parameters or buffers by zeros of `shape` (same dtype, device, grad flag)."""
    old = getattr(module, name)
    new = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]], origin: str = "checkpoint") -> None:
    """Resize `model`'s modules to recorded `shapes` (from `record_shapes`); BadInput if they do not fit."""
    modules = dict(model.named_modules())
    for name, entry in shapes.items():
        module = modules.get(name)
        if module is None:
            raise BadInput(f"{origin}: recorded shapes name module '{name}', which the rebuilt model does not have")
        if type(module).__name__ != entry.get("type"):
            raise BadInput(
                f"{origin}: module '{name}' is a {type(module).__name__} in the rebuilt model, "
                f"the checkpoint recorded a {entry.get('type')}"
            )
        own = dict(_own_tensors(module))
        unknown = sorted(set(entry.get("tensors", {})) - set(own))
        if unknown:
            raise BadInput(f"{origin}: module '{name}' has no tensor '{unknown[0]}' in the rebuilt model")
        for attr, value in entry.get("attrs", {}).items():
            if attr not in SHAPE_ATTRS or not hasattr(module, attr):
                raise BadInput(f"{origin}: module '{name}' has no shape attribute '{attr}'")
            setattr(module, attr, int(value))
        for tname, shape in entry.get("tensors", {}).items():
            if list(own[tname].shape) != list(shape):
                resize_tensor(module, tname, shape)
