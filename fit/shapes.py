"""Candidate shapes: a channel width per prunable coupling group, and the compact net of each.

A shape keeps the same fraction `keep` of every prunable group, rounded up to a multiple of `round_to` channels
(what a target's kernels may favour: XNNPACK packs 4/8/16 channels) and never below `min_channels`. Which channels
survive is decided by their normalised L1 score (`compress.pruning.methods.channel_l1`), so a shape's compact net is
the L1 cut of the given model at those widths: its latency, memory and file size are the shape's, its weights are
only a starting point for fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.pruning.budget import ChannelCost
from compress.pruning.coupling import ChannelGroup
from compress.pruning.methods.channel_l1 import l1_channel_scores
from compress.pruning.slicing import slice_model


@dataclass(frozen=True)
class Shape:
    """One candidate: kept channels per prunable group (group id -> count) and how it was derived."""

    kept: dict[int, int]
    keep: float  # the nominal keep fraction it was made from
    round_to: int
    params: int = 0
    macs: int = 0  # for a 1280x720 output
    fraction: float = 1.0  # kept channels / all prunable channels (the shape model's x)
    params_fraction: float = 1.0
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """What identifies the shape: its widths (two derivations of the same widths are one shape)."""
        text = json.dumps(sorted(self.kept.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def dense(self) -> bool:
        return all(self.kept[g] == self.sizes[g] for g in self.kept)

    def label(self) -> str:
        widths = sorted(set(self.kept.values()), reverse=True)
        return f"keep {self.fraction:.3f} (widths {'/'.join(map(str, widths[:4]))}{'/…' if len(widths) > 4 else ''})"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "keep": round(self.keep, 6),
            "round_to": self.round_to,
            "fraction": round(self.fraction, 6),
            "params": self.params,
            "params_fraction": round(self.params_fraction, 6),
            "macs": self.macs,
            "kept": {str(g): n for g, n in sorted(self.kept.items())},
        }


class ShapeSpace:
    """The shapes one model can take: its prunable groups, their L1 order and the accounting of each shape."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], scale: int, min_channels: int) -> None:
        self.model, self.groups, self.min_channels = model, groups, min_channels
        self.searched = [g.id for g in groups if g.prunable]
        if not self.searched:
            reasons = sorted({g.reason for g in groups if g.reason})
            raise ValueError(f"no channel group of this model can be pruned ({'; '.join(reasons)[:300]})")
        self.sizes = {g.id: g.size for g in groups if g.prunable}
        self.cost = ChannelCost(model, groups, self.searched, scale)
        self.scores = l1_channel_scores(model, groups)

    def shape(self, keep: float, round_to: int) -> Shape:
        kept = {}
        for g, size in self.sizes.items():
            n = math.ceil(keep * size / round_to - 1e-9) * round_to
            kept[g] = max(min(self.min_channels, size), min(size, n))
        params = self.cost.params(kept)
        return Shape(
            kept=kept,
            keep=keep,
            round_to=round_to,
            params=params,
            macs=self.cost.macs(kept),
            fraction=sum(kept.values()) / sum(self.sizes.values()),
            params_fraction=params / self.cost.original["params"],
            sizes=dict(self.sizes),
        )

    def grid(self, round_to: int, steps: int = 64) -> list[Shape]:
        """Every distinct shape of the family `round_to`, from the smallest to the dense net."""
        seen: dict[str, Shape] = {}
        for i in range(1, steps + 1):
            s = self.shape(i / steps, round_to)
            seen.setdefault(s.id, s)
        return sorted(seen.values(), key=lambda s: (s.fraction, s.params))

    def keep_masks(self, shape: Shape) -> dict[int, torch.Tensor]:
        """The channels each group keeps: its `kept` best by normalised L1 score (ties by channel index)."""
        masks = {}
        for g, n in shape.kept.items():
            order = torch.argsort(-self.scores[g], stable=True)[:n]
            mask = torch.zeros(self.sizes[g], dtype=torch.bool)
            mask[order] = True
            masks[g] = mask
        return masks

    def compact(self, shape: Shape) -> nn.Module:
        """The given model cut to `shape` (a copy; the model is unchanged)."""
        return slice_model(self.model, self.groups, self.keep_masks(shape))
