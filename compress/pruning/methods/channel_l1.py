"""L1-norm channel pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets") at a budget.

Why it is here: it is the classic structured baseline FMP should beat at the same budget. It needs no search:
score every channel of every prunable coupling group once, remove the lowest-scoring channels until the compact
network meets the budget, slice, fine-tune with the ordinary loop.

Scoring (ours where Li et al. have no coupling): a group channel is produced by every "out" member of its group
(a residual stream has one producer per block); its score is the sum over those producers of the L1 norm of the
output filter(s) that write it, and a PixelShuffle producer's s^2 filters of one channel are summed too. Scores are
divided by their group's mean before the global ranking, because raw L1 norms are not comparable across groups: a
stream channel sums the norms of many producers, an inner ResBlock channel one filter, and conv widths differ.
Normalised, the ranking asks "which channels are weak for their group", and the budget loop, not the raw scale of
a layer, decides how much each group loses. Channels are removed one at a time in ascending order (ties by group
id, then channel), never taking a group below min(min_channels, size), until the compact net's parameters (or
MACs for a 1280x720 output) are at most the target fraction of the original (`budget.ChannelCost`, which counts
exactly what `compress.evaluate.model_stats` counts on the sliced model).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.flags import option, require
from compress.pruning.base import Pruner
from compress.pruning.budget import (
    ChannelBudget,
    ChannelCost,
    budget_summary,
    check_reachable,
    min_keep_per_group,
    prune_to_budget,
)
from compress.pruning.coupling import ChannelGroup, find_groups
from compress.pruning.gates import layer_sparsity
from compress.pruning.layers import weight_dims
from compress.pruning.slicing import slice_model
from compress.train import TrainConfig, TrainData, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelL1Config(ChannelBudget):
    min_channels: int = option(4, "never prune a channel group below this many channels")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.min_channels >= 1, "min_channels", f"must be >= 1, got {self.min_channels}")


@torch.no_grad()
def l1_channel_scores(model: nn.Module, groups: list[ChannelGroup], normalize: bool = True) -> dict[int, torch.Tensor]:
    """Per prunable group: each channel's summed L1 filter norm over the group's producers, / the group mean."""
    scores = {}
    for g in groups:
        if not g.prunable:
            continue
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.producers:
            layer = model.get_submodule(m.layer)
            out_dim, _ = weight_dims(layer)
            w = layer.weight.detach().double().cpu().abs()
            norms = w.sum(dim=[d for d in range(w.dim()) if d != out_dim])
            s += norms[m.index].sum(dim=1)
        mean = s.mean()
        scores[g.id] = s / mean if normalize and mean > 0 else s
    return scores


def l1_keep(
    model: nn.Module, groups: list[ChannelGroup], scale: int, config: ChannelL1Config
) -> tuple[dict[int, torch.Tensor], ChannelCost]:
    """Keep masks of every prunable group meeting the config's budget by normalised L1 score, and the accounting."""
    searched = [g.id for g in groups if g.prunable]
    if not searched:
        reasons = sorted({g.reason for g in groups if g.reason})
        raise ValueError(f"no channel group of this model can be pruned ({'; '.join(reasons)[:300]})")
    cost = ChannelCost(model, groups, searched, scale)
    min_keep = min_keep_per_group(groups, searched, config.min_channels)
    check_reachable(cost, config.metric, config.target, min_keep)
    full = {g: torch.ones(cost.sizes[g], dtype=torch.bool) for g in searched}
    limit = int(config.target * cost.original[config.metric])
    scores = l1_channel_scores(model, groups)
    keep, reached = prune_to_budget(cost, config.metric, limit, scores, full, min_keep)
    if not reached:  # check_reachable makes this a rounding corner case
        raise ValueError(f"{config.metric} target {config.target:g} cannot be met with {config.min_channels} channels")
    return keep, cost


class ChannelL1FineTune(Pruner):
    """No-op pruner that names the fine-tuning run (the compact net is already pruned)."""

    name = "channel-l1"


def run(
    model: nn.Module, data: TrainData, train_cfg: TrainConfig, out: Path, config: ChannelL1Config, resume: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model`'s channels by L1 norm to the budget, slice, fine-tune for `train_cfg.steps` (the whole step
    budget: there is no search) in `<out>/finetune`. Returns (compact model, record); `model` is not changed."""
    model.eval()
    groups = find_groups(model)
    keep, cost = l1_keep(model, groups, data.scale, config)
    compact = slice_model(model, groups, keep)
    summary = budget_summary(cost, keep)
    log.info(
        "channel-l1: %d -> %d parameters, %s fraction %.3f (target %.3f)",
        cost.original["params"],
        summary["compact"]["params"],
        config.metric,
        summary[f"achieved_{config.metric}_fraction"],
        config.target,
    )
    finetune = train(compact, data, train_cfg, Path(out) / "finetune", pruner=ChannelL1FineTune(), resume=resume)
    pruned = [n for n in summary["widths"] if n in dict(compact.named_modules())]  # the layers that lost channels
    zeros, _ = layer_sparsity({n: compact.get_submodule(n) for n in pruned})
    record = {
        "method": "channel-l1",
        "targets": {"params_fraction": config.params, "macs_fraction": config.macs, "weight_sparsity": 0.0},
        "config": asdict(config),
        **summary,
        "pruned_layers": pruned,
        "achieved_sparsity_pruned_layers": zeros,  # no weight pruning: zeros only by chance
        "search_steps": 0,
        "finetune_steps": finetune["steps"],
        "forced": False,
        "settings": {
            "score": "sum of producer filter L1 norms, divided by the group mean",
            "ranking": f"global ascending, one channel at a time, until the {config.metric} target is met",
        },
        "trace": [],
        "runs": {"finetune": finetune},
    }
    return compact, record
