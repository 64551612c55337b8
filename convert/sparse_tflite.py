"""Sparse weight encoding for .tflite files: a rewrite of the flatbuffer, no TensorFlow needed.

litert-torch has no sparsity option, so the converted file is rewritten after the fact. For every CONV_2D whose
constant float32 filter (OHWI) has at least `min_sparsity` zeros:

- the filter's buffer is replaced by its non-zero values only, and a new constant tensor with TFLite's
  `SparsityParameters` points at it: traversal order [0, 1, 2, 3], dims 0-2 DENSE, the last dim (input
  channels) SPARSE_CSR with segment and index vectors as uint8, uint16 or int32, whichever holds their largest
  value;
- the original filter tensor keeps its name and shape but becomes the output of a new DENSIFY op (it gets an
  empty buffer; leaving the old data in place would make the file larger than the dense one);
- the DENSIFY ops go first in the operator list, and a DENSIFY operator code is added if missing.

DENSIFY restores the dense filter at load time, so this saves file and download size, not run-time memory or
time (docs/research: stack.md section 6). Filters whose buffer is shared by several tensors are left dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

log = logging.getLogger(__name__)

MIN_SPARSITY = 0.30  # the same threshold TF's own sparsifier uses; below it CSR indices cost more than they save
FILE_IDENTIFIER = b"TFL3"
TRAVERSAL_ORDER = (0, 1, 2, 3)


@dataclass(frozen=True)
class SparseStats:
    """Conv filter figures of a .tflite file, over distinct constant CONV_2D filter tensors."""

    sparse_tensors: int  # filters stored as sparse tensors (each feeds a DENSIFY op)
    conv_weights: int  # elements of all conv filters, dense count
    nonzeros: int  # non-zero elements among them


@dataclass(frozen=True)
class CsrTensor:
    """A tensor with its leading dims dense and its last dim in CSR: one segment per row of the leading dims."""

    shape: tuple[int, ...]
    segments: np.ndarray  # len prod(shape[:-1]) + 1; segments[r]:segments[r+1] index `indices` for row r
    indices: np.ndarray  # position in the last dim of each non-zero
    values: np.ndarray  # the non-zeros, row-major


def encode_csr(dense: np.ndarray) -> CsrTensor:
    """Encode `dense` with all dims but the last DENSE and the last SPARSE_CSR (TFLite's layout for conv filters)."""
    rows = dense.reshape(-1, dense.shape[-1])
    nonzero = rows != 0
    segments = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))])
    _, indices = np.nonzero(nonzero)  # row-major order, the same order as rows[nonzero]
    return CsrTensor(tuple(dense.shape), segments.astype(np.int64), indices.astype(np.int64), rows[nonzero])


def decode_csr(csr: CsrTensor) -> np.ndarray:
    """Inverse of `encode_csr`."""
    n_rows = int(np.prod(csr.shape[:-1], dtype=np.int64))
    if len(csr.segments) != n_rows + 1 or len(csr.indices) != len(csr.values):
        raise ValueError(f"inconsistent CSR tensor for shape {csr.shape}")
    rows = np.zeros((n_rows, csr.shape[-1]), dtype=csr.values.dtype)
    row_of_value = np.repeat(np.arange(n_rows), np.diff(csr.segments))
    rows[row_of_value, csr.indices] = csr.values
    return rows.reshape(csr.shape)


def _index_vector(values: np.ndarray) -> tuple[int, object]:
    """The smallest of TFLite's index vector types that holds `values`, as (SparseIndexVector type, vector)."""
    top = int(values.max()) if values.size else 0
    if top <= np.iinfo(np.uint8).max:
        vec, kind, dtype = schema.Uint8VectorT(), schema.SparseIndexVector.Uint8Vector, np.uint8
    elif top <= np.iinfo(np.uint16).max:
        vec, kind, dtype = schema.Uint16VectorT(), schema.SparseIndexVector.Uint16Vector, np.uint16
    else:
        vec, kind, dtype = schema.Int32VectorT(), schema.SparseIndexVector.Int32Vector, np.int32
    vec.values = values.astype(dtype)
    return kind, vec


def _sparsity_parameters(csr: CsrTensor) -> schema.SparsityParametersT:
    dims = []
    for size in csr.shape[:-1]:
        dim = schema.DimensionMetadataT()
        dim.format, dim.denseSize = schema.DimensionType.DENSE, int(size)
        dims.append(dim)
    last = schema.DimensionMetadataT()
    last.format = schema.DimensionType.SPARSE_CSR
    last.arraySegmentsType, last.arraySegments = _index_vector(csr.segments)
    last.arrayIndicesType, last.arrayIndices = _index_vector(csr.indices)
    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap, params.dimMetadata = list(TRAVERSAL_ORDER), [], dims + [last]
    return params


def _vector_values(kind: int, vec: object) -> np.ndarray:
    if kind == schema.SparseIndexVector.NONE or vec is None:
        raise ValueError("sparse dimension without an index vector")
    return np.asarray(vec.values, dtype=np.int64)


def read_sparse_tensor(model: schema.ModelT, tensor: schema.TensorT) -> CsrTensor:
    """The CSR content of a sparse constant tensor in the layout `sparsify_tflite` writes."""
    sp = tensor.sparsity
    dims = sp.dimMetadata or []
    layout_ok = list(sp.traversalOrder) == list(range(len(tensor.shape))) and not (
        sp.blockMap is not None and len(sp.blockMap)
    )
    dense_leading = all(d.format == schema.DimensionType.DENSE for d in dims[:-1])
    if not (layout_ok and dense_leading and dims and dims[-1].format == schema.DimensionType.SPARSE_CSR):
        raise ValueError(f"tensor {tensor.name!r}: only dense-then-CSR sparsity without blocks is supported")
    values = np.frombuffer(_buffer_bytes(model, tensor), dtype=np.float32)
    last = dims[-1]
    return CsrTensor(
        tuple(int(s) for s in tensor.shape),
        _vector_values(last.arraySegmentsType, last.arraySegments),
        _vector_values(last.arrayIndicesType, last.arrayIndices),
        values,
    )


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


def _conv_filter_indices(model: schema.ModelT, sg: schema.SubGraphT) -> list[int]:
    """Distinct tensor indices used as CONV_2D filters in a subgraph, in operator order."""
    seen: dict[int, None] = {}
    for op in sg.operators or []:
        if _opcode_is(model, op, schema.BuiltinOperator.CONV_2D) and len(op.inputs) > 1 and op.inputs[1] >= 0:
            seen.setdefault(int(op.inputs[1]), None)
    return list(seen)


def _producers(sg: schema.SubGraphT) -> dict[int, schema.OperatorT]:
    return {int(t): op for op in sg.operators or [] for t in op.outputs}


def conv_filter_stats(data: bytes) -> SparseStats:
    """Count conv filter weights, non-zeros and sparse filters in a .tflite file (dense or sparse-encoded)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sparse = weights = nonzeros = 0
    for sg in model.subgraphs:
        producers = _producers(sg)
        for idx in _conv_filter_indices(model, sg):
            op = producers.get(idx)
            if op is not None and _opcode_is(model, op, schema.BuiltinOperator.DENSIFY):
                src = sg.tensors[op.inputs[0]]
                csr = read_sparse_tensor(model, src)
                sparse += 1
                weights += int(np.prod(csr.shape))
                nonzeros += int(np.count_nonzero(csr.values))
            elif op is None and sg.tensors[idx].type == schema.TensorType.FLOAT32:
                values = np.frombuffer(_buffer_bytes(model, sg.tensors[idx]), dtype=np.float32)
                weights += values.size
                nonzeros += int(np.count_nonzero(values))
    return SparseStats(sparse, weights, nonzeros)


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
    if t.type != schema.TensorType.FLOAT32 or len(t.shape) != 4 or t.sparsity is not None:
        return "not a dense float32 4-D tensor"
    if users.get(t.buffer, 0) != 1:
        return "its buffer is shared with other tensors"
    if idx in set(sg.inputs) | set(sg.outputs):
        return "it is a subgraph input or output"
    if len(model.buffers[t.buffer].data) != 4 * int(np.prod(t.shape)):
        return "buffer size does not match its shape"
    return ""


# Flatbuffer tables a sparse tensor adds besides its data: the tensor, its sparsity parameters and dimension
# metadata, a DENSIFY operator, an empty buffer and alignment. Measured on filters of 9 to 9216 weights:
# 246-269 B per tensor, plus ~80 B once for the DENSIFY operator code.
SPARSE_TENSOR_OVERHEAD_BYTES = 272


def _encoded_bytes(csr: CsrTensor, params: schema.SparsityParametersT) -> int:
    """Estimated bytes of a CSR-encoded tensor in the file, to keep one only where it is smaller than dense."""
    last = params.dimMetadata[-1]
    index_bytes = last.arraySegments.values.nbytes + last.arrayIndices.values.nbytes
    return csr.values.size * 4 + index_bytes + SPARSE_TENSOR_OVERHEAD_BYTES


def sparsify_tflite(src: bytes, min_sparsity: float = MIN_SPARSITY) -> tuple[bytes, SparseStats]:
    """Rewrite a .tflite file with its sparse-enough CONV_2D filters CSR-encoded; returns (bytes, stats)."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    model = schema.ModelT.InitFromPackedBuf(src, 0)
    _check_inline_buffers(model)
    users = _buffer_users(model)
    densify_code: int | None = None
    for sg in model.subgraphs:
        produced = _producers(sg)
        densify_ops = []
        for idx in _conv_filter_indices(model, sg):
            t = sg.tensors[idx]
            why = _sparsifiable(model, sg, idx, users, produced)
            if why:
                log.debug("left %s dense: %s", t.name, why)
                continue
            dense = np.frombuffer(_buffer_bytes(model, t), dtype=np.float32).reshape(tuple(t.shape))
            if 1.0 - np.count_nonzero(dense) / dense.size < min_sparsity:
                continue
            csr = encode_csr(dense)
            params = _sparsity_parameters(csr)
            if _encoded_bytes(csr, params) >= dense.nbytes:
                log.debug("left %s dense: CSR would not be smaller", t.name)
                continue
            sparse_t = schema.TensorT()
            sparse_t.name = _name_bytes(t.name) + b"_sparse"
            sparse_t.shape, sparse_t.type = list(t.shape), t.type
            sparse_t.buffer = t.buffer  # the old buffer now holds only the non-zeros
            sparse_t.sparsity = params
            model.buffers[t.buffer].data = np.frombuffer(csr.values.astype("<f4").tobytes(), dtype=np.uint8)
            model.buffers.append(schema.BufferT())  # the dense filter becomes a run-time tensor
            t.buffer = len(model.buffers) - 1
            sg.tensors.append(sparse_t)
            if densify_code is None:
                densify_code = _densify_opcode(model)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = densify_code, [len(sg.tensors) - 1], [idx]
            op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.DensifyOptions, schema.DensifyOptionsT()
            densify_ops.append(op)
        sg.operators = densify_ops + list(sg.operators or [])
    builder = flatbuffers.Builder(len(src))
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    out = bytes(builder.Output())
    stats = conv_filter_stats(out)  # read back from the new file rather than trusting the loop above
    log.info(
        "sparse rewrite: %d conv filters CSR-encoded, %d of %d conv weights non-zero, %d -> %d bytes",
        stats.sparse_tensors,
        stats.nonzeros,
        stats.conv_weights,
        len(src),
        len(out),
    )
    return out, stats
