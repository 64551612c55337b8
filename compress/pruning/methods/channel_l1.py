"""L1-norm channel pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets") at a parameter budget,
and the channel budget accounting it shares with FMP.

Why it is here: it is the classic structured baseline FMP should beat at the same budget. It needs no search:
score every channel of every prunable coupling group once, remove the lowest-scoring channels until the
compact network meets the budget, slice, fine-tune with the ordinary loop.

Scoring (ours where Li et al. have no coupling): a group channel is produced by every "out" member of its group
(a residual stream has one producer per block); its score is the sum over those producers of the L1 norm of
the output filter(s) that write it, and a PixelShuffle producer's s^2 filters of one channel are summed too.
Scores are divided by their group's mean before the global ranking, because raw L1 norms are not comparable
across groups: a stream channel sums the norms of many producers, an inner ResBlock channel one filter, and
conv widths differ. Normalised, the ranking asks "which channels are weak for their group", and the budget
loop, not the raw scale of a layer, decides how much each group loses. Channels are removed one at a time in
ascending order (ties by group id, then channel), never taking a group below min(min_channels, size), until
the compact net's parameter count (or MACs) is at most the target fraction of the original. The
accounting (`ChannelCost`) counts exactly what `compress.evaluate.model_stats` counts on the sliced model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data import PatchSampler
from compress.evaluate import conv_output_pixels
from compress.pruning.base import Pruner
from compress.pruning.coupling import ChannelGroup, find_groups
from compress.pruning.gates import layer_sparsity
from compress.pruning.slicing import slice_model
from compress.train import TrainConfig, train

log = logging.getLogger(__name__)
METRICS = ("params", "macs")


class ChannelCost:
    """Parameters and MACs of the compact network as a function of how many channels each group keeps.

    Every conv input/output width is a sum over the groups touching that side of (channels kept) x (layer
    channels per group channel: s^2 for a PixelShuffle producer, the number of reads for a concat consumer).
    Groups not in `searched` keep their full width. Counts match `model_stats` on the sliced model exactly.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], searched: list[int], scale: int) -> None:
        self.convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        self.searched = list(searched)
        self.sizes = {g.id: g.size for g in groups}
        self.producers = {g.id: [m.layer for m in g.producers] for g in groups}
        pixels = conv_output_pixels(model, scale)
        # per conv: (kh*kw / groups, has bias, output pixels at 1280x720)
        self.shape = {
            n: (m.kernel_size[0] * m.kernel_size[1] // m.groups, m.bias is not None, pixels[n])
            for n, m in self.convs.items()
        }
        # per (conv, side): fixed channel count, [(group id, channels per group channel)]
        self.sides: dict[tuple[str, str], tuple[int, list[tuple[int, int]]]] = {}
        fixed = {(n, k): 0 for n in self.convs for k in ("out", "in")}
        terms: dict[tuple[str, str], list[tuple[int, int]]] = {key: [] for key in fixed}
        chosen = set(self.searched)
        for g in groups:
            for m in g.members:
                key = (m.layer, m.kind)
                if g.id in chosen:
                    terms[key].append((g.id, int(m.index.shape[1])))
                else:
                    fixed[key] += m.index.numel()
        for n, m in self.convs.items():
            for kind, width in (("out", m.out_channels), ("in", m.in_channels)):
                key = (n, kind)
                if not terms[key] and fixed[key] == 0:
                    fixed[key] = width  # a conv the trace never reached keeps its width
                self.sides[key] = (fixed[key], terms[key])
        conv_params = sum(p.numel() for m in self.convs.values() for p in (m.weight, m.bias) if p is not None)
        self.other_params = sum(p.numel() for p in model.parameters()) - conv_params
        self.full = {g: self.sizes[g] for g in self.searched}
        got = self.widths(self.full)
        bad = [n for n, m in self.convs.items() if got[n] != (m.out_channels, m.in_channels)]
        if bad:
            raise ValueError(f"channel accounting does not reproduce the widths of {', '.join(bad)}")
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
        total = sum(widths[n][0] * widths[n][1] * self.shape[n][0] for n in self.sparse_layers)
        return math.ceil(self.sparsity * total - 1e-9)

    def _width(self, key: tuple[str, str], kept: dict[int, int]) -> int:
        fixed, terms = self.sides[key]
        return fixed + sum(kept[g] * mult for g, mult in terms)

    def widths(self, kept: dict[int, int]) -> dict[str, tuple[int, int]]:
        """(out, in) channels of every conv."""
        return {n: (self._width((n, "out"), kept), self._width((n, "in"), kept)) for n in self.convs}

    def params(self, kept: dict[int, int]) -> int:
        total = self.other_params
        for n, (c_out, c_in) in self.widths(kept).items():
            k2, bias, _ = self.shape[n]
            total += c_out * c_in * k2 + (c_out if bias else 0)
        return total

    def macs(self, kept: dict[int, int]) -> int:
        """MACs for a 1280x720 output, rounded per layer as `model_stats` does."""
        return sum(
            int(round(self.shape[n][2] * c_out * c_in * self.shape[n][0]))
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


@torch.no_grad()
def l1_channel_scores(model: nn.Module, groups: list[ChannelGroup], normalize: bool = True) -> dict[int, torch.Tensor]:
    """Per prunable group: each channel's summed L1 filter norm over the group's producers, / the group mean."""
    scores = {}
    for g in groups:
        if not g.prunable:
            continue
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.producers:
            w = model.get_submodule(m.layer).weight.detach().double().cpu()
            s += w.abs().sum(dim=(1, 2, 3))[m.index].sum(dim=1)
        mean = s.mean()
        scores[g.id] = s / mean if normalize and mean > 0 else s
    return scores


def l1_keep(
    model: nn.Module, groups: list[ChannelGroup], params_target: float, min_channels: int = 4
) -> tuple[dict[int, torch.Tensor], ChannelCost]:
    """Keep masks of every prunable group meeting `params_target` by normalised L1 score, and the accounting."""
    searched = [g.id for g in groups if g.prunable]
    cost = ChannelCost(model, groups, searched, model.config.scale)
    min_keep = min_keep_per_group(groups, searched, min_channels)
    check_reachable(cost, "params", params_target, min_keep)
    full = {g: torch.ones(cost.sizes[g], dtype=torch.bool) for g in searched}
    limit = int(params_target * cost.original["params"])
    keep, reached = prune_to_budget(cost, "params", limit, l1_channel_scores(model, groups), full, min_keep)
    if not reached:  # check_reachable makes this a rounding corner case
        raise ValueError(f"params target {params_target:g} cannot be met with {min_channels} channels per group")
    return keep, cost


class ChannelL1FineTune(Pruner):
    """No-op pruner that names the fine-tuning run (the compact net is already pruned)."""

    name = "channel-l1"


def run_channel_l1(
    model: nn.Module,
    sampler: PatchSampler,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    params_target: float,
    resume: bool = True,
    min_channels: int = 4,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model`'s channels by L1 norm to `params_target` x its parameters, slice, fine-tune for
    `train_cfg.steps` (the whole step budget: there is no search) in `<run_dir>/finetune`.

    Returns (compact model, report). `model` itself is not changed.
    """
    if not 0.0 < params_target < 1.0:
        raise ValueError(f"params_target must be in (0, 1), got {params_target}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    model.eval()
    groups = find_groups(model)
    keep, cost = l1_keep(model, groups, params_target, min_channels)
    compact = slice_model(model, groups, keep)
    summary = budget_summary(cost, keep)
    log.info(
        "channel-l1: %d -> %d parameters (%.3f of the original, target %.3f)",
        cost.original["params"],
        summary["compact"]["params"],
        summary["achieved_params_fraction"],
        params_target,
    )
    run = train(compact, sampler, train_cfg, Path(run_dir) / "finetune", pruner=ChannelL1FineTune(), resume=resume)
    pruned = list(summary["widths"])  # the convs that lost channels
    zeros, _ = layer_sparsity({n: compact.get_submodule(n) for n in pruned})
    report = {
        "method": "channel-l1",
        "targets": {"params_fraction": params_target, "macs_fraction": None, "weight_sparsity": 0.0},
        **summary,
        "pruned_layers": pruned,
        "achieved_sparsity_pruned_layers": zeros,  # no weight pruning: zeros only by chance
        "search_steps": 0,
        "finetune_steps": run["steps"],
        "forced": False,
        "settings": {
            "min_channels": min_channels,
            "score": "sum of producer filter L1 norms, divided by the group mean",
            "ranking": "global ascending, one channel at a time, until the params target is met",
        },
        "trace": [],
        "runs": {"finetune": run},
    }
    return compact, report
