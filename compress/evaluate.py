"""Measure a torch SR model the way device_bench measures artifacts: whole images, 8-bit, Y-PSNR/SSIM.

Also the model's size figures for manifests: per-layer and total parameters, non-zeros, and MACs for a
1280x720 output (dense MACs, and the MACs of non-zero weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.pruning.gates import prunable_convs
from edgesr.datasets import SRPair
from edgesr.images import bicubic_upscale, quantize_uint8, to_float
from edgesr.metrics import mean_scores, sr_scores


@torch.no_grad()
def super_resolve(model: nn.Module, lr: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 LR -> float32 sHxsWx3 SR (not yet quantized), on the model's device."""
    device = next(model.parameters()).device
    x = torch.from_numpy(to_float(lr)).permute(2, 0, 1)[None].to(device)
    return model.eval()(x)[0].permute(1, 2, 0).float().cpu().numpy()


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


def conv_output_pixels(model: nn.Module, scale: int, out_hw: tuple[int, int] = (720, 1280)) -> dict[str, float]:
    """Output pixels of every conv for one `out_hw` output image. Conv MACs are linear in the pixel count, so they are
    measured on a small LR probe and scaled to the target."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pixels: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: pixels.__setitem__(n, o.shape[-2] * o.shape[-1]))
        for n, m in convs.items()
    ]
    probe = 8
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, probe, probe, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    ratio = out_hw[0] * out_hw[1] / scale**2 / probe**2
    return {n: pixels[n] * ratio for n in convs}


@torch.no_grad()
def model_stats(model: nn.Module, scale: int, out_hw: tuple[int, int] = (720, 1280)) -> dict[str, Any]:
    """Parameter, non-zero and MAC counts; MACs are for one `out_hw` output image (default 1280x720)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    trainable = prunable_convs(model)
    pixels = conv_output_pixels(model, scale, out_hw)
    layers, totals = {}, {"params": 0, "nonzeros": 0, "macs": 0, "nonzero_macs": 0}
    for name, conv in convs.items():
        w = conv.weight
        nnz = int((w != 0).sum())
        # MACs per output pixel = c_out * c_in/groups * k * k = the weight count.
        macs = int(round(pixels[name] * w.numel()))
        nz_macs = int(round(pixels[name] * nnz))
        layers[name] = {
            "shape": list(w.shape),
            "params": w.numel(),
            "nonzeros": nnz,
            "sparsity": round(1 - nnz / w.numel(), 6),
            "prunable": name in trainable,
        }
        totals["macs"] += macs
        totals["nonzero_macs"] += nz_macs
    for p in model.parameters():
        totals["params"] += p.numel()
        totals["nonzeros"] += int((p != 0).sum())
    pr = [v for v in layers.values() if v["prunable"]]
    pr_params = sum(v["params"] for v in pr)
    return {
        "params": totals["params"],
        "nonzeros": totals["nonzeros"],
        "sparsity_prunable": round(1 - sum(v["nonzeros"] for v in pr) / pr_params, 6),
        "sparsity_all_params": round(1 - totals["nonzeros"] / totals["params"], 6),
        "macs_1280x720": totals["macs"],
        "nonzero_macs_1280x720": totals["nonzero_macs"],
        "macs_output_size": f"{out_hw[1]}x{out_hw[0]}",
        "layers": layers,
    }
