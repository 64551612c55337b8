"""Parity: does a converted file compute what the torch model computes, on a real photo?

A TFLite artifact runs in `ai_edge_litert`'s interpreter (the runtime devices use) on one tile cut from a
bundled test photo's LR image; its output is compared with torch's on the same float32 input: max abs error and
PSNR between the two outputs (peak 1.0), by `convert.verify` (the one comparison every format uses). Each
precision has a documented tolerance (`TFLITE_TOLERANCES`); a sparse
file must be bit-identical to its dense sibling of the same precision on the same runtime and delegate, since
DENSIFY restores the very same weights.

The interpreter runs with XNNPACK (the default delegate). A file XNNPACK cannot prepare (sparse + dynamic-range
int8: XNNPACK rejects DENSIFY feeding a hybrid conv) is run with the builtin kernels instead, and its record says so.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convert import verify
from convert.verify import FP32_MAX_ABS_ERROR, Tolerance
from edgesr.datasets import load_test_set
from edgesr.errors import CheckFailed
from edgesr.images import quantize_uint8, to_float
from edgesr.metrics import psnr
from edgesr.workload import Size, as_size, make_frame

log = logging.getLogger(__name__)

PARITY_SET, PARITY_IMAGE = "sporco", "monarch"


# Measured on edsr-tiny x2 (trained checkpoint and seeded random init, dense and 80-90 % magnitude-pruned) on the
# monarch tile, ai_edge_litert 2.3.0 (XNNPACK and builtin kernels), max abs error / PSNR vs torch:
# - fp32: 2e-7..7e-7 / 137-148 dB (float reassociation); 1e-4 leaves two orders of magnitude.
# - fp16 weights: 1.6e-5..1.2e-4 / 92-106 dB; rounding weights to fp16 costs ~2^-11 relative per weight.
# - int8-dynamic: 1.3e-3..9.5e-3 / 52-71 dB (XNNPACK and the builtin kernels round differently).
# - int8 (static, calibrated): 2.3e-3..3e-2 / 49-63 dB; activations quantized to 8 bits per layer.
# Each gate sits 15-20 dB below the worst case measured (max error ~5x larger): loose enough for other SR models,
# tight enough to catch a broken conversion (a wrong layout or scale gives < 20 dB).
TFLITE_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(FP32_MAX_ABS_ERROR, 80.0),
    "fp16": Tolerance(2e-3, 70.0),
    "int8-dynamic": Tolerance(0.08, 38.0),
    "int8": Tolerance(0.2, 32.0),
}
XNNPACK, BUILTIN = "xnnpack", "builtin"


def parity_tile(tile: int | Size, scale: int, image: str = PARITY_IMAGE) -> np.ndarray:
    """A (1, H, W, 3) float32 NHWC crop of the tile's size from the centre of a bundled photo's LR image (mirrored
    outwards where the photo is smaller, as device_bench makes its frames)."""
    pairs = {p.name: p for p in load_test_set(PARITY_SET, scale)}
    return make_frame(to_float(pairs[image].lr), as_size(tile))[None]


@torch.no_grad()
def torch_output(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """The torch model's output for an NHWC float32 input, as NHWC float32."""
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    return model.eval()(x).permute(0, 2, 3, 1).contiguous().numpy()


def run_tflite(path: str | os.PathLike, x_nhwc: np.ndarray, delegate: str = XNNPACK) -> np.ndarray:
    """Run a single-input, single-output .tflite on `x_nhwc` with ai_edge_litert's interpreter.

    `delegate`: XNNPACK (the runtime's default) or BUILTIN (BUILTIN_WITHOUT_DEFAULT_DELEGATES: reference kernels).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs: dict[str, Any] = {}
    if delegate == BUILTIN:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    elif delegate != XNNPACK:
        raise ValueError(f"unknown delegate {delegate!r}")
    interpreter = Interpreter(model_path=str(path), **kwargs)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    if tuple(inp["shape"]) != x_nhwc.shape:
        raise CheckFailed(f"{Path(path).name}: input shape {tuple(inp['shape'])}, expected {x_nhwc.shape}")
    interpreter.set_tensor(inp["index"], x_nhwc.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).copy()


def _runtime_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("ai-edge-litert")


def run_tflite_any(path: Path, x_nhwc: np.ndarray) -> tuple[np.ndarray, str, str | None]:
    """Run with XNNPACK, or with the builtin kernels if XNNPACK fails to prepare the file.

    Returns (output, delegate used, XNNPACK's one-line error or None).
    """
    try:
        return run_tflite(path, x_nhwc, XNNPACK), XNNPACK, None
    except RuntimeError as exc:  # "failed to delegate ... (TfLiteXNNPackDelegate) failed to prepare"
        why = " ".join(str(exc).split())
        log.info("%s: XNNPACK cannot run it (%s); using the builtin kernels", path.name, why)
        return run_tflite(path, x_nhwc, BUILTIN), BUILTIN, why


def tflite_parity(
    path: Path,
    x_nhwc: np.ndarray,
    reference: np.ndarray,
    precision: str,
    output: np.ndarray,
    delegate: str,
) -> dict[str, Any]:
    """The manifest's parity record of one output against torch; CheckFailed beyond the precision's tolerance."""
    record = verify.check(
        path.name, f"{precision} output", output, reference, TFLITE_TOLERANCES[precision], PARITY_IMAGE
    )
    record["verified_with"] = {"runtime": "ai-edge-litert", "version": _runtime_version(), "delegate": delegate}
    return record


def sporco_tiles(tile: int | Size, scale: int, per_image: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR (1, H, W, 3) float32 NHWC, HR (s*H, s*W, 3) uint8) crops of the bundled sporco test set.

    Up to `per_image` crops per photo on a regular grid, so a fixed-shape .tflite can be scored on real images
    without the runner's tiling. Photos whose LR image is smaller than the tile are left out.
    """
    th, tw = as_size(tile)
    out = []
    for pair in load_test_set(PARITY_SET, scale):
        h, w = pair.lr.shape[:2]
        if h < th or w < tw:
            continue
        side = max(1, int(math.isqrt(per_image)))
        tops = np.linspace(0, h - th, side).astype(int)
        lefts = np.linspace(0, w - tw, side).astype(int)
        for top in tops:
            for left in lefts:
                lr = to_float(pair.lr[top : top + th, left : left + tw])[None]
                hr = pair.hr[top * scale : (top + th) * scale, left * scale : (left + tw) * scale]
                out.append((np.ascontiguousarray(lr), hr))
    return out  # empty when the tile is larger than every LR image


def tflite_psnr_y(path: Path, tiles: list[tuple[np.ndarray, np.ndarray]], scale: int, delegate: str) -> float:
    """Mean Y-PSNR (SR protocol: 8-bit output, border = scale) of a .tflite over `sporco_tiles` crops."""
    scores = [
        psnr(quantize_uint8(run_tflite(path, lr, delegate)[0]), hr, crop_border=scale, y_channel=True)
        for lr, hr in tiles
    ]
    return float(np.mean(scores))
