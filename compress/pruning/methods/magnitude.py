"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune").

Every `frequency` steps during the first `prune_fraction` of the run, each pruned layer keeps its largest-|w|
weights so that its sparsity follows s_t = s_f * (1 - (1 - t / t1)^3), reaching the target s_f at t1; after t1 the
masks stay fixed while the remaining weights fine-tune. Sparsity is uniform per layer, so every layer ends exactly
at the target (up to rounding to whole weights). Masks are `gates.MaskGate`s: the forward pass sees W · mask, so
pruned weights are exactly zero in every step and in the baked export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.flags import option, require
from compress.pruning.base import Pruner, cubic_ramp
from compress.pruning.gates import MaskGate, attach_gates, bake, gate, select_layers, zero_fraction
from compress.train import TrainConfig, TrainData, train


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float | None = option(None, "target fraction of zero weights in the pruned layers, in (0, 1)")
    layers: str = option(
        "all", "which layers to prune: all, default (the architecture's sparse layers) or comma-separated globs"
    )
    prune_fraction: float = option(0.5, "share of the steps over which sparsity ramps up (cubic); the rest fine-tunes")
    frequency: int = option(0, "steps between mask updates during the ramp (0: the ramp's length / 20)")

    @property
    def removed(self) -> float:
        """The fraction of the pruned layers' weights the method removes (what sets the fine-tuning lr)."""
        return self.sparsity

    def __post_init__(self) -> None:
        require(self.sparsity is not None, "sparsity", "is needed by --method magnitude")
        require(0.0 < self.sparsity < 1.0, "sparsity", f"must be in (0, 1), got {self.sparsity}")
        require(0.0 < self.prune_fraction <= 1.0, "prune_fraction", f"must be in (0, 1], got {self.prune_fraction}")
        require(self.frequency >= 0, "frequency", f"must be >= 0, got {self.frequency}")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(end step of the ramp, steps between updates) for a run of `total_steps`."""
        end = max(1, round(total_steps * self.prune_fraction))
        return end, self.frequency or max(1, end // 20)


class GradualMagnitudePruner(Pruner):
    name = "magnitude"

    def __init__(self, model: nn.Module, config: MagnitudeConfig, total_steps: int) -> None:
        self.config = config
        self.end_step, self.frequency = config.schedule(total_steps)
        self.layers = select_layers(model, config.layers)
        attach_gates(self.layers, MaskGate)
        self.current = 0.0

    def sparsity_at(self, step: int) -> float:
        return self.config.sparsity * cubic_ramp(step, self.end_step)

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        """Keep each layer's largest |W'|: weights pruned earlier have W' = 0 and stay pruned."""
        for layer in self.layers.values():
            w = layer.weight.detach().abs().flatten()
            keep = w.numel() - round(sparsity * w.numel())
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[torch.topk(w, keep, sorted=False).indices] = True
            gate(layer).mask.copy_(mask.view_as(layer.weight))
        self.current = sparsity

    def step(self, step: int, lr: float = 0.0) -> None:
        due = step >= self.end_step or step % self.frequency == 0
        if step > 0 and self.current < self.config.sparsity and due:
            self._update_masks(self.sparsity_at(step))

    def finalize(self) -> dict[str, Any]:
        if self.current < self.config.sparsity:
            self._update_masks(self.config.sparsity)
        achieved = zero_fraction(self.layers.values())
        bake(self.layers)
        return {
            "method": self.name,
            "target_sparsity": self.config.sparsity,
            "config": asdict(self.config),
            "schedule": {"start_step": 0, "end_step": self.end_step, "frequency": self.frequency},
            "achieved_sparsity_pruned_layers": round(achieved, 6),
            "pruned_layers": list(self.layers),
        }

    def status(self) -> dict[str, str]:
        return {"sparsity": f"{100 * self.current:.1f}%"}

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}  # the masks are buffers of the model's gates

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])


def run(
    model: nn.Module, data: TrainData, train_cfg: TrainConfig, out: Path, config: MagnitudeConfig, resume: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model` in place while it trains for `train_cfg.steps`; returns (model with baked zeros, record)."""
    pruner = GradualMagnitudePruner(model, config, train_cfg.steps)
    summary = train(model, data, train_cfg, Path(out), pruner=pruner, resume=resume)
    return model, {**pruner.finalize(), "runs": {"train": summary}}


def prune_once(model: nn.Module, sparsity: float, layers: str = "all") -> dict[str, Any]:
    """One-shot magnitude pruning without training: every selected layer keeps its largest 1 - `sparsity` of
    weights, baked into exact zeros. Returns the pruning record."""
    return GradualMagnitudePruner(model, MagnitudeConfig(sparsity=sparsity, layers=layers), total_steps=1).finalize()
