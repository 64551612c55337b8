"""IKS — individual kernel sparsity (Luo et al., ACM MM 2022), as the reference code RaccoonDML/IKS does it.

Each gated conv keeps its dense weight W and a learnable threshold parameter θ; the forward pass uses

    W' = sign(W) · relu(|W| − sigmoid(θ))          (gate "soft", the reference default)
    W' = W · 1[|W| > sigmoid(θ)]                   (gate "hard", for ablation: no gradient reaches θ)

θ trains with the weights (same optimiser). θ has one entry per weight (`weight`, the reference's `pw`),
per k×k kernel (`kernel`, `kw`), per output filter (`filter`, `gw`) or per layer (`layer`, `lw`), and starts
at −12 (sigmoid ≈ 6e−6: the net starts dense).

Every `eval_every` steps (the reference's "epoch", which is 1000 iterations there) the pruner:
1. measures S_cur = 100 · zeros(W') / numel(W') over the gated layers only;
2. validates (PSNR on a held-out set) when S_cur ≥ target − tolerance, keeping the best such state;
3. decays every θ by r = 1 + k · (S_cur − S_t) when all of: epoch − last_decay > D, epoch < epochs − D and
   S_cur outside [S_t, S_t + band] (tested as |S_t + band/2 − S_cur| > band/2, as the reference does).
   Defaults are the reference values k = 0.005, D = 10, band = 1 %; Adam's moments of θ are left alone.

The gates are `compress.pruning.gates` parametrizations on the convs' `weight`, so the model keeps its own
class and module names. `finalize` restores the selected state and bakes W' into plain weights with exact
zeros (θ dropped): what convert/ receives is an ordinary network.

Checkpoint selection differs from the reference on one point, on purpose: the reference keeps the best PSNR
among epochs with S_cur > S_t − 5, so its model can be 5 points short of the requested sparsity. Here the
tolerance is explicit and 0 by default; if no validated state reached target − tolerance, `finalize` fails.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compress.pruning.base import Pruner
from compress.pruning.gates import attach_gates, bake, gate, layer_sparsity, select_convs, zero_fraction
from edgesr.errors import CheckFailed

log = logging.getLogger(__name__)

# Threshold granularity: our name -> the reference's --sparseMode name.
GRANULARITIES = {"weight": "pw", "kernel": "kw", "filter": "gw", "layer": "lw"}
GATES = ("soft", "hard")


@dataclass(frozen=True)
class IKSConfig:
    target: float  # fraction of zero weights over the gated layers, in (0, 1)
    total_steps: int  # length of the run: "no decay in the last D epochs" needs it
    eval_every: int = 10  # steps per "epoch": sparsity check, validation and decay decision
    granularity: str = "weight"
    gate: str = "soft"
    theta_init: float = -12.0
    init_decay: float = 1.0  # multiplies θ once before training (reference --init_decay; >1 releases weights)
    decay_slope: float = 0.005  # k in r = 1 + k (S_cur − S_t), S in percent
    decay_distance: int = 10  # D, in epochs
    band: float = 1.0  # percent: no decay while S_cur is in [S_t, S_t + band]
    tolerance: float = 0.0  # fraction: selection accepts states with sparsity >= target - tolerance
    layers: str = "default"  # a compress.pruning.gates.select_convs spec

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"IKS target sparsity must be in (0, 1), got {self.target}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"IKS granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.gate not in GATES:
            raise ValueError(f"IKS gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.theta_init >= 0:
            raise ValueError(f"IKS theta_init must be < 0 (sigmoid(θ) is the threshold), got {self.theta_init}")
        if self.eval_every < 1 or self.decay_distance < 0 or self.total_steps < 1:
            raise ValueError("IKS needs eval_every >= 1, decay_distance >= 0 and total_steps >= 1")
        if not 0.0 <= self.tolerance < self.target:
            raise ValueError(f"IKS tolerance must be in [0, target), got {self.tolerance}")
        if self.band <= 0 or self.decay_slope <= 0 or self.init_decay <= 0:
            raise ValueError("IKS band, decay_slope and init_decay must be > 0")

    @property
    def epochs(self) -> int:
        return self.total_steps // self.eval_every


def theta_shape(weight_shape: torch.Size, granularity: str) -> tuple[int, ...]:
    c_out, c_in, kh, kw = weight_shape
    return {
        "weight": (c_out, c_in, kh, kw),
        "kernel": (c_out, c_in, 1, 1),
        "filter": (c_out, 1, 1, 1),
        "layer": (1,),
    }[granularity]


class IKSGate(nn.Module):
    """The weight parametrization W -> W' with a learnable threshold sigmoid(θ)."""

    def __init__(self, weight: torch.Tensor, granularity: str, theta_init: float, gate: str) -> None:
        super().__init__()
        self.gate = gate
        shape = theta_shape(weight.shape, granularity)
        self.theta = nn.Parameter(torch.full(shape, theta_init, dtype=weight.dtype, device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        threshold = torch.sigmoid(self.theta)
        if self.gate == "hard":
            return w * (w.abs() > threshold).to(w.dtype)
        return torch.sign(w) * torch.relu(w.abs() - threshold)


class IKSPruner(Pruner):
    name = "iks"

    def __init__(
        self, model: nn.Module, config: IKSConfig, validate: Callable[[nn.Module], float] | None = None
    ) -> None:
        self.config, self.model, self.validate = config, model, validate
        self.layers = select_convs(model, config.layers)
        attach_gates(self.layers, lambda w: IKSGate(w, config.granularity, config.theta_init, config.gate))
        if config.init_decay != 1.0:
            self._scale_thetas(config.init_decay)
        self.last_decay_epoch = 0
        self.decays: list[dict[str, Any]] = []
        self.trace: list[list[float]] = []  # [step, gated sparsity %, val PSNR or -1]
        self.best: dict[str, Any] | None = None
        self.validation_seconds = 0.0

    # -- measurements ---------------------------------------------------------------------------------------

    def gated_sparsity(self) -> float:
        """Percent of zero entries of W' over the gated layers (the reference's S_cur)."""
        return 100.0 * zero_fraction(self.layers.values())

    def thetas(self) -> list[nn.Parameter]:
        return [gate(conv).theta for conv in self.layers.values()]

    @torch.no_grad()
    def _scale_thetas(self, factor: float) -> None:
        for theta in self.thetas():
            theta.mul_(factor)

    # -- the Pruner contract --------------------------------------------------------------------------------

    def step(self, step: int, lr: float = 0.0) -> None:
        c = self.config
        if step % c.eval_every:
            return
        epoch = step // c.eval_every
        s_cur = self.gated_sparsity()
        target_pct = 100.0 * c.target
        psnr = -1.0
        if self.validate is not None and s_cur >= 100.0 * (c.target - c.tolerance) - 1e-9:
            t0 = time.perf_counter()
            psnr = float(self.validate(self.model))
            self.validation_seconds += time.perf_counter() - t0
            if self.best is None or psnr > self.best["val_psnr_db"]:
                state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.best = {"step": step, "val_psnr_db": psnr, "sparsity_pct": s_cur, "state": state}
        self.trace.append([step, round(s_cur, 4), round(psnr, 4)])
        outside = abs(target_pct + c.band / 2 - s_cur) > c.band / 2
        if epoch - self.last_decay_epoch > c.decay_distance and epoch < c.epochs - c.decay_distance and outside:
            ratio = 1.0 + c.decay_slope * (s_cur - target_pct)
            self._scale_thetas(ratio)
            self.last_decay_epoch = epoch
            self.decays.append({"step": step, "epoch": epoch, "sparsity_pct": round(s_cur, 4), "ratio": ratio})
            log.debug("IKS decay at step %d: S_cur %.2f%% -> theta x %.4f", step, s_cur, ratio)

    def status(self) -> dict[str, str]:
        if not self.trace:
            return {}
        return {"sparsity": f"{self.trace[-1][1]:.1f}%", "decays": str(len(self.decays))}

    def finalize(self) -> dict[str, Any]:
        c = self.config
        if self.best is None:
            reached = max((t[1] for t in self.trace), default=0.0)
            raise CheckFailed(
                f"IKS never validated a state at >= {100 * (c.target - c.tolerance):.1f}% sparsity "
                f"(highest seen {reached:.2f}%): give it more --steps, a smaller --decay-distance or --eval-every, "
                "or allow --tolerance"
            )
        self.model.load_state_dict(self.best["state"])
        bake(self.layers)
        achieved, per_layer = layer_sparsity(self.layers)
        return {
            "method": self.name,
            "target_sparsity": c.target,
            "achieved_sparsity_pruned_layers": achieved,
            "per_layer_sparsity": per_layer,
            "pruned_layers": list(self.layers),
            "config": {**asdict(c), "reference_sparse_mode": GRANULARITIES[c.granularity]},
            "selected": {k: v for k, v in self.best.items() if k != "state"},
            "selection_rule": f"best validation PSNR among states with gated sparsity >= target - {c.tolerance}",
            "validations": sum(1 for t in self.trace if t[2] != -1),
            "validation_seconds": round(self.validation_seconds, 1),
            "decays": self.decays,
            "trace_step_sparsity_pct_val_psnr": self.trace,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "last_decay_epoch": self.last_decay_epoch,
            "decays": copy.deepcopy(self.decays),
            "trace": copy.deepcopy(self.trace),
            "best": self.best,
            "validation_seconds": self.validation_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != asdict(self.config):
            raise ValueError("the saved run used other IKS settings")
        self.last_decay_epoch = int(state["last_decay_epoch"])
        self.decays, self.trace, self.best = state["decays"], state["trace"], state["best"]
        self.validation_seconds = float(state.get("validation_seconds", 0.0))
