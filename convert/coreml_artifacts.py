"""Core ML artifacts for one precision, each verified by executing the saved file (`device_bench.mil_exec`).

Per precision a dense and a sparse .mlpackage (see convert/coreml.py for how each tensor is encoded):

  precision  dense file              sparse file              weights                      compute  target
  fp32       dense.mlpackage         sparse.mlpackage         fp32                         fp32     iOS16
  fp16       dense-fp16.mlpackage    sparse-fp16.mlpackage    fp16                         fp16     iOS16
  int8       dense-int8.mlpackage    sparse-int8.mlpackage    int8 per output channel      fp32     iOS16 / iOS18
  lutN       dense-lutN.mlpackage    sparse-lutN.mlpackage    N-bit k-means palette        fp32     iOS16 / iOS18
                                                              (N in 1, 2, 3, 4, 6, 8)               (lut3: iOS18)

The sparse int8 / lutN files use iOS18's joint compression: only the non-zeros are quantized / palettized.
A sparse file in which no tensor gains from sparse storage is not written; it is listed in `skipped`.

Parity, on the parity tile `x` (a crop of a real photo), of the executor's output for every file:
- against torch: max abs error and PSNR (peak 1.0) within the precision's tolerance (`TOLERANCES`);
- int8 / lutN: against a torch copy of the model whose conv weights are the file's dequantized weights, within
  `DEQUANTIZED_MAX_ABS` (fp32 compute): the executor and the file agree, the loss is the weights' alone;
- sparse fp32 / fp16: bit-identical to the dense file's output (sparse storage changes no weight).
On macOS the real Core ML `predict` also runs each file and must agree with the executor.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convert import coreml, parity, verify
from convert.verify import FP32_MAX_ABS_ERROR, Tolerance
from convert.weight_bound import bound_bytes
from device_bench import mil_exec
from edgesr.errors import CheckFailed
from edgesr.manifest import sha256, size_bytes
from edgesr.workload import Size, as_size

log = logging.getLogger(__name__)

LUT_PRECISIONS = tuple(f"lut{n}" for n in range(1, 9))
COREML_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", *LUT_PRECISIONS)
DEQUANTIZED_MAX_ABS = 1e-4


# Set from measurement (32x32 monarch tile): the shipped edsr-tiny x2 checkpoint unpruned and pruned to 80 %,
# edsr-tiny x3 random init pruned 50 %, rdn-tiny x2 random init pruned 90 %. Worst PSNR vs torch seen (all from the
# unpruned checkpoint unless noted): fp16 71.2 dB (pruned), int8 61.6, lut8 65.9, lut6 53.3, lut4 38.1, lut3 32.6,
# lut2 18.3, lut1 12.0. The limits sit well below, since deeper trained models lose more: they catch a broken file,
# they do not promise quality (lut1 / lut2 are far from torch). fp32 is exact up to float rounding.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_error=FP32_MAX_ABS_ERROR),
    "fp16": Tolerance(psnr_db_min=50.0),
    "int8": Tolerance(psnr_db_min=40.0),
    "lut8": Tolerance(psnr_db_min=40.0),
    "lut6": Tolerance(psnr_db_min=35.0),
    "lut4": Tolerance(psnr_db_min=25.0),
    "lut3": Tolerance(psnr_db_min=20.0),
    "lut2": Tolerance(psnr_db_min=10.0),
    "lut1": Tolerance(psnr_db_min=5.0),
}
VALUE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, **{f"lut{n}": n for n in range(1, 9)}}


@dataclass(frozen=True)
class Built:
    """One in-memory Core ML model ready to save, with what the manifest says about it."""

    file: str
    encoding: str
    mlmodel: Any
    target: str
    original: dict[str, np.ndarray]  # conv op name -> weight of the uncompressed program it was made from


def file_name(encoding: str, precision: str) -> str:
    """dense.mlpackage / sparse.mlpackage for fp32 (names the demo relies on), else e.g. sparse-lut4.mlpackage."""
    return f"{encoding}.mlpackage" if precision == "fp32" else f"{encoding}-{precision}.mlpackage"


def _build(model: nn.Module, precision: str, tile: Size, sparse_min: float) -> list[Built]:
    """The dense and sparse models of one precision (the sparse one only if some tensor is stored sparse)."""
    bits = VALUE_BITS[precision]
    if precision in ("fp32", "fp16"):
        dense_target = sparse_target = "iOS16"
        dense_base = sparse_base = coreml.convert_coreml(model, tile, "iOS16", compute_precision=precision)
        dense, sparse = dense_base, coreml.sparsify_coreml(dense_base, sparse_min)
    elif precision == "int8":
        dense_target, sparse_target = "iOS16", "iOS18"
        dense_base, sparse_base = (coreml.convert_coreml(model, tile, t) for t in (dense_target, sparse_target))
        dense = coreml.quantize_int8(dense_base)
        sparse = coreml.quantize_int8(coreml.sparsify_coreml(sparse_base, sparse_min, value_bits=8), joint=True)
    else:
        dense_target = "iOS16" if bits in coreml.IOS16_PALETTE_BITS else "iOS18"
        sparse_target = "iOS18"
        dense_base, sparse_base = (coreml.convert_coreml(model, tile, t) for t in (dense_target, sparse_target))
        dense = coreml.palettize(dense_base, bits)
        sparse = coreml.palettize(coreml.sparsify_coreml(sparse_base, sparse_min, value_bits=bits), bits, joint=True)
    originals = [dict(coreml.conv_weight_consts(b)) for b in (dense_base, sparse_base)]
    out = [Built(file_name("dense", precision), "dense", dense, dense_target, originals[0])]
    if _has_sparse(sparse):
        out.append(Built(file_name("sparse", precision), "sparse", sparse, sparse_target, originals[1]))
    return out


def _has_sparse(mlmodel: Any) -> bool:
    return any(
        op.op_type == coreml.SPARSE_OP
        for fn in mlmodel._mil_program.functions.values()
        for op in mil_exec.operations(fn)
    )


def torch_with_weights(model: nn.Module, original: dict[str, np.ndarray], path: Path) -> tuple[nn.Module, int]:
    """A copy of `model` whose conv weights are the saved file's (dequantized) ones; returns (copy, convs replaced).

    `original` maps conv op names to the uncompressed program's weights; a program conv is matched to the torch
    conv whose weight equals its uncompressed weight exactly.
    """
    dense = original
    stored = mil_exec.materialized_weights(path)
    clone = copy.deepcopy(model).eval()
    replaced = 0
    # Every 4-d parameter, not only nn.Conv2d weights: a .pt2 module or an F.conv2d user model keeps its kernels
    # as plain parameters.
    for param in clone.parameters():
        if param.dim() != 4:
            continue
        w = param.detach().numpy()
        for name, original in dense.items():
            if name in stored and original.shape == w.shape and np.array_equal(original, w):
                with torch.no_grad():
                    param.copy_(torch.from_numpy(stored[name].astype(np.float32)))
                replaced += 1
                break
    return clone, replaced


def _predict_on_mac(path: Path, x_nchw: np.ndarray) -> np.ndarray:
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    return np.asarray(mlmodel.predict({coreml.INPUT_NAME: x_nchw})[coreml.OUTPUT_NAME])


def _verified_with(on_mac: bool) -> dict[str, Any]:
    import coremltools as ct

    runtime = mil_exec.RUNTIME + (" + coreml predict (CPU_ONLY)" if on_mac else "")
    return {"runtime": runtime, "version": ct.__version__, "delegate": None}


def _verify(
    built: Built,
    path: Path,
    precision: str,
    model: nn.Module,
    x: np.ndarray,
    reference: np.ndarray,
    dense_output: np.ndarray | None,
) -> tuple[dict[str, Any], np.ndarray]:
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    out_nchw = mil_exec.run_mlpackage(path, {coreml.INPUT_NAME: x_nchw})[coreml.OUTPUT_NAME]
    output = out_nchw.transpose(0, 2, 3, 1)
    tol = TOLERANCES[precision]
    record = verify.check(path.name, "Core ML output", output, reference, tol, parity.PARITY_IMAGE)
    if precision in ("fp32", "fp16") and dense_output is not None:
        verify.check_identical(path.name, output, dense_output)
        record["bit_identical_to_dense"] = True
    if precision not in ("fp32", "fp16"):
        record["dequantized_torch"] = _dequantized_parity(model, built.original, path, output, x)
    on_mac = sys.platform == "darwin"
    if on_mac:
        mac = _predict_on_mac(path, x_nchw).transpose(0, 2, 3, 1)
        mac_err, _ = verify.figures(mac, output)
        mac_limit = 1e-3 if precision != "fp16" else 2e-2
        if not mac_err <= mac_limit:
            raise CheckFailed(
                f"{path.name}: Core ML predict differs from the reference executor by {mac_err:.3g} "
                f"(limit {mac_limit:g})"
            )
        record["coreml_predict"] = {"max_abs_error_vs_executor": mac_err, "tolerance": mac_limit}
    record["verified_with"] = _verified_with(on_mac)
    return record, output


def _dequantized_parity(
    model: nn.Module, original: dict[str, np.ndarray], path: Path, output: np.ndarray, x: np.ndarray
) -> dict[str, Any]:
    clone, replaced = torch_with_weights(model, original, path)
    expected = parity.torch_output(clone, x)
    err, _ = verify.figures(output, expected)
    if not err <= DEQUANTIZED_MAX_ABS:
        raise CheckFailed(
            f"{path.name}: executor output differs from torch with the file's dequantized weights by {err:.3g} "
            f"(limit {DEQUANTIZED_MAX_ABS:g})"
        )
    return {"max_abs_error": err, "tolerance": DEQUANTIZED_MAX_ABS, "convs_replaced": replaced}


def _artifact(built: Built, path: Path, precision: str, sparse_min: float, tile: Size, scale: int) -> dict[str, Any]:
    stats = coreml.mlpackage_stats(path)
    a: dict[str, Any] = {
        "file": path.name,
        "format": "coreml",
        "encoding": built.encoding,
        "precision": precision,
        "size_bytes": size_bytes(path),
        "sha256": sha256(path),
        "minimum_deployment_target": built.target,
        "compute_precision": "fp16" if precision == "fp16" else "fp32",
        "weight_bin_bytes": stats.weight_bin_bytes,
        "weights": {
            "conv_weights": stats.conv_weights,
            "nonzeros": stats.nonzeros,
            "sparse_tensors": stats.sparse_tensors,
            "weight_bytes": stats.weight_bytes,
            "bound_bytes": bound_bytes(stats.conv_weights, stats.nonzeros * VALUE_BITS[precision]),
            "inline_tensors": stats.inline_tensors,
        },
        "io": {
            "layout": "NCHW",
            "dtype": "float32",
            "input_name": coreml.INPUT_NAME,
            "output_name": coreml.OUTPUT_NAME,
            "input_shape": [1, 3, *tile],
            "output_shape": [1, 3, scale * tile[0], scale * tile[1]],
        },
    }
    if built.encoding == "sparse":
        a["min_sparsity"] = sparse_min
    if stats.inline_tensors:
        a["note"] = (
            f"{stats.inline_tensors} conv weight tensor(s) under 10 elements stay inline and uncompressed "
            "(Core ML never compresses them)"
        )
    return a


def _no_sparse_reason(bits: int, sparse_min: float) -> str:
    if bits == 1:
        return "no conv weight tensor is smaller stored sparse (a 1-bit palette never gains from a 1-bit mask)"
    floor = f" and >= {sparse_min:.0%} by --sparse-min" if sparse_min else ""
    return f"no conv weight tensor is smaller stored sparse (needs > 1/{bits} zeros{floor})"


def coreml_artifacts(
    model: nn.Module,
    staging: Path,
    precision: str,
    tile: int | Size,
    sparse_min: float,
    x: np.ndarray,
    reference: np.ndarray,
    scale: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write `precision`'s Core ML files into `staging`, verify each; returns (artifacts, skipped).

    `x` is the parity tile, float32 NHWC (1, tile, tile, 3) in [0, 1]; `reference` torch's NHWC output for it.
    Raises CheckFailed when a file's parity is worse than its documented tolerance.
    """
    if precision not in COREML_PRECISIONS:
        raise ValueError(f"Core ML has no {precision} variant; known: {', '.join(COREML_PRECISIONS)}")
    if precision in LUT_PRECISIONS and VALUE_BITS[precision] not in coreml.PALETTE_BITS:
        bits = ", ".join(map(str, coreml.PALETTE_BITS[:-1])) + f" or {coreml.PALETTE_BITS[-1]}"
        reason = f"coremltools palettizes to {bits} bits only"
        return [], [{"format": "coreml", "precision": precision, "reason": reason}]
    staging, tile = Path(staging), as_size(tile)
    built = _build(model, precision, tile, sparse_min)
    skipped = []
    if len(built) == 1:
        name = file_name("sparse", precision)
        skipped.append(
            {
                "file": name,
                "format": "coreml",
                "precision": precision,
                "reason": _no_sparse_reason(VALUE_BITS[precision], sparse_min),
            }
        )
    artifacts, dense_output = [], None
    for b in built:
        path = coreml.save_mlpackage(b.mlmodel, staging / b.file)
        record, output = _verify(b, path, precision, model, x, reference, dense_output)
        if b.encoding == "dense":
            dense_output = output
        a = _artifact(b, path, precision, sparse_min, tile, scale)
        a["parity"] = record
        log.info(
            "%s: %d bytes, conv weights %d B (bound %d B), %d sparse tensors, vs torch max abs %.2e, PSNR %s dB",
            a["file"],
            a["size_bytes"],
            a["weights"]["weight_bytes"],
            a["weights"]["bound_bytes"],
            a["weights"]["sparse_tensors"],
            record["max_abs_error"],
            "inf" if record["psnr_db"] is None else f"{record['psnr_db']:.1f}",
        )
        artifacts.append(a)
    return artifacts, skipped
