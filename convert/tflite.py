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

The LiteRT converter folds a quantize that directly follows the graph input (a model whose first op is a conv)
and a dequantize right before the output into int8 I/O tensors; it has no option to keep float edges.
`float_io` rewrites such a file: a QUANTIZE op from a new float32 input to the int8 tensor (which keeps its scale
and zero point) first, a DEQUANTIZE op to a new float32 output last. The float32 tensors take the original
names and become the subgraph's and signature's inputs/outputs; the int8 ones are renamed `<name>_int8`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import flatbuffers
import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from convert.sparse_tflite import FILE_IDENTIFIER
from edgesr.errors import BadInput, CheckFailed
from edgesr.manifest import atomic_output
from edgesr.workload import Size, as_size

log = logging.getLogger(__name__)

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")

# Graph edge types `float_io` converts to float32 with QUANTIZE / DEQUANTIZE (what those kernels take).
_QUANTIZED_IO = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def convert_tflite(
    model: nn.Module,
    path: str | os.PathLike,
    tile: int | Size,
    precision: str = "fp32",
    calibration: np.ndarray | None = None,
) -> Path:
    """Convert `model` (NCHW float in [0, 1] -> NCHW) to a .tflite taking (1, H, W, 3) NHWC float32, where the
    tile is a side (square) or (H, W).

    `calibration` (N, H, W, 3) float32 NHWC patches are required for `int8` and ignored otherwise.
    """
    path = Path(path)
    data = tflite_bytes(model, tile, precision, calibration)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    log.info("converted %s (%s, %d bytes): %s", path.name, precision, len(data), dict(tflite_op_counts(data)))
    return path


def tflite_bytes(
    model: nn.Module, tile: int | Size, precision: str = "fp32", calibration: np.ndarray | None = None
) -> bytes:
    """The .tflite file `convert_tflite` writes, as bytes."""
    import litert_torch  # slow import (jax, transformers); only conversion needs it

    if precision not in PRECISIONS:
        raise BadInput(f"unknown TFLite precision '{precision}'; known: {', '.join(PRECISIONS)}")
    wrapped = litert_torch.to_channel_last_io(model.eval(), args=[0], outputs=[0]).eval()
    sample = torch.rand(1, *as_size(tile), 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if precision == "fp32":
            edge_model = litert_torch.convert(wrapped, (sample,))
        elif precision == "fp16":
            from litert_torch.generative.quantize import quant_recipes

            edge_model = litert_torch.convert(wrapped, (sample,), quant_config=quant_recipes.full_fp16_recipe())
        else:
            edge_model = _convert_pt2e(wrapped, sample, precision == "int8-dynamic", calibration)
    data = float_io(bytes(edge_model.model_content()))
    _check_float_io(data, precision)
    return data


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


def float_io(data: bytes) -> bytes:
    """`data` with float32 graph inputs and outputs: QUANTIZE in front of each quantized input, DEQUANTIZE after
    each quantized output (same scale and zero point). Returns `data` unchanged when every edge is already float."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    if any(b.offset and b.offset > 1 for b in model.buffers or []):
        raise ValueError("buffers stored outside the flatbuffer (models over 2 GB) are not supported")
    changed = False
    # Only entry subgraphs: the inputs of a control-flow body are fed by its caller's tensors, not by the user.
    entries = {int(sig.subgraphIndex) for sig in model.signatureDefs or []} or {0}
    for sg_index, sg in enumerate(model.subgraphs):
        if sg_index not in entries:
            continue
        old_inputs = [int(i) for i in sg.inputs if _quantized_edge(sg.tensors[int(i)])]
        old_outputs = [int(i) for i in sg.outputs if _quantized_edge(sg.tensors[int(i)])]
        if not old_inputs and not old_outputs:
            continue
        changed = True
        new_in = {i: _float_twin(model, sg, i) for i in old_inputs}
        new_out = {i: _float_twin(model, sg, i) for i in old_outputs}
        quantize = [_edge_op(model, schema.BuiltinOperator.QUANTIZE, new_in[i], i) for i in old_inputs]
        dequantize = [_edge_op(model, schema.BuiltinOperator.DEQUANTIZE, i, new_out[i]) for i in old_outputs]
        sg.operators = quantize + list(sg.operators or []) + dequantize
        sg.inputs = [new_in.get(int(i), int(i)) for i in sg.inputs]
        sg.outputs = [new_out.get(int(i), int(i)) for i in sg.outputs]
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == sg_index:
                for tm in sig.inputs or []:
                    tm.tensorIndex = new_in.get(tm.tensorIndex, tm.tensorIndex)
                for tm in sig.outputs or []:
                    tm.tensorIndex = new_out.get(tm.tensorIndex, tm.tensorIndex)
        log.debug("float I/O: QUANTIZE on inputs %s, DEQUANTIZE on outputs %s", old_inputs, old_outputs)
    if not changed:
        return data
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _quantized_edge(t: schema.TensorT) -> bool:
    q = t.quantization
    return t.type in _QUANTIZED_IO and q is not None and q.scale is not None and len(q.scale) > 0


def _float_twin(model: schema.ModelT, sg: schema.SubGraphT, idx: int) -> int:
    """Append a float32 tensor shaped like tensor `idx` that takes its name (`idx` becomes `<name>_int8`)."""
    old = sg.tensors[idx]
    t = schema.TensorT()
    t.name = old.name
    t.type = schema.TensorType.FLOAT32
    t.shape = list(old.shape)
    t.shapeSignature = None if old.shapeSignature is None else list(old.shapeSignature)
    t.hasRank = old.hasRank
    model.buffers.append(schema.BufferT())  # a run-time tensor: empty buffer
    t.buffer = len(model.buffers) - 1
    name = old.name.encode() if isinstance(old.name, str) else (old.name or b"")
    old.name = name + b"_" + _TYPE_NAMES[old.type].lower().encode()
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _edge_op(model: schema.ModelT, code: int, src: int, dst: int) -> schema.OperatorT:
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, code)
    op.inputs, op.outputs = [src], [dst]
    if code == schema.BuiltinOperator.QUANTIZE:
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.QuantizeOptions, schema.QuantizeOptionsT()
    else:
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.DequantizeOptions, schema.DequantizeOptionsT()
    return op


def _opcode(model: schema.ModelT, code: int) -> int:
    """Index of `code`'s operator code, appended (version 2: the int8 kernels) if the file has none."""
    for i, oc in enumerate(model.operatorCodes):
        if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == code:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode = oc.deprecatedBuiltinCode = code
    oc.version = 2
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _check_float_io(data: bytes, precision: str) -> None:
    """CheckFailed unless every graph input and output is float32 (what device_bench's runner feeds and reads)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    entries = {int(sig.subgraphIndex) for sig in model.signatureDefs or []} or {0}
    for sg in (model.subgraphs[i] for i in sorted(entries)):
        for kind, indices in (("input", sg.inputs), ("output", sg.outputs)):
            for i in indices:
                t = sg.tensors[int(i)]
                if t.type != schema.TensorType.FLOAT32:
                    name = t.name.decode() if isinstance(t.name, bytes) else t.name
                    raise CheckFailed(
                        f"{precision} conversion: {kind} '{name}' is {_TYPE_NAMES.get(t.type, t.type)}, not FLOAT32"
                    )


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
