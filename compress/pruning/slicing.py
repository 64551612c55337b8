"""Physical channel slicing: turn group keep-masks into a compact dense network.

Why: masks only zero channels; speed and size on a device come from layers that are actually narrower. The sliced
network computes exactly what the masked network (`coupling.apply_group_masks`) computes: a removed channel is zero
in every producer of its group (filters, bias, a BatchNorm's scale and shift) and ignored by every consumer, so
dropping it changes nothing else. Exact up to float summation order.

Every layer keeps its class and module name; only its tensors and shape attributes change (conv-like layers along
their out/in channel dims, a depthwise conv's groups with its channels, BatchNorm and per-channel PReLU along their
channels). A checkpoint records the new shapes (`compress.models.shapes.record_shapes`), so the compact network
rebuilds from the same recipe as the original: an edgesr preset or a user's factory.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from compress.models.shapes import resize_tensor
from compress.pruning.coupling import ChannelGroup, group_masks_to_layer_masks
from compress.pruning.layers import groups_of, is_depthwise, weight_dims

log = logging.getLogger(__name__)


@torch.no_grad()
def _keep_along(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(module, name)
    new = old.detach().index_select(dim, keep.nonzero().flatten().to(old.device)).clone()
    resize_tensor(module, name, new.shape)
    getattr(module, name).copy_(new)


def weight_slice(t: torch.Tensor, layer: nn.Module, out_keep: torch.Tensor, in_keep: torch.Tensor) -> torch.Tensor:
    """A tensor of `layer`'s weight shape, cut to the kept channels as `slice_model` cuts the weight."""
    out_dim, in_dim = weight_dims(layer)
    t = t.index_select(out_dim, out_keep.nonzero().flatten().to(t.device))
    if groups_of(layer) == 1:
        t = t.index_select(in_dim, in_keep.nonzero().flatten().to(t.device))
    return t


def _slice_layer(layer: nn.Module, out_keep: torch.Tensor, in_keep: torch.Tensor) -> None:
    out_dim, in_dim = weight_dims(layer)
    depthwise = is_depthwise(layer)
    _keep_along(layer, "weight", out_dim, out_keep)
    if groups_of(layer) == 1:
        _keep_along(layer, "weight", in_dim, in_keep)
    elif not depthwise and not (out_keep.all() and in_keep.all()):
        raise ValueError(f"cannot slice grouped {type(layer).__name__} (groups={groups_of(layer)})")
    if layer.bias is not None:
        _keep_along(layer, "bias", 0, out_keep)
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = int(out_keep.sum()), int(in_keep.sum())
        return
    layer.out_channels, layer.in_channels = int(out_keep.sum()), int(in_keep.sum())
    if depthwise:
        layer.groups = layer.in_channels


def _slice_channels(module: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            _keep_along(module, name, 0, keep)
    n = int(keep.sum())
    if isinstance(module, nn.BatchNorm2d):
        module.num_features = n
    else:
        module.num_parameters = n


def slice_model(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> nn.Module:
    """A copy of `model` without the channels that `keep` (group id -> bool mask) drops; `model` is unchanged."""
    masks = group_masks_to_layer_masks(model, groups, keep)
    sliced = copy.deepcopy(model)
    changed = 0
    for name, m in masks.items():
        if all(bool(v.all()) for v in m.values()):
            continue
        module = sliced.get_submodule(name)
        if "chan" in m:
            _slice_channels(module, m["chan"])
        else:
            _slice_layer(module, m["out"], m["in"])
        changed += 1
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in sliced.parameters())
    log.info("sliced %d layers: %d -> %d parameters", changed, before, after)
    return sliced
