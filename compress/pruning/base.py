"""The pruner contract the training loop knows: regularize the loss, step after the optimiser, finalize.

A pruner may also own parameters it updates itself in `step` (kept out of the loop's Adam, e.g. FMP's
proximal/SGD-updated vectors), and may end training early by returning True from `done` (e.g. a search that
met its target).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.pruning.gates import bake, layer_sparsity


class Pruner:
    """Base pruner: no regularizer, no masks. Subclasses decide how weights are removed."""

    name = "none"

    def regularize(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the method's penalty to the task loss (identity by default)."""
        return loss

    def step(self, step: int, lr: float) -> None:
        """Called after each optimiser step with the 1-based step count and the learning rate just used."""

    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters this pruner updates itself; the training loop's optimiser leaves them alone."""
        return []

    def done(self) -> bool:
        """True ends training after the current step (state is saved; the run counts the steps it made)."""
        return False

    def status(self) -> dict[str, str]:
        """Short figures for the progress bar, e.g. {"sparsity": "79.8%"}."""
        return {}

    def finalize(self) -> dict[str, Any]:
        """Make pruning permanent and return what the manifest should record about it."""
        return {"method": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedMaskPruner(Pruner):
    """Fine-tunes a model whose `layers` may carry MaskGates (held fixed); finalize bakes them.

    `record` is what the manifest gets, completed with the sparsity measured after baking. The channel methods
    fine-tune their compact nets with it (FMP's weight masks; channel-l1 has none).
    """

    def __init__(self, model: nn.Module, layers: list[str], record: dict[str, Any], name: str) -> None:
        self.name = name
        self.layers = {n: model.get_submodule(n) for n in layers}
        self.gated = {n: c for n, c in self.layers.items() if parametrize.is_parametrized(c, "weight")}
        self.record = record

    @torch.no_grad()
    def finalize(self) -> dict[str, Any]:
        bake(self.gated)
        achieved, per_layer = layer_sparsity(self.layers)
        return {
            **self.record,
            "pruned_layers": list(self.layers),
            "achieved_sparsity_pruned_layers": achieved,
            "per_layer_sparsity": per_layer,
        }
