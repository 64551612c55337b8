"""The fit's units of work, each one cached trial: make a shape's artifacts, measure them on a target, train a shape.

Each function takes what determines its result and returns a JSON-able record; `search` keys the trials.
The stages are the project's own: `compress.train` for fine-tuning, `convert.tiles` for artifacts, and
`device_bench.run_bench` for measurements, so a fit's figures are exactly what `bench` would report.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data import PatchSampler, TrainingSet
from compress.evaluate import evaluate, model_stats
from compress.intake import LoadedModel, ModelSpec
from compress.pruning.methods import METHODS as COMPRESS_METHODS
from compress.pruning.methods import magnitude
from compress.pruning.methods.channel_l1 import ChannelL1FineTune
from compress.pruning.methods.magnitude import MagnitudeConfig
from compress.train import FINETUNE, TrainData, finetune_lr, train
from convert.tiles import convert_tiles
from device_bench.bench import BenchConfig, run_bench
from edgesr.errors import CheckFailed
from edgesr.manifest import new_manifest
from edgesr.workload import Workload, format_size
from fit.config import FitConfig
from fit.shapes import Shape

log = logging.getLogger("fit")

# the row fields a fit keeps of each bench row (the whole row stays in the trial's bench folder)
ROW_FIELDS = (
    "model", "precision", "encoding", "artifact", "artifact_path", "sha256", "target", "emulated", "tile",
    "frame", "size_bytes", "download_bytes", "peak_rss_mb", "frame_ms_median", "frame_ms_p90", "fps",
    "latency_ms_median", "psnr_y_db", "psnr_delta_vs_torch_db", "threads", "runtime", "delegate",
)  # fmt: skip


def model_digest(model: nn.Module) -> str:
    """What the weights and shapes of `model` are, as a digest (the same model gives the same digest anywhere)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(
    model: nn.Module, loaded: LoadedModel, out: Path, shape: Shape | str, extra: dict[str, Any] | None = None
) -> Path:
    """An edgesr checkpoint of a compact net (rebuilds from the intake's recipe and its recorded shapes); `shape`
    is the fit's shape, or a tag when a method chose the widths."""
    tag = shape if isinstance(shape, str) else shape.id
    manifest = new_manifest(
        "checkpoint",
        model=loaded.recipe,
        name=f"{loaded.name}-fit-{tag}",
        source=loaded.source,
        stats=model_stats(model, loaded.scale),
        scale=loaded.scale,
        fit={"shape": shape if isinstance(shape, str) else shape.to_dict()},
        **(extra or {}),
    )
    return save_checkpoint(out, model, manifest, recipe=loaded.recipe)


def make_artifacts(
    checkpoint: Path, out: Path, name: str, tiles: tuple[int | str, ...], workload: Workload, precisions: tuple
) -> dict[str, Any]:
    """TFLite files of `checkpoint` for every tile (one tile-<size>/ folder each when several), one convert folder
    per precision (`out/<precision>`). A precision whose file fails convert's own check against torch (full int8
    of the pretrained RDN: 23.7 dB) is recorded as refused, with convert's reason, and the others go on."""
    if out.exists():  # a killed earlier attempt: convert publishes whole folders, but not over a stale one
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifests, folders, refused = [], [], {}
    for precision in precisions:
        try:
            manifests += convert_tiles(
                ModelSpec(checkpoint=checkpoint), out / precision, tiles, workload.frame, ("tflite",), (precision,),
                name=name,
            )  # fmt: skip
            folders.append(str(out / precision))
        except CheckFailed as exc:
            log.warning("%s: %s refused: %s", name, precision, exc)
            refused[precision] = str(exc)[:500]
    return {
        "folders": folders,
        "refused": refused,
        "artifacts": [
            {
                "file": a["file"],
                "precision": a["precision"],
                "size_bytes": a["size_bytes"],
                "tile": [m["tile"]["height"], m["tile"]["width"]],
            }
            for m in manifests
            for a in m["artifacts"]
        ],
    }


def measure(
    folders: list[str], out: Path, cfg: FitConfig, target: str, workload: Workload, test_set: str
) -> dict[str, Any]:
    """Bench convert folders on one target at its workload (every tile and precision in them); the report rows."""
    if not folders:  # every precision was refused at conversion: nothing to run
        return {"rows": [], "failed": [], "environment": {}}
    tiles = ",".join(str(t) for t in workload.tiles) if workload.tiles else None
    frame = format_size(workload.frame) if workload.frame else None
    report = run_bench(
        BenchConfig(
            artifacts=tuple(Path(f) for f in folders),
            out=out,
            targets=(target,),
            test_set=test_set,
            degradation=cfg.degradation,
            threads=cfg.threads,
            warmup=cfg.warmup,
            runs=cfg.runs,
            timeout_s=cfg.timeout_s,
            device_python=cfg.device_python,
            targets_file=cfg.targets_file,
            frame=frame,
            tiles=tiles,
            min_seconds=cfg.min_seconds,
        )
    )
    failed = report.get("failed_targets") or []
    rows = [{k: r.get(k) for k in ROW_FIELDS} for r in report["rows"]]
    return {"rows": rows, "failed": failed, "environment": report.get("environment", {}).get(target, {})}


def _distilled(loaded: LoadedModel, cfg: FitConfig, images: TrainingSet, removed: float) -> tuple[Any, TrainData]:
    """The fit's fine-tuning config for a net missing `removed` of the model, and its data: patches of the
    training images, the unpruned model as the teacher."""
    train_cfg = dataclasses.replace(
        FINETUNE, steps=cfg.steps, lr=finetune_lr(removed), seed=cfg.seed, device=cfg.device
    )
    teacher = copy.deepcopy(loaded.model).eval()
    sampler = PatchSampler(images, loaded.scale, train_cfg.lr_patch, train_cfg.batch_size, train_cfg.seed)
    torch.manual_seed(cfg.seed)
    return train_cfg, TrainData(sampler, loaded.scale, teacher, cfg.degradation)


def _save_trained(
    compact: nn.Module,
    loaded: LoadedModel,
    shape: Shape | str,
    cfg: FitConfig,
    out: Path,
    test_pairs: list,
    train_cfg: Any,
    runs: list[dict[str, Any]],
    pruning: dict[str, Any],
) -> dict[str, Any]:
    """Score a trained net on the test set, save it as a checkpoint with that score; the trial's record."""
    compact = compact.cpu().eval()
    scores = evaluate(compact, test_pairs, loaded.scale)
    psnr = scores["mean"]["psnr_y_db"]
    steps, seconds = sum(r["steps"] for r in runs), round(sum(r["seconds"] for r in runs), 1)
    path = save_model(
        compact,
        loaded,
        out,
        shape,
        {
            "psnr_y_db": psnr,
            "ssim_y": scores["mean"]["ssim_y"],
            "test_set": {"name": cfg.test_set, "degradation": cfg.degradation},
            "train": {"config": dataclasses.asdict(train_cfg), "steps": steps, "seconds": seconds},
            "pruning": pruning,
        },
    )
    params = model_stats(compact, loaded.scale)["params"]
    return {"checkpoint": str(path), "psnr_y_db": psnr, "steps": steps, "seconds": seconds, "params": params}


def train_shape(
    compact: nn.Module,
    loaded: LoadedModel,
    shape: Shape,
    cfg: FitConfig,
    out: Path,
    test_pairs: list,
    images: TrainingSet,
    sparsity: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune the L1 cut of `shape` for the fit's training budget, distilled from the unpruned model, and with
    `sparsity` prune its weights by magnitude on the way (`cfg.sparse_layers`); save it with its torch Y-PSNR on
    the test set (resumes an interrupted run from `<out>/finetune`)."""
    train_cfg, data = _distilled(loaded, cfg, images, 1.0 - shape.params_fraction * (1.0 - sparsity))
    if sparsity:
        config = MagnitudeConfig(sparsity=sparsity, layers=cfg.sparse_layers)
        compact, weights = magnitude.run(compact, data, train_cfg, out / "finetune", config)
        runs = list(weights.pop("runs").values())
    else:
        runs = [train(compact, data, train_cfg, out / "finetune", pruner=ChannelL1FineTune(), resume=True)]
        weights = None
    pruning = {"method": "channel-l1", "shape": shape.to_dict(), "weights": weights}
    result = _save_trained(compact, loaded, shape, cfg, out, test_pairs, train_cfg, runs, pruning)
    what = shape.label() + (f" at {sparsity:.0%} weight sparsity" if sparsity else "")
    log.info("trained %s for %d steps: Y-PSNR %.3f dB on %s", what, result["steps"], result["psnr_y_db"],
             cfg.test_set)  # fmt: skip
    return result


def train_method(
    method: str,
    loaded: LoadedModel,
    params_fraction: float,
    cfg: FitConfig,
    out: Path,
    test_pairs: list,
    images: TrainingSet,
) -> dict[str, Any]:
    """Prune the unpruned model with another structured method of compress to `params_fraction` of its
    parameters within the same training budget (its own search and fine-tune, distilled), and save the compact net
    with its torch Y-PSNR. The method picks its own widths; the final measurement says what they cost."""
    entry = COMPRESS_METHODS[method]
    # fmp's weight indicators would only cut file size, which the sparse candidate handles: its channel search here
    extra = {"weight_sparsity": 0.0} if method == "fmp" else {}
    config = entry.config(params=min(params_fraction, 0.999), **extra)
    train_cfg, data = _distilled(loaded, cfg, images, config.removed)
    compact, record = entry.run(copy.deepcopy(loaded.model), data, train_cfg, out / method, config, True)
    runs = list(record.pop("runs").values())
    tag = f"{method}-{params_fraction:.3f}"
    result = _save_trained(compact, loaded, tag, cfg, out, test_pairs, train_cfg, runs, record)
    log.info("%s to %.3f of the parameters, %d steps: Y-PSNR %.3f dB on %s", method, params_fraction,
             result["steps"], result["psnr_y_db"], cfg.test_set)  # fmt: skip
    return result


def pick_row(rows: list[dict[str, Any]], precision: str, tile: tuple[int, int], encoding: str) -> dict | None:
    """The bench row of one artifact: precision, tile and encoding (a convert folder may hold dense and sparse)."""
    key = (precision, tuple(tile), encoding)
    return next((r for r in rows if (r["precision"], tuple(r["tile"]), r.get("encoding")) == key), None)
