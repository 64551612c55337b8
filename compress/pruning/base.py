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

from compress.pruning.gates import bake, gate, layer_sparsity


def cubic_ramp(step: int, end: int) -> float:
    """Zhu & Gupta's schedule as a fraction of the way: 0 at step 0, 1 - (1 - t / end)^3, 1 from `end` on."""
    if step <= 0:
        return 0.0
    return 1.0 if step >= end else 1.0 - (1.0 - step / end) ** 3


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


class RampedMaskPruner(FixedMaskPruner):
    """A FixedMaskPruner whose gates close gradually: each gated layer starts whole, and over the first `end`
    steps the weights its final mask `alive` kills are cut in order of their current |W| (a cubic share of them
    at every `frequency`-th step, as in gradual magnitude pruning), so the survivors adapt while the dead ones go.
    From `end` on (and at finalize, for a run cut short) the gates are the final masks."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        record: dict[str, Any],
        name: str,
        alive: dict[str, torch.Tensor],
        end: int,
    ) -> None:
        super().__init__(model, layers, record, name)
        self.alive, self.end, self.frequency = alive, max(1, end), max(1, end // 20)
        self.cut = 0.0

    @torch.no_grad()
    def _close(self, share: float) -> None:
        for n, alive in self.alive.items():
            conv = self.gated[n]
            mask = gate(conv).mask
            alive = alive.to(mask.device)
            need = round(share * int((~alive).sum()))
            score = conv.weight.detach().abs().flatten().clone()  # W' = W * mask: cut ones score 0, stay cut
            score[alive.flatten()] = torch.inf
            mask.fill_(True)
            mask.view(-1)[torch.topk(score, need, largest=False).indices] = False
        self.cut = share

    def step(self, step: int, lr: float = 0.0) -> None:
        if self.cut < 1.0 and (step >= self.end or step % self.frequency == 0):
            self._close(cubic_ramp(step, self.end))

    def finalize(self) -> dict[str, Any]:
        if self.cut < 1.0:
            self._close(1.0)
        return {**super().finalize(), "weight_ramp_steps": self.end}

    def status(self) -> dict[str, str]:
        return {"weights cut": f"{100 * self.cut:.0f}%"}

    def state_dict(self) -> dict[str, Any]:
        return {"cut": self.cut}  # the masks are buffers of the model's gates

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cut = float(state["cut"])
