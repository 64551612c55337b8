"""FMP — flexible meta pruning (Zhang et al., ICML 2024): channels and weights pruned at once through a hypernetwork.

FMP has no public code. This is DHP's hypernetwork and proximal gradient (Li et al., ECCV 2020, ofsoundof/dhp, the
code FMP builds on) plus FMP's weight indicators as the paper's abstract and reviews describe them.

The search (`FMPSearch`, a `Pruner` for the ordinary training loop):

* Channel vectors: one z_g per prunable coupling group (`coupling.find_groups`), so residual adds, concats and
  PixelShuffle are handled for any traced net instead of per architecture (DHP hand-codes them per model): a
  PixelShuffle producer's s^2 sub-channels read the same entry, a concat consumer reads several groups at their
  offsets. Unprunable groups (RGB, anything through a fixed conv) read a constant 1.
* Hypernetwork per conv (DHP, element-wise weights): M = z_in z_out^T + B0; e_ij = M_ij w1_ij + b1_ij in R^m;
  o_ij = W2_ij e_ij + b2_ij in R^{k^2}; the kernel is o reshaped to [c_out, c_in, k, k]. Parameters are stored in
  [c_out, c_in] order (DHP stores [c_in, c_out] and permutes at the end; the maths is the same). It is a torch
  parametrization of the conv's `weight` that ignores the stored tensor (requires_grad False, so DDP sees no unused
  parameter) and returns W = kernel * U (* the locked masks, below).
* Weight indicators U (FMP): U has the weight's shape, starts at 1 and multiplies the generated kernel; an L1
  penalty lambda_W * sum|U| (the norm FMP's Table 5 chose) pushes it to 0.
* Updates: B0, w1, b1, W2, b2 and the conv biases are ordinary parameters that the loop's Adam trains. z and U
  belong to the pruner. They are registered in the model, so DDP averages their gradients and the loop's state
  file saves them. After each loop step, z takes a plain SGD step at its own constant `channel_lr` and then the
  prox z <- sign(z) max(|z| - lambda_C channel_lr, 0): a proximal-gradient step on task loss + lambda_C |z|_1, so
  a channel survives only while its mean |dL/dz| keeps up with lambda_C. (DHP steps z with its main Adam, which
  moves every z by ~lr per step whatever its gradient: with lambda_C > 1 every channel then dies at the same rate,
  with lambda_C < 1 none dies within a short search. SGD keeps the gradient's magnitude, which is the signal.)
  The prox skips a group once it is down to min_channels entries above T (DHP). U takes an SGD step at a constant
  `indicator_lr` on dL/dU + lambda_W (FMP's abstract names "proximal gradient and SGD").
* Checks every `check_every` steps (DHP: 100). A channel is kept when |z| >= T or it is among its group's
  min_channels largest (DHP's |z| >= min(T, k-th largest), made robust to ties and all-zero vectors). A weight is
  dead when U < T_w. The compact net's parameters or MACs come from the masks (`channel_l1.ChannelCost`, the same
  count `model_stats` gives). The weight sparsity counts dead weights inside the kept channels of the
  hypernetwork convs.

Our choices where the paper is silent (or only its reviews describe it):

* When U trains (`weights_from`). By default the search is staged: U waits at 1 until the channels lock, then
  trains (SGD + L1) until the weight target is met. Run jointly from the first step ("start"), the L1 shrinks
  every U of a layer whose |dL/dU| is below lambda_W at the same rate: at lambda_W = 1e-4 that was all of
  EDSR's body, whose output faded for hundreds of steps while z was being scored (the loss rose 5-fold), and
  FMP lost 1.3 dB to channel-only pruning at the same parameter budget. Staged, z scores channels of an intact
  net and the indicators then pick weights inside the kept channels.
* Rewinding (`rewind`, staged only, default on). The indicator phase decides which weights die; at the weight lock
  everything else (hypernetworks, z, biases) goes back to its state at the channel lock and the survivors' U to 1,
  as lottery-ticket rewinding does. While U decays under the L1 the rest of the net adapts to damped kernels:
  kept as it was, the fine-tune started from damped survivors and lost 1.6 dB (31.54 against 33.11 for resetting
  only U, edsr-tiny x2, 2000 steps); resetting only U undid a damping the biases had adapted to (x8 per conv at
  lambda_W = 1e-2, outputs of 1e7). Without rewind the dead U go to 0 and survivors keep theirs.
* Where U enters: the literal reading of "indicators influence the sparsity of kernel weights", a multiplicative
  gate on the generated kernel. U is projected onto [0, 1] after each SGD step. Plain SGD
  blew up on a randomly initialised tiny EDSR: dL/dU in the head reaches 1e-1, U went to -1e2 within 5 steps
  and the loss to NaN by step 8. The projection also makes dead indicators exactly 0 instead of flipping sign
  around it. At U = 0 the one-sided derivative lambda_W applies, so a weight comes back only when
  -dL/dU > lambda_W.
* Targets are kept fractions of the original net. `params_target` counts non-zero parameters, so channels and
  weights share one budget, as FMP reports total compression: the channel search stops where the compact net,
  once `weight_sparsity` of its hypernetwork convs' weights are zero, holds at most the target's non-zeros. FMP
  therefore keeps more channels than channel-only pruning at the same `params_target` and pays for them with
  zeros. `macs_target` counts the compact net's dense MACs for a 1280x720 output (zeros are still multiplied by
  dense runtimes), so there the weight cut comes on top. `weight_sparsity` is the zero fraction in the
  hypernetwork convs of the compact net.
* Stopping (FMP's Table 6 "Channel"/"Weight"/"Total" criteria are unclear). Channels lock at the first check that
  meets the budget. The cut is placed at the target: channels that crossed T together since the last check come
  back in descending |z| while the budget holds. The prox then stops and the gates zero the pruned rows and
  columns, so the searching net computes what the compact net will. The L1 on U runs only while the weight
  sparsity is below its target. Once channels are locked and the target is met, the weight masks lock with
  exactly the target's share dead, lowest score first over all hypernetwork convs (`weight_score`): by default
  the indicator's mean over the indicator phase times the generated |W|, ties by |W|; "u" ranks by U alone. Dead
  U are set to 0 and survivors keep theirs (then `rewind`, below). Why the mean and the magnitude: at the default
  lambda_W the indicator lr is ~50, so U moves in large noisy steps and dies in cohorts (they all start at 1 under
  the same decay); which 30 % sit at 0 at one step is largely noise, and cutting exactly those lost 0.9 dB
  (checked every step: 32.21 against 33.11 dB when a 50-step check cadence let |W| decide among a larger U = 0
  cohort; edsr-tiny x2, 2000 steps). The mean keeps U's evidence, |W| keeps what matters to the output. The
  search ends when both parts are locked, or after `search_fraction` of the steps. The remaining steps fine-tune
  the compact net with a fresh Adam and schedule (DHP: search, then fine-tune).
* Forcing. If the search runs out first, `materialize` forces whatever is still missing. Channels go in global
  ascending |z|, one at a time with the budget re-counted, never below min_channels. Weights go per layer in
  ascending |W|; the search's own zeros stay, and every hypernetwork conv of the compact net ends at the target.
  The report says `forced: true` and which part was forced.
* Init "pretrained" (the default: users start from a dense checkpoint, although FMP reportedly trains from
  scratch): z = 1, biases 0, w1 ~ U(-sqrt3, sqrt3) and W2_ij = W_ij w1_ij^T / |w1_ij|^2. The generated kernel is
  then exactly the checkpoint's, and W_ij = (z_in_i z_out_j + B0_ij) W_ij stays linear in z, so shrinking z
  shrinks whole channels. "scratch" is DHP's init: z ~ N(0, 1), W2 ~ U(+-sqrt3 sqrt(1/(m c_in k^2))), all biases
  0 (the hypernetwork convs' own biases too, since DHP zeroes the main net's).
* Defaults. lambda_C = 0 means calibrated: over the first `check_every` steps z does not move and the mean
  |dL/dz| per channel is recorded; lambda_C becomes its median (channels whose gradient cannot keep up with the
  median's die). channel_lr = 0 means 2 / (lambda_C S) for a search budget of S steps, so an undefended z (from 1)
  dies by mid-search. lambda_W = 1e-4, T_w = 5e-3 (DHP's channel threshold, reused); indicator_lr = 0 means
  2 / (lambda_W S_U), S_U the search steps left when the indicators start, for the same reason. Anything that
  does not finish in time is forced (below). The hypernetwork moves a kernel element about m times faster than
  the loop's lr moves a plain weight (Adam moves each of its m W2 entries by ~lr), and DHP searched at lr 1e-4:
  the search runs at lr x `search_lr_scale` (default 1/m).
* Convs: by default, every trainable conv in at least one prunable group. A group is searched only when all its
  member convs have hypernetworks, because z cannot score a channel whose weights some conv does not generate
  from z. Other groups keep their width.

`materialize()` turns the searched net into a plain compact one: the generated kernels become weights, the
hypernetworks and vectors go, `slicing.slice_model` slices the channels, and dead weights are zeroed and held by
`gates.MaskGate`s. `FixedMaskPruner` fine-tunes it with those masks and bakes them. `run_fmp` does the whole run.
Channel-only meta pruning (DHP-style, FMP's structured half) is the same code with weight_sparsity = 0: no
indicators, no weight masks, method "channel-only".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.data import PatchSampler
from compress.pruning.base import Pruner
from compress.pruning.channel_l1 import (
    ChannelCost,
    budget_summary,
    check_reachable,
    fill_to_budget,
    kept_counts,
    min_keep_per_group,
    prune_to_budget,
)
from compress.pruning.coupling import ChannelGroup, find_groups, group_masks_to_layer_masks
from compress.pruning.gates import MaskGate, attach_gates, bake, gate, layer_sparsity, prunable_convs, select_convs
from compress.pruning.slicing import slice_model
from compress.train import TrainConfig, train
from edgesr.errors import CheckFailed

log = logging.getLogger(__name__)
INITS = ("pretrained", "scratch")
WEIGHTS_FROM = ("channel-lock", "start")
WEIGHT_SCORES = ("mean-u-abs-w", "u")
VECTORS = "fmp_channel_vectors"  # the model attribute holding the channel vectors during the search


@dataclass(frozen=True)
class FMPConfig:
    params_target: float | None = None  # kept fraction of the original parameters after channel pruning
    macs_target: float | None = None  # ... or of its MACs for a 1280x720 output (exactly one of the two)
    weight_sparsity: float = 0.0  # zero fraction wanted in the hypernetwork convs of the compact net; 0 = channels only
    embedding_dim: int = 8  # m
    lambda_channel: float = 0.0  # lambda_C, prox strength; 0 = calibrated (median |dL/dz| over the first check)
    channel_lr: float = 0.0  # SGD lr of z (constant); 0 = 2 / (lambda_C * search budget)
    search_lr_scale: float = 0.0  # the search's lr = loop lr * this; 0 = 1 / embedding_dim
    lambda_weight: float = 1e-4  # lambda_W, L1 on the indicators
    indicator_lr: float = 0.0  # SGD lr of the indicators (constant); 0 = 2 / (lambda_W * search steps they get)
    weights_from: str = "channel-lock"  # when the indicators start: "channel-lock" (staged) or "start" (joint)
    rewind: bool = True  # staged: at the weight lock, the net goes back to its channel-lock state, U to the mask
    weight_score: str = "mean-u-abs-w"  # the cut: lowest mean U over the indicator phase x |W|, or lowest U ("u")
    channel_threshold: float = 5e-3  # T (DHP)
    weight_threshold: float = 5e-3  # T_w
    min_channels: int = 4  # no group below min(min_channels, size) (DHP)
    check_every: int = 100  # steps between mask checks (DHP)
    search_fraction: float = 0.5  # most of the run the search may take; the rest fine-tunes
    init: str = "pretrained"
    layers: str = "auto"  # "auto" or a gates.select_convs spec (all, default, globs)

    def __post_init__(self) -> None:
        targets = [t for t in (self.params_target, self.macs_target) if t is not None]
        if len(targets) != 1:
            raise ValueError("FMP needs exactly one of params_target and macs_target")
        if not 0.0 < targets[0] < 1.0:
            raise ValueError(f"FMP {self.metric} target must be in (0, 1), got {targets[0]}")
        if not 0.0 <= self.weight_sparsity < 1.0:
            raise ValueError(f"FMP weight_sparsity must be in [0, 1), got {self.weight_sparsity}")
        if self.embedding_dim < 1 or self.min_channels < 1 or self.check_every < 1:
            raise ValueError("FMP needs embedding_dim, min_channels and check_every >= 1")
        if min(self.lambda_channel, self.lambda_weight, self.channel_lr, self.search_lr_scale) < 0:
            raise ValueError("FMP lambda_channel, lambda_weight, channel_lr and search_lr_scale must be >= 0")
        if min(self.channel_threshold, self.weight_threshold) <= 0:
            raise ValueError("FMP channel_threshold and weight_threshold must be > 0")
        if self.indicator_lr < 0:
            raise ValueError(f"FMP indicator_lr must be >= 0, got {self.indicator_lr}")
        if self.weight_score not in WEIGHT_SCORES:
            raise ValueError(f"FMP weight_score must be one of {', '.join(WEIGHT_SCORES)}, got {self.weight_score!r}")
        if self.weights_from not in WEIGHTS_FROM:
            raise ValueError(f"FMP weights_from must be one of {', '.join(WEIGHTS_FROM)}, got {self.weights_from!r}")
        if not 0.0 < self.search_fraction < 1.0:
            raise ValueError(f"FMP search_fraction must be in (0, 1), got {self.search_fraction}")
        if self.init not in INITS:
            raise ValueError(f"FMP init must be one of {', '.join(INITS)}, got {self.init!r}")

    @property
    def metric(self) -> str:
        return "params" if self.params_target is not None else "macs"

    @property
    def target(self) -> float:
        return self.params_target if self.params_target is not None else self.macs_target  # type: ignore[return-value]

    @property
    def method(self) -> str:
        return "fmp" if self.weight_sparsity > 0 else "channel-only"


class ChannelVectors(nn.Module):
    """The searched groups' channel vectors z_g, and a constant 1 that unsearched channels read."""

    def __init__(self, sizes: dict[int, int], init: str, device: torch.device) -> None:
        super().__init__()
        make = torch.ones if init == "pretrained" else torch.randn
        self.z = nn.ParameterDict({str(g): nn.Parameter(make(n, device=device)) for g, n in sizes.items()})
        self.register_buffer("one", torch.ones(1, device=device))
        self.offset: dict[int, int] = {}  # group id -> position of its z in `flat()` (ParameterDict sorts keys)
        pos = 1
        for key, z in self.z.items():
            self.offset[int(key)], pos = pos, pos + z.numel()

    def vector(self, group: int) -> nn.Parameter:
        return self.z[str(group)]

    def flat(self) -> torch.Tensor:
        return torch.cat([self.one, *self.z.values()])


class HyperGate(nn.Module):
    """The weight parametrization of one conv: the DHP hypernetwork's kernel times the weight indicators.

    `src_out`/`src_in` give, per layer channel, its position in `ChannelVectors.flat()`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        vectors: ChannelVectors,
        src_out: torch.Tensor,
        src_in: torch.Tensor,
        embedding_dim: int,
        init: str,
        indicators: bool,
    ) -> None:
        super().__init__()
        c_out, c_in, kh, kw = weight.shape
        k2, m = kh * kw, embedding_dim
        dev, dt = weight.device, weight.dtype
        self.shape = tuple(weight.shape)
        self._vectors = (vectors,)  # a tuple: shared, owned (and saved) by the model, not by each gate
        self.register_buffer("src_out", src_out.to(dev))
        self.register_buffer("src_in", src_in.to(dev))
        w1 = torch.empty(c_out, c_in, m, device=dev, dtype=dt).uniform_(-math.sqrt(3), math.sqrt(3))
        if init == "pretrained":  # W2_ij = W_ij w1_ij^T / |w1_ij|^2, so that W2_ij (1 * w1_ij) = W_ij
            w = weight.detach().reshape(c_out, c_in, k2, 1)
            w2 = w * w1[:, :, None, :] / w1.pow(2).sum(-1)[:, :, None, None]
        else:  # DHP's "hyperfan-in"
            bound = math.sqrt(3) * math.sqrt(1.0 / (m * c_in * k2))
            w2 = torch.empty(c_out, c_in, k2, m, device=dev, dtype=dt).uniform_(-bound, bound)
        self.B0 = nn.Parameter(torch.zeros(c_out, c_in, device=dev, dtype=dt))
        self.w1 = nn.Parameter(w1)
        self.b1 = nn.Parameter(torch.zeros(c_out, c_in, m, device=dev, dtype=dt))
        self.W2 = nn.Parameter(w2.contiguous())
        self.b2 = nn.Parameter(torch.zeros(c_out, c_in, k2, device=dev, dtype=dt))
        self.register_parameter("U", nn.Parameter(torch.ones_like(weight)) if indicators else None)
        # Locked masks (all True until the search locks them).
        self.register_buffer("out_mask", torch.ones(c_out, dtype=torch.bool, device=dev))
        self.register_buffer("in_mask", torch.ones(c_in, dtype=torch.bool, device=dev))
        mask = torch.ones(self.shape, dtype=torch.bool, device=dev) if indicators else None
        self.register_buffer("weight_mask", mask)

    def generate(self) -> torch.Tensor:
        """The hypernetwork's kernel, before indicators and masks."""
        z = self._vectors[0].flat()
        m = z[self.src_out][:, None] * z[self.src_in][None, :] + self.B0
        e = m[..., None] * self.w1 + self.b1
        o = torch.einsum("oikm,oim->oik", self.W2, e) + self.b2
        return o.reshape(self.shape)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored weight is ignored: the kernel comes from the hypernetwork."""
        k = self.generate()
        k = k * (self.out_mask[:, None, None, None] & self.in_mask[None, :, None, None]).to(k.dtype)
        if self.U is not None:
            k = k * self.U * self.weight_mask.to(k.dtype)
        return k


def hyper_convs(model: nn.Module, groups: list[ChannelGroup], spec: str) -> dict[str, nn.Conv2d]:
    """The convs that get hypernetworks: "auto" = every trainable conv in a prunable group, else select_convs."""
    if spec == "auto":
        touched = {m.layer for g in groups if g.prunable for m in g.members}
        chosen = {n: c for n, c in prunable_convs(model).items() if n in touched}
        if not chosen:
            raise ValueError("no trainable conv lies in a prunable channel group")
        return chosen
    return select_convs(model, spec)


class FMPSearch(Pruner):
    """The search phase: hypernetworks on the chosen convs, prox on z, SGD on U, checks, locks, `done`."""

    def __init__(self, model: nn.Module, config: FMPConfig, total_steps: int) -> None:
        if total_steps < 2:
            raise ValueError(f"FMP needs at least 2 steps (search, then fine-tuning), got {total_steps}")
        if hasattr(model, VECTORS):
            raise ValueError("this model already carries FMP hypernetworks")
        self.name = config.method
        self.model, self.config, self.total_steps = model, config, total_steps
        self.budget_steps = max(1, min(total_steps - 1, int(config.search_fraction * total_steps)))
        self.groups = find_groups(model)
        self.layers = hyper_convs(model, self.groups, config.layers)
        self.searched = [g.id for g in self.groups if g.prunable and all(m.layer in self.layers for m in g.members)]
        self.cost = ChannelCost(model, self.groups, self.searched, model.config.scale)
        if config.metric == "params":  # the budget counts non-zeros: the weight cut pays for part of it
            self.cost.expect_weight_sparsity(self.layers, config.weight_sparsity)
        self.min_keep = min_keep_per_group(self.groups, self.searched, config.min_channels)
        check_reachable(self.cost, config.metric, config.target, self.min_keep)
        self.limit = int(config.target * self.cost.original[config.metric])
        self._attach()
        zs = list(self.vectors.z.values())
        self.z_opt = torch.optim.SGD(zs, lr=1.0) if zs else None  # lr set once lambda_C is known
        self.lambda_c = config.lambda_channel  # 0 until calibrated
        self.z_lr = config.channel_lr
        self.z_grad_sum = {g: torch.zeros_like(self.vectors.vector(g)) for g in self.searched}
        self.z_grad_steps = 0
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
                src[(m.layer, m.kind)][m.index] = pos[:, None].expand_as(m.index)
        indicators = c.weight_sparsity > 0
        for n, conv in self.layers.items():
            hyper = HyperGate(
                conv.weight, self.vectors, src[(n, "out")], src[(n, "in")], c.embedding_dim, c.init, indicators
            )
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
            out_keep, in_keep = masks[n]
            d = self._dead(hyper)[out_keep][:, in_keep]
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
        log.info("FMP: lambda_C %.3g, channel lr %.3g", self.lambda_c, self.z_lr)

    @torch.no_grad()
    def _channel_step(self, step: int) -> None:
        """SGD on z at its own constant lr, then the prox; before lambda_C is calibrated, only gradients count."""
        if self.lambda_c <= 0 or self.z_lr <= 0:
            for g in self.searched:
                grad = self.vectors.vector(g).grad
                if grad is not None:
                    self.z_grad_sum[g] += grad.abs()
            self.z_grad_steps += 1
            if step < self.config.check_every:
                return
            self._calibrate()
        for group in self.z_opt.param_groups:
            group["lr"] = self.z_lr
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
        if step % self.config.check_every == 0 or self.exhausted:
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
            hyper.out_mask.copy_(masks[n][0])
            hyper.in_mask.copy_(masks[n][1])

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
            out_keep, in_keep = (m.to(hyper.U.device) for m in masks[n])
            region = (out_keep[:, None, None, None] & in_keep[None, :, None, None]).expand(hyper.shape)
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
            "rewind_state": None if self.rewind_state is None else {k: v.cpu() for k, v in self.rewind_state.items()},
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
        self.u_sum = {n: v.to(device) for n, v in state["u_sum"].items()}
        self.u_steps = int(state["u_steps"])

    # -- after the search -----------------------------------------------------------------------------------

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """The compact model: final kernels as plain weights, channels sliced, dead weights zeroed under MaskGates.

        Consumes the search: the searched model loses its hypernetworks (its convs keep the final kernels,
        full width), and this pruner can no longer step.
        """
        if self.report is not None:
            raise RuntimeError("materialize() was already called")
        c = self.config
        forced = {"channels": False, "weights": False}
        keep = self.keep_masks()
        if self.cost.value(kept_counts(keep), c.metric) > self.limit:
            scores = {g: self.vectors.vector(g).detach().abs().cpu() for g in self.searched}
            keep, reached = prune_to_budget(self.cost, c.metric, self.limit, scores, keep, self.min_keep)
            if not reached:
                raise CheckFailed(f"FMP could not force the {c.metric} target {c.target}")
            forced["channels"] = True
        self.channel_keep = keep  # the final masks (inspectable after materialize)
        weights_by, dead = None, {}
        if self.u_opt is not None:
            if self.weights_locked_at is not None:
                weights_by = "locked by the search"
            elif self.weight_sparsity(keep) >= c.weight_sparsity:
                self._cut_weights(keep)
                weights_by = "lowest U, cut at materialize"
            else:
                weights_by = "forced: lowest |W| per layer"
            cut = not weights_by.startswith("forced")
            thr = c.weight_threshold
            dead = {n: (~h.weight_mask if cut else h.U.detach() < thr).cpu() for n, h in self.hyper.items()}
        for conv in self.layers.values():  # the final kernel W_gen * U becomes the conv's plain weight
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
            conv.weight.requires_grad_(True)
        delattr(self.model, VECTORS)
        layer_masks = group_masks_to_layer_masks(self.model, self.groups, keep)
        compact = slice_model(self.model, self.groups, keep)
        alive = {}
        for n, d in dead.items():
            out_keep, in_keep = layer_masks[n]
            alive[n] = ~d[out_keep][:, in_keep]
        sparsity_found = None
        if alive:
            sparsity_found = 1 - sum(int(a.sum()) for a in alive.values()) / sum(a.numel() for a in alive.values())
            if sparsity_found < c.weight_sparsity:
                for n, a in alive.items():
                    _top_up(compact.get_submodule(n).weight.detach(), a, c.weight_sparsity)
                forced["weights"] = True
            gated = {n: compact.get_submodule(n) for n in alive}
            for n, conv in gated.items():
                conv.weight[~alive[n].to(conv.weight.device)] = 0.0
            attach_gates(gated, MaskGate)
            for n, conv in gated.items():
                gate(conv).mask.copy_(alive[n])
        self.report = {
            "method": c.method,
            "targets": {
                "params_fraction": c.params_target,
                "macs_fraction": c.macs_target,
                "weight_sparsity": c.weight_sparsity,
            },
            **budget_summary(self.cost, keep),
            "weight_sparsity_found": None if sparsity_found is None else round(sparsity_found, 6),
            "weight_masks": weights_by,
            "hypernetwork_layers": list(self.layers),
            "searched_groups": len(self.searched),
            "search_steps": self.steps_made,
            "search_budget_steps": self.budget_steps,
            "channels_locked_at": self.channels_locked_at,
            "weights_locked_at": self.weights_locked_at,
            "forced": any(forced.values()),
            "forced_parts": forced,
            "settings": {
                **asdict(c),
                "z_update": "SGD at channel_lr, then prox soft threshold lambda_C * channel_lr",
                "lambda_channel_used": self.lambda_c,
                "channel_lr_used": self.z_lr,
                "search_lr_scale_used": search_lr_scale(self.config),
                "indicator_update": "SGD at indicator_lr on task loss + lambda_weight * sum|U|, U projected on [0, 1]",
                "indicator_lr_used": self.u_lr if self.u_opt is not None else None,
            },
            "trace": copy.deepcopy(self.trace),
        }
        log.info(
            "FMP materialized: %s fraction %.3f (target %.3f), weight sparsity found %s, forced %s",
            c.metric,
            self.report[f"achieved_{c.metric}_fraction"],
            c.target,
            "-" if sparsity_found is None else f"{sparsity_found:.3f}",
            forced,
        )
        self.hyper, self.z_opt, self.u_opt = {}, None, None
        return compact

    def finetune_pruner(self, compact: nn.Module) -> FixedMaskPruner:
        """The pruner that fine-tunes `compact` (from `materialize`) and bakes its masks at the end."""
        if self.report is None:
            raise RuntimeError("call materialize() first")
        return FixedMaskPruner(compact, list(self.layers), self.report, name=self.name)


def _indicator_key(key: str) -> bool:
    """State-dict entries a rewind leaves alone: the indicators and the locked masks."""
    return key.rpartition(".")[2] in ("U", "weight_mask", "out_mask", "in_mask")


def _top_up(weight: torch.Tensor, alive: torch.Tensor, sparsity: float) -> None:
    """Kill the smallest-|W| live weights of one layer until its dead fraction is at least `sparsity`."""
    need = math.ceil(sparsity * alive.numel() - 1e-9) - int((~alive).sum())
    if need <= 0:
        return
    score = weight.abs().cpu().flatten().clone()
    score[~alive.flatten()] = math.inf
    alive.view(-1)[torch.topk(score, need, largest=False).indices] = False


class FixedMaskPruner(Pruner):
    """Fine-tunes a compact net whose `layers` may carry MaskGates (held fixed); finalize bakes them.

    `record` is what the manifest gets, completed with the sparsity measured after baking.
    """

    def __init__(self, model: nn.Module, layers: list[str], record: dict[str, Any], name: str = "fmp") -> None:
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


def search_lr_scale(config: FMPConfig) -> float:
    """The search's lr relative to the loop's: the hypernetwork moves a kernel element about `embedding_dim`
    times faster than a plain weight at the same lr (DHP searched at 1e-4), hence 1/m by default."""
    return config.search_lr_scale or 1.0 / config.embedding_dim


def run_fmp(
    model: nn.Module,
    sampler: PatchSampler,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    config: FMPConfig,
    resume: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A whole FMP run in `train_cfg.steps` steps: search in `<run_dir>/search` (ends early when both targets are
    met), materialize, fine-tune the compact net for the remaining steps in `<run_dir>/finetune`, bake.

    Each phase resumes on its own. `model` is consumed (it ends as the full-width searched net). Returns (compact
    model with plain convs, report for the manifest).
    """
    run_dir = Path(run_dir)
    search = FMPSearch(model, config, total_steps=train_cfg.steps)
    search_cfg = dataclasses.replace(train_cfg, lr=train_cfg.lr * search_lr_scale(config))
    run_search = train(model, sampler, search_cfg, run_dir / "search", pruner=search, resume=resume)
    compact = search.materialize()
    finetune_cfg = dataclasses.replace(train_cfg, steps=train_cfg.steps - run_search["steps"])
    pruner = search.finetune_pruner(compact)
    run_finetune = train(compact, sampler, finetune_cfg, run_dir / "finetune", pruner=pruner, resume=resume)
    report = pruner.finalize()
    report["finetune_steps"] = run_finetune["steps"]
    report["runs"] = {"search": run_search, "finetune": run_finetune}
    return compact, report
