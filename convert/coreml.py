"""PyTorch -> Core ML ML Program (.mlpackage), dense and with the existing zeros encoded sparse.

The model is traced and converted with fp32 compute at a fixed (1, 3, tile, tile) NCHW input named "lr" and
output "sr", minimum target iOS 16 (the first with `constexpr_sparse_to_dense`). The sparse variant runs
`coremltools.optimize.coreml.prune_weights` with a threshold of 1e-12: it prunes nothing new, it only stores the
conv weights that already are at least `min_sparsity` zeros as `constexpr_sparse_to_dense` (a bit mask plus the
non-zero values). Core ML keeps tensors under 10 elements inline in the program, never in weight.bin, and never
compresses them (EDSR's 3x3 MeanShift convs, for instance).

Prediction needs macOS, so nothing here runs a model; `mlpackage_stats` reads the saved program back instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesr.manifest import atomic_output, size_bytes

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "lr", "sr"
SPARSE_OP = "constexpr_sparse_to_dense"
PRUNED_OP_TYPES = ("conv",)


@dataclass(frozen=True)
class CoreMLStats:
    """What a saved .mlpackage holds: sizes, and conv weight figures read back from its program."""

    size_bytes: int
    weight_bin_bytes: int
    conv_weights: int
    nonzeros: int
    sparse_tensors: int  # constexpr_sparse_to_dense ops in the program


def convert_coreml(model: nn.Module, tile: int) -> Any:
    """Trace and convert to an fp32 ML Program (an in-memory `ct.models.MLModel`) for (1, 3, tile, tile) input."""
    import coremltools as ct

    sample = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), sample)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, 3, tile, tile))],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT32,
    )


def sparsify_coreml(mlmodel: Any, min_sparsity: float) -> Any:
    """Encode conv weights with at least `min_sparsity` zeros as constexpr_sparse_to_dense (values unchanged)."""
    import coremltools.optimize.coreml as cto

    # weight_threshold=0: small tensors (the 3->n head conv) are encoded too; threshold 1e-12 keeps every
    # non-zero weight, so the encoded weights equal the dense ones exactly.
    op_config = cto.OpThresholdPrunerConfig(
        threshold=1e-12, minimum_sparsity_percentile=min_sparsity, weight_threshold=0
    )
    config = cto.OptimizationConfig(op_type_configs=dict.fromkeys(PRUNED_OP_TYPES, op_config))
    return cto.prune_weights(mlmodel, config)


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
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def _operations(block: Any) -> list[Any]:
    ops = []
    for op in block.operations:
        ops.append(op)
        for inner in getattr(op, "blocks", []) or []:
            ops += _operations(inner)
    return ops


def _const_value(var: Any) -> np.ndarray | None:
    if var.val is not None:
        return np.asarray(var.val)
    producer = var.op
    if producer is not None and producer.op_type.startswith("constexpr_"):
        return np.asarray(producer.materialized_val_inference())
    return None


def _conv_weights(program: Any) -> tuple[list[np.ndarray], list[Any]]:
    """Distinct conv weight values (materialized if compressed) in program order, and all ops."""
    ops = [op for fn in program.functions.values() for op in _operations(fn)]
    seen: set[int] = set()
    weights = []
    for op in ops:
        if op.op_type in PRUNED_OP_TYPES and id(op.weight) not in seen:
            seen.add(id(op.weight))
            value = _const_value(op.weight)
            if value is not None:
                weights.append(value)
    return weights, ops


def read_conv_weights(path: str | os.PathLike) -> list[np.ndarray]:
    """The conv weights of a saved .mlpackage as dense arrays (sparse-encoded ones decoded by coremltools)."""
    return _conv_weights(load_program(path))[0]


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def mlpackage_stats(path: str | os.PathLike) -> CoreMLStats:
    """Sizes of a saved .mlpackage and its conv weight figures, read from the program on disk."""
    weights, ops = _conv_weights(load_program(path))
    wb = weight_bin(path)
    return CoreMLStats(
        size_bytes=size_bytes(path),
        weight_bin_bytes=wb.stat().st_size if wb else 0,
        conv_weights=sum(w.size for w in weights),
        nonzeros=sum(int(np.count_nonzero(w)) for w in weights),
        sparse_tensors=sum(op.op_type == SPARSE_OP for op in ops),
    )
