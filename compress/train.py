"""The training loop: L1 loss, Adam, cosine learning rate, a pruner hook, resumable state, tqdm progress.

One loop serves dense training and every pruning method: the pruner adds its penalty to the loss and acts
after each optimiser step. State (model, optimiser, sampler, pruner, step) is saved atomically to
`<run_dir>/train_state.pt` every `save_every` steps and at the end; a run restarted with the same folder resumes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compress.checkpoint import torch_load
from compress.data import PatchSampler
from compress.pruning.base import Pruner
from edgesr.errors import BadInput
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


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
    """Train in place; returns {"steps", "seconds", "final_loss", "resumed_from"}."""
    device = resolve_device(cfg.device)
    pruner = pruner or Pruner()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_NAME
    start = 0
    if resume and state_path.exists():
        state = torch_load(state_path)
        if state.get("train_config") != asdict(cfg):
            raise BadInput(f"{state_path}: saved run used other settings; pass --no-resume or another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        pruner.load_state_dict(state["pruner"])
        start = int(state["step"])
        log.info("resuming %s at step %d of %d", run_dir, start, cfg.steps)

    def save(step: int) -> None:
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
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train[{pruner.name}]", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        lr, hr = sampler.batch()
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        loss = F.l1_loss(model(lr), hr)
        total = pruner.regularize(loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        pruner.step(step + 1)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(l1=f"{loss_ema:.4f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    save(cfg.steps)
    model.eval()
    return {"steps": cfg.steps, "seconds": round(time.time() - t0, 1), "final_loss": loss_ema, "resumed_from": start}
