"""A reference executor for Core ML ML Programs: run a saved .mlpackage with numpy, on any OS.

Device side (numpy and coremltools' program loader only, never torch): convert verifies its Core ML files with
it, and the bench runner, which is copied to a device with this file next to it, runs Core ML jobs with it where
Core ML itself cannot run (Linux): the "coreml-reference" runtime, whose timings mean nothing.

Core ML's own `predict` needs macOS. This module reads the program of a saved .mlpackage back with coremltools'
milproto loader (`load_program`), decodes every compressed weight itself from the stored parts (bit masks,
non-zero values, LUT indices, int8 data and scales: `materialize`) and then runs the ops SR networks produce
with numpy (`run_program`). It never calls coremltools' own decompression, so a test that compares this
executor with torch checks the file, not coremltools against itself.

Numerics: every op computes in float64 and rounds its result to the dtype the program declares for that value
(fp32 or fp16), so an fp16 program's activations are rounded to fp16 after every op as on a device, while
accumulation is exact. Convolutions are a sum of one matrix product per kernel tap.

An op this executor does not implement raises `UnsupportedOp` naming the op type and its output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # within edgesr a program it cannot run is the user's bad input (exit 2); next to the runner on a device,
    from edgesr.errors import BadInput  # where edgesr is not installed, a plain error of its own
except ImportError:  # pragma: no cover - exercised by the runner on a device without edgesr

    class BadInput(ValueError):  # type: ignore[no-redef]
        """A program this executor cannot read or run."""


log = logging.getLogger(__name__)

RUNTIME = "edgesr mil_exec (numpy)"


class UnsupportedOp(BadInput):
    """The program uses an op the reference executor does not implement (exit 2: the model cannot be verified)."""


# ---------------------------------------------------------------------------------------------- loading


def load_program(path: str | os.PathLike) -> Any:
    """Read a saved .mlpackage's ML Program as a PyMIL Program (works on Linux; nothing is executed)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise BadInput(f"{path}: not a .mlpackage (no Manifest.json)")
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise BadInput(f"{path}: not an ML Program (model type {spec.WhichOneof('Type')})")
    return load(spec, spec.specificationVersion, mlmodel.weights_dir)


def operations(block: Any) -> list[Any]:
    """The ops of a block in program order, nested blocks included."""
    ops = []
    for op in block.operations:
        ops.append(op)
        for inner in getattr(op, "blocks", []) or []:
            ops += operations(inner)
    return ops


def _np_dtype(builtin: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(builtin)


def dtype_name(var: Any) -> str:
    """The MIL dtype of a value as a string: 'fp32', 'fp16', 'int8', 'uint1', ..."""
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def dtype_bits(var: Any) -> int:
    """Bits per element of a value's MIL dtype (uint1 masks: 1, uint4 indices: 4, fp16: 16, ...)."""
    bits = var.dtype.get_bitwidth() if hasattr(var.dtype, "get_bitwidth") else None
    if not bits:
        raise ValueError(f"value '{var.name}' has no fixed bit width ({dtype_name(var)})")
    return int(bits)


# ------------------------------------------------------------------------------ compressed weights

# Each decoder takes the op and a getter for its inputs' values and returns the op's outputs (one or two).


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """iOS16 packing: `count` nbits-wide fields packed LSB first, one byte after the other."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: nbits * count]
    fields = bits.reshape(count, nbits).astype(np.int64)
    return (fields << np.arange(nbits)).sum(axis=1)


def _broadcast_blocks(params: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat blockwise parameters (same rank as the data, each dim dividing it) up to the data's shape."""
    params = np.asarray(params)
    if params.ndim != len(shape) or any(s % p for s, p in zip(shape, params.shape, strict=True)):
        raise ValueError(f"block parameters of shape {params.shape} do not tile a tensor of shape {shape}")
    for axis, (s, p) in enumerate(zip(shape, params.shape, strict=True)):
        if s != p:
            params = np.repeat(params, s // p, axis=axis)
    return params


def _lut_lookup(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """iOS18 scalar palettization: lut has shape (*blocks, 2**nbits, 1); each block of indices has its own table."""
    lut = np.asarray(lut)
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"LUT of shape {lut.shape} does not fit indices of rank {rank}")
    if lut.shape[-1] != 1:
        raise ValueError(f"vector palettization (vector size {lut.shape[-1]}) is not supported")
    tables = lut[..., 0]  # (*blocks, entries)
    blocks = tables.shape[:rank]
    block_size = [s // b for s, b in zip(indices.shape, blocks, strict=True)]
    block_index = np.meshgrid(
        *[np.arange(s) // bs for s, bs in zip(indices.shape, block_size, strict=True)], indexing="ij"
    )
    return tables[(*block_index, indices.astype(np.int64))]


def _sparse_to_dense_ios16(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    shape = tuple(int(s) for s in get("shape"))
    mask = np.unpackbits(np.asarray(get("mask"), dtype=np.uint8), bitorder="little")[: int(np.prod(shape))]
    return _scatter(get("nonzero_data"), mask.reshape(shape))


def _scatter(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense tensor of mask's shape with `nonzero` placed at the set bits, in row-major order."""
    nonzero = np.asarray(nonzero)
    flat_mask = np.asarray(mask).reshape(-1) != 0
    if int(flat_mask.sum()) != nonzero.size:
        raise ValueError(f"mask has {int(flat_mask.sum())} set bits but there are {nonzero.size} non-zero values")
    out = np.zeros(flat_mask.size, dtype=nonzero.dtype)
    out[flat_mask] = nonzero.reshape(-1)
    return out.reshape(np.shape(mask))


def _sparse_to_dense(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    if "shape" in op.inputs:  # iOS16 form: packed mask + explicit shape
        return _sparse_to_dense_ios16(op, get)
    return _scatter(get("nonzero_data"), get("mask"))


def _affine_dequantize(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    data = np.asarray(get("quantized_data"))
    zero_point, scale, axis = np.asarray(get("zero_point")), np.asarray(get("scale")), int(get("axis"))
    shape = [1] * data.ndim
    if scale.ndim == 1:
        shape[axis] = scale.size
    if zero_point.ndim == 1 and zero_point.size > 1:
        zero_point = zero_point.reshape([zero_point.size if i == axis % data.ndim else 1 for i in range(data.ndim)])
    deq = (data.astype(np.float64) - zero_point.astype(np.float64)) * scale.astype(np.float64).reshape(shape)
    return deq.astype(scale.dtype)


def _lut_to_dense(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    lut = np.asarray(get("lut"))
    if "shape" in op.inputs:  # iOS16 form: packed indices, one 1-D table
        shape = tuple(int(s) for s in get("shape"))
        nbits = int(np.log2(lut.size))
        return lut[_unpack_bits(get("indices"), nbits, int(np.prod(shape)))].reshape(shape)
    if "vector_axis" in op.inputs and op.inputs["vector_axis"] is not None:
        raise ValueError("vector palettization is not supported")
    return _lut_lookup(np.asarray(get("indices")), lut)


def _shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    scale = np.asarray(scale)
    full = data.astype(np.float64)
    if offset is not None:
        full = full - _broadcast_blocks(np.asarray(offset), data.shape).astype(np.float64)
    return (full * _broadcast_blocks(scale, data.shape).astype(np.float64)).astype(scale.dtype)


def _blockwise_shift_scale(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    offset = get("offset") if op.inputs.get("offset") is not None else None
    return _shift_scale(np.asarray(get("data")), get("scale"), offset)


def _sparse_blockwise_shift_scale(op: Any, get: Callable[[str], Any]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(get("data_mask"))
    offset = get("offset") if op.inputs.get("offset") is not None else None
    dense = _shift_scale(_scatter(get("nonzero_data"), mask), get("scale"), offset)
    return mask, dense[mask != 0].reshape(-1)


def _lut_to_sparse(op: Any, get: Callable[[str], Any]) -> tuple[np.ndarray, np.ndarray]:
    if op.inputs.get("vector_axis") is not None:
        raise ValueError("vector palettization is not supported")
    mask = np.asarray(get("indices_mask"))
    dense = _lut_lookup(_scatter(get("indices_nonzero_data"), mask), get("lut"))
    return mask, dense[mask != 0].reshape(-1)


def _constexpr_cast(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    return np.asarray(get("source"))  # the output dtype is applied by the caller


CONSTEXPR_OPS: dict[str, Callable[[Any, Callable[[str], Any]], Any]] = {
    "constexpr_sparse_to_dense": _sparse_to_dense,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_sparse_blockwise_shift_scale": _sparse_blockwise_shift_scale,
    "constexpr_lut_to_sparse": _lut_to_sparse,
    "constexpr_cast": _constexpr_cast,
}


# -------------------------------------------------------------------------------------------- ops


def _f64(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _conv(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x, w = _f64(get("x")), _f64(get("weight"))
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"only 2-D convolution is supported (input rank {x.ndim}, weight rank {w.ndim})")
    strides = [int(s) for s in _opt(op, get, "strides", (1, 1))]
    dilations = [int(d) for d in _opt(op, get, "dilations", (1, 1))]
    groups = int(_opt(op, get, "groups", 1))
    pad_type = str(_opt(op, get, "pad_type", "valid"))
    n, c, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    if c != c_in_g * groups or c_out % groups:
        raise ValueError(f"conv: input has {c} channels, weight {w.shape} with {groups} groups")
    eff = [dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1]
    pads = _conv_pads(pad_type, _opt(op, get, "pad", (0, 0, 0, 0)), (h, wd), eff, strides)
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    ho = (x.shape[2] - eff[0]) // strides[0] + 1
    wo = (x.shape[3] - eff[1]) // strides[1] + 1
    out = np.zeros((n, c_out, ho, wo))
    go = c_out // groups
    for g in range(groups):
        xg, wg = x[:, g * c_in_g : (g + 1) * c_in_g], w[g * go : (g + 1) * go]
        for i in range(kh):
            for j in range(kw):
                top, left = i * dilations[0], j * dilations[1]
                tap = xg[
                    :,
                    :,
                    top : top + strides[0] * (ho - 1) + 1 : strides[0],
                    left : left + strides[1] * (wo - 1) + 1 : strides[1],
                ]
                out[:, g * go : (g + 1) * go] += np.einsum("oc,nchw->nohw", wg[:, :, i, j], tap, optimize=True)
    if op.inputs.get("bias") is not None:
        out += _f64(get("bias")).reshape(1, -1, 1, 1)
    return out


def _conv_pads(pad_type: str, pad: Any, size: tuple[int, int], eff: list[int], strides: list[int]) -> list[int]:
    """(top, bottom, left, right) padding for MIL's pad_type."""
    if pad_type == "custom":
        return [int(p) for p in pad]
    if pad_type == "valid":
        return [0, 0, 0, 0]
    if pad_type in ("same", "same_lower"):
        out = []
        for dim in range(2):
            total = max((-(-size[dim] // strides[dim]) - 1) * strides[dim] + eff[dim] - size[dim], 0)
            small, big = total // 2, total - total // 2
            out += [big, small] if pad_type == "same_lower" else [small, big]
        return out
    raise ValueError(f"unknown pad_type '{pad_type}'")


def _opt(op: Any, get: Callable[[str], Any], name: str, default: Any) -> Any:
    return get(name) if op.inputs.get(name) is not None else default


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Any, Callable[[str], Any]], np.ndarray]:
    return lambda op, get: fn(_f64(get("x")), _f64(get("y")))


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any, Callable[[str], Any]], np.ndarray]:
    return lambda op, get: fn(_f64(get("x")))


def _prelu(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x, alpha = _f64(get("x")), _f64(get("alpha"))
    alpha = alpha.reshape([1, -1] + [1] * (x.ndim - 2))
    return np.where(x > 0, x, x * alpha)


def _concat(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    values = [np.asarray(v) for v in get("values")]
    axis = int(get("axis"))
    if bool(_opt(op, get, "interleave", False)):
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] = sum(v.shape[axis] for v in values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _pixel_shuffle(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x, r = np.asarray(get("x")), int(get("upscale_factor"))
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def _pixel_unshuffle(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x, r = np.asarray(get("x")), int(get("downscale_factor"))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


def _depth_to_space(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    """DCR order, as TensorFlow's depth_to_space: output[c, h*b+i, w*b+j] = input[(i*b+j)*C' + c, h, w]."""
    x, b = np.asarray(get("x")), int(get("block_size"))
    n, c, h, w = x.shape
    return x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x, b = np.asarray(get("x")), int(get("block_size"))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def _out_size(size: int, factor: Any) -> int:
    return int(np.floor(size * float(factor)))


def _nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = x.shape[-2:]
    rows = np.minimum((np.arange(out_h) * h) // out_h, h - 1)
    cols = np.minimum((np.arange(out_w) * w) // out_w, w - 1)
    return x[..., rows, :][..., cols]


def _upsample_nearest(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = np.asarray(get("x"))
    h, w = x.shape[-2:]
    sh, sw = _opt(op, get, "scale_factor_height", 1), _opt(op, get, "scale_factor_width", 1)
    return _nearest(x, _out_size(h, sh), _out_size(w, sw))


def _resize_nearest(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    return _nearest(np.asarray(get("x")), int(get("target_size_height")), int(get("target_size_width")))


def _linear_axis(x: np.ndarray, axis: int, out: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """Linear interpolation along `axis` to `out` samples with MIL's grid conventions."""
    size = x.shape[axis]
    i = np.arange(out, dtype=np.float64)
    if align_corners:
        grid = i * ((size - 1) / (out - 1)) if out > 1 else np.zeros(out)
    elif half_pixel:
        grid = (i + 0.5) * (size / out) - 0.5
    else:
        grid = i * (size / out)
    grid = np.clip(grid, 0, size - 1)
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = (grid - lo).reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def _upsample_bilinear(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = _f64(get("x"))
    h, w = x.shape[-2:]
    align = bool(_opt(op, get, "align_corners", True))
    half = bool(_opt(op, get, "half_pixel_centers", not align))
    out_h = _out_size(h, _opt(op, get, "scale_factor_height", 1))
    out_w = _out_size(w, _opt(op, get, "scale_factor_width", 1))
    return _linear_axis(_linear_axis(x, -2, out_h, align, half), -1, out_w, align, half)


def _resize_bilinear(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = _f64(get("x"))
    mode = str(_opt(op, get, "sampling_mode", "DEFAULT"))
    modes = {"ALIGN_CORNERS": (True, False), "STRICT_ALIGN_CORNERS": (True, False), "DEFAULT": (False, False)}
    modes["UNALIGN_CORNERS"] = (False, True)
    if mode not in modes:
        raise ValueError(f"resize_bilinear sampling_mode {mode} is not supported")
    align, half = modes[mode]
    out_h, out_w = int(get("target_size_height")), int(get("target_size_width"))
    return _linear_axis(_linear_axis(x, -2, out_h, align, half), -1, out_w, align, half)


def _slice_by_index(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = np.asarray(get("x"))
    rank = x.ndim
    begin = list(_opt(op, get, "begin", [0] * rank))
    end = list(_opt(op, get, "end", list(x.shape)))
    stride = list(_opt(op, get, "stride", [1] * rank))
    begin_mask = list(_opt(op, get, "begin_mask", [False] * rank))
    end_mask = list(_opt(op, get, "end_mask", [False] * rank))
    squeeze = list(_opt(op, get, "squeeze_mask", [False] * rank))
    index = []
    for d in range(rank):
        b = None if begin_mask[d] else int(begin[d])
        e = None if end_mask[d] else int(end[d])
        index.append(b if squeeze[d] else slice(b, e, int(stride[d])))
    return x[tuple(index)]


def _batch_norm(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = _f64(get("x"))
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean, var = _f64(get("mean")).reshape(shape), _f64(get("variance")).reshape(shape)
    gamma = _f64(_opt(op, get, "gamma", np.ones(1))).reshape(shape if op.inputs.get("gamma") is not None else [1])
    beta = _f64(_opt(op, get, "beta", np.zeros(1))).reshape(shape if op.inputs.get("beta") is not None else [1])
    return (x - mean) / np.sqrt(var + float(_opt(op, get, "epsilon", 1e-5))) * gamma + beta


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def _pad(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    """MIL pad: `pad` holds (before, after) for each of the last len(pad) / 2 dims; numpy's reflect / edge are
    MIL's reflect (edge not repeated) / replicate."""
    x = np.asarray(get("x"))
    pad = [int(p) for p in get("pad")]
    mode = str(_opt(op, get, "mode", "constant"))
    if mode not in _PAD_MODES or len(pad) % 2 or len(pad) // 2 > x.ndim or any(p < 0 for p in pad):
        raise ValueError(f"pad mode '{mode}' with pad {pad} on a rank-{x.ndim} tensor is not supported")
    widths = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=float(_opt(op, get, "constant_val", 0.0)))
    return np.pad(x, widths, mode=_PAD_MODES[mode])


def _split(op: Any, get: Callable[[str], Any]) -> tuple[np.ndarray, ...]:
    x, axis = np.asarray(get("x")), int(get("axis"))
    if op.inputs.get("split_sizes") is not None:
        sizes = [int(s) for s in get("split_sizes")]
    else:
        parts = int(get("num_splits"))
        if x.shape[axis] % parts:
            raise ValueError(f"cannot split size {x.shape[axis]} into {parts} equal parts")
        sizes = [x.shape[axis] // parts] * parts
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to size {x.shape[axis]} of axis {axis}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _reduce_mean(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = _f64(get("x"))
    axes = _opt(op, get, "axes", None)
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
    return np.mean(x, axis=axes, keepdims=bool(_opt(op, get, "keep_dims", False)))


def _rsqrt(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    """MIL rsqrt adds `epsilon` (default 1e-12) before the root: 1 / sqrt(x + epsilon)."""
    return 1 / np.sqrt(_f64(get("x")) + float(_opt(op, get, "epsilon", 1e-12)))


def _squeeze(op: Any, get: Callable[[str], Any]) -> np.ndarray:
    x = np.asarray(get("x"))
    axes = _opt(op, get, "axes", None)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(int(a) for a in axes))


OPS: dict[str, Callable[[Any, Callable[[str], Any]], Any]] = {
    "conv": _conv,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "pow": _binary(np.power),
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "relu6": _unary(lambda x: np.clip(x, 0, 6)),
    "sigmoid": _unary(lambda x: 1 / (1 + np.exp(-x))),
    "tanh": _unary(np.tanh),
    "silu": _unary(lambda x: x / (1 + np.exp(-x))),
    "sqrt": _unary(np.sqrt),
    "rsqrt": _rsqrt,
    "square": _unary(np.square),
    "exp": _unary(np.exp),
    "leaky_relu": lambda op, get: (lambda x, a: np.where(x > 0, x, a * x))(
        _f64(get("x")), float(_opt(op, get, "alpha", 0.01))
    ),
    "elu": lambda op, get: (lambda x, a: np.where(x > 0, x, a * np.expm1(x)))(
        _f64(get("x")), float(_opt(op, get, "alpha", 1.0))
    ),
    "clip": lambda op, get: np.clip(_f64(get("x")), float(get("alpha")), float(get("beta"))),
    "prelu": _prelu,
    "concat": _concat,
    "stack": lambda op, get: np.stack([np.asarray(v) for v in get("values")], axis=int(get("axis"))),
    "split": _split,
    "pad": _pad,
    "reduce_mean": _reduce_mean,
    "reshape": lambda op, get: np.reshape(get("x"), [int(s) for s in get("shape")]),
    "transpose": lambda op, get: np.transpose(get("x"), [int(p) for p in get("perm")]),
    "expand_dims": lambda op, get: np.expand_dims(get("x"), tuple(int(a) for a in get("axes"))),
    "squeeze": _squeeze,
    "slice_by_index": _slice_by_index,
    "pixel_shuffle": _pixel_shuffle,
    "pixel_unshuffle": _pixel_unshuffle,
    "depth_to_space": _depth_to_space,
    "space_to_depth": _space_to_depth,
    "upsample_nearest_neighbor": _upsample_nearest,
    "resize_nearest_neighbor": _resize_nearest,
    "upsample_bilinear": _upsample_bilinear,
    "resize_bilinear": _resize_bilinear,
    "batch_norm": _batch_norm,
    "cast": lambda op, get: np.asarray(get("x")),  # the output dtype is applied by the caller
    "identity": lambda op, get: np.asarray(get("x")),
}
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted({"const", *OPS, *CONSTEXPR_OPS}))


# ---------------------------------------------------------------------------------------- running


def _getter(op: Any, env: dict[str, Any]) -> Callable[[str], Any]:
    def value(var: Any) -> Any:
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise KeyError(f"value '{var.name}' used by '{op.name}' ({op.op_type}) was never computed")

    def get(name: str) -> Any:
        var = op.inputs[name]
        if isinstance(var, (list, tuple)):
            return [value(v) for v in var]
        return value(var)

    return get


def _store(op: Any, result: Any, env: dict[str, Any]) -> None:
    """Record an op's outputs, each rounded to the dtype the program declares for it."""
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(op.outputs):
        raise ValueError(f"'{op.op_type}' gave {len(results)} outputs, the program declares {len(op.outputs)}")
    for var, value in zip(op.outputs, results, strict=True):
        dtype = _np_dtype(var.dtype)
        arr = np.asarray(value)
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        if var.shape is not None and all(isinstance(s, int) for s in var.shape) and tuple(var.shape) != arr.shape:
            raise ValueError(f"'{op.op_type}' computed shape {arr.shape} for '{var.name}', program says {var.shape}")
        env[var.name] = arr


def _evaluate(op: Any, env: dict[str, Any], where: str) -> None:
    if op.op_type == "const":
        for var in op.outputs:
            env[var.name] = var.val
        return
    fn = CONSTEXPR_OPS.get(op.op_type) or OPS.get(op.op_type)
    if fn is None:
        raise UnsupportedOp(
            f"{where}: Core ML op '{op.op_type}' (output '{op.outputs[0].name}') is not supported by the "
            f"reference executor; supported: {', '.join(s for s in SUPPORTED_OPS if not s.startswith('constexpr'))}"
        )
    try:
        _store(op, fn(op, _getter(op, env)), env)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadInput(f"{where}: cannot run '{op.op_type}' (output '{op.outputs[0].name}'): {exc}") from None


def run_program(
    program: Any, inputs: dict[str, np.ndarray], where: str = "program", function: str = "main"
) -> dict[str, np.ndarray]:
    """Run a PyMIL program's function on named numpy inputs; returns its outputs by name."""
    fn = program.functions[function]
    env: dict[str, Any] = {}
    missing = sorted(set(fn.inputs) - set(inputs))
    if missing:
        raise BadInput(f"{where}: missing inputs {', '.join(missing)} (the program takes {', '.join(fn.inputs)})")
    for name, var in fn.inputs.items():
        value = np.asarray(inputs[name])
        if tuple(var.shape) != value.shape:
            raise BadInput(f"{where}: input '{name}' has shape {value.shape}, the program takes {tuple(var.shape)}")
        env[name] = value.astype(_np_dtype(var.dtype))
    for op in operations(fn):
        _evaluate(op, env, where)
    return {var.name: np.asarray(env[var.name]) for var in fn.outputs}


def run_mlpackage(path: str | os.PathLike, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a saved .mlpackage on named inputs (e.g. {"lr": NCHW float32}) with the numpy executor."""
    return run_program(load_program(path), inputs, where=str(path))


# -------------------------------------------------------------------------------- weights & storage


@dataclass(frozen=True)
class ConvWeight:
    """One conv's weight as stored in the program: its dense value and what the file spends on it."""

    conv: str  # name of the conv op
    value: np.ndarray  # materialised (decoded, dequantized) weight
    storage: tuple[str, ...]  # op types that produce it, e.g. ("const",) or ("constexpr_sparse_to_dense", ...)
    stored_bytes: int  # bytes of every stored part (values, masks, indices, LUTs, scales, shapes)
    inline: bool  # kept inside the program text (tensors under 10 elements), not in weight.bin

    @property
    def sparse(self) -> bool:
        return "constexpr_sparse_to_dense" in self.storage


def _stored_parts(var: Any) -> tuple[list[Any], list[str]]:
    """Const leaves and producing op types of the constexpr chain that yields `var`.

    The serializer writes identical data once (iOS18 joint compression refers to one mask from two ops), so
    leaves with the same dtype, shape and bytes count once.
    """
    op = var.op
    if op is None:
        return [], []
    if op.op_type == "const":
        return [var], ["const"]
    leaves, kinds, seen = [], [op.op_type], set()
    for inp in op.inputs.values():
        for v in inp if isinstance(inp, (list, tuple)) else (inp,):
            sub_leaves, sub_kinds = _stored_parts(v)
            for leaf in sub_leaves:
                key = _leaf_key(leaf)
                if key not in seen:
                    seen.add(key)
                    leaves.append(leaf)
            kinds += [k for k in sub_kinds if k != "const"]
    return leaves, kinds


def _leaf_key(var: Any) -> tuple[str, tuple[int, ...], bytes]:
    value = np.asarray(var.val)
    return dtype_name(var), value.shape, value.tobytes()


def _leaf_bytes(var: Any) -> int:
    if isinstance(var.val, str) or var.val is None:
        return 0
    return -(-int(np.asarray(var.val).size) * dtype_bits(var) // 8)


def conv_weights(program: Any, where: str = "program", function: str = "main") -> list[ConvWeight]:
    """Every distinct conv weight of the program, materialised by this module's decoders, in program order."""
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file

    fn = program.functions[function]
    env: dict[str, Any] = {}
    out, seen = [], set()
    for op in operations(fn):
        if op.op_type == "const" or op.op_type in CONSTEXPR_OPS:
            _evaluate(op, env, where)
        if op.op_type != "conv" or id(op.weight) in seen or op.weight.op is None:
            continue
        seen.add(id(op.weight))
        leaves, kinds = _stored_parts(op.weight)
        if not kinds:
            continue  # a weight computed at run time: not a stored weight
        value = env[op.weight.name] if op.weight.name in env else np.asarray(op.weight.val)
        inline = all(not should_use_weight_file(np.asarray(leaf.val)) for leaf in leaves if leaf.val is not None)
        out.append(
            ConvWeight(
                conv=op.name,
                value=np.asarray(value),
                storage=tuple(dict.fromkeys(kinds)),
                stored_bytes=sum(_leaf_bytes(leaf) for leaf in leaves),
                inline=inline,
            )
        )
    return out


def materialized_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Conv op name -> its weight as the program defines it (sparse, LUT and quantized forms decoded here)."""
    return {w.conv: w.value for w in conv_weights(load_program(path), where=str(path))}
