"""Per-weight masks on conv layers: the gate mechanism every pruner drives.

A pruner decides masks; `WeightMasks.apply()` enforces them after every optimiser step, so masked weights stay
exactly zero through fine-tuning and export. Which layers are prunable is decided here once: every Conv2d
with trainable weights (EDSR's fixed MeanShift convs are excluded).
"""

from __future__ import annotations

import torch
from torch import nn


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Conv layers whose weights train, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}


class WeightMasks:
    def __init__(self, model: nn.Module, layers: list[str] | None = None) -> None:
        convs = prunable_convs(model)
        unknown = sorted(set(layers or []) - set(convs))
        if unknown:
            raise ValueError(f"not prunable conv layers: {', '.join(unknown)}; prunable: {', '.join(convs)}")
        self.layers = {n: convs[n] for n in (layers or list(convs))}
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.layers.items()}

    @torch.no_grad()
    def apply(self) -> None:
        for name, conv in self.layers.items():
            conv.weight.mul_(self.masks[name].to(conv.weight.device))

    def sparsity(self) -> float:
        """Fraction of masked weights over all masked layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.masks):
            raise ValueError("mask layers in the saved state differ from this model's")
        self.masks = {n: state[n].bool() for n in self.masks}
