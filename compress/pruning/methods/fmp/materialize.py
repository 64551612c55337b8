"""After FMP's search: the compact net (kernels as weights, channels sliced, dead weights held by MaskGates)."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.pruning.base import FixedMaskPruner, RampedMaskPruner
from compress.pruning.budget import budget_summary, kept_counts, prune_to_budget
from compress.pruning.coupling import group_masks_to_layer_masks
from compress.pruning.gates import MaskGate, attach_gates, gate
from compress.pruning.methods.fmp.config import search_lr_scale
from compress.pruning.methods.fmp.hypernetwork import VECTORS
from compress.pruning.methods.fmp.search import FMPSearch
from compress.pruning.slicing import slice_model, weight_slice
from edgesr.errors import CheckFailed

log = logging.getLogger(__name__)


@torch.no_grad()
def materialize(search: FMPSearch) -> nn.Module:
    """The compact model: final kernels as plain weights, channels sliced, dead weights zeroed under MaskGates.

    Consumes the search: the searched model loses its hypernetworks (its convs keep the final kernels,
    full width), and the search can no longer step.
    """
    if search.report is not None:
        raise RuntimeError("materialize() was already called")
    c = search.config
    forced = {"channels": False, "weights": False}
    keep = search.keep_masks()
    if search.cost.value(kept_counts(keep), c.metric) > search.limit:
        scores = {g: search.vectors.vector(g).detach().abs().cpu() for g in search.searched}
        keep, reached = prune_to_budget(search.cost, c.metric, search.limit, scores, keep, search.min_keep)
        if not reached:
            raise CheckFailed(f"FMP could not force the {c.metric} target {c.target}")
        forced["channels"] = True
    search.channel_keep = keep  # the final masks (inspectable after materialize)
    weights_by, dead = None, {}
    if search.u_opt is not None:
        if search.weights_locked_at is not None:
            weights_by = "locked by the search"
        elif search.weight_sparsity(keep) >= c.weight_sparsity:
            search._cut_weights(keep)
            weights_by = "lowest U, cut at materialize"
        else:
            weights_by = "forced: lowest |W| per layer"
        cut = not weights_by.startswith("forced")
        thr = c.weight_threshold
        dead = {n: (~h.weight_mask if cut else h.U.detach() < thr).cpu() for n, h in search.hyper.items()}
    for conv in search.layers.values():  # the final kernel W_gen * U becomes the conv's plain weight
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        conv.weight.requires_grad_(True)
    delattr(search.model, VECTORS)
    if search.checkpoint_state is not None:  # the search chose the masks; the survivors start as they were
        search.model.load_state_dict(search.checkpoint_state)
    layer_masks = group_masks_to_layer_masks(search.model, search.groups, keep)
    compact = slice_model(search.model, search.groups, keep)
    alive = {}
    for n, d in dead.items():
        layer = search.model.get_submodule(n)
        alive[n] = ~weight_slice(d, layer, layer_masks[n]["out"], layer_masks[n]["in"])
    sparsity_found = None
    if alive:
        sparsity_found = 1 - sum(int(a.sum()) for a in alive.values()) / sum(a.numel() for a in alive.values())
        if sparsity_found < c.weight_sparsity:
            for n, a in alive.items():
                _top_up(compact.get_submodule(n).weight.detach(), a, c.weight_sparsity)
            forced["weights"] = True
        gated = {n: compact.get_submodule(n) for n in alive}
        ramp = getattr(c, "weight_ramp", 0.0) > 0
        if not ramp:  # else the gates start open and `finetune_pruner`'s ramp closes them
            for n, conv in gated.items():
                conv.weight[~alive[n].to(conv.weight.device)] = 0.0
        attach_gates(gated, MaskGate)
        for n, conv in gated.items():
            if not ramp:
                gate(conv).mask.copy_(alive[n])
    search.weight_alive = alive
    search.report = {
        "method": c.method,
        "targets": {
            "params_fraction": c.params,
            "macs_fraction": c.macs,
            "weight_sparsity": c.weight_sparsity,
        },
        **budget_summary(search.cost, keep),
        "weight_sparsity_found": None if sparsity_found is None else round(sparsity_found, 6),
        "weight_masks": weights_by,
        "hypernetwork_layers": list(search.layers),
        "searched_groups": len(search.searched),
        "unsearched_groups": {str(g): why for g, why in search.unsearched.items()},
        "search_steps": search.steps_made,
        "search_budget_steps": search.budget_steps,
        "channels_locked_at": search.channels_locked_at,
        "weights_locked_at": search.weights_locked_at,
        "forced": any(forced.values()),
        "forced_parts": forced,
        "finetune_from": c.finetune_from,
        "settings": {
            **asdict(c),
            "z_update": "SGD at channel_lr, then prox soft threshold lambda_C * channel_lr",
            "lambda_channel_used": search.lambda_c,
            "channel_lr_used": search.z_lr,
            "search_lr_scale_used": search_lr_scale(search.config),
            "indicator_update": "SGD at indicator_lr on task loss + lambda_weight * sum|U|, U projected on [0, 1]",
            "indicator_lr_used": search.u_lr if search.u_opt is not None else None,
        },
        "trace": copy.deepcopy(search.trace),
    }
    log.info(
        "FMP materialized: %s fraction %.3f (target %.3f), weight sparsity found %s, forced %s",
        c.metric,
        search.report[f"achieved_{c.metric}_fraction"],
        c.target,
        "-" if sparsity_found is None else f"{sparsity_found:.3f}",
        forced,
    )
    search.hyper, search.z_opt, search.u_opt = {}, None, None
    return compact


def finetune_pruner(search: FMPSearch, compact: nn.Module, steps: int) -> FixedMaskPruner:
    """The pruner that fine-tunes `compact` (from `materialize`) for `steps` and bakes its masks at the end: the
    weight masks held from the start, or closed over the first `weight_ramp` of the steps."""
    if search.report is None:
        raise RuntimeError("call materialize() first")
    ramp = getattr(search.config, "weight_ramp", 0.0)
    if ramp > 0 and search.weight_alive:
        end = round(ramp * steps)
        return RampedMaskPruner(compact, list(search.layers), search.report, search.name, search.weight_alive, end)
    return FixedMaskPruner(compact, list(search.layers), search.report, name=search.name)


def _top_up(weight: torch.Tensor, alive: torch.Tensor, sparsity: float) -> None:
    """Kill the smallest-|W| live weights of one layer until its dead fraction is at least `sparsity`."""
    need = math.ceil(sparsity * alive.numel() - 1e-9) - int((~alive).sum())
    if need <= 0:
        return
    score = weight.abs().cpu().flatten().clone()
    score[~alive.flatten()] = math.inf
    alive.view(-1)[torch.topk(score, need, largest=False).indices] = False
