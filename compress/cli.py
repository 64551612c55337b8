"""`edgesr compress`: train a dense SR model, prune a checkpoint, or evaluate one.

  edgesr compress train --model edsr-tiny --scale 2 --steps 3000 --out runs/dense
  edgesr compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --method magnitude --sparsity 0.8 \
      --steps 1000 --out runs/pruned
  edgesr compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --method iks --sparsity 0.85 \
      --steps 1000 --out runs/iks85
  edgesr compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --method fmp --params 0.5 \
      --weight-sparsity 0.3 --steps 2000 --out runs/fmp50
  edgesr compress eval --checkpoint runs/pruned/model.pt

Each of train/prune writes <out>/model.pt and <out>/manifest.json (architecture, per-layer sparsity, params,
non-zeros, MACs for a 1280x720 output, PSNR/SSIM on the test set, seed, time) and keeps <out>/train_state.pt
for resuming. Under `torchrun --nproc_per_node N -m compress ...` training is data-parallel.
Exit codes: 0 done, 1 the method could not meet its target (IKS) or training diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.data import PatchSampler
from compress.evaluate import evaluate, evaluate_bicubic, model_stats, validator
from compress.models import create_model, list_models, model_spec
from compress.pruning.base import Pruner
from compress.pruning.channel_l1 import run_channel_l1
from compress.pruning.fmp import INITS, WEIGHT_SCORES, WEIGHTS_FROM, FMPConfig, run_fmp
from compress.pruning.iks import GATES, GRANULARITIES, IKSConfig, IKSPruner
from compress.pruning.magnitude import GradualMagnitudePruner, MagnitudeConfig
from compress.train import TrainConfig, is_main_process, train
from edgesr.datasets import load_test_set, load_training_images
from edgesr.errors import BadInput, run_cli
from edgesr.manifest import new_manifest, versions

log = logging.getLogger("compress")
WEIGHT_METHODS = ("magnitude", "iks")  # unstructured: --sparsity
CHANNEL_METHODS = ("fmp", "channel-only", "channel-l1")  # structured (fmp: and unstructured): --params/--macs
METHODS = WEIGHT_METHODS + CHANNEL_METHODS
DEFAULT_LAYERS = {"magnitude": "all", "iks": "default"}


def _train_args(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    d = TrainConfig()
    p.add_argument("--out", type=Path, required=True, help="output folder (model.pt, manifest.json, state)")
    p.add_argument("--data", default="bundled", help="training images: 'bundled' (scikit-image photos) or a folder")
    p.add_argument("--test-set", default="sporco", help="test set name (sporco, butterfly, sporco+butterfly) or folder")
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"patches per step (default {d.batch_size})")
    p.add_argument("--patch", type=int, default=d.lr_patch, help=f"LR patch side in px (default {d.lr_patch})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate, cosine-decayed (default {lr})")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between resumable saves")
    p.add_argument("--seed", type=int, default=0, help="seed for init and patch sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-resume", action="store_true", help="start over even if <out>/train_state.pt exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesr compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a dense model from scratch")
    t.add_argument("--model", default="edsr-tiny", help=f"preset: {', '.join(list_models())} (default edsr-tiny)")
    t.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="upscaling factor (default 2)")
    _train_args(t, steps=3000, lr=5e-4)
    p = sub.add_parser("prune", help="prune a checkpoint to a target sparsity, fine-tuning as it goes")
    p.add_argument("--checkpoint", type=Path, required=True, help="edgesr checkpoint or EDSR-PyTorch .pt")
    p.add_argument("--method", default="magnitude", choices=METHODS, help="pruning method (default magnitude)")
    p.add_argument(
        "--sparsity", type=float, help="magnitude/iks: target fraction of zero weights in the pruned layers, in (0, 1)"
    )
    p.add_argument(
        "--params", type=float, help="fmp/channel-*: fraction of the parameters the channel-pruned net keeps, in (0, 1)"
    )
    p.add_argument("--macs", type=float, help="fmp/channel-only: ... or of its MACs (1280x720 output), instead")
    p.add_argument(
        "--weight-sparsity", type=float, default=None, help="fmp: zero fraction wanted in the compact net's convs"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="which convs to prune: 'all' (every trainable conv), 'default' (the architecture's sparse layers: "
        "EDSR body convs) or comma-separated globs such as 'body.*'. Default: all for magnitude, default for iks",
    )
    _train_args(p, steps=1000, lr=5e-4)
    m = p.add_argument_group("magnitude")
    m.add_argument(
        "--prune-fraction",
        type=float,
        default=0.5,
        help="share of the steps over which sparsity ramps up; the rest fine-tunes (default 0.5)",
    )
    i = p.add_argument_group("iks (defaults are the reference code's, RaccoonDML/IKS)")
    i.add_argument("--granularity", default="weight", choices=list(GRANULARITIES), help="one threshold per ...")
    i.add_argument("--gate", default="soft", choices=GATES, help="soft: sign(w)relu(|w|-t); hard: w*[|w|>t]")
    i.add_argument("--theta-init", type=float, default=-12.0, help="initial θ; threshold = sigmoid(θ) (default -12)")
    i.add_argument("--init-decay", type=float, default=1.0, help="multiply θ once at the start (default 1)")
    i.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps per 'epoch': sparsity check, validation and decay decision (default steps/200, at least 1)",
    )
    i.add_argument("--decay-distance", type=int, default=10, help="min epochs between decays, D (default 10)")
    i.add_argument("--decay-slope", type=float, default=0.005, help="k in θ *= 1 + k(S_cur - S_target) (0.005)")
    i.add_argument("--band", type=float, default=1.0, help="percent above target where no decay fires (default 1)")
    i.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="accept a selected model this far below the target (fraction; default 0; the reference used 0.05)",
    )
    i.add_argument("--val-set", default="hopper", help="held-out images for checkpoint selection (default hopper)")
    f = p.add_argument_group("fmp / channel-only (DHP hypernetwork; see README for the choices where FMP is silent)")
    f.add_argument(
        "--search-fraction", type=float, default=0.5, help="most of the steps the search may use (default 0.5)"
    )
    f.add_argument(
        "--lambda-channel",
        type=float,
        default=None,
        help="prox strength on channel vectors (default: calibrated to the median |dL/dz| of the first check)",
    )
    f.add_argument(
        "--channel-lr",
        type=float,
        default=None,
        help="SGD lr of channel vectors (default 2/(lambda-channel x search steps): an undefended one dies mid-search)",
    )
    f.add_argument(
        "--search-lr-scale", type=float, default=None, help="search lr = --lr x this (default 1/embedding-dim)"
    )
    f.add_argument("--lambda-weight", type=float, default=1e-4, help="L1 strength on weight indicators (1e-4)")
    f.add_argument(
        "--indicator-lr",
        type=float,
        default=None,
        help="SGD lr of the weight indicators (default 2/(lambda-weight x search steps they get): undefended ones "
        "die mid-way)",
    )
    f.add_argument(
        "--weights-from",
        default="channel-lock",
        choices=WEIGHTS_FROM,
        help="when the weight indicators start: once the channels lock (default, staged) or at the first step (joint)",
    )
    f.add_argument(
        "--weight-score",
        default="mean-u-abs-w",
        choices=WEIGHT_SCORES,
        help="which weights the weight lock cuts: lowest mean indicator over the indicator phase x |W| (default) "
        "or lowest indicator",
    )
    f.add_argument(
        "--no-rewind",
        action="store_true",
        help="staged: keep the net as the indicator phase left it (damped survivors) instead of rewinding it to the "
        "channel lock with the chosen weight mask",
    )
    f.add_argument("--check-every", type=int, default=None, help="steps between mask checks (default steps/40)")
    f.add_argument("--embedding-dim", type=int, default=8, help="hypernetwork embedding size m (DHP: 8)")
    f.add_argument("--init", default="pretrained", choices=INITS, help="hypernetwork init (default pretrained)")
    f.add_argument("--min-channels", type=int, default=4, help="never prune a group below this (DHP: 4)")
    e = sub.add_parser("eval", help="PSNR/SSIM and size figures of a checkpoint")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--test-set", default="sporco")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr_patch=args.patch,
            lr=args.lr,
            save_every=args.save_every,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def _check_targets(args: argparse.Namespace) -> None:
    """Each method takes its own target flags; a wrong or missing one is BadInput naming the flag."""
    given = {f: getattr(args, f.replace("-", "_")) for f in ("sparsity", "params", "macs", "weight-sparsity")}
    if args.method in WEIGHT_METHODS:
        wanted, other = ["sparsity"], ["params", "macs", "weight-sparsity"]
    else:
        wanted = ["params"] if args.method == "channel-l1" else ["params", "macs"]
        other = ["sparsity"] + ([] if args.method == "fmp" else ["weight-sparsity"])
        if args.method != "channel-l1" and given["params"] is not None and given["macs"] is not None:
            raise BadInput("give one of --params and --macs, not both")
        if args.method == "fmp" and given["weight-sparsity"] is None:
            raise BadInput("--method fmp needs --weight-sparsity (use --method channel-only to prune channels only)")
    if all(given[f] is None for f in wanted):
        raise BadInput(f"--method {args.method} needs {' or '.join('--' + f for f in wanted)}")
    for f in other:
        if given[f] is not None:
            raise BadInput(f"--{f} does not apply to --method {args.method}")
    for f, v in given.items():
        if v is not None and not 0.0 < v < 1.0:
            raise BadInput(f"--{f} must be in (0, 1), got {v}")


def _channel_prune(
    args: argparse.Namespace, model: Any, sampler: PatchSampler, cfg: TrainConfig
) -> tuple[Any, dict, dict]:
    """FMP, channel-only meta pruning or L1-channel pruning: (compact model, pruning record, run summary)."""
    try:
        if args.method == "channel-l1":
            compact, report = run_channel_l1(
                model, sampler, cfg, args.out, args.params, resume=not args.no_resume, min_channels=args.min_channels
            )
        else:
            lambda_weight = args.lambda_weight
            config = FMPConfig(
                params_target=args.params,
                macs_target=args.macs,
                weight_sparsity=args.weight_sparsity or 0.0,
                embedding_dim=args.embedding_dim,
                lambda_channel=args.lambda_channel or 0.0,
                channel_lr=args.channel_lr or 0.0,
                search_lr_scale=args.search_lr_scale or 0.0,
                lambda_weight=lambda_weight,
                indicator_lr=args.indicator_lr or 0.0,
                weights_from=args.weights_from,
                rewind=not args.no_rewind,
                weight_score=args.weight_score,
                check_every=args.check_every or max(1, args.steps // 40),
                search_fraction=args.search_fraction,
                init=args.init,
                min_channels=args.min_channels,
            )
            compact, report = run_fmp(model, sampler, cfg, args.out, config, resume=not args.no_resume)
    except ValueError as exc:
        raise BadInput(f"{args.method}: {exc}") from None
    runs = list(report.pop("runs").values())
    run = {
        "steps": sum(r["steps"] for r in runs),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "final_loss": runs[-1]["final_loss"],
        "resumed_from": runs[0]["resumed_from"],
        "processes": runs[0]["processes"],
        "phases": runs,
    }
    return compact, report, run


def _pruner(args: argparse.Namespace, model: Any) -> Pruner:
    """The pruner the flags ask for; bad values are BadInput naming the flag."""
    layers = args.layers or DEFAULT_LAYERS[args.method]
    try:
        if args.method == "magnitude":
            if not 0.0 < args.prune_fraction <= 1.0:
                raise BadInput(f"--prune-fraction must be in (0, 1], got {args.prune_fraction}")
            end = max(1, round(args.steps * args.prune_fraction))
            config = MagnitudeConfig(target=args.sparsity, end_step=end, frequency=max(1, end // 20), layers=layers)
            return GradualMagnitudePruner(model, config)
        iks = IKSConfig(
            target=args.sparsity,
            total_steps=args.steps,
            eval_every=args.eval_every or max(1, args.steps // 200),
            granularity=args.granularity,
            gate=args.gate,
            theta_init=args.theta_init,
            init_decay=args.init_decay,
            decay_slope=args.decay_slope,
            decay_distance=args.decay_distance,
            band=args.band,
            tolerance=args.tolerance,
            layers=layers,
        )
        val_pairs = load_test_set(args.val_set, model.config.scale)
        return IKSPruner(model, iks, validate=validator(val_pairs, model.config.scale))
    except ValueError as exc:
        raise BadInput(f"{args.method}: {exc}") from None


def _finish(args: argparse.Namespace, model: Any, cfg: TrainConfig, run: dict, extra: dict) -> None:
    scale = model.config.scale
    pairs = load_test_set(args.test_set, scale)
    scores = evaluate(model.cpu(), pairs, scale)
    manifest = new_manifest(
        "checkpoint",
        model=model_spec(model),
        name=args.out.name,
        **extra,
        stats=model_stats(model, scale),
        test_set={
            "name": str(args.test_set),
            "images": [p.name for p in pairs],
            "protocol": f"Y (BT.601), border {scale}, 8-bit SR, LR by Pillow bicubic",
        },
        psnr_y_db=scores["mean"]["psnr_y_db"],
        ssim_y=scores["mean"]["ssim_y"],
        per_image=scores["per_image"],
        bicubic_psnr_y_db=evaluate_bicubic(pairs, scale)["mean"]["psnr_y_db"],
        seed=cfg.seed,
        train={"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, **run},
        versions=versions("torch", "numpy"),
    )
    path = save_checkpoint(args.out, model, manifest)
    pruned = (manifest.get("pruning") or {}).get("achieved_sparsity_pruned_layers")
    log.info(
        "wrote %s: Y-PSNR %.3f dB (bicubic %.3f dB) on %s; sparsity %s of pruned layers, %.3f of all parameters",
        path,
        manifest["psnr_y_db"],
        manifest["bicubic_psnr_y_db"],
        args.test_set,
        "-" if pruned is None else f"{pruned:.3f}",
        manifest["stats"]["sparsity_all_params"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        model, manifest = load_checkpoint(args.checkpoint)
        scale = model.config.scale
        pairs = load_test_set(args.test_set, scale)
        scores, bic = evaluate(model, pairs, scale), evaluate_bicubic(pairs, scale)
        stats = model_stats(model, scale)
        for name, s in scores["per_image"].items():
            log.info(
                "%-12s %.3f dB  SSIM %.4f  (bicubic %.3f dB)",
                name,
                s["psnr_y_db"],
                s["ssim_y"],
                bic["per_image"][name]["psnr_y_db"],
            )
        log.info(
            "mean         %.3f dB  SSIM %.4f  (bicubic %.3f dB); params %d, non-zeros %d, sparsity %.3f",
            scores["mean"]["psnr_y_db"],
            scores["mean"]["ssim_y"],
            bic["mean"]["psnr_y_db"],
            stats["params"],
            stats["nonzeros"],
            stats["sparsity_prunable"],
        )
        return 0

    cfg = _train_config(args)
    if args.command == "prune":
        _check_targets(args)  # before any work, and before <out> exists
    images = [img for _, img in load_training_images(args.data)]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    import torch

    torch.manual_seed(args.seed)  # model init (train) and pruner init (FMP's w1): same seed, same run
    if args.command == "train":
        model = create_model(args.model, scale=args.scale)
        sampler = PatchSampler(images, args.scale, cfg.lr_patch, cfg.batch_size, cfg.seed)
        run = train(model, sampler, cfg, args.out, resume=not args.no_resume)
        _finish(args, model, cfg, run, {"preset": args.model, "parent": None, "pruning": None, "started": started})
        return 0

    model, parent = load_checkpoint(args.checkpoint)
    sampler = PatchSampler(images, model.config.scale, cfg.lr_patch, cfg.batch_size, cfg.seed)
    if args.method in CHANNEL_METHODS:
        model, pruning, run = _channel_prune(args, model, sampler, cfg)
    else:
        pruner = _pruner(args, model)
        run = train(model, sampler, cfg, args.out, pruner=pruner, resume=not args.no_resume)
        pruning = pruner.finalize()
    if not is_main_process():
        return 0
    parent_info = {"path": str(args.checkpoint), "psnr_y_db": parent.get("psnr_y_db"), "name": parent.get("name")}
    _finish(
        args,
        model,
        cfg,
        run,
        {"preset": parent.get("preset"), "parent": parent_info, "pruning": pruning, "started": started},
    )
    return 0


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
