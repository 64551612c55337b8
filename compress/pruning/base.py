"""The pruner contract the training loop knows: regularize the loss, step after the optimiser, finalize."""

from __future__ import annotations

from typing import Any

import torch


class Pruner:
    """Base pruner: no regularizer, no masks. Subclasses decide how weights are removed."""

    name = "none"

    def regularize(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the method's penalty to the task loss (identity by default)."""
        return loss

    def step(self, step: int) -> None:
        """Called after each optimiser step with the 1-based step count."""

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
