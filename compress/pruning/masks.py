"""Which conv layers a pruner touches, and per-weight masks on them.

Layer selection is decided here once, for every method: `prunable_convs` is every Conv2d with trainable
weights (EDSR's fixed MeanShift convs are excluded), and `select_convs` narrows that by a spec — `all`,
`default` (the architecture's usual sparse layers, e.g. EDSR's body convs, as the IKS reference code does) or
comma-separated glob patterns over module names (`body.*,tail.0.0`).

A mask pruner decides masks; `WeightMasks.apply()` enforces them after every optimiser step, so masked weights
stay exactly zero through fine-tuning and export.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from compress.models import default_sparse_layers


def prunable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Conv layers whose weights train, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}


def select_convs(model: nn.Module, spec: str = "all") -> dict[str, nn.Conv2d]:
    """Prunable convs chosen by `spec`: `all`, `default` or comma-separated globs; ValueError if none match."""
    convs = prunable_convs(model)
    if spec == "all":
        return convs
    patterns = default_sparse_layers(model) if spec == "default" else [p.strip() for p in spec.split(",") if p]
    chosen = {n: m for n, m in convs.items() if any(fnmatchcase(n, p) for p in patterns)}
    unused = [p for p in patterns if not any(fnmatchcase(n, p) for n in convs)]
    if unused or not chosen:
        raise ValueError(
            f"layer pattern(s) {', '.join(unused or patterns)} match no prunable conv; prunable: {', '.join(convs)}"
        )
    return chosen


class WeightMasks:
    def __init__(self, model: nn.Module, layers: str = "all") -> None:
        self.layers = select_convs(model, layers)
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
