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
* What the search is for (`finetune_from`, `channel_init`, `search_fraction`; decided by ablation, edsr-tiny x2 from
  the shipped checkpoint, --params 0.5 --weight-sparsity 0.3, 1000 steps, seed 0, sporco Y-PSNR; channel-l1 at the
  same steps: 34.038 dB). Through a hypernetwork at 1/m of the lr, the searching net drifts from the checkpoint
  while it scores channels, and the compact net then fine-tuned from the drifted kernels for only what was left. By
  default the search only chooses the masks: the compact net fine-tunes from the checkpoint's own weights under them
  (sf 0.5: 33.732 at 1000 steps; from the searched kernels it was 33.306 even at 2000), z starts at each channel's
  normalised L1 filter norm so the prox reaches the weak channels first and the gradient decides among the rest
  (ones: 33.972, l1: 34.004 at sf 0.1), and the search gets 10 % of the steps (sf 0.5: 33.732, 0.2: 33.728, 0.1:
  34.004, 0.05 with checks every 10 steps: 33.999). `--finetune-from search --channel-init ones --search-fraction
  0.5` is the earlier behaviour; `rewind` only matters with `--finetune-from search`. The same ablation kept the
  search at 1/m of the lr (the full lr: 33.972) and the mean-U x |W| weight score (U alone: 33.818).
* Where FMP still loses to channel-l1 (0.03 dB at 1000 steps): its channel choice. The search alone at 50 % of the
  parameters scores 33.725 against L1's 34.038 (it defends the residual stream, whose z collects every block's
  gradient); the search's share of the steps costs 0.005 dB, closing the weight mask gradually (`weight_ramp`)
  0, HR-only training loses. `channel_prox="group"` (each group against its own median gradient) lifts the search
  alone to 33.878 but FMP falls to 33.888, so it stays an option.
* Init "pretrained" (the default: users start from a dense checkpoint, although FMP reportedly trains from scratch):
  z = 1 (or the L1 start above), biases 0, w1 ~ U(-sqrt3, sqrt3) and W2_ij = W_ij w1_ij^T / |w1_ij|^2. The generated
  kernel is then exactly the checkpoint's, and W_ij = (z_in_i z_out_j + B0_ij) W_ij stays linear in z, so shrinking
  z shrinks whole channels. "scratch" is DHP's init: z ~ N(0, 1), W2 ~ U(+-sqrt3 sqrt(1/(m c_in k^2))), all biases 0
  (the hypernetwork convs' own biases too, since DHP zeroes the main net's).
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

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from compress.pruning.methods.fmp.config import ChannelOnlyConfig, FMPConfig, search_lr_scale
from compress.pruning.methods.fmp.materialize import finetune_pruner, materialize
from compress.pruning.methods.fmp.search import FMPSearch
from compress.train import TrainConfig, TrainData, train

__all__ = ["ChannelOnlyConfig", "FMPConfig", "FMPSearch", "materialize", "run", "run_channel_only"]


def run(
    model: nn.Module, data: TrainData, train_cfg: TrainConfig, out: Path, config: FMPConfig, resume: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """A whole FMP run in `train_cfg.steps` steps: search in `<out>/search` (ends early when both targets are met),
    materialize, fine-tune the compact net for the remaining steps in `<out>/finetune`, bake.

    Each phase resumes on its own. `model` is consumed (it ends as the full-width searched net). Returns (compact
    model with plain layers, record for the manifest).
    """
    out = Path(out)
    search = FMPSearch(model, config, total_steps=train_cfg.steps, scale=data.scale)
    search_cfg = dataclasses.replace(train_cfg, lr=train_cfg.lr * search_lr_scale(config))
    run_search = train(model, data, search_cfg, out / "search", pruner=search, resume=resume)
    compact = materialize(search)
    finetune_cfg = dataclasses.replace(train_cfg, steps=train_cfg.steps - run_search["steps"])
    pruner = finetune_pruner(search, compact, finetune_cfg.steps)
    run_finetune = train(compact, data, finetune_cfg, out / "finetune", pruner=pruner, resume=resume)
    record = pruner.finalize()
    record["finetune_steps"] = run_finetune["steps"]
    record["runs"] = {"search": run_search, "finetune": run_finetune}
    return compact, record


def run_channel_only(
    model: nn.Module, data: TrainData, train_cfg: TrainConfig, out: Path, config: ChannelOnlyConfig, resume: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Channel-only meta pruning: the FMP search without weight indicators."""
    return run(model, data, train_cfg, out, FMPConfig(**asdict(config), weight_sparsity=0.0), resume)
