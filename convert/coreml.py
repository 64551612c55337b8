"""PyTorch -> Core ML ML Program (.mlpackage): dense, sparse, int8 and palettized weights, fp32 or fp16 compute.

The model is traced and converted at a fixed (1, 3, tile, tile) NCHW float32 input named "lr" and float32 output
"sr" (fp16 programs cast inside). Deployment targets: iOS16 for fp32/fp16 and for dense int8 / palettized
weights (constexpr_sparse_to_dense, constexpr_affine_dequantize, constexpr_lut_to_dense), iOS18 for joint
sparse + int8 / sparse + palettized weights and for 3-bit palettes, which need the iOS18 ops.

Weight compression is decided per conv weight tensor, never by coremltools' default size threshold (2048
elements), so small tensors such as a 3->32 head conv are compressed too:
- sparse (`sparsify_coreml`): a tensor is stored as a bit mask plus its non-zero values when at least
  `min_sparsity` of it is zero AND that is smaller than the dense tensor at the value width the file will use
  (fp32 32 bits, fp16 16, int8 8, n-bit palette n): non-zeros x width + 1 bit per weight < weights x width.
  Threshold 0: exact zeros only, so the non-zero values are stored unchanged.
- int8 (`quantize_int8`): per-output-channel symmetric int8, when that is smaller than the float tensor.
- palettized (`palettize`): per-tensor k-means n-bit LUT over the values the file stores (the non-zeros of a
  sparse tensor), only when indices + LUT are smaller than those values in fp32.
Core ML keeps tensors under 10 elements inline in the program text and never compresses them (EDSR's 3x3
MeanShift convs, for instance); `mil_exec.conv_weights` reports them as `inline`.

Prediction needs macOS; on Linux `device_bench.mil_exec` executes the saved program with numpy instead.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from device_bench import mil_exec
from edgesr.manifest import atomic_output, size_bytes
from edgesr.workload import Size, as_size

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "lr", "sr"
SPARSE_OP = "constexpr_sparse_to_dense"
PRUNED_OP_TYPES = ("conv",)
INLINE_MAX_ELEMENTS = 9  # Core ML writes tensors this small into the program text, uncompressed
PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # what coremltools' k-means palettizer supports
IOS16_PALETTE_BITS = (1, 2, 4, 6, 8)  # what iOS16's constexpr_lut_to_dense can hold
TARGETS = ("iOS16", "iOS17", "iOS18")


@dataclass(frozen=True)
class CoreMLStats:
    """What a saved .mlpackage holds: sizes, and conv weight figures read back from its program."""

    size_bytes: int
    weight_bin_bytes: int
    conv_weights: int
    nonzeros: int
    sparse_tensors: int  # conv weights stored through constexpr_sparse_to_dense
    weight_bytes: int = 0  # bytes the conv weights take in the file: values, masks, indices, LUTs, scales
    inline_tensors: int = 0  # conv weights kept inline (under 10 elements), never compressed


def convert_coreml(model: nn.Module, tile: int | Size, target: str = "iOS16", compute_precision: str = "fp32") -> Any:
    """Trace and convert to an ML Program (an in-memory `ct.models.MLModel`) for (1, 3, H, W) input (the tile: a
    side, or (H, W)).

    `compute_precision` "fp16" stores weights and computes in fp16; input and output stay float32 either way.
    """
    import coremltools as ct

    if target not in TARGETS:
        raise ValueError(f"unknown Core ML target {target!r}; known: {', '.join(TARGETS)}")
    precision = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[compute_precision]
    h, w = as_size(tile)
    sample = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), sample)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, 3, h, w), dtype=np.float32)],
        outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=precision,
    )


def conv_weight_consts(mlmodel: Any) -> list[tuple[str, np.ndarray]]:
    """(conv op name, weight value) for every conv of an in-memory model whose weight is a plain const."""
    out = []
    for fn in mlmodel._mil_program.functions.values():
        for op in mil_exec.operations(fn):
            if op.op_type in PRUNED_OP_TYPES and op.weight.op is not None and op.weight.op.op_type == "const":
                out.append((op.name, np.asarray(op.weight.val)))
    return out


def sparse_saves_bytes(weight: np.ndarray, value_bits: int, min_sparsity: float = 0.0) -> bool:
    """Whether a tensor should be stored sparse: enough zeros, and mask + non-zeros smaller than dense."""
    n = weight.size
    nonzeros = int(np.count_nonzero(weight))
    if n <= INLINE_MAX_ELEMENTS or n == nonzeros or (n - nonzeros) / n < min_sparsity:
        return False
    return math.ceil(nonzeros * value_bits / 8) + math.ceil(n / 8) < math.ceil(n * value_bits / 8)


def _value_bits(weight: np.ndarray) -> int:
    return weight.dtype.itemsize * 8


def sparsify_coreml(mlmodel: Any, min_sparsity: float, value_bits: int | None = None) -> Any:
    """Store the conv weights that gain from it as constexpr_sparse_to_dense (values unchanged, exact zeros).

    `value_bits`: the width the non-zeros will finally have (8 before int8, n before an n-bit palette);
    default the weight's own dtype width.
    """
    import coremltools.optimize.coreml as cto

    op_config = cto.OpThresholdPrunerConfig(threshold=0.0, minimum_sparsity_percentile=0.0, weight_threshold=0)
    chosen = {
        name: op_config
        for name, w in conv_weight_consts(mlmodel)
        if sparse_saves_bytes(w, value_bits or _value_bits(w), min_sparsity)
    }
    if not chosen:
        return mlmodel
    return cto.prune_weights(mlmodel, cto.OptimizationConfig(op_name_configs=chosen))


def quantize_int8(mlmodel: Any, joint: bool = False) -> Any:
    """Per-output-channel symmetric int8 conv weights; `joint` quantizes a sparse model's non-zeros (iOS18)."""
    import coremltools.optimize.coreml as cto

    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel", weight_threshold=0)
    return cto.linear_quantize_weights(
        mlmodel, cto.OptimizationConfig(op_type_configs=dict.fromkeys(PRUNED_OP_TYPES, config)), joint_compression=joint
    )


def palette_saves_bytes(values: int, nbits: int) -> bool:
    """Whether `values` fp32 numbers take more room than their n-bit indices plus a 2^n-entry fp32 LUT."""
    return math.ceil(values * nbits / 8) + 4 * 2**nbits < 4 * values


def palettize(mlmodel: Any, nbits: int, joint: bool = False) -> Any:
    """Per-tensor k-means n-bit palettes for the conv weights that gain from it; `joint` palettizes non-zeros."""
    import coremltools.optimize.coreml as cto

    if nbits not in PALETTE_BITS:
        raise ValueError(f"coremltools palettizes to {', '.join(map(str, PALETTE_BITS))} bits, not {nbits}")
    config = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor", weight_threshold=0)
    chosen = {}
    for fn in mlmodel._mil_program.functions.values():
        for op in mil_exec.operations(fn):
            if op.op_type not in PRUNED_OP_TYPES or op.weight.op is None:
                continue
            producer = op.weight.op
            if producer.op_type == "const":
                count = op.weight.val.size
            elif producer.op_type == SPARSE_OP and joint:
                count = producer.nonzero_data.val.size
            else:
                continue
            if palette_saves_bytes(count, nbits):
                chosen[op.name] = config
    if not chosen:
        return mlmodel
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=chosen), joint_compression=joint)


def coremltools_default_sparse(mlmodel: Any, target_sparsity: float) -> Any:
    """The cross-check: coremltools' own `prune_weights` with `OpMagnitudePrunerConfig` defaults on conv weights.

    Its default `weight_threshold` (2048 elements) leaves smaller tensors dense; on a model pruned to
    `target_sparsity` per layer it keeps the same zeros in the tensors it does touch.
    """
    import coremltools.optimize.coreml as cto

    config = cto.OpMagnitudePrunerConfig(target_sparsity=target_sparsity)
    return cto.prune_weights(mlmodel, cto.OptimizationConfig(op_type_configs=dict.fromkeys(PRUNED_OP_TYPES, config)))


def save_mlpackage(mlmodel: Any, path: str | os.PathLike) -> Path:
    """Save an ML Program as a .mlpackage folder atomically (temp folder, then rename)."""
    path = Path(path)
    with atomic_output(path, is_dir=True) as tmp:
        mlmodel.save(str(tmp))
    return path


def weight_bin(path: str | os.PathLike) -> Path | None:
    """The weight file of a .mlpackage (Data/com.apple.CoreML/weights/weight.bin), if it has one."""
    found = sorted(Path(path).glob("Data/com.apple.CoreML/weights/*.bin"))
    return found[0] if found else None


def load_program(path: str | os.PathLike) -> Any:
    """Read a saved .mlpackage's ML Program back as a PyMIL Program (works on Linux, no prediction)."""
    return mil_exec.load_program(path)


def read_conv_weights(path: str | os.PathLike) -> list[np.ndarray]:
    """The conv weights of a saved .mlpackage as dense arrays, decoded by `device_bench.mil_exec`, in program order."""
    return [w.value for w in mil_exec.conv_weights(load_program(path), where=str(path))]


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def mlpackage_stats(path: str | os.PathLike) -> CoreMLStats:
    """Sizes of a saved .mlpackage and its conv weight figures, read from the program on disk."""
    weights = mil_exec.conv_weights(load_program(path), where=str(path))
    wb = weight_bin(path)
    return CoreMLStats(
        size_bytes=size_bytes(path),
        weight_bin_bytes=wb.stat().st_size if wb else 0,
        conv_weights=sum(w.value.size for w in weights),
        nonzeros=sum(int(np.count_nonzero(w.value)) for w in weights),
        sparse_tensors=sum(w.sparse for w in weights),
        weight_bytes=sum(w.stored_bytes for w in weights),
        inline_tensors=sum(w.inline for w in weights),
    )
