"""The one pruning mechanism: gates on conv weights, and which convs get them.

A gate is a torch parametrization on a conv's `weight`: the conv keeps its dense tensor W and every forward
pass uses W' = gate(W). A mask gate gives W' = W · mask (magnitude pruning, fixed-mask fine-tuning); a
threshold gate gives IKS's W' = sign(W) · relu(|W| − sigmoid(θ)) (see `compress.pruning.iks`). Pruners decide
what their gates hold; `bake` replaces every gate by its current W' — plain convs whose weights contain exact
zeros — so what leaves compress/ is an ordinary network and convert/ never sees a gate.

Layer selection is decided here once, for every method: `prunable_convs` is every Conv2d with trainable
weights (EDSR's fixed MeanShift convs are excluded), and `select_convs` narrows that by a spec — `all`,
`default` (the architecture's usual sparse layers, e.g. EDSR's body convs, as the IKS reference code does) or
comma-separated glob patterns over module names (`body.*,tail.0.0`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize

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


class MaskGate(nn.Module):
    """W' = W · mask, with the mask a boolean buffer (saved with the model, so resumed runs keep it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def attach_gates(convs: dict[str, nn.Conv2d], make_gate: Callable[[torch.Tensor], nn.Module]) -> None:
    """Put a gate made by `make_gate(weight)` on each conv's weight."""
    for conv in convs.values():
        parametrize.register_parametrization(conv, "weight", make_gate(conv.weight))


def gate(conv: nn.Conv2d) -> nn.Module:
    """The gate on a gated conv."""
    return conv.parametrizations.weight[0]


@torch.no_grad()
def zero_fraction(convs: Iterable[nn.Conv2d]) -> float:
    """Fraction of exact zeros in the effective weights W' over all given convs."""
    zeros = total = 0
    for conv in convs:
        w = conv.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


@torch.no_grad()
def layer_sparsity(convs: dict[str, nn.Conv2d]) -> tuple[float, dict[str, float]]:
    """(zero fraction over all given convs, {name: zero fraction}), rounded to 6 places, as manifests record them."""
    per_layer, zeros, total = {}, 0, 0
    for name, conv in convs.items():
        z, n = int((conv.weight == 0).sum()), conv.weight.numel()
        per_layer[name] = round(z / n, 6)
        zeros, total = zeros + z, total + n
    return round(zeros / total, 6) if total else 0.0, per_layer


@torch.no_grad()
def bake(convs: dict[str, nn.Conv2d]) -> None:
    """Replace every gate by its current W' (exact zeros, no -0.0): plain convs again, gate parameters dropped."""
    for conv in convs.values():
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        w = conv.weight
        w.copy_(torch.where(w == 0, torch.zeros_like(w), w))
