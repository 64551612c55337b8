"""FMP's search phase: a `Pruner` for the ordinary loop (see `compress.pruning.methods.fmp` for the method)."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.pruning.base import Pruner
from compress.pruning.budget import (
    ChannelCost,
    check_reachable,
    fill_to_budget,
    kept_counts,
    min_keep_per_group,
)
from compress.pruning.coupling import ChannelGroup, find_groups, group_masks_to_layer_masks
from compress.pruning.gates import gate
from compress.pruning.methods.channel_l1 import l1_channel_scores
from compress.pruning.methods.fmp.config import FMPConfig
from compress.pruning.methods.fmp.hypernetwork import VECTORS, ChannelVectors, HyperGate, hyper_convs

log = logging.getLogger(__name__)


class FMPSearch(Pruner):
    """The search phase: hypernetworks on the chosen convs, prox on z, SGD on U, checks, locks, `done`."""

    def __init__(self, model: nn.Module, config: FMPConfig, total_steps: int, scale: int) -> None:
        if total_steps < 2:
            raise ValueError(f"FMP needs at least 2 steps (search, then fine-tuning), got {total_steps}")
        if hasattr(model, VECTORS):
            raise ValueError("this model already carries FMP hypernetworks")
        self.name = config.method
        self.model, self.config, self.total_steps = model, config, total_steps
        self.budget_steps = max(1, min(total_steps - 1, int(config.search_fraction * total_steps)))
        self.check_every = config.check_every or max(1, total_steps // 40)
        self.groups = find_groups(model)
        self.layers = hyper_convs(model, self.groups, config.layers)
        self.searched, self.unsearched = [], {}
        for g in self.groups:
            why = _why_not_searched(model, g, self.layers) if g.prunable else None
            if g.prunable and why is None:
                self.searched.append(g.id)
            elif why is not None:
                self.unsearched[g.id] = why
        self.cost = ChannelCost(model, self.groups, self.searched, scale)
        if config.metric == "params":  # the budget counts non-zeros: the weight cut pays for part of it
            self.cost.expect_weight_sparsity(self.layers, config.weight_sparsity)
        self.min_keep = min_keep_per_group(self.groups, self.searched, config.min_channels)
        check_reachable(self.cost, config.metric, config.target, self.min_keep)
        self.limit = int(config.target * self.cost.original[config.metric])
        self.checkpoint_state: dict[str, torch.Tensor] | None = None  # the net before the search (survivors)
        if config.finetune_from == "checkpoint":
            self.checkpoint_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._attach()
        zs = list(self.vectors.z.values())
        self.z_opt = torch.optim.SGD(zs, lr=1.0) if zs else None  # lr set once lambda_C is known
        self.lambda_c = config.lambda_channel  # 0 until calibrated
        self.z_lr = config.channel_lr
        self.z_grad_sum = {g: torch.zeros_like(self.vectors.vector(g)) for g in self.searched}
        self.z_grad_steps = 0
        self.grad_scale = {g: 1.0 for g in self.searched}  # channel_prox group: 1 / the group's median |dL/dz|
        self.z_max = {g: max(1.0, float(self.vectors.vector(g).detach().abs().max())) for g in self.searched}
        us = [g.U for g in self.hyper.values() if g.U is not None]
        self.u_opt = torch.optim.SGD(us, lr=1.0) if us else None  # lr set when the indicators start
        self.u_lr = 0.0
        if config.weights_from == "start":
            self._start_indicators(0)
        self.trace: list[dict[str, Any]] = []
        self.channel_keep: dict[int, torch.Tensor] | None = None
        self.l1_active = True  # the L1 on U pauses while the weight target is met
        self.channels_locked_at: int | None = None
        self.weights_locked_at: int | None = None
        self.exhausted = False
        self.steps_made = 0
        self.report: dict[str, Any] | None = None  # set by materialize
        self.rewind_state: dict[str, torch.Tensor] | None = None  # the net at the channel lock (staged + rewind)
        self.u_sum: dict[str, torch.Tensor] = {}  # sum of U over the indicator steps (for the mean-U score)
        self.u_steps = 0
        log.info(
            "FMP %s: %d hypernetwork convs, %d searched groups, %s target %.3f, weight sparsity %.3f, search <= %d",
            self.name,
            len(self.layers),
            len(self.searched),
            config.metric,
            config.target,
            config.weight_sparsity,
            self.budget_steps,
        )

    def _attach(self) -> None:
        c = self.config
        device = next(self.model.parameters()).device
        sizes = {g.id: g.size for g in self.groups}
        self.vectors = ChannelVectors({g: sizes[g] for g in self.searched}, c.init, device)
        if c.init == "pretrained" and c.channel_init in (
            "auto",
            "l1",
        ):  # before the hypernetworks: their init reproduces W at these z
            scores = l1_channel_scores(self.model, [g for g in self.groups if g.id in self.searched])
            with torch.no_grad():
                for g in self.searched:
                    self.vectors.vector(g).copy_(scores[g].clamp(min=1e-2).to(device))
        self.model.add_module(VECTORS, self.vectors)
        src = {}
        for n, conv in self.layers.items():
            src[(n, "out")] = torch.zeros(conv.out_channels, dtype=torch.long)
            src[(n, "in")] = torch.zeros(conv.in_channels, dtype=torch.long)
        by_id = {g.id: g for g in self.groups}
        for gid in self.searched:
            g = by_id[gid]
            pos = torch.arange(g.size) + self.vectors.offset[gid]
            for m in g.members:
                if m.kind != "chan":  # PReLU channels follow their conv's z
                    src[(m.layer, m.kind)][m.index] = pos[:, None].expand_as(m.index)
        indicators = c.weight_sparsity > 0
        for n, conv in self.layers.items():
            hyper = HyperGate(conv, self.vectors, src[(n, "out")], src[(n, "in")], c.embedding_dim, c.init, indicators)
            parametrize.register_parametrization(conv, "weight", hyper)
            conv.parametrizations.weight.original.requires_grad_(False)
            if c.init == "scratch" and conv.bias is not None:
                with torch.no_grad():
                    conv.bias.zero_()
        self.hyper: dict[str, HyperGate] = {n: gate(conv) for n, conv in self.layers.items()}

    # -- masks and measurements -----------------------------------------------------------------------------

    @torch.no_grad()
    def current_keep(self) -> dict[int, torch.Tensor]:
        """Per searched group: |z| >= T, plus the min_channels largest |z| (the checks' channel masks)."""
        keep = {}
        for gid in self.searched:
            a = self.vectors.vector(gid).detach().abs().cpu()
            k = a >= self.config.channel_threshold
            k[torch.topk(a, self.min_keep[gid]).indices] = True
            keep[gid] = k
        return keep

    def keep_masks(self) -> dict[int, torch.Tensor]:
        """The channel masks in force: the locked ones, else the current ones."""
        return self.channel_keep if self.channel_keep is not None else self.current_keep()

    @torch.no_grad()
    def _dead(self, hyper: HyperGate) -> torch.Tensor:
        if self.weights_locked_at is not None:
            return ~hyper.weight_mask.cpu()
        return hyper.U.detach().abs().cpu() < self.config.weight_threshold

    def weight_sparsity(self, keep: dict[int, torch.Tensor] | None = None) -> float | None:
        """Dead fraction of the hypernetwork convs' weights inside kept channels (None without indicators)."""
        if self.u_opt is None:
            return None
        masks = group_masks_to_layer_masks(self.model, self.groups, self.keep_masks() if keep is None else keep)
        dead = total = 0
        for n, hyper in self.hyper.items():
            d = self._dead(hyper)[hyper.region(masks[n]["out"], masks[n]["in"]).cpu()]
            dead, total = dead + int(d.sum()), total + d.numel()
        return dead / total

    # -- the Pruner contract --------------------------------------------------------------------------------

    def own_parameters(self) -> list[nn.Parameter]:
        if self.report is not None:
            return []
        return list(self.vectors.z.values()) + [g.U for g in self.hyper.values() if g.U is not None]

    @torch.no_grad()
    def prox(self, lr: float) -> None:
        """z <- sign(z) max(|z| - lambda_C lr, 0) per searched group, unless it is down to min_channels above T."""
        shrink = self.lambda_c * lr
        for gid in self.searched:
            z = self.vectors.vector(gid)
            if int((z.abs() > self.config.channel_threshold).sum()) <= self.min_keep[gid]:
                continue
            z.copy_(z.sign() * (z.abs() - shrink).clamp_min(0))

    def _start_indicators(self, step: int) -> None:
        """The indicators start training: lr = indicator_lr, or 2 / (lambda_W x the search steps left), so an
        undefended U (from 1) dies half-way through the steps it gets."""
        left = max(1, self.budget_steps - step)
        lam = self.config.lambda_weight
        self.u_lr = self.config.indicator_lr or (2.0 / (lam * left) if lam > 0 else 1.0)  # no L1: plain SGD at 1
        if self.u_opt is not None:
            for group in self.u_opt.param_groups:
                group["lr"] = self.u_lr
            log.info("FMP: weight indicators start at step %d, lr %.3g", step, self.u_lr)

    @torch.no_grad()
    def _indicator_step(self) -> None:
        """U <- clamp(U - eta (dL/dU + lambda_W), 0, 1): SGD on task loss + lambda_W sum|U|, projected on [0, 1]."""
        if self.u_lr == 0.0:  # staged: U waits at 1 until the channels lock
            return
        lam = self.config.lambda_weight if self.l1_active and self.weights_locked_at is None else 0.0
        for hyper in self.hyper.values():
            u = hyper.U
            if u.grad is None:
                u.grad = torch.zeros_like(u)
            u.grad.add_(lam)  # the L1 subgradient lambda_W sign(U), U >= 0; at U = 0 the one-sided derivative
        self.u_opt.step()
        for hyper in self.hyper.values():
            hyper.U.clamp_(0.0, 1.0)
        if self.weights_locked_at is None:
            for n, hyper in self.hyper.items():
                if n not in self.u_sum:
                    self.u_sum[n] = torch.zeros_like(hyper.U, requires_grad=False)
                self.u_sum[n] += hyper.U.detach()
            self.u_steps += 1

    def _calibrate(self) -> None:
        """lambda_C = the median over searched channels of the mean |dL/dz| seen so far (a channel whose gradient
        cannot keep up with that dies); z's lr lets an undefended z (from 1) die in half the search budget."""
        if self.lambda_c <= 0:
            mean_abs = torch.cat([v.flatten() for v in self.z_grad_sum.values()]) / max(1, self.z_grad_steps)
            self.lambda_c = max(float(mean_abs.median()), 1e-12)
        if self.z_lr <= 0:
            self.z_lr = 2.0 / (self.lambda_c * self.budget_steps)
        self._set_grad_scale()
        log.info("FMP: lambda_C %.3g, channel lr %.3g", self.lambda_c, self.z_lr)

    def _set_grad_scale(self) -> None:
        """channel_prox group: each group's z gradients are scaled by lambda_C / that group's median mean |dL/dz|
        over the calibration, so the prox asks every channel to keep up with its own group's median."""
        if self.config.channel_prox != "group" or self.z_grad_steps == 0:
            return
        for g in self.searched:
            median = float((self.z_grad_sum[g] / self.z_grad_steps).median())
            self.grad_scale[g] = self.lambda_c / max(median, 1e-12)

    @torch.no_grad()
    def _channel_step(self, step: int) -> None:
        """SGD on z at its own constant lr, then the prox; before lambda_C is calibrated, only gradients count."""
        if self.lambda_c <= 0 or self.z_lr <= 0:
            for g in self.searched:
                grad = self.vectors.vector(g).grad
                if grad is not None:
                    self.z_grad_sum[g] += grad.abs()
            self.z_grad_steps += 1
            if step < self.check_every:
                return
            self._calibrate()
        for group in self.z_opt.param_groups:
            group["lr"] = self.z_lr
        for g in self.searched:
            grad = self.vectors.vector(g).grad
            if grad is not None and self.grad_scale[g] != 1.0:
                grad.mul_(self.grad_scale[g])
        self.z_opt.step()
        for g in self.searched:  # z scales channels: never beyond its starting scale (1 for "pretrained")
            z = self.vectors.vector(g)
            z.clamp_(-self.z_max[g], self.z_max[g])
        if self.channels_locked_at is None:
            self.prox(self.z_lr)

    def step(self, step: int, lr: float) -> None:
        if self.z_opt is not None:
            self._channel_step(step)
        if self.u_opt is not None:
            self._indicator_step()
        for p in self.own_parameters():  # the loop zeroes only its own optimiser's gradients
            p.grad = None
        self.steps_made = step
        if step >= self.budget_steps:
            self.exhausted = True
        if step % self.check_every == 0 or self.exhausted:
            self._check(step)

    @torch.no_grad()
    def _check(self, step: int) -> None:
        c = self.config
        keep = self.keep_masks()
        if self.channels_locked_at is None and self.cost.value(kept_counts(keep), c.metric) <= self.limit:
            self._lock_channels(step, keep)
            keep = self.channel_keep
        kept = kept_counts(keep)
        ws = self.weight_sparsity(keep)
        if ws is not None and self.weights_locked_at is None:
            self.l1_active = ws < c.weight_sparsity
            if self.channels_locked_at is not None and not self.l1_active:
                self._lock_weights(step)
                ws = self.weight_sparsity(keep)
        entry = {
            "step": step,
            "params_fraction": round(self.cost.fraction(kept, "params"), 6),
            "macs_fraction": round(self.cost.fraction(kept, "macs"), 6),
            "kept_channels": sum(kept.values()),
            "weight_sparsity": None if ws is None else round(ws, 6),
            "channels_locked": self.channels_locked_at is not None,
            "weights_locked": self.weights_locked_at is not None,
        }
        self.trace.append(entry)
        log.debug("FMP check %s", entry)

    def _lock_channels(self, step: int, keep: dict[int, torch.Tensor]) -> None:
        """Fix the channel masks with the cut at the target: channels that crossed T together since the last
        check come back in descending |z| while the budget holds."""
        scores = {g: self.vectors.vector(g).detach().abs().cpu() for g in self.searched}
        self.channel_keep = fill_to_budget(self.cost, self.config.metric, self.limit, scores, keep)
        self._set_channel_masks()
        self.channels_locked_at = step
        if self.u_lr == 0.0:
            self._start_indicators(step)
            if self.config.rewind:
                self.rewind_state = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items() if not _indicator_key(k)
                }
        log.info("FMP: channel target met at step %d; channel masks locked", step)

    @torch.no_grad()
    def _set_channel_masks(self) -> None:
        masks = group_masks_to_layer_masks(self.model, self.groups, self.channel_keep)
        for n, hyper in self.hyper.items():
            hyper.out_mask.copy_(masks[n]["out"])
            hyper.in_mask.copy_(masks[n]["in"])

    @torch.no_grad()
    def _lock_weights(self, step: int) -> None:
        self._cut_weights(self.channel_keep)
        if self.rewind_state is not None:  # the indicators chose; the net goes back to the channel lock, undamped
            self.model.load_state_dict(self.rewind_state, strict=False)
            for hyper in self.hyper.values():
                hyper.U.copy_(hyper.weight_mask.to(hyper.U.dtype))
            self.rewind_state = None
        self.weights_locked_at = step
        log.info("FMP: weight sparsity target met at step %d; weight masks locked", step)

    @torch.no_grad()
    def _cut_weights(self, keep: dict[int, torch.Tensor]) -> None:
        """Weight masks inside the kept channels with exactly the target's share dead: the lowest scores over all
        hypernetwork convs (`weight_score`: mean U over the indicator steps x generated |W|, or U; U share one
        scale, all start at 1 under the same decay), ties broken by the smaller generated |W|. The dead indicators
        are set to 0; survivors keep their U, so the locked net computes what the searching net computed minus the
        dead weights (which U had already shrunk).

        Survivors are not reset to U = 1 here: while U decays the rest of the net (conv biases, the other layers'
        hypernetworks) adapts to the damped kernels, and undoing the damping alone multiplied every layer's output
        (x8 per conv at lambda_W = 1e-2, 1e7 at the output of edsr-tiny). `_lock_weights` resets them together
        with the rest of the net when it rewinds."""
        masks = group_masks_to_layer_masks(self.model, self.groups, keep)
        regions, scores, ws = {}, [], []
        for n, hyper in self.hyper.items():
            region = hyper.region(masks[n]["out"], masks[n]["in"])
            regions[n] = region
            w = hyper.generate().detach().abs()
            if self.config.weight_score == "mean-u-abs-w":
                score = (self.u_sum[n] / self.u_steps if self.u_steps else hyper.U.detach()) * w
            else:
                score = hyper.U.detach()
            scores.append(score[region].cpu())
            ws.append(w[region].cpu())
        score, w = torch.cat(scores), torch.cat(ws)
        order = torch.sort(w, stable=True).indices
        order = order[torch.sort(score[order], stable=True).indices]
        dead = torch.zeros(score.numel(), dtype=torch.bool)
        dead[order[: math.ceil(self.config.weight_sparsity * score.numel() - 1e-9)]] = True
        start = 0
        for n, hyper in self.hyper.items():
            size = int(regions[n].sum())
            mask = torch.ones(hyper.shape, dtype=torch.bool, device=hyper.U.device)
            mask[regions[n]] = ~dead[start : start + size].to(mask.device)
            hyper.weight_mask.copy_(mask)
            hyper.U.mul_(mask.to(hyper.U.dtype))  # dead indicators 0; survivors keep their value
            start += size

    def done(self) -> bool:
        if self.exhausted:
            return True
        return self.channels_locked_at is not None and (self.u_opt is None or self.weights_locked_at is not None)

    def status(self) -> dict[str, str]:
        if not self.trace:
            return {}
        last = self.trace[-1]
        out = {self.config.metric: f"{100 * last[f'{self.config.metric}_fraction']:.1f}%"}
        if last["weight_sparsity"] is not None:
            out["wsp"] = f"{100 * last['weight_sparsity']:.1f}%"
        return out

    def finalize(self) -> dict[str, Any]:
        raise RuntimeError("an FMP search is finished by materialize() and fine-tuning, not finalize()")

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "total_steps": self.total_steps,
            "z": {str(g): self.vectors.vector(g).detach().cpu().clone() for g in self.searched},
            "U": {n: h.U.detach().cpu().clone() for n, h in self.hyper.items() if h.U is not None},
            "z_opt": None if self.z_opt is None else self.z_opt.state_dict(),
            "lambda_c": self.lambda_c,
            "z_lr": self.z_lr,
            "z_grad_sum": {str(g): v.cpu().clone() for g, v in self.z_grad_sum.items()},
            "z_grad_steps": self.z_grad_steps,
            "z_max": {str(g): v for g, v in self.z_max.items()},
            "u_opt": None if self.u_opt is None else self.u_opt.state_dict(),
            "u_lr": self.u_lr,
            "trace": copy.deepcopy(self.trace),
            "channel_keep": None if self.channel_keep is None else {str(g): k for g, k in self.channel_keep.items()},
            "channels_locked_at": self.channels_locked_at,
            "weights_locked_at": self.weights_locked_at,
            "l1_active": self.l1_active,
            "rewind_state": None if self.rewind_state is None else _cpu(self.rewind_state),
            "checkpoint_state": None if self.checkpoint_state is None else _cpu(self.checkpoint_state),
            "u_sum": {n: v.cpu() for n, v in self.u_sum.items()},
            "u_steps": self.u_steps,
            "exhausted": self.exhausted,
            "steps_made": self.steps_made,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != asdict(self.config) or state.get("total_steps") != self.total_steps:
            raise ValueError("the saved run used other FMP settings")
        for g in self.searched:
            self.vectors.vector(g).copy_(state["z"][str(g)])
        for n, u in state["U"].items():
            self.hyper[n].U.copy_(u)
        if self.z_opt is not None:
            self.z_opt.load_state_dict(state["z_opt"])
        self.lambda_c, self.z_lr = float(state["lambda_c"]), float(state["z_lr"])
        self.z_grad_sum = {int(g): v.to(self.vectors.vector(int(g)).device) for g, v in state["z_grad_sum"].items()}
        self.z_grad_steps = int(state["z_grad_steps"])
        if self.lambda_c > 0:
            self._set_grad_scale()
        self.z_max = {int(g): float(v) for g, v in state["z_max"].items()}
        if self.u_opt is not None:
            self.u_opt.load_state_dict(state["u_opt"])
        self.u_lr = float(state["u_lr"])
        self.trace = copy.deepcopy(state["trace"])
        keep = state["channel_keep"]
        self.channel_keep = None if keep is None else {int(g): k.bool() for g, k in keep.items()}
        if self.channel_keep is not None:
            self._set_channel_masks()
        self.channels_locked_at, self.weights_locked_at = state["channels_locked_at"], state["weights_locked_at"]
        self.exhausted, self.steps_made = bool(state["exhausted"]), int(state["steps_made"])
        self.l1_active = bool(state["l1_active"])
        rewind = state["rewind_state"]
        device = next(self.model.parameters()).device
        self.rewind_state = None if rewind is None else {k: v.to(device) for k, v in rewind.items()}
        before = state.get("checkpoint_state")
        self.checkpoint_state = None if before is None else {k: v.to(device) for k, v in before.items()}
        self.u_sum = {n: v.to(device) for n, v in state["u_sum"].items()}
        self.u_steps = int(state["u_steps"])


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state.items()}


def _indicator_key(key: str) -> bool:
    """State-dict entries a rewind leaves alone: the indicators and the locked masks."""
    return key.rpartition(".")[2] in ("U", "weight_mask", "out_mask", "in_mask")


def _why_not_searched(model: nn.Module, group: ChannelGroup, layers: dict[str, nn.Module]) -> str | None:
    """Why a prunable group keeps its width in the search (None: it is searched). z scores a channel only if every
    conv-like layer touching it generates its kernel from z, and a BatchNorm after a conv normalises z away."""
    missing = sorted({m.layer for m in group.members if m.kind != "chan" and m.layer not in layers})
    if missing:
        return f"no hypernetwork on {', '.join(missing[:3])}"
    norms = [
        m.layer for m in group.members if m.kind == "chan" and isinstance(model.get_submodule(m.layer), nn.BatchNorm2d)
    ]
    if norms:
        return f"BatchNorm {norms[0]} normalises the channel vector away"
    return None
