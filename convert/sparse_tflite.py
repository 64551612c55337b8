"""Sparse weight encoding for .tflite files: a rewrite of the flatbuffer, no TensorFlow needed.

litert-torch has no sparsity option, so the converted file is rewritten after the fact. Every conv filter (the
filter input of CONV_2D, grouped convs included, and of DEPTHWISE_CONV_2D) that is stored as a constant - float32,
float16 (read through a DEQUANTIZE, as fp16-weight files hold them) or int8 (per-channel quantized, zero points 0)
- gets the smallest encoding TFLite's `SparsityParameters` can express:

- TFLite stores a sparse tensor as a tree (compressed sparse fibre): the dims in a `traversal_order`, each level
  DENSE (all children kept) or SPARSE_CSR (only children with a non-zero below them, through a segment vector per
  parent and an index vector per child). Every traversal order and DENSE/SPARSE_CSR pattern (24 x 16 for a 4-D
  filter) is sized exactly, with each index vector the smallest of uint8/uint16/int32 that holds its largest value;
  the cheapest wins. Random (unstructured) zeros favour one CSR level on the longest dim; channel-structured zeros
  favour a sparse outer level.
- A filter stays dense when no encoding is smaller than its dense bytes plus the flatbuffer tables a sparse
  tensor adds (`SPARSE_TENSOR_OVERHEAD_BYTES`), or when it has fewer than `min_sparsity` zeros (a user floor).
- The encoded filter feeds a new DENSIFY op whose output is the original tensor (name, shape, type and
  quantization kept; it gets an empty buffer: leaving the old data in place would make the file larger). DENSIFY
  ops go first in the operator list; a DENSIFY operator code is added if missing.
- If the rewritten file is not smaller than the input, the input is returned unchanged: never larger than dense.

DENSIFY restores the dense filter at load time, so this saves file and download size, not run-time memory or
time (docs/research: stack.md section 6). DENSIFY feeding DEPTHWISE_CONV_2D and grouped CONV_2D was run in both
runtimes at fp32, fp16 and int8, and int8-dynamic with the builtin kernels (XNNPACK rejects sparse weights feeding
its dynamic-range convs, see convert.tflite_artifacts). Filters whose buffer is shared by several tensors are left
dense.
The layouts this module writes were run in ai_edge_litert (XNNPACK and the builtin kernels) by
tests/test_sparse_tflite.py; the pipeline runs every file it ships.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from convert.weight_bound import bound_bytes

log = logging.getLogger(__name__)

# Default user floor: none. A filter is encoded whenever that saves bytes (`choose_layout` decides); a higher
# --sparse-min only skips filters with fewer zeros.
MIN_SPARSITY = 0.0
FILE_IDENTIFIER = b"TFL3"

# Flatbuffer tables a sparse tensor adds besides its data: the tensor, its sparsity parameters and dimension
# metadata, a DENSIFY operator, an empty buffer and alignment. Measured on filters of 9 to 9216 weights:
# 246-269 B per tensor, plus ~80 B once for the DENSIFY operator code.
SPARSE_TENSOR_OVERHEAD_BYTES = 272

_IDX = schema.SparseIndexVector
# (numpy dtype, SparseIndexVector type, vector class), smallest first.
_INDEX_TYPES = (
    (np.uint8, _IDX.Uint8Vector, schema.Uint8VectorT),
    (np.uint16, _IDX.Uint16Vector, schema.Uint16VectorT),
    (np.int32, _IDX.Int32Vector, schema.Int32VectorT),
)
# Bytes per stored value of the filter types this module encodes.
VALUE_BYTES = {schema.TensorType.FLOAT32: 4, schema.TensorType.FLOAT16: 2, schema.TensorType.INT8: 1}
_NUMPY_TYPES = {schema.TensorType.FLOAT32: "<f4", schema.TensorType.FLOAT16: "<f2", schema.TensorType.INT8: "i1"}
# The ops whose filter (input 1) is a conv weight: litert-torch writes a groups == channels conv as
# DEPTHWISE_CONV_2D (filter 1 x kh x kw x C) and every other conv, grouped ones included, as CONV_2D (OHWI).
CONV_OPS = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D)


@dataclass(frozen=True)
class SparseStats:
    """Conv filter figures of a .tflite file, over distinct constant CONV_2D / DEPTHWISE_CONV_2D filter tensors."""

    sparse_tensors: int  # filters stored as sparse tensors (each feeds a DENSIFY op)
    conv_weights: int  # elements of all conv filters, dense count
    nonzeros: int  # non-zero elements among them, at the precision the file stores them
    weight_bytes: int = 0  # bytes the filters take in the file: values, index vectors, quantization scales/zeros
    bound_bytes: int = 0  # non-zeros at their stored width + 1 bit per weight (ceil(conv_weights / 8))


@dataclass(frozen=True)
class SparseLayout:
    """How a tensor is traversed: `order` lists its dims outermost first; `sparse[k]` says level k is SPARSE_CSR."""

    order: tuple[int, ...]
    sparse: tuple[bool, ...]

    @staticmethod
    def csr(rank: int) -> SparseLayout:
        """The layout TF's sparsifier writes: dims in order, all DENSE but the last, which is SPARSE_CSR."""
        return SparseLayout(tuple(range(rank)), (False,) * (rank - 1) + (True,))


@dataclass(frozen=True)
class SparseTensor:
    """A tensor in TFLite's sparse format (no blocks): per traversal level, segments and indices (None if DENSE)."""

    shape: tuple[int, ...]
    layout: SparseLayout
    segments: tuple[np.ndarray | None, ...]
    indices: tuple[np.ndarray | None, ...]
    values: np.ndarray  # the stored values in traversal order (zeros inside DENSE levels included)

    def index_bytes(self) -> int:
        """Bytes of all index vectors, each at the width `index_dtype` picks."""
        return sum(v.size * np.dtype(index_dtype(v)).itemsize for v in (*self.segments, *self.indices) if v is not None)


def index_dtype(values: np.ndarray) -> type:
    """The smallest of TFLite's index vector types (uint8, uint16, int32) that holds every value."""
    top = int(values.max()) if values.size else 0
    return _INDEX_TYPES[_width_class(top)][0]


def _width_class(top: int) -> int:
    return 0 if top <= 0xFF else 1 if top <= 0xFFFF else 2


_WIDTH_BYTES = (1, 2, 4)


def encode_sparse(dense: np.ndarray, layout: SparseLayout) -> SparseTensor:
    """Encode `dense` in TFLite's sparse format with the given traversal order and level formats."""
    t = dense.transpose(layout.order)
    nonzero = t != 0
    stored = np.ones((), dtype=bool)  # which prefixes of the traversal tree are kept, level by level
    segments: list[np.ndarray | None] = []
    indices: list[np.ndarray | None] = []
    for k, sparse in enumerate(layout.sparse):
        if sparse:
            below = nonzero.reshape(t.shape[: k + 1] + (-1,)).any(axis=-1)
            child = stored[..., None] & below
            per_parent = child[stored]  # (kept parents in row-major order, size of dim k)
            segments.append(np.concatenate([[0], np.cumsum(per_parent.sum(axis=1))]).astype(np.int64))
            indices.append(np.nonzero(per_parent)[1].astype(np.int64))
        else:
            child = np.broadcast_to(stored[..., None], t.shape[: k + 1])
            segments.append(None)
            indices.append(None)
        stored = child
    return SparseTensor(tuple(dense.shape), layout, tuple(segments), tuple(indices), t[stored])


def decode_sparse(sp: SparseTensor) -> np.ndarray:
    """Inverse of `encode_sparse`: the dense tensor."""
    tshape = tuple(sp.shape[d] for d in sp.layout.order)
    prefixes = np.zeros((1, 0), dtype=np.int64)
    for k, size in enumerate(tshape):
        if sp.layout.sparse[k]:
            seg, idx = sp.segments[k], sp.indices[k]
            if seg is None or idx is None or len(seg) != len(prefixes) + 1 or int(seg[-1]) != len(idx):
                raise ValueError(f"inconsistent sparse level {k} for shape {sp.shape}")
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"sparse level {k}: index out of range for size {size}")
            parents = np.repeat(prefixes, np.diff(seg), axis=0)
            prefixes = np.concatenate([parents, idx[:, None]], axis=1)
        else:
            parents = np.repeat(prefixes, size, axis=0)
            prefixes = np.concatenate([parents, np.tile(np.arange(size), len(prefixes))[:, None]], axis=1)
    if len(prefixes) != sp.values.size:
        raise ValueError(f"{sp.values.size} values for {len(prefixes)} stored positions (shape {sp.shape})")
    out = np.zeros(tshape, dtype=sp.values.dtype)
    out[tuple(prefixes.T)] = sp.values
    return out.transpose(np.argsort(sp.layout.order))


def encoded_bytes(sp: SparseTensor, value_bytes: int) -> int:
    """Bytes the sparse tensor's data take in the file (values and index vectors), tables excluded."""
    return sp.values.size * value_bytes + sp.index_bytes()


def candidate_layouts(rank: int) -> list[SparseLayout]:
    """Every traversal order with every DENSE/SPARSE_CSR pattern that has a sparse level; TF's layout first."""
    out = [SparseLayout.csr(rank)]
    for order in itertools.permutations(range(rank)):
        for sparse in itertools.product((False, True), repeat=rank):
            layout = SparseLayout(order, sparse)
            if any(sparse) and layout != out[0]:
                out.append(layout)
    return out


def layout_bytes(dense: np.ndarray, layout: SparseLayout, value_bytes: int) -> int:
    """`encoded_bytes(encode_sparse(dense, layout), value_bytes)`, computed from counts alone (no index vectors)."""
    t = dense.transpose(layout.order)
    nonzero = t != 0
    stored = np.ones((), dtype=bool)
    total = 0
    for k, sparse in enumerate(layout.sparse):
        if sparse:
            child = stored[..., None] & nonzero.reshape(t.shape[: k + 1] + (-1,)).any(axis=-1)
            parents, children = int(stored.sum()), int(child.sum())
            total += (parents + 1) * _WIDTH_BYTES[_width_class(children)]
            total += children * _WIDTH_BYTES[_width_class(t.shape[k] - 1)]
        else:
            child = np.broadcast_to(stored[..., None], t.shape[: k + 1])
        stored = child
    return total + int(stored.sum()) * value_bytes


def choose_layout(dense: np.ndarray, value_bytes: int) -> tuple[SparseLayout | None, int]:
    """The smallest encoding of `dense` and its bytes including tables; (None, dense bytes) when dense is smallest."""
    best, best_bytes = None, dense.size * value_bytes
    for layout in candidate_layouts(dense.ndim):
        size = layout_bytes(dense, layout, value_bytes) + SPARSE_TENSOR_OVERHEAD_BYTES
        if size < best_bytes:
            best, best_bytes = layout, size
    return best, best_bytes


def _index_vector(values: np.ndarray) -> tuple[int, object]:
    """`values` as the smallest TFLite index vector: (SparseIndexVector type, vector object)."""
    dtype, kind, cls = _INDEX_TYPES[_width_class(int(values.max()) if values.size else 0)]
    vec = cls()
    vec.values = values.astype(dtype)
    return kind, vec


def _sparsity_parameters(sp: SparseTensor) -> schema.SparsityParametersT:
    dims = []
    for k, d in enumerate(sp.layout.order):
        meta = schema.DimensionMetadataT()
        if sp.layout.sparse[k]:
            meta.format = schema.DimensionType.SPARSE_CSR
            meta.arraySegmentsType, meta.arraySegments = _index_vector(sp.segments[k])
            meta.arrayIndicesType, meta.arrayIndices = _index_vector(sp.indices[k])
        else:
            meta.format, meta.denseSize = schema.DimensionType.DENSE, int(sp.shape[d])
        dims.append(meta)
    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap, params.dimMetadata = list(sp.layout.order), [], dims
    return params


def _vector_values(kind: int, vec: object) -> np.ndarray:
    if kind == _IDX.NONE or vec is None:
        raise ValueError("sparse dimension without an index vector")
    return np.asarray(vec.values, dtype=np.int64)


def read_sparse_tensor(model: schema.ModelT, tensor: schema.TensorT) -> SparseTensor:
    """The content of a sparse constant tensor (any traversal order and level formats, no blocks)."""
    sp = tensor.sparsity
    rank = len(tensor.shape)
    dims = sp.dimMetadata or []
    order = tuple(int(i) for i in sp.traversalOrder)
    if sorted(order) != list(range(rank)) or len(dims) != rank or (sp.blockMap is not None and len(sp.blockMap)):
        raise ValueError(f"tensor {tensor.name!r}: block-sparse tensors are not supported")
    sparse = tuple(d.format == schema.DimensionType.SPARSE_CSR for d in dims)
    levels = list(zip(dims, sparse, strict=True))
    segments = tuple(_vector_values(d.arraySegmentsType, d.arraySegments) if s else None for d, s in levels)
    indices = tuple(_vector_values(d.arrayIndicesType, d.arrayIndices) if s else None for d, s in levels)
    if tensor.type not in _NUMPY_TYPES:
        raise ValueError(f"tensor {tensor.name!r}: unsupported sparse value type {tensor.type}")
    values = np.frombuffer(_buffer_bytes(model, tensor), dtype=_NUMPY_TYPES[tensor.type])
    shape = tuple(int(s) for s in tensor.shape)
    return SparseTensor(shape, SparseLayout(order, sparse), segments, indices, values)


def _name_bytes(name: bytes | str | None) -> bytes:
    return name.encode() if isinstance(name, str) else (name or b"")


def _buffer_bytes(model: schema.ModelT, tensor: schema.TensorT) -> bytes:
    data = model.buffers[tensor.buffer].data
    return b"" if data is None else np.asarray(data, dtype=np.uint8).tobytes()


def _opcode_is(model: schema.ModelT, op: schema.OperatorT, code: int) -> bool:
    oc = model.operatorCodes[op.opcodeIndex]
    # Codes below 127 are also stored in the deprecated field; old writers set only that one.
    return max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == code


def _buffer_users(model: schema.ModelT) -> dict[int, int]:
    users: dict[int, int] = {}
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            users[t.buffer] = users.get(t.buffer, 0) + 1
    return users


def _check_inline_buffers(model: schema.ModelT) -> None:
    # Files over 2 GB keep buffers after the flatbuffer (offset/size); repacking would break those offsets.
    if any(b.offset and b.offset > 1 for b in model.buffers or []):
        raise ValueError("buffers stored outside the flatbuffer (models over 2 GB) are not supported")


def _producers(sg: schema.SubGraphT) -> dict[int, schema.OperatorT]:
    return {int(t): op for op in sg.operators or [] for t in op.outputs}


def _consumers(sg: schema.SubGraphT) -> dict[int, int]:
    uses: dict[int, int] = {}
    for op in sg.operators or []:
        for t in op.inputs:
            if t >= 0:
                uses[int(t)] = uses.get(int(t), 0) + 1
    return uses


def _stored_filters(model: schema.ModelT, sg: schema.SubGraphT) -> list[int]:
    """Distinct tensors that hold conv filter data (`CONV_OPS`), in operator order: the filter itself, or for a
    filter made by DEQUANTIZE (fp16 weights) the DEQUANTIZE's input. Either may be a DENSIFY output after a rewrite."""
    producers = _producers(sg)
    seen: dict[int, None] = {}
    for op in sg.operators or []:
        is_conv = any(_opcode_is(model, op, code) for code in CONV_OPS)
        if not (is_conv and len(op.inputs) > 1 and op.inputs[1] >= 0):
            continue
        idx = int(op.inputs[1])
        prod = producers.get(idx)
        if prod is not None and _opcode_is(model, prod, schema.BuiltinOperator.DEQUANTIZE):
            idx = int(prod.inputs[0])
        seen.setdefault(idx, None)
    return list(seen)


def _quantization_bytes(tensor: schema.TensorT) -> int:
    """Bytes of a tensor's quantization scales (float32) and zero points (int64)."""
    q = tensor.quantization
    if q is None:
        return 0
    return 4 * len(q.scale if q.scale is not None else []) + 8 * len(q.zeroPoint if q.zeroPoint is not None else [])


def _dense_values(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray:
    return np.frombuffer(_buffer_bytes(model, tensor), dtype=_NUMPY_TYPES[tensor.type]).reshape(tuple(tensor.shape))


def conv_filter_stats(data: bytes) -> SparseStats:
    """Conv filter weights, non-zeros, sparse filters and their bytes in a .tflite file (dense or sparse-encoded)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sparse = weights = nonzeros = weight_bytes = value_bytes = 0
    for sg in model.subgraphs:
        producers = _producers(sg)
        for idx in _stored_filters(model, sg):
            op = producers.get(idx)
            t = sg.tensors[idx]
            if op is not None and _opcode_is(model, op, schema.BuiltinOperator.DENSIFY):
                src = sg.tensors[op.inputs[0]]
                sp = read_sparse_tensor(model, src)
                sparse += 1
                n, nnz = int(np.prod(sp.shape)), int(np.count_nonzero(sp.values))
                weight_bytes += sp.values.nbytes + sp.index_bytes() + _quantization_bytes(src)
            elif op is None and t.type in _NUMPY_TYPES and model.buffers[t.buffer].data is not None:
                values = _dense_values(model, t)
                n, nnz = values.size, int(np.count_nonzero(values))
                weight_bytes += values.nbytes
            else:
                continue
            weight_bytes += _quantization_bytes(t)
            weights += n
            nonzeros += nnz
            value_bytes += nnz * VALUE_BYTES[t.type]
    return SparseStats(sparse, weights, nonzeros, weight_bytes, bound_bytes(weights, 8 * value_bytes))


def _densify_opcode(model: schema.ModelT) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == schema.BuiltinOperator.DENSIFY:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode = oc.deprecatedBuiltinCode = schema.BuiltinOperator.DENSIFY
    oc.version = 1
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _sparsifiable(
    model: schema.ModelT, sg: schema.SubGraphT, idx: int, users: dict[int, int], produced: dict[int, schema.OperatorT]
) -> str:
    """Why the filter tensor cannot be encoded, or '' if it can."""
    t = sg.tensors[idx]
    if idx in produced or t.buffer == 0 or model.buffers[t.buffer].data is None:
        return "not a constant"
    if t.type not in VALUE_BYTES or t.sparsity is not None:
        return "not a dense float32, float16 or int8 tensor"
    if users.get(t.buffer, 0) != 1:
        return "its buffer is shared with other tensors"
    if idx in set(sg.inputs) | set(sg.outputs):
        return "it is a subgraph input or output"
    if len(model.buffers[t.buffer].data) != VALUE_BYTES[t.type] * int(np.prod(t.shape)):
        return "buffer size does not match its shape"
    q = t.quantization
    if t.type == schema.TensorType.INT8 and (q is None or q.zeroPoint is None or np.any(np.asarray(q.zeroPoint))):
        return "int8 without zero points of 0 (DENSIFY fills with 0, which must mean 0.0)"
    return ""


def sparsify_tflite(src: bytes, min_sparsity: float = MIN_SPARSITY) -> tuple[bytes, SparseStats]:
    """Rewrite a .tflite file with each conv filter in its smallest encoding; returns (bytes, stats).

    Filters with fewer than `min_sparsity` zeros stay dense whatever their size; the result is never larger than
    `src` (if it would be, `src` is returned).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    model = schema.ModelT.InitFromPackedBuf(src, 0)
    _check_inline_buffers(model)
    users = _buffer_users(model)
    densify_code: int | None = None
    for sg in model.subgraphs:
        produced = _producers(sg)
        densify_ops = []
        for idx in _stored_filters(model, sg):
            t = sg.tensors[idx]
            why = _sparsifiable(model, sg, idx, users, produced)
            if why:
                log.debug("left %s dense: %s", t.name, why)
                continue
            dense = _dense_values(model, t)
            if 1.0 - np.count_nonzero(dense) / dense.size < min_sparsity or not np.any(dense == 0):
                continue
            layout, size = choose_layout(dense, VALUE_BYTES[t.type])
            if layout is None:
                log.debug("left %s dense: no sparse encoding is smaller", t.name)
                continue
            sp = encode_sparse(dense, layout)
            sparse_t = schema.TensorT()
            sparse_t.name = _name_bytes(t.name) + b"_sparse"
            sparse_t.shape, sparse_t.type = list(t.shape), t.type
            sparse_t.buffer = t.buffer  # the old buffer now holds only the stored values
            sparse_t.sparsity = _sparsity_parameters(sp)
            # The quantization stays on the DENSIFY output (what the conv reads); the sparse input needs none.
            model.buffers[t.buffer].data = np.frombuffer(
                sp.values.astype(_NUMPY_TYPES[t.type]).tobytes(), dtype=np.uint8
            )
            model.buffers.append(schema.BufferT())  # the dense filter becomes a run-time tensor
            t.buffer = len(model.buffers) - 1
            sg.tensors.append(sparse_t)
            if densify_code is None:
                densify_code = _densify_opcode(model)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = densify_code, [len(sg.tensors) - 1], [idx]
            op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.DensifyOptions, schema.DensifyOptionsT()
            densify_ops.append(op)
            log.debug("%s: %s sparse=%s, %d -> ~%d bytes", t.name, layout.order, layout.sparse, dense.nbytes, size)
        sg.operators = densify_ops + list(sg.operators or [])
    builder = flatbuffers.Builder(len(src))
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    out = bytes(builder.Output())
    if densify_code is None:
        out = src  # nothing encoded: the input as it was, byte for byte
    elif len(out) >= len(src):
        log.info("sparse rewrite would not make the file smaller (%d -> %d bytes): kept dense", len(src), len(out))
        out = src
    stats = conv_filter_stats(out)  # read back from the new file rather than trusting the loop above
    log.info(
        "sparse rewrite: %d conv filters sparse-encoded, %d of %d conv weights non-zero, %d -> %d bytes",
        stats.sparse_tensors,
        stats.nonzeros,
        stats.conv_weights,
        len(src),
        len(out),
    )
    return out, stats


def tf_sparsify(src: bytes) -> bytes:
    """TensorFlow's own sparsifier (`mlir_sparsify`, what `Optimize.EXPERIMENTAL_SPARSITY` runs) on a .tflite.

    A cross-check for benchmarks and tests only (a private TF API; needs TensorFlow, which edgesr's runtime path
    never imports). litert-torch files carry a `keep_stablehlo_constant` metadata entry that makes the pass skip
    every tensor; it is dropped first (research: stack.md section 4c).
    """
    from tensorflow.lite.python.convert import mlir_sparsify

    model = schema.ModelT.InitFromPackedBuf(src, 0)
    model.metadata = [md for md in model.metadata or [] if _name_bytes(md.name) != b"keep_stablehlo_constant"]
    builder = flatbuffers.Builder(len(src))
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(mlir_sparsify(bytes(builder.Output())))
