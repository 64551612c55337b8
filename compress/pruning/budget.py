"""Channel budget accounting shared by the channel methods: what a compact net costs, and cuts that fit a budget.

`ChannelCost` gives the parameters and MACs of the compact network as a function of how many channels each coupling
group keeps, counting exactly what `compress.evaluate.model_stats` counts on the sliced model (every conv-like layer,
BatchNorm and PReLU parameters, everything else fixed). `prune_to_budget` and `fill_to_budget` remove or restore
channels in score order until a budget holds; `budget_summary` is the record both L1 and meta pruning report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.evaluate import layer_positions
from compress.flags import option, require
from compress.pruning.coupling import ChannelGroup
from compress.pruning.layers import conv_like_layers, groups_of, in_channels, is_depthwise, out_channels

METRICS = ("params", "macs")


@dataclass(frozen=True)
class ChannelBudget:
    """What the channel methods share: the budget the compact net must meet (exactly one of the two)."""

    params: float | None = option(
        None, "fraction of the original's non-zero parameters the compact net keeps, in (0, 1)"
    )
    macs: float | None = option(None, "... or of its MACs for a 1280x720 output, instead of --params")

    def __post_init__(self) -> None:
        given = [(n, v) for n, v in (("params", self.params), ("macs", self.macs)) if v is not None]
        require(len(given) == 1, "params", "or --macs is needed by the channel methods (one of them, not both)")
        name, value = given[0]
        require(0.0 < value < 1.0, name, f"must be in (0, 1), got {value}")

    @property
    def metric(self) -> str:
        return "params" if self.params is not None else "macs"

    @property
    def target(self) -> float:
        return self.params if self.params is not None else self.macs  # type: ignore[return-value]

    @property
    def removed(self) -> float:
        """The fraction of parameters (or MACs) the method removes (what sets the fine-tuning lr)."""
        return 1.0 - self.target


def _per_channel_params(module: nn.Module) -> int:
    """Parameters a BatchNorm or per-channel PReLU holds per channel."""
    return sum(1 for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None)


class ChannelCost:
    """Parameters and MACs of the compact network as a function of how many channels each group keeps.

    Every layer input/output width is a sum over the groups touching that side of (channels kept) x (layer
    channels per group channel: s^2 for a PixelShuffle producer, the number of reads for a concat consumer).
    Groups not in `searched` keep their full width. Counts match `model_stats` on the sliced model exactly.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], searched: list[int], scale: int) -> None:
        self.convs = conv_like_layers(model)
        self.chan_modules = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.PReLU) and m.num_parameters > 1
        }
        self.searched = list(searched)
        self.sizes = {g.id: g.size for g in groups}
        self.producers = {g.id: [m.layer for m in g.producers] for g in groups}
        positions = layer_positions(model, scale)
        # per layer: (weights per (out, in) channel pair, depthwise, groups, has bias, positions at 1280x720)
        self.shape = {
            n: (
                int(m.weight[0, 0].numel()) if not isinstance(m, nn.Linear) else 1,
                is_depthwise(m) and not isinstance(m, nn.ConvTranspose2d),
                groups_of(m),
                m.bias is not None,
                positions[n],
            )
            for n, m in self.convs.items()
        }
        # per (layer, side): fixed channel count, [(group id, channels per group channel)]
        self.sides: dict[tuple[str, str], tuple[int, list[tuple[int, int]]]] = {}
        fixed = {(n, k): 0 for n in self.convs for k in ("out", "in")}
        fixed.update({(n, "chan"): 0 for n in self.chan_modules})
        terms: dict[tuple[str, str], list[tuple[int, int]]] = {key: [] for key in fixed}
        chosen = set(self.searched)
        for g in groups:
            for m in g.members:
                key = (m.layer, m.kind)
                if g.id in chosen:
                    terms[key].append((g.id, int(m.index.shape[1])))
                else:
                    fixed[key] += m.index.numel()
        widths = {(n, "out"): out_channels(m) for n, m in self.convs.items()}
        widths.update({(n, "in"): in_channels(m) for n, m in self.convs.items()})
        widths.update({(n, "chan"): int(m.weight.shape[0]) for n, m in self.chan_modules.items()})
        for key, width in widths.items():
            if not terms[key] and fixed[key] == 0:
                fixed[key] = width  # a layer the trace never reached keeps its width
            self.sides[key] = (fixed[key], terms[key])
        counted = [p for m in self.convs.values() for p in (m.weight, m.bias) if p is not None]
        counted += [
            p for m in self.chan_modules.values() for p in (m.weight, getattr(m, "bias", None)) if p is not None
        ]
        self.other_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in counted)
        self.full = {g: self.sizes[g] for g in self.searched}
        bad = [f"{n}.{k}" for (n, k), w in widths.items() if self._width((n, k), self.full) != w]
        if bad:
            raise ValueError(f"channel accounting does not reproduce the widths of {', '.join(bad[:5])}")
        self.original = {"params": self.params(self.full), "macs": self.macs(self.full)}
        self.sparse_layers: list[str] = []
        self.sparsity = 0.0

    def expect_weight_sparsity(self, layers: Iterable[str], sparsity: float) -> None:
        """Budget parameters as non-zeros: `sparsity` of the weights of `layers` in the compact net will be zero
        (FMP's weight half, one global cut over those layers). `original` stays the dense count; MACs are
        unaffected (dense runtimes multiply the zeros too)."""
        self.sparse_layers, self.sparsity = list(layers), float(sparsity)

    def zeroed_weights(self, kept: dict[int, int]) -> int:
        """How many weights the expected weight sparsity zeroes in the compact net (rounded up, as the cut is)."""
        if not self.sparse_layers or self.sparsity <= 0:
            return 0
        widths = self.widths(kept)
        total = sum(self.weight_count(n, *widths[n]) for n in self.sparse_layers)
        return math.ceil(self.sparsity * total - 1e-9)

    def weight_count(self, name: str, c_out: int, c_in: int) -> int:
        """Weights of layer `name` at widths (c_out, c_in): a depthwise conv holds k*k per output channel."""
        per_pair, depthwise, groups, _, _ = self.shape[name]
        return c_out * per_pair if depthwise else c_out * c_in * per_pair // groups

    def _width(self, key: tuple[str, str], kept: dict[int, int]) -> int:
        fixed, terms = self.sides[key]
        return fixed + sum(kept[g] * mult for g, mult in terms)

    def widths(self, kept: dict[int, int]) -> dict[str, tuple[int, int]]:
        """(out, in) channels of every conv-like layer."""
        return {n: (self._width((n, "out"), kept), self._width((n, "in"), kept)) for n in self.convs}

    def params(self, kept: dict[int, int]) -> int:
        total = self.other_params
        for n, (c_out, c_in) in self.widths(kept).items():
            total += self.weight_count(n, c_out, c_in) + (c_out if self.shape[n][3] else 0)
        for n, m in self.chan_modules.items():
            total += self._width((n, "chan"), kept) * _per_channel_params(m)
        return total

    def macs(self, kept: dict[int, int]) -> int:
        """MACs for a 1280x720 output, rounded per layer as `model_stats` does."""
        return sum(
            int(round(self.shape[n][4] * self.weight_count(n, c_out, c_in)))
            for n, (c_out, c_in) in self.widths(kept).items()
        )

    def value(self, kept: dict[int, int], metric: str) -> int:
        """What the budget counts: non-zero parameters (all of them, less the expected weight zeros) or MACs."""
        if metric not in METRICS:
            raise ValueError(f"budget metric must be one of {', '.join(METRICS)}, got {metric!r}")
        return self.params(kept) - self.zeroed_weights(kept) if metric == "params" else self.macs(kept)

    def fraction(self, kept: dict[int, int], metric: str) -> float:
        return self.value(kept, metric) / self.original[metric]


def kept_counts(keep: dict[int, torch.Tensor]) -> dict[int, int]:
    return {g: int(k.sum()) for g, k in keep.items()}


def prune_to_budget(
    cost: ChannelCost,
    metric: str,
    limit: int,
    scores: dict[int, torch.Tensor],
    keep: dict[int, torch.Tensor],
    min_keep: dict[int, int],
) -> tuple[dict[int, torch.Tensor], bool]:
    """Remove kept channels in ascending score order until `cost.value <= limit`; (new keep masks, reached)."""
    keep = {g: k.clone().bool().cpu() for g, k in keep.items()}
    kept = kept_counts(keep)
    if cost.value(kept, metric) <= limit:
        return keep, True
    order = sorted(
        (float(s), g, j)
        for g, score in scores.items()
        for j, s in enumerate(score.detach().cpu().tolist())
        if keep[g][j]
    )
    for _, g, j in order:
        if kept[g] <= min_keep[g]:
            continue
        keep[g][j] = False
        kept[g] -= 1
        if cost.value(kept, metric) <= limit:
            return keep, True
    return keep, False


def fill_to_budget(
    cost: ChannelCost,
    metric: str,
    limit: int,
    scores: dict[int, torch.Tensor],
    keep: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor]:
    """Add removed channels back in descending score order, each only if `cost.value` stays within `limit`."""
    keep = {g: k.clone().bool().cpu() for g, k in keep.items()}
    kept = kept_counts(keep)
    order = sorted(
        ((-float(s), g, j) for g, score in scores.items() for j, s in enumerate(score.detach().cpu().tolist())),
    )
    for _, g, j in order:
        if keep[g][j]:
            continue
        kept[g] += 1
        if cost.value(kept, metric) <= limit:
            keep[g][j] = True
        else:
            kept[g] -= 1
    return keep


def min_keep_per_group(groups: list[ChannelGroup], searched: list[int], min_channels: int) -> dict[int, int]:
    sizes = {g.id: g.size for g in groups}
    return {g: min(min_channels, sizes[g]) for g in searched}


def check_reachable(cost: ChannelCost, metric: str, target: float, min_keep: dict[int, int]) -> None:
    """ValueError when `target` is below what keeping only `min_keep` channels per group gives."""
    floor = cost.fraction(min_keep, metric)
    if target < floor:
        raise ValueError(
            f"{metric} target {target:g} is below the smallest reachable fraction {floor:.4f} "
            "(every prunable group at its minimum width; fixed layers stay)"
        )


def width_table(cost: ChannelCost, kept: dict[int, int]) -> dict[str, dict[str, list[int]]]:
    """Per conv: original and compact [out, in] widths (convs whose width changed only)."""
    before, after = cost.widths(cost.full), cost.widths(kept)
    return {n: {"original": list(before[n]), "compact": list(after[n])} for n in before if before[n] != after[n]}


def budget_summary(cost: ChannelCost, keep: dict[int, torch.Tensor]) -> dict[str, Any]:
    """The compact net's size figures against the original (what both methods' reports carry)."""
    kept = kept_counts(keep)
    return {
        "original": dict(cost.original),
        "compact": {"params": cost.params(kept), "nonzeros": cost.value(kept, "params"), "macs": cost.macs(kept)},
        "achieved_params_fraction": round(cost.fraction(kept, "params"), 6),  # non-zeros
        "achieved_dense_params_fraction": round(cost.params(kept) / cost.original["params"], 6),
        "achieved_macs_fraction": round(cost.fraction(kept, "macs"), 6),
        "kept_channels": {
            str(g): {"kept": kept[g], "size": cost.sizes[g], "producers": cost.producers[g]} for g in cost.searched
        },
        "widths": width_table(cost, kept),
    }
