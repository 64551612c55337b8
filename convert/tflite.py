"""PyTorch -> .tflite with litert-torch: NHWC float32 input and output, one fixed tile shape, four precisions.

litert-torch exports static shapes (pixel shuffle lowers to reshapes and transposes), so a file serves one tile
size; the device runner tiles whole images with an overlap. `to_channel_last_io` wraps the model so the file
takes and returns NHWC, which is what every TFLite runtime and image library expects.

Precisions (every file keeps float32 NHWC input and output, so one runner feeds them all the same tiles):
- `fp32`: as exported.
- `fp16`: weights stored as float16, widened by DEQUANTIZE ops at load time (litert-torch's fp16 recipe, which
  runs ai-edge-quantizer's float casting); compute stays float32.
- `int8-dynamic`: dynamic-range quantization (PT2E, per-channel symmetric int8 weights; activations quantized
  on the fly by the kernels).
- `int8`: full integer quantization (PT2E static, per-channel int8 weights, int8 activations whose ranges come
  from calibration patches); QUANTIZE/DEQUANTIZE at the float32 edges.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from edgesr.errors import BadInput
from edgesr.manifest import atomic_output

log = logging.getLogger(__name__)

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")


def convert_tflite(
    model: nn.Module,
    path: str | os.PathLike,
    tile: int,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
) -> Path:
    """Convert `model` (NCHW float in [0, 1] -> NCHW) to a .tflite taking (1, tile, tile, 3) NHWC float32.

    `calibration` (N, tile, tile, 3) float32 NHWC patches are required for `int8` and ignored otherwise.
    """
    path = Path(path)
    data = tflite_bytes(model, tile, precision, calibration)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    log.info("converted %s (%s, %d bytes): %s", path.name, precision, len(data), dict(tflite_op_counts(data)))
    return path


def tflite_bytes(model: nn.Module, tile: int, precision: str = "fp32", calibration: np.ndarray | None = None) -> bytes:
    """The .tflite file `convert_tflite` writes, as bytes."""
    import litert_torch  # slow import (jax, transformers); only conversion needs it

    if precision not in PRECISIONS:
        raise BadInput(f"unknown TFLite precision '{precision}'; known: {', '.join(PRECISIONS)}")
    wrapped = litert_torch.to_channel_last_io(model.eval(), args=[0], outputs=[0]).eval()
    sample = torch.rand(1, tile, tile, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if precision == "fp32":
            edge_model = litert_torch.convert(wrapped, (sample,))
        elif precision == "fp16":
            from litert_torch.generative.quantize import quant_recipes

            edge_model = litert_torch.convert(wrapped, (sample,), quant_config=quant_recipes.full_fp16_recipe())
        else:
            edge_model = _convert_pt2e(wrapped, sample, precision == "int8-dynamic", calibration)
    return bytes(edge_model.model_content())


def _convert_pt2e(wrapped: nn.Module, sample: torch.Tensor, dynamic: bool, calibration: np.ndarray | None):
    """litert-torch's PT2E route: export, insert observers, calibrate, fold to q/dq, convert."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    if not dynamic:
        if calibration is None or calibration.ndim != 4 or tuple(calibration.shape[1:]) != tuple(sample.shape[1:]):
            got = None if calibration is None else tuple(calibration.shape)
            raise BadInput(
                f"int8 needs calibration patches of shape (N, {', '.join(map(str, sample.shape[1:]))}), got {got}"
            )
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    exported = torch.export.export(wrapped, (sample,)).module()
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    # Per-channel weight observers need one pass even for dynamic quantization (else scalar scales).
    prepared(sample)
    if not dynamic:
        for patch in calibration:
            prepared(torch.from_numpy(np.ascontiguousarray(patch[None], dtype=np.float32)))
    quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    return litert_torch.convert(quantized, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))


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
