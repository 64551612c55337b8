"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune").

Every `frequency` steps between `start_step` and `end_step`, each pruned layer keeps its largest-|w| weights so
that its sparsity follows s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3), reaching the target s_f at t1; after
t1 the masks stay fixed while the remaining weights fine-tune. Sparsity is uniform per layer, so every
layer ends exactly at the target (up to rounding to whole weights). Masks are `gates.MaskGate`s: the forward
pass sees W · mask, so pruned weights are exactly zero in every step and in the baked export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.pruning.base import Pruner
from compress.pruning.gates import MaskGate, attach_gates, bake, gate, select_convs, zero_fraction


@dataclass(frozen=True)
class MagnitudeConfig:
    target: float
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 10
    layers: str = "all"  # a compress.pruning.gates.select_convs spec

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"MagnitudeConfig.target must be in (0, 1), got {self.target}")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"MagnitudeConfig.frequency must be >= 1, got {self.frequency}")


class GradualMagnitudePruner(Pruner):
    name = "magnitude"

    def __init__(self, model: nn.Module, config: MagnitudeConfig) -> None:
        self.config = config
        self.layers = select_convs(model, config.layers)
        attach_gates(self.layers, MaskGate)
        self.current = 0.0

    def sparsity_at(self, step: int) -> float:
        c = self.config
        if step <= c.start_step:
            return 0.0
        if step >= c.end_step:
            return c.target
        progress = (step - c.start_step) / (c.end_step - c.start_step)
        return c.target * (1.0 - (1.0 - progress) ** 3)

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        """Keep each layer's largest |W'|: weights pruned earlier have W' = 0 and stay pruned."""
        for conv in self.layers.values():
            w = conv.weight.detach().abs().flatten()
            keep = w.numel() - round(sparsity * w.numel())
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[torch.topk(w, keep, sorted=False).indices] = True
            gate(conv).mask.copy_(mask.view_as(conv.weight))
        self.current = sparsity

    def step(self, step: int, lr: float = 0.0) -> None:
        c = self.config
        due = step >= c.end_step or (step - c.start_step) % c.frequency == 0
        if step > c.start_step and self.current < c.target and due:
            self._update_masks(self.sparsity_at(step))

    def finalize(self) -> dict[str, Any]:
        if self.current < self.config.target:
            self._update_masks(self.config.target)
        achieved = zero_fraction(self.layers.values())
        bake(self.layers)
        c = self.config
        return {
            "method": self.name,
            "target_sparsity": c.target,
            "schedule": {"start_step": c.start_step, "end_step": c.end_step, "frequency": c.frequency},
            "achieved_sparsity_pruned_layers": round(achieved, 6),
            "pruned_layers": list(self.layers),
        }

    def status(self) -> dict[str, str]:
        return {"sparsity": f"{100 * self.current:.1f}%"}

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}  # the masks are buffers of the model's gates

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])
