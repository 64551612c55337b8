"""Measure a torch SR model the way device_bench measures artifacts: whole images, 8-bit, Y-PSNR/SSIM.

Also the model's size figures for manifests: per-layer and total parameters, non-zeros, and MACs for a
1280x720 output (dense MACs, and the MACs of non-zero weights), over every conv-like layer
(`compress.pruning.layers`: Conv2d of any groups, ConvTranspose2d, Linear).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.pruning.layers import conv_like_layers, probe_input, prunable_layers
from compress.receptive_field import local_receptive_field, tiling_overlap
from device_bench.runner import tile_regions
from edgesr.datasets import SRPair
from edgesr.errors import BadInput
from edgesr.images import bicubic_upscale, quantize_uint8, to_float
from edgesr.metrics import mean_scores, sr_scores

log = logging.getLogger(__name__)


# An LR image with a side over this is super-resolved in tiles of this side (plus the overlap), as the device
# runner does, so a large photo costs a tile's activations, not the whole image's (a 6000x4000 photo whole: 8.7 GB).
EVAL_TILE = 256


@torch.no_grad()
def super_resolve(model: nn.Module, lr: np.ndarray, tile: int = EVAL_TILE) -> np.ndarray:
    """uint8 HxWx3 LR -> float32 sHxsWx3 SR (not yet quantized), on the model's device. Images larger than `tile`
    go through in overlapping tiles stitched as device_bench's runner stitches them (overlap = the measured
    receptive-field radius + margin), which equals whole-image inference for a model without global statistics."""
    model.eval()
    h, w = lr.shape[:2]
    if max(h, w) <= tile:
        return _sr(model, lr)
    overlap = _overlap(model)
    side = max(tile, 4 * overlap)  # at least half of every tile is its own
    rows, cols = tile_regions(h, side, overlap), tile_regions(w, side, overlap)
    out = None
    for ys, ya, yb in rows:
        for xs, xa, xb in cols:
            sr = _sr(model, lr[ys : ys + side, xs : xs + side])
            if out is None:
                s = sr.shape[0] // min(side, h)
                out = np.empty((h * s, w * s, 3), dtype=np.float32)
            out[ya * s : yb * s, xa * s : xb * s] = sr[(ya - ys) * s : (yb - ys) * s, (xa - xs) * s : (xb - xs) * s]
    return out


def _sr(model: nn.Module, lr: np.ndarray) -> np.ndarray:
    device = next(model.parameters()).device
    x = torch.from_numpy(to_float(lr)).permute(2, 0, 1)[None].to(device)
    return model(x)[0].permute(1, 2, 0).float().cpu().numpy()


def _overlap(model: nn.Module) -> int:
    """The tiling overlap for `model`, measured once per model object (it depends on the architecture only)."""
    if not hasattr(model, "_edgesr_eval_overlap"):
        with torch.enable_grad():  # measured from gradients
            radius, held = local_receptive_field(model)
        if held:
            log.warning("tiled evaluation approximates whole-image output: global statistics in %s", ", ".join(held))
        object.__setattr__(model, "_edgesr_eval_overlap", tiling_overlap(radius))
    return model._edgesr_eval_overlap


def evaluate(model: nn.Module, pairs: list[SRPair], scale: int) -> dict[str, Any]:
    """{"mean": {...}, "per_image": {name: {...}}} of Y-PSNR/SSIM, border = scale."""
    per = {p.name: sr_scores(quantize_uint8(super_resolve(model, p.lr)), p.hr, scale) for p in pairs}
    return {"mean": mean_scores(list(per.values())), "per_image": per}


def validator(pairs: list[SRPair], scale: int) -> Callable[[nn.Module], float]:
    """A function model -> mean Y-PSNR on `pairs` that leaves the model in training mode afterwards."""

    def validate(model: nn.Module) -> float:
        psnr = evaluate(model, pairs, scale)["mean"]["psnr_y_db"]
        model.train()
        return psnr

    return validate


def evaluate_bicubic(pairs: list[SRPair], scale: int) -> dict[str, Any]:
    per = {p.name: sr_scores(bicubic_upscale(p.lr, scale), p.hr, scale) for p in pairs}
    return {"mean": mean_scores(list(per.values())), "per_image": per}


def layer_positions(model: nn.Module, scale: int, out_hw: tuple[int, int] = (720, 1280)) -> dict[str, float]:
    """How many times each conv-like layer applies its whole weight for one `out_hw` output image, so that its MACs
    are positions x weight count: a Conv2d's output pixels, a ConvTranspose2d's input pixels (each input pixel is
    scattered through the whole kernel), a Linear's rows. Linear in the pixel count, so measured on a small LR probe
    and scaled to the target."""
    layers = conv_like_layers(model)
    positions: dict[str, float] = {}

    def count(name: str, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(layer, nn.Linear):
            positions[name] = output.numel() / output.shape[-1]
        elif isinstance(layer, nn.ConvTranspose2d):
            positions[name] = inputs[0].shape[0] * inputs[0].shape[-2] * inputs[0].shape[-1]
        else:
            positions[name] = output.shape[0] * output.shape[-2] * output.shape[-1]

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: count(n, m, i, o)) for n, m in layers.items()]
    probe = 8
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(probe_input(model, probe))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in positions]
    if missing:
        raise BadInput(f"layer '{missing[0]}' never runs in a forward pass, so its MACs cannot be counted")
    ratio = out_hw[0] * out_hw[1] / scale**2 / probe**2
    return {n: positions[n] * ratio for n in layers}


@torch.no_grad()
def model_stats(model: nn.Module, scale: int, out_hw: tuple[int, int] = (720, 1280)) -> dict[str, Any]:
    """Parameter, non-zero and MAC counts over every conv-like layer; MACs are for one `out_hw` output image."""
    layers = conv_like_layers(model)
    trainable = prunable_layers(model)
    positions = layer_positions(model, scale, out_hw)
    per_layer, totals = {}, {"params": 0, "nonzeros": 0, "macs": 0, "nonzero_macs": 0}
    for name, layer in layers.items():
        w = layer.weight
        nnz = int((w != 0).sum())
        per_layer[name] = {
            "type": type(layer).__name__,
            "shape": list(w.shape),
            "params": w.numel(),
            "nonzeros": nnz,
            "sparsity": round(1 - nnz / w.numel(), 6),
            "prunable": name in trainable,
        }
        totals["macs"] += int(round(positions[name] * w.numel()))
        totals["nonzero_macs"] += int(round(positions[name] * nnz))
    for p in model.parameters():
        totals["params"] += p.numel()
        totals["nonzeros"] += int((p != 0).sum())
    pr = [v for v in per_layer.values() if v["prunable"]]
    pr_params = sum(v["params"] for v in pr)
    return {
        "params": totals["params"],
        "nonzeros": totals["nonzeros"],
        "sparsity_prunable": round(1 - sum(v["nonzeros"] for v in pr) / pr_params, 6) if pr_params else 0.0,
        "sparsity_all_params": round(1 - totals["nonzeros"] / totals["params"], 6),
        "macs_1280x720": totals["macs"],
        "nonzero_macs_1280x720": totals["nonzero_macs"],
        "macs_output_size": f"{out_hw[1]}x{out_hw[0]}",
        "layers": per_layer,
    }
