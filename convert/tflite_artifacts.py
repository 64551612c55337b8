"""One TFLite precision's artifacts for the convert pipeline: the dense file and its sparse sibling, verified.

For a precision (`TFLITE_PRECISIONS`) this converts the model with litert-torch (`convert.tflite`), rewrites the
conv filters into their smallest sparse encoding (`convert.sparse_tflite`), runs both files in ai_edge_litert on
the parity tile and checks them against torch (`convert.parity`): each within its precision's tolerance, and the
sparse output bit-identical to the dense one on the same runtime and delegate. A file that XNNPACK cannot prepare
is verified with the builtin kernels and marked `runtime_requirements: {"xnnpack": false}` (device_bench's runner
then builds its interpreter without the default delegates). Each entry also gets `quality`: the file's own mean
Y-PSNR over crops of the sporco test set, so the int8/fp16 loss against fp32 reads straight off the manifest.

File names: fp32 keeps `dense.tflite` / `sparse.tflite` (the demo and device_bench rely on them); the other
precisions are `<encoding>-<precision>.tflite`, e.g. `dense-fp16.tflite`, `sparse-int8.tflite`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from convert import parity, verify
from convert.sparse_tflite import SparseStats, conv_filter_stats, sparsify_tflite
from convert.tflite import PRECISIONS, convert_tflite
from edgesr.manifest import atomic_output, sha256, size_bytes
from edgesr.workload import Size

log = logging.getLogger(__name__)

TFLITE_PRECISIONS: tuple[str, ...] = PRECISIONS

SPARSE_NOTE = (
    "sparse conv weights shrink the file only: DENSIFY restores dense weights when the model loads, "
    "so peak memory and latency are those of the dense file"
)
NO_XNNPACK_NOTE = (
    "XNNPACK cannot prepare this file (it rejects sparse weights feeding dynamic-range int8 convs): "
    "run it with the builtin kernels (verified that way)"
)


def tflite_file_name(encoding: str, precision: str) -> str:
    """`dense.tflite` / `sparse.tflite` for fp32, else `<encoding>-<precision>.tflite`."""
    return f"{encoding}.tflite" if precision == "fp32" else f"{encoding}-{precision}.tflite"


def tflite_artifacts(
    model: nn.Module,
    staging: Path,
    precision: str,
    tile: int | Size,
    sparse_min: float,
    x: np.ndarray,
    reference: np.ndarray,
    calibration: np.ndarray | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build, verify and describe the dense and sparse .tflite of one precision in `staging`: (artifacts, skipped).

    Raises CheckFailed (one line: file, figure, limit) when a file is outside its precision's tolerance or the
    sparse file's output differs from the dense one's.
    """
    staging = Path(staging)
    scale = reference.shape[1] // x.shape[1]
    tiles = parity.sporco_tiles(tile, scale)
    dense_path = convert_tflite(model, staging / tflite_file_name("dense", precision), tile, precision, calibration)
    dense_bytes = dense_path.read_bytes()
    dense_out, dense_delegate, dense_xnnpack_error = parity.run_tflite_any(dense_path, x)
    dense = _entry(dense_path, "dense", precision, conv_filter_stats(dense_bytes))
    dense["parity"] = parity.tflite_parity(dense_path, x, reference, precision, dense_out, dense_delegate)
    _mark_xnnpack(dense, dense_xnnpack_error, None)
    dense["quality"] = _quality(dense_path, tiles, scale, dense_delegate)

    sparse_bytes, sparse_stats = sparsify_tflite(dense_bytes, sparse_min)
    sparse_name = tflite_file_name("sparse", precision)
    if sparse_stats.sparse_tensors == 0:
        reason = "no conv weight tensor is smaller sparse-encoded than dense"
        if sparse_min > 0:
            reason += f" (among those with >= {sparse_min:.0%} zeros)"
        skipped = [
            {"file": sparse_name, "format": "tflite", "encoding": "sparse", "precision": precision, "reason": reason}
        ]
        return [dense], skipped
    sparse_path = staging / sparse_name
    with atomic_output(sparse_path) as tmp:
        tmp.write_bytes(sparse_bytes)
    sparse_out, sparse_delegate, sparse_xnnpack_error = parity.run_tflite_any(sparse_path, x)
    same_runtime_dense = (
        dense_out if sparse_delegate == dense_delegate else parity.run_tflite(dense_path, x, sparse_delegate)
    )
    verify.check_identical(f"{sparse_name} (with {sparse_delegate})", sparse_out, same_runtime_dense)
    sparse = _entry(sparse_path, "sparse", precision, sparse_stats)
    sparse["parity"] = parity.tflite_parity(sparse_path, x, reference, precision, sparse_out, sparse_delegate)
    sparse["parity"]["bit_identical_to_dense"] = True
    sparse["min_sparsity"] = sparse_min
    _mark_xnnpack(sparse, sparse_xnnpack_error, SPARSE_NOTE)
    sparse["quality"] = _quality(sparse_path, tiles, scale, sparse_delegate)
    for a in (dense, sparse):
        w = a["weights"]
        log.info(
            "%s: %d bytes, conv weights %d B (bound %d B), %d sparse filters, verified with %s",
            a["file"],
            a["size_bytes"],
            w["weight_bytes"],
            w["bound_bytes"],
            w["sparse_tensors"],
            a["parity"]["verified_with"]["delegate"],
        )
    return [dense, sparse], []


def _entry(path: Path, encoding: str, precision: str, stats: SparseStats) -> dict[str, Any]:
    return {
        "file": path.name,
        "format": "tflite",
        "encoding": encoding,
        "precision": precision,
        "size_bytes": size_bytes(path),
        "sha256": sha256(path),
        "weights": {
            "conv_weights": stats.conv_weights,
            "nonzeros": stats.nonzeros,
            "sparse_tensors": stats.sparse_tensors,
            "weight_bytes": stats.weight_bytes,
            "bound_bytes": stats.bound_bytes,
        },
    }


def _quality(
    path: Path, tiles: list[tuple[np.ndarray, np.ndarray]], scale: int, delegate: str
) -> dict[str, Any] | None:
    """SR quality of the file itself: mean Y-PSNR over real test-set crops (compare precisions with it).

    None when the tile is larger than every test photo's LR image (nothing to score at that shape)."""
    if not tiles:
        return None
    return {
        "psnr_y_db": parity.tflite_psnr_y(path, tiles, scale, delegate),
        "test_set": parity.PARITY_SET,
        "tiles": len(tiles),
        "delegate": delegate,
    }


def _mark_xnnpack(entry: dict[str, Any], xnnpack_error: str | None, note: str | None) -> None:
    """Record that XNNPACK could not prepare the file, and the one-line note that goes with it."""
    notes = [note] if note else []
    if xnnpack_error is not None:
        entry["runtime_requirements"] = {"xnnpack": False}
        entry["parity"]["xnnpack_error"] = xnnpack_error
        notes.append(NO_XNNPACK_NOTE)
    if notes:
        entry["note"] = "; ".join(notes)
