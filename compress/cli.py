"""`edgesr compress`: train or fine-tune an SR model, prune it, or evaluate it.

  edgesr compress train --model edsr-tiny --scale 2 --steps 3000 --out runs/dense
  edgesr compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --method magnitude --sparsity 0.8 \\
      --steps 1000 --out runs/pruned
  edgesr compress prune --checkpoint ~/.cache/edgesr/isr-rdn-psnr-small-x2.h5 --method channel-l1 --params 0.5 \\
      --out runs/rdn-l1
  edgesr compress prune --model nets/sr.py:build --weights sr.pth --method iks --sparsity 0.8 --out runs/mine
  edgesr compress eval --checkpoint runs/pruned/model.pt

The model (every command, as in convert): --checkpoint FILE (edgesr, EDSR-PyTorch, BasicSR EDSR, ISR .h5; .pt2 for
eval only) or --model NAME|MODULE:FACTORY [--weights FILE] [--factory-args JSON].
train and prune write <out>/model.pt (rebuilds from its recipe: preset or factory, plus the pruned shapes) and
<out>/manifest.json (architecture, per-layer sparsity, params, non-zeros, MACs for a 1280x720 output, PSNR/SSIM on
the test set, seed, time), and keep <out>/train_state.pt for resuming. A trained model (a checkpoint, or --model with
weights or a factory) is fine-tuned with the fine-tuning defaults (distilled from the unpruned model); a preset
without weights trains from scratch. Under `torchrun --nproc_per_node N -m compress ...` training is data-parallel.
Exit codes: 0 done, 1 the method could not meet its target (IKS) or training diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.flags import ConfigError, add_config_flags, build_config, flag_error, given
from compress.intake import LoadedModel, add_model_arguments, load_model, spec_from_args
from compress.pruning.methods import METHODS
from compress.train import FINETUNE, STATE_NAME, TRAIN, TrainConfig, TrainData, finetune_lr, is_main_process, train
from edgesr.datasets import lr_degradation
from edgesr.errors import ArgumentParser, BadInput, run_cli
from edgesr.images import DEGRADATIONS
from edgesr.manifest import exclusive_output

log = logging.getLogger("compress")
METHOD_FIELDS = {name: {f.name for f in dataclasses.fields(m.config)} for name, m in METHODS.items()}
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-set", default="sporco", help="sporco, butterfly, sporco+butterfly, hopper, or a folder")
    p.add_argument(
        "--degradation",
        default="pillow",
        choices=DEGRADATIONS,
        help="how LR images are made from HR ones where a set ships none: pillow (Pillow bicubic) or matlab "
        "(MATLAB imresize, as SR papers and BasicSR) (default pillow)",
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder (model.pt, manifest.json, state)")
    p.add_argument(
        "--data",
        default="bundled",
        help="training images: 'bundled' (scikit-image photos) or a folder of HR images (plain, DIV2K or BasicSR "
        "layout; shipped LR files are used)",
    )
    _data_args(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if <out>/train_state.pt exists")
    g = p.add_argument_group("training (defaults: from scratch / fine-tuning a trained model)")
    notes = {
        f: f"default {getattr(TRAIN, f)} / {getattr(FINETUNE, f)}"
        for f in TRAIN_FIELDS
        if getattr(TRAIN, f) != getattr(FINETUNE, f)
    }
    notes["lr"] = f"default {TRAIN.lr} / {FINETUNE.lr} x sqrt(fraction the method removes), at least {finetune_lr(0):g}"
    add_config_flags(g, {"train": TrainConfig}, defaults_note=notes)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="edgesr compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from scratch or fine-tune a trained one")
    add_model_arguments(t)
    t.add_argument("--scale", type=int, choices=(2, 3, 4), help="upscaling factor of a --model preset (default 2)")
    _train_args(t)
    p = sub.add_parser("prune", help="prune a model to a target, fine-tuning as it goes")
    add_model_arguments(p)
    p.add_argument("--method", default="magnitude", choices=list(METHODS), help="pruning method (default magnitude)")
    _train_args(p)
    m = p.add_argument_group(
        "method flags ([methods that take a flag]; a flag the chosen method does not take is an error): "
        + "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())
    )
    add_config_flags(m, {name: method.config for name, method in METHODS.items()})
    e = sub.add_parser("eval", help="PSNR/SSIM and size figures of a model")
    add_model_arguments(e)
    _data_args(e)
    return parser


def _method_config(args: argparse.Namespace) -> Any:
    """The chosen method's config from its flags; a flag of another method is BadInput naming it."""
    own = METHOD_FIELDS[args.method]
    all_fields = set().union(*METHOD_FIELDS.values())
    foreign = sorted(f for f in given(args, all_fields) if f not in own)
    if foreign:
        takes = ", ".join("--" + f.replace("_", "-") for f in sorted(own))
        raise BadInput(f"--{foreign[0].replace('_', '-')} does not apply to --method {args.method} (it takes {takes})")
    cls = METHODS[args.method].config
    try:
        return build_config(cls, given(args, own))
    except ConfigError as exc:
        raise BadInput(flag_error(exc, cls)) from None


def _train_config(args: argparse.Namespace, trained: bool, method: Any) -> TrainConfig:
    """The run's TrainConfig: TRAIN or FINETUNE under the user's flags; a fine-tune's peak lr, unless given, follows
    how much the method removes (`train.finetune_lr`; 0 for dense fine-tuning)."""
    values = given(args, TRAIN_FIELDS)
    if trained and "lr" not in values:
        values["lr"] = finetune_lr(method.removed if method is not None else 0.0)
    try:
        return build_config(TrainConfig, values, FINETUNE if trained else TRAIN)
    except ConfigError as exc:
        raise BadInput(flag_error(exc, TrainConfig)) from None


def _load(args: argparse.Namespace, trainable: bool) -> LoadedModel:
    spec = spec_from_args(args)
    if getattr(args, "scale", None) is not None:
        if not spec.is_preset:
            raise BadInput("--scale goes with a --model preset; a factory takes it in --factory-args")
        spec = dataclasses.replace(spec, factory_args={**spec.factory_args, "scale": args.scale})
    loaded = load_model(spec)
    if trainable:
        if loaded.recipe is None:
            raise BadInput(
                f"{spec.origin}: a .pt2 is an inference graph and cannot be trained or pruned; "
                "give the model it was exported from (--model MODULE:FACTORY --weights FILE)"
            )
        from compress.pruning.layers import check_known_layers

        check_known_layers(loaded.model, spec.origin)
    return loaded


def _test_set_record(args: argparse.Namespace, pairs: list, scale: int) -> dict[str, Any]:
    lr = lr_degradation(args.test_set, scale, args.degradation)
    return {
        "name": str(args.test_set),
        "images": [p.name for p in pairs],
        "degradation": args.degradation,
        "lr": lr,
        "protocol": f"Y (BT.601), border {scale}, 8-bit SR, LR: {lr}",
    }


def _finish(
    args: argparse.Namespace, loaded: LoadedModel, model: Any, pairs: list, cfg: TrainConfig, run: dict, extra: dict
) -> None:
    from compress.checkpoint import save_checkpoint
    from compress.evaluate import evaluate, evaluate_bicubic, model_stats
    from edgesr.manifest import new_manifest, versions

    scale = loaded.scale
    scores = evaluate(model.cpu(), pairs, scale)
    manifest = new_manifest(
        "checkpoint",
        model=loaded.recipe,
        name=args.out.name,
        source=loaded.source,
        **extra,
        stats=model_stats(model, scale),
        scale=scale,
        test_set=_test_set_record(args, pairs, scale),
        psnr_y_db=scores["mean"]["psnr_y_db"],
        ssim_y=scores["mean"]["ssim_y"],
        per_image=scores["per_image"],
        bicubic_psnr_y_db=evaluate_bicubic(pairs, scale)["mean"]["psnr_y_db"],
        seed=cfg.seed,
        train={"config": dataclasses.asdict(cfg), **run},
        versions=versions("torch", "numpy"),
    )
    path = save_checkpoint(args.out, model, manifest, recipe=loaded.recipe)
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


def _evaluate(args: argparse.Namespace) -> int:
    from compress.evaluate import evaluate, evaluate_bicubic, model_stats
    from edgesr.datasets import load_test_set

    loaded = _load(args, trainable=False)
    pairs = load_test_set(args.test_set, loaded.scale, args.degradation)
    scores, bic = evaluate(loaded.model, pairs, loaded.scale), evaluate_bicubic(pairs, loaded.scale)
    for name, s in scores["per_image"].items():
        log.info(
            "%-12s %.3f dB  SSIM %.4f  (bicubic %.3f dB)",
            name,
            s["psnr_y_db"],
            s["ssim_y"],
            bic["per_image"][name]["psnr_y_db"],
        )
    line = "mean         %.3f dB  SSIM %.4f  (bicubic %.3f dB); LR: %s"
    mean, lr = scores["mean"], lr_degradation(args.test_set, loaded.scale, args.degradation)
    log.info(line, mean["psnr_y_db"], mean["ssim_y"], bic["mean"]["psnr_y_db"], lr)
    if loaded.recipe is not None:
        stats = model_stats(loaded.model, loaded.scale)
        log.info(
            "params %d, non-zeros %d, sparsity %.3f of prunable layers, %.2f GMACs for a 1280x720 output",
            stats["params"],
            stats["nonzeros"],
            stats["sparsity_prunable"],
            stats["macs_1280x720"] / 1e9,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return _evaluate(args)
    with (
        exclusive_output(args.out, f"compress {args.command}", resumable=(f"**/{STATE_NAME}",))
        if is_main_process()
        else contextlib.nullcontext()
    ):
        return _train_or_prune(args)


def _train_or_prune(args: argparse.Namespace) -> int:
    method = _method_config(args) if args.command == "prune" else None  # flags first: before any slow work
    loaded = _load(args, trainable=True)
    cfg = _train_config(args, loaded.trained, method)
    from compress.data import PatchSampler, TrainingSet
    from edgesr.datasets import load_test_set

    pairs = load_test_set(args.test_set, loaded.scale, args.degradation)  # before training, not after it
    images = TrainingSet.from_source(args.data, loaded.scale, args.degradation)
    sampler = PatchSampler(images, loaded.scale, cfg.lr_patch, cfg.batch_size, cfg.seed)
    teacher = copy.deepcopy(loaded.model).eval() if cfg.distill > 0 else None
    data = TrainData(sampler, loaded.scale, teacher, args.degradation)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    import torch

    torch.manual_seed(cfg.seed)  # pruner init (FMP's w1): same seed, same run
    parent = {"path": str(args.checkpoint or args.model), **{k: loaded.manifest.get(k) for k in ("name", "psnr_y_db")}}
    if args.command == "train":
        run = train(loaded.model, data, cfg, args.out, resume=not args.no_resume)
        model, pruning = loaded.model, None
    else:
        try:
            model, pruning = METHODS[args.method].run(loaded.model, data, cfg, args.out, method, not args.no_resume)
        except ConfigError as exc:
            raise BadInput(flag_error(exc)) from None
        except ValueError as exc:
            raise BadInput(f"{args.method}: {exc}") from None
        runs = list(pruning.pop("runs").values())
        run = {
            "steps": sum(r["steps"] for r in runs),
            "seconds": round(sum(r["seconds"] for r in runs), 1),
            "final_loss": runs[-1]["final_loss"],
            "resumed_from": runs[0]["resumed_from"],
            "processes": runs[0]["processes"],
            "phases": runs,
        }
    if not is_main_process():
        return 0
    extra = {"parent": parent if loaded.trained else None, "pruning": pruning, "started": started}
    _finish(args, loaded, model, pairs, cfg, run, extra)
    return 0


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
