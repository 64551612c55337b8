"""PyTorch -> .tflite with litert-torch: NHWC float32 input and output, one fixed tile shape.

litert-torch exports static shapes (pixel shuffle lowers to reshapes and transposes), so a file serves one tile
size; the device runner tiles whole images with an overlap. `to_channel_last_io` wraps the model so the file
takes and returns NHWC, which is what every TFLite runtime and image library expects.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from edgesr.manifest import atomic_output

log = logging.getLogger(__name__)

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def convert_tflite(model: nn.Module, path: str | os.PathLike, tile: int) -> Path:
    """Convert `model` (NCHW float in [0, 1] -> NCHW) to a .tflite taking (1, tile, tile, 3) NHWC float32."""
    import litert_torch  # slow import (jax, transformers); only conversion needs it

    path = Path(path)
    wrapped = litert_torch.to_channel_last_io(model.eval(), args=[0], outputs=[0]).eval()
    sample = torch.rand(1, tile, tile, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        edge_model = litert_torch.convert(wrapped, (sample,))
    with atomic_output(path) as tmp:
        edge_model.export(str(tmp))
    log.info("converted %s (%d bytes): %s", path.name, path.stat().st_size, dict(tflite_op_counts(path.read_bytes())))
    return path


def tflite_op_counts(data: bytes) -> Counter[str]:
    """Builtin operator names and how often each occurs, over all subgraphs of a .tflite file."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    counts: Counter[str] = Counter()
    for sg in model.subgraphs:
        for op in sg.operators or []:
            oc = model.operatorCodes[op.opcodeIndex]
            code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
            counts[_OP_NAMES.get(code, f"builtin_{code}")] += 1
    return counts
