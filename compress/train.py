"""The training loop: L1 loss, Adam, cosine learning rate, a pruner hook, resumable state, tqdm progress.

One loop serves dense training and every pruning method: the pruner adds its penalty to the loss and acts
after each optimiser step. State (model, optimiser, sampler, pruner, step) is saved atomically to
`<run_dir>/train_state.pt` every `save_every` steps and at the end; a run restarted with the same folder resumes.

Started by `torchrun --nproc_per_node N`, the loop runs data-parallel (DDP; NCCL on CUDA, gloo on CPU): each rank
draws `batch_size / N` patches from its own stream, gradients are averaged, pruners act identically on every
rank (their decisions depend only on the synchronised weights), and rank 0 alone writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from compress.checkpoint import torch_load
from compress.data import PatchSampler
from compress.pruning.base import Pruner
from edgesr.errors import BadInput, CheckFailed
from edgesr.manifest import atomic_output

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr_patch: int = 32  # LR patch side; HR patches are scale x larger
    lr: float = 5e-4
    lr_min_ratio: float = 0.02  # cosine decay ends at lr * lr_min_ratio
    save_every: int = 250
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr_patch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


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


def _lr_at(cfg: TrainConfig, step: int) -> float:
    cos = 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * cos)


def train(
    model: nn.Module,
    sampler: PatchSampler,
    cfg: TrainConfig,
    run_dir: Path,
    pruner: Pruner | None = None,
    resume: bool = True,
) -> dict:
    """Train in place; returns {"steps" (made, fewer if the pruner ended early), "seconds", "final_loss",
    "resumed_from", "processes"}."""
    device = resolve_device(cfg.device)
    size = _init_distributed(device, cfg)
    rank = world()[0]
    pruner = pruner or Pruner()
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
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc=f"train[{pruner.name}]",
        unit="step",
        disable=rank > 0,
    )
    made = start
    for step in bar:
        if pruner.done():
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        lr, hr = sampler.batch()
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        loss = F.l1_loss(net(lr), hr)
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
