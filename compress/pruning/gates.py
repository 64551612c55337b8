"""The one pruning mechanism: gates on layer weights, and which layers get them.

A gate is a torch parametrization on a conv-like layer's `weight` (`compress.pruning.layers`: Conv2d,
ConvTranspose2d, Linear): the layer keeps its dense tensor W and every forward pass uses W' = gate(W). A mask gate
gives W' = W · mask (magnitude pruning, fixed-mask fine-tuning); a threshold gate gives IKS's
W' = sign(W) · relu(|W| − sigmoid(θ)). Pruners decide what their gates hold; `bake` replaces every gate by its
current W' — plain layers whose weights contain exact zeros — so what leaves compress/ is an ordinary network and
convert/ never sees a gate.

Layer selection is decided here once, for every method: `select_layers` narrows `layers.prunable_layers` (every
conv-like layer with trainable weights; EDSR's fixed MeanShift convs are excluded) by a spec — `all`, `default`
(the architecture's usual sparse layers, e.g. EDSR's body convs, as the IKS reference code does; for a model
edgesr has no table for, every prunable layer except the first and the last to run, which face the RGB image) or
comma-separated glob patterns over module names (`body.*,tail.0.0`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.models import default_sparse_layers
from compress.pruning.layers import ConvLike, probe_input, prunable_layers


def execution_order(model: nn.Module, layers: dict[str, nn.Module], size: int = 16) -> list[str]:
    """Names of `layers` in the order a forward pass on a small probe runs them (each once, first call)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(probe_input(model, size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return list(dict.fromkeys(order))


def _default_patterns(model: nn.Module, layers: dict[str, ConvLike]) -> list[str]:
    patterns = default_sparse_layers(model)
    if patterns is not None:
        return patterns
    order = execution_order(model, layers)
    inner = order[1:-1] if len(order) > 2 else order
    return inner or list(layers)


def select_layers(model: nn.Module, spec: str = "all") -> dict[str, ConvLike]:
    """Prunable layers chosen by `spec`: `all`, `default` or comma-separated globs; ValueError if none match."""
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("the model has no conv-like layer with trainable weights")
    if spec == "all":
        return layers
    patterns = _default_patterns(model, layers) if spec == "default" else [p.strip() for p in spec.split(",") if p]
    chosen = {n: m for n, m in layers.items() if any(fnmatchcase(n, p) for p in patterns)}
    unused = [p for p in patterns if not any(fnmatchcase(n, p) for n in layers)]
    if unused or not chosen:
        names = ", ".join(list(layers)[:12]) + (f" (+{len(layers) - 12} more)" if len(layers) > 12 else "")
        raise ValueError(f"layer pattern(s) {', '.join(unused or patterns)} match no prunable layer; prunable: {names}")
    return chosen


class MaskGate(nn.Module):
    """W' = W · mask, with the mask a boolean buffer (saved with the model, so resumed runs keep it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def attach_gates(convs: dict[str, nn.Module], make_gate: Callable[[torch.Tensor], nn.Module]) -> None:
    """Put a gate made by `make_gate(weight)` on each conv's weight."""
    for conv in convs.values():
        parametrize.register_parametrization(conv, "weight", make_gate(conv.weight))


def gate(conv: nn.Module) -> nn.Module:
    """The gate on a gated conv."""
    return conv.parametrizations.weight[0]


@torch.no_grad()
def zero_fraction(convs: Iterable[nn.Module]) -> float:
    """Fraction of exact zeros in the effective weights W' over all given convs."""
    zeros = total = 0
    for conv in convs:
        w = conv.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


@torch.no_grad()
def layer_sparsity(convs: dict[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """(zero fraction over all given convs, {name: zero fraction}), rounded to 6 places, as manifests record them."""
    per_layer, zeros, total = {}, 0, 0
    for name, conv in convs.items():
        z, n = int((conv.weight == 0).sum()), conv.weight.numel()
        per_layer[name] = round(z / n, 6)
        zeros, total = zeros + z, total + n
    return round(zeros / total, 6) if total else 0.0, per_layer


@torch.no_grad()
def bake(convs: dict[str, nn.Module]) -> None:
    """Replace every gate by its current W' (exact zeros, no -0.0): plain convs again, gate parameters dropped."""
    for conv in convs.values():
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        w = conv.weight
        w.copy_(torch.where(w == 0, torch.zeros_like(w), w))
