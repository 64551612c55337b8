"""Benchmark: edgesr's IKS against the authors' rule, ported here on its own, side by side in one run.

The port follows RaccoonDML/IKS as `shared/research/algorithms.md` §1 records it, written apart from
`compress/pruning/methods/iks.py` so that the two can disagree: a soft threshold W' = sign(W) relu(|W| − σ(t)) per
weight (`--sparseMode pw`), t from −12 and trained by the same Adam as the weights; after every epoch the sparsity
S of W' over the IKS layers, validation, "best" saved when S > S_t − 5 and the PSNR beats the best so far, and the
decay t ← t · (1 + k (S − S_t)) when the last one was more than D epochs ago, the run is not in its last D epochs
and |S_t + 0.5 − S| > 0.5 (k = 0.005, D = 10). Both run in edgesr's training loop with the same data, seed,
teacher, learning rate, steps, epoch length and validation set; edgesr's side is `--finish reference
--tolerance 0.05` (the authors' selection window). What differs is only the code of the rule.

    python benchmarks/iks_reference.py --sparsity 0.8 --steps 1000 --out runs/iks-reference

Prints the two Y-PSNRs on the test set and their difference, with the sparsity each reached and the step each
selected; writes --out/iks_reference.{json,md}. It asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("iks_reference")
SIDES = ("edgesr", "reference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints/edsr-tiny-x2/model.pt"))
    p.add_argument("--sparsity", type=float, default=0.8, help="target S_t as a fraction (default 0.8)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps, both sides (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-set", default="sporco")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "runs/iks-reference")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side, write its JSON
    return p.parse_args(argv)


def reference_pruner(model: Any, sparsity: float, total_steps: int, epoch_steps: int, validate: Any) -> Any:
    """The authors' rule as a pruner for edgesr's loop (imports inside: the benchmark's parent never needs torch)."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from compress.pruning.base import Pruner
    from compress.pruning.gates import select_layers

    class SoftThreshold(nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.t = nn.Parameter(torch.full_like(weight, -12.0))  # --t0 -12, one per weight (pw)

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return torch.sign(w) * torch.relu(torch.abs(w) - torch.sigmoid(self.t))

    class ReferenceIKS(Pruner):
        name = "iks-reference"

        def __init__(self) -> None:
            self.convs = select_layers(model, "default")  # EDSR: the body convs, as the reference's edsr.py
            for conv in self.convs.values():
                parametrize.register_parametrization(conv, "weight", SoftThreshold(conv.weight))
            self.target = 100.0 * sparsity
            self.epochs = total_steps // epoch_steps
            self.last_decay_epoch, self.best_psnr, self.best = 0, -1.0, None
            self.trace: list[tuple[int, float]] = []

        @torch.no_grad()
        def current_sparsity(self) -> float:
            zeros = sum(int((c.weight == 0).sum()) for c in self.convs.values())
            return 100.0 * zeros / sum(c.weight.numel() for c in self.convs.values())

        def step(self, step: int, lr: float = 0.0) -> None:
            if step % epoch_steps:
                return
            epoch, s = step // epoch_steps, self.current_sparsity()
            self.trace.append((step, s))
            if s > self.target - 5:  # trainer.py: save "best" when S_cur > S_t - 5 and the PSNR is the best
                psnr = validate(model)
                if psnr > self.best_psnr:
                    self.best_psnr = psnr
                    self.best = (step, s, copy.deepcopy(model.state_dict()))
            if epoch - self.last_decay_epoch > 10 and epoch < self.epochs - 10 and abs(self.target + 0.5 - s) > 0.5:
                with torch.no_grad():
                    for conv in self.convs.values():
                        conv.parametrizations.weight[0].t.mul_(1 + 0.005 * (s - self.target))
                self.last_decay_epoch = epoch

        def finalize(self) -> dict[str, Any]:
            step, s, state = self.best
            model.load_state_dict(state)
            for conv in self.convs.values():
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
            return {"selected_step": step, "selected_sparsity_pct": s}

    return ReferenceIKS()


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side in this process, set up as `compress prune` sets up a fine-tune of a trained model."""
    import torch

    from compress.data import PatchSampler, TrainingSet
    from compress.evaluate import evaluate, validator
    from compress.intake import ModelSpec, load_model
    from compress.pruning.gates import select_layers
    from compress.pruning.methods import iks
    from compress.train import FINETUNE, TrainData, finetune_lr, train
    from edgesr.datasets import load_test_set

    torch.set_num_threads(1)
    loaded = load_model(ModelSpec(checkpoint=Path(args.checkpoint)))
    model, scale = loaded.model, loaded.scale
    cfg = dataclasses.replace(
        FINETUNE, steps=args.steps, seed=args.seed, device=args.device, lr=finetune_lr(args.sparsity)
    )
    sampler = PatchSampler(TrainingSet.from_source("bundled", scale), scale, cfg.lr_patch, cfg.batch_size, cfg.seed)
    data = TrainData(sampler, scale, copy.deepcopy(model).eval())
    config = iks.IKSConfig(sparsity=args.sparsity, finish="reference", tolerance=0.05)
    torch.manual_seed(cfg.seed)
    folder = args.out / args.side
    t0 = time.perf_counter()
    if args.side == "edgesr":
        model, record = iks.run(model, data, cfg, folder, config, resume=False)
        picked = {"selected_step": record["selected"]["step"],
                  "selected_sparsity_pct": record["selected"]["sparsity_pct"]}  # fmt: skip
    else:
        val = validator(load_test_set(config.val_set, scale), scale)
        pruner = reference_pruner(model, args.sparsity, cfg.steps, config.epoch_steps(cfg.steps), val)
        train(model, data, cfg, folder, pruner=pruner, resume=False)
        picked = pruner.finalize()
    scores = evaluate(model, load_test_set(args.test_set, scale), scale)["mean"]
    with torch.no_grad():
        layers = [m.weight for m in select_layers(model, "default").values()]
        achieved = sum(int((w == 0).sum()) for w in layers) / sum(w.numel() for w in layers)
    return {"side": args.side, **scores, "sparsity_pruned_layers": achieved, **picked,
            "seconds": round(time.perf_counter() - t0, 1), "lr": cfg.lr}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.side:
        (args.out / f"{args.side}.json").write_text(json.dumps(run_side(args)))
        return 0
    base = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*base, "--side", side], cwd=REPO, env=env) for side in SIDES]  # side by side
    if any(p.wait() for p in procs):
        log.error("a side failed; see its output above")
        return 1
    sides = {s: json.loads((args.out / f"{s}.json").read_text()) for s in SIDES}
    diff = sides["edgesr"]["psnr_y_db"] - sides["reference"]["psnr_y_db"]
    lines = [
        f"IKS cross-check: {args.checkpoint}, target {args.sparsity:.0%}, {args.steps} steps, seed {args.seed}, "
        f"lr {sides['edgesr']['lr']:.2e}, Y-PSNR on {args.test_set} (border = scale), 1 thread per side",
        "",
        "| side | Y-PSNR (dB) | SSIM | zeros (IKS layers) | selected step | sparsity there (%) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SIDES:
        r = sides[s]
        lines.append(
            f"| {s} | {r['psnr_y_db']:.3f} | {r['ssim_y']:.4f} | {r['sparsity_pruned_layers']:.2%} | "
            f"{r['selected_step']} | {r['selected_sparsity_pct']:.2f} | {r['seconds']} |"
        )
    lines += ["", f"edgesr − reference: {diff:+.3f} dB", "", "Command: " + shlex.join(base)]
    text = "\n".join(lines)
    (args.out / "iks_reference.json").write_text(json.dumps({"sides": sides, "difference_db": diff}, indent=2))
    (args.out / "iks_reference.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
