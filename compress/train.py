"""The training loop: L1 loss, Adam, warm-up + cosine learning rate, a pruner hook, resumable state, progress.

One loop serves dense training, fine-tuning and every pruning method: the pruner adds its penalty to the loss and
acts after each optimiser step. With `distill` > 0 the target is partly the output of a teacher (the unpruned
model, frozen): loss = (1 - distill) L1(sr, hr) + distill L1(sr, teacher(lr)), which keeps a pretrained model's
behaviour instead of refitting it to a handful of photos. `TRAIN` holds the defaults for training from scratch,
`FINETUNE` those for pruning or fine-tuning a trained model (chosen by measurement; see the README).

State (model, optimiser, sampler, pruner, step) is saved atomically to `<run_dir>/train_state.pt` every
`save_every` steps and at the end; a run restarted with the same folder resumes.

Started by `torchrun --nproc_per_node N`, the loop runs data-parallel (DDP; NCCL on CUDA, gloo on CPU): each rank
draws `batch_size / N` patches from its own stream, gradients are averaged, pruners act identically on every
rank (their decisions depend only on the synchronised weights), and rank 0 alone writes files.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compress.checkpoint import torch_load
from compress.data import PatchSampler
from compress.flags import option, require
from compress.pruning.base import Pruner
from edgesr.errors import BadInput, CheckFailed
from edgesr.manifest import atomic_output
from edgesr.progress import progress

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"


# LR pixels in one step's batch (batch x patch^2): 256x the default, beyond which a step's activations alone would
# need tens of GB; a limit checked before any allocation.
MAX_STEP_LR_PIXELS = 1 << 22


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(3000, "optimiser steps")
    batch_size: int = option(16, "patches per step")
    lr_patch: int = option(32, "LR patch side in px; HR patches are scale x larger", flag="--patch")
    lr: float = option(5e-4, "peak Adam learning rate")
    warmup: float = option(0.0, "share of the steps over which the learning rate ramps up from 0")
    lr_min_ratio: float = option(0.02, "the cosine decay ends at lr x this")
    distill: float = option(
        0.0, "weight of the unpruned model's output in the target: 0 trains on HR only, 1 on the teacher only"
    )
    save_every: int = option(250, "steps between resumable saves")
    seed: int = option(0, "seed for init and patch sampling")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr_patch", "save_every"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0.0 <= self.warmup < 1.0, "warmup", f"must be in [0, 1), got {self.warmup}")
        require(0.0 < self.lr_min_ratio <= 1.0, "lr_min_ratio", f"must be in (0, 1], got {self.lr_min_ratio}")
        require(0.0 <= self.distill <= 1.0, "distill", f"must be in [0, 1], got {self.distill}")
        require(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            "device",
            f"must be auto, cpu, mps, cuda or cuda:N, got {self.device[:40]!r}",
        )
        pixels = self.batch_size * self.lr_patch**2
        field = "lr_patch" if self.lr_patch**2 > MAX_STEP_LR_PIXELS // 16 else "batch_size"
        require(
            pixels <= MAX_STEP_LR_PIXELS,
            field,
            f"{getattr(self, field)}: {self.batch_size} patches of {self.lr_patch}x{self.lr_patch} LR pixels a step "
            f"is {pixels:,} pixels, more than the {MAX_STEP_LR_PIXELS:,} edgesr allows (default: 16 of 32x32); "
            "lower --batch-size or --patch",
        )


# Training from scratch (a preset or factory without weights).
TRAIN = TrainConfig()
# Pruning or fine-tuning a trained model: distilled from the unpruned model, warm-up, and a peak learning rate that
# grows with how much the method removes (`finetune_lr`). Measured (README "Fine-tuning a trained model"): a
# pretrained RDN pruned to 1 % lost 2.1 dB in 200 steps at lr 5e-4 on HR patches, 0.7 dB distilled at 5e-4,
# 0.02 dB distilled at 1e-4; edsr-tiny pruned to 80 % reached 33.39 dB at 5e-4 but 31.87 at 1e-4.
FINETUNE = TrainConfig(steps=1000, lr=5e-4, warmup=0.05, distill=1.0)
FINETUNE_LR_FLOOR = 0.1  # the smallest share of FINETUNE.lr a fine-tune uses (a method that removes ~nothing)


def finetune_lr(removed: float) -> float:
    """The default peak learning rate for fine-tuning a trained model of which a method removes `removed` (a
    fraction of its weights or parameters): FINETUNE.lr x sqrt(removed), at least FINETUNE_LR_FLOOR of it. A
    converged model barely damaged is pushed off its minimum by Adam's lr-sized steps; a heavily pruned one needs
    them to recover."""
    return FINETUNE.lr * max(FINETUNE_LR_FLOOR, math.sqrt(max(0.0, min(1.0, removed))))


@dataclass
class TrainData:
    """What a run trains on: patches, the model's scale, the teacher for distillation (None: no teacher), and the
    degradation its LR images use (for validation sets made on the fly)."""

    sampler: PatchSampler
    scale: int
    teacher: nn.Module | None = None
    degradation: str = "pillow"


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device '{name}' requested but CUDA is not available")
    if name == "cuda" and world()[1] > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def _init_distributed(device: torch.device, cfg: TrainConfig) -> int:
    rank, size = world()
    if size == 1:
        return size
    if cfg.batch_size % size:
        raise BadInput(f"--batch-size {cfg.batch_size} must be a multiple of the {size} torchrun processes")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return size


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from 0 over `warmup` of the steps, then cosine decay to lr x lr_min_ratio at the end."""
    warm = round(cfg.warmup * cfg.steps)
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    span = max(1, cfg.steps - warm)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - warm, span) / span))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * cos)


def train(
    model: nn.Module,
    data: TrainData,
    cfg: TrainConfig,
    run_dir: Path,
    pruner: Pruner | None = None,
    resume: bool = True,
) -> dict:
    """Train in place; returns {"steps" (made, fewer if the pruner ended early), "seconds", "final_loss",
    "resumed_from", "processes"}."""
    if cfg.distill > 0 and data.teacher is None:
        raise BadInput(
            f"--distill {cfg.distill} needs a teacher: distillation is for pruning or fine-tuning a trained model"
        )
    sampler = data.sampler
    device = resolve_device(cfg.device)
    size = _init_distributed(device, cfg)
    rank = world()[0]
    pruner = pruner or Pruner()
    teacher = None
    if cfg.distill > 0:
        teacher = data.teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.to(device).train()
    net: nn.Module = model
    if size > 1:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        sampler.batch_size = cfg.batch_size // size
    own = {id(p) for p in pruner.own_parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_NAME
    start = 0
    if resume and state_path.exists():
        state = torch_load(state_path)
        if state.get("train_config") != asdict(cfg):
            raise BadInput(f"{state_path}: saved run used other settings; pass --no-resume or another --out")
        try:
            model.load_state_dict(state["model"])
            pruner.load_state_dict(state["pruner"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise BadInput(
                f"{state_path}: saved run is of another model or method ({first}); pass --no-resume"
            ) from None
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start = int(state["step"])
        log.info("resuming %s at step %d of %d", run_dir, start, cfg.steps)
    if rank > 0:  # each rank its own patch stream (rank 0 keeps the saved one)
        sampler.gen.manual_seed(cfg.seed + 7919 * rank + start)

    def save(step: int) -> None:
        if rank > 0:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "pruner": pruner.state_dict(),
            "step": step,
            "train_config": asdict(cfg),
        }
        with atomic_output(state_path) as tmp:
            torch.save(state, tmp)

    t0, loss_ema = time.time(), None
    bar = progress(
        range(start, cfg.steps),
        desc=f"train[{pruner.name}]",
        total=cfg.steps,
        initial=start,
        unit="step",
        disable=rank > 0,
    )
    made = start
    for step in bar:
        if pruner.done():
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        lr, hr = sampler.batch()
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        sr = net(lr)
        loss = F.l1_loss(sr, hr) if cfg.distill < 1 else sr.new_zeros(())
        if teacher is not None:
            with torch.no_grad():
                target = teacher(lr)
            loss = (1 - cfg.distill) * loss + cfg.distill * F.l1_loss(sr, target)
        if not torch.isfinite(loss):
            raise CheckFailed(
                f"training diverged at step {step + 1} (L1 loss {loss.item()}); lower --lr or the method's step sizes"
            )
        total = pruner.regularize(loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        pruner.step(step + 1, opt.param_groups[0]["lr"])
        made = step + 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(l1=f"{loss_ema:.4f}", **pruner.status())
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
    save(made)
    if size > 1:
        dist.barrier()
    model.eval()
    return {
        "steps": made,
        "seconds": round(time.time() - t0, 1),
        "final_loss": loss_ema,
        "resumed_from": start,
        "processes": size,
    }
