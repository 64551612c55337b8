"""Per-conv width overrides: how a channel-pruned (sliced) network is rebuilt from its architecture config.

Every architecture config carries `conv_channels`, a tuple of (module name, out_channels, in_channels), empty for
an unpruned model. The model builds at full width, then `apply_conv_channels` swaps each named conv for one of
the recorded widths, so `build_from_spec(model_spec(sliced))` gives the compact net and its state dict loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn


def normalize_conv_channels(entries: Iterable[Sequence[Any]]) -> tuple[tuple[str, int, int], ...]:
    """Width overrides as a hashable tuple; JSON manifests give lists of lists, which are accepted too."""
    out = []
    for entry in entries:
        if len(entry) != 3 or int(entry[1]) < 1 or int(entry[2]) < 1:
            raise ValueError(f"conv_channels entries are (name, out_channels >= 1, in_channels >= 1), got {entry!r}")
        out.append((str(entry[0]), int(entry[1]), int(entry[2])))
    return tuple(out)


def apply_conv_channels(model: nn.Module, conv_channels: tuple[tuple[str, int, int], ...]) -> None:
    """Replace each named Conv2d by a fresh one with the given widths (kernel, stride, padding, bias kept)."""
    for name, c_out, c_in in conv_channels:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Conv2d) or old.groups != 1 or not old.weight.requires_grad:
            raise ValueError(f"conv_channels names '{name}', which is not a trainable ungrouped Conv2d of this model")
        new = nn.Conv2d(
            c_in,
            c_out,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            1,
            old.bias is not None,
            old.padding_mode,
        )
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
