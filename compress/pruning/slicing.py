"""Physical channel slicing: turn group keep-masks into a compact dense network that rebuilds from its spec.

Why: masks only zero channels; speed and size on a device come from convs that are actually narrower. The
sliced network computes exactly what the masked network (`coupling.apply_group_masks`) computes: a removed
channel is zero in every producer of its group (weights and bias) and ignored by every consumer (zero input
columns), so dropping it changes nothing else. Exact up to float summation order.

The new widths are written into the architecture config's `conv_channels` overrides (module name, out, in), so
`build_from_spec(model_spec(sliced))` rebuilds the compact architecture and its state dict loads strictly;
checkpoints therefore round-trip sliced models with no change to `compress.checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from compress.pruning.coupling import ChannelGroup, group_masks_to_layer_masks

log = logging.getLogger(__name__)


def _sliced_conv(conv: nn.Conv2d, out_keep: torch.Tensor, in_keep: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(
        int(in_keep.sum()),
        int(out_keep.sum()),
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        1,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[out_keep][:, in_keep])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[out_keep])
    new.requires_grad_(conv.weight.requires_grad)
    return new


def slice_model(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> nn.Module:
    """A copy of `model` without the channels that `keep` (group id -> bool mask) drops; `model` is unchanged."""
    masks = group_masks_to_layer_masks(model, groups, keep)
    sliced = copy.deepcopy(model)
    changed: dict[str, tuple[int, int]] = {}
    for name, (out_keep, in_keep) in masks.items():
        if out_keep.all() and in_keep.all():
            continue
        conv = sliced.get_submodule(name)
        if conv.groups != 1:
            raise ValueError(f"cannot slice grouped conv '{name}' (groups={conv.groups})")
        parent, _, attr = name.rpartition(".")
        setattr(sliced.get_submodule(parent), attr, _sliced_conv(conv, out_keep, in_keep))
        changed[name] = (int(out_keep.sum()), int(in_keep.sum()))
    config = getattr(sliced, "config", None)
    if dataclasses.is_dataclass(config) and any(f.name == "conv_channels" for f in dataclasses.fields(config)):
        widths = {name: (c_out, c_in) for name, c_out, c_in in config.conv_channels}
        widths.update(changed)
        overrides = tuple((name, c_out, c_in) for name, (c_out, c_in) in widths.items())
        sliced.config = dataclasses.replace(config, conv_channels=overrides)
    elif changed:
        log.warning(
            "%s has no conv_channels config: the sliced model cannot be rebuilt from a spec", type(model).__name__
        )
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in sliced.parameters())
    log.info("sliced %d convs: %d -> %d parameters", len(changed), before, after)
    return sliced
