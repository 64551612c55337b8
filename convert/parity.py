"""Parity: does a converted file compute what the torch model computes, on a real photo?

A TFLite artifact runs in `ai_edge_litert`'s interpreter (the runtime devices use) on one tile cut from a
bundled test photo's LR image; its output is compared with torch's on the same float32 input. fp32 files must
agree to `FP32_MAX_ABS_ERR`; the sparse file must be bit-identical to the dense one, since DENSIFY restores the
very same weights.
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

from edgesr.datasets import load_test_set
from edgesr.errors import CheckFailed
from edgesr.images import to_float
from edgesr.metrics import psnr_float

log = logging.getLogger(__name__)

PARITY_SET, PARITY_IMAGE = "sporco", "monarch"
FP32_MAX_ABS_ERR = 1e-4


def parity_tile(tile: int, scale: int, image: str = PARITY_IMAGE) -> np.ndarray:
    """A (1, tile, tile, 3) float32 NHWC crop from the centre of a bundled photo's LR image (edge-padded if small)."""
    pairs = {p.name: p for p in load_test_set(PARITY_SET, scale)}
    lr = to_float(pairs[image].lr)
    h, w = lr.shape[:2]
    if h < tile or w < tile:
        lr = np.pad(lr, ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0)), mode="edge")
        h, w = lr.shape[:2]
    top, left = (h - tile) // 2, (w - tile) // 2
    return np.ascontiguousarray(lr[top : top + tile, left : left + tile])[None]


@torch.no_grad()
def torch_output(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """The torch model's output for an NHWC float32 input, as NHWC float32."""
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    return model.eval()(x).permute(0, 2, 3, 1).contiguous().numpy()


def run_tflite(path: str | os.PathLike, x_nhwc: np.ndarray) -> np.ndarray:
    """Run a single-input, single-output .tflite on `x_nhwc` with ai_edge_litert's interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    if tuple(inp["shape"]) != x_nhwc.shape:
        raise CheckFailed(f"{Path(path).name}: input shape {tuple(inp['shape'])}, expected {x_nhwc.shape}")
    interpreter.set_tensor(inp["index"], x_nhwc.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).copy()


def compare(name: str, output: np.ndarray, reference: np.ndarray, max_abs_err: float = FP32_MAX_ABS_ERR) -> dict:
    """Max abs error and PSNR (peak 1.0) of `output` against `reference`; CheckFailed beyond `max_abs_err`."""
    if output.shape != reference.shape:
        raise CheckFailed(f"{name}: output shape {output.shape}, torch gives {reference.shape}")
    err = float(np.max(np.abs(output.astype(np.float64) - reference.astype(np.float64))))
    psnr = psnr_float(output, reference, peak=1.0)
    if not err <= max_abs_err:  # also catches NaN
        raise CheckFailed(
            f"{name}: output differs from torch by up to {err:.3g} (limit {max_abs_err:g}), "
            f"PSNR {psnr:.1f} dB on {PARITY_IMAGE}"
        )
    # JSON has no infinity: identical outputs are recorded as psnr_db null with max_abs_err 0.
    return {"image": PARITY_IMAGE, "max_abs_err": err, "psnr_db": psnr if math.isfinite(psnr) else None}


def bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bits (so -0.0 vs 0.0 or differing NaNs count as different)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_tflite(
    path: Path, reference: np.ndarray, x_nhwc: np.ndarray, dense_output: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Parity of one .tflite against torch (and against the dense file's output if given); returns (record, output)."""
    output = run_tflite(path, x_nhwc)
    record = compare(path.name, output, reference)
    record["bit_identical_to_dense"] = None
    if dense_output is not None:
        same = bit_identical(output, dense_output)
        if not same:
            diff = float(np.max(np.abs(output.astype(np.float64) - dense_output)))
            raise CheckFailed(f"{path.name}: output is not bit-identical to the dense file's (max diff {diff:.3g})")
        record["bit_identical_to_dense"] = True
    log.info(
        "%s: max abs err %.2e vs torch, PSNR %s dB on %s%s",
        path.name,
        record["max_abs_err"],
        "inf" if record["psnr_db"] is None else f"{record['psnr_db']:.1f}",
        PARITY_IMAGE,
        ", bit-identical to dense" if dense_output is not None else "",
    )
    return record, output


def bound_bytes(conv_weights: int, nonzeros: int) -> int:
    """Reference size of the conv weights: fp32 non-zeros plus a 1-bit-per-weight mask."""
    return nonzeros * 4 + math.ceil(conv_weights / 8)
