"""The CSR + DENSIFY rewrite on small .tflite files built here with the schema, run in the real interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import format_converter_wrapper_pybind11 as fc
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from convert.sparse_tflite import CsrTensor, conv_filter_stats, decode_csr, encode_csr, sparsify_tflite

# Not from conftest: test_rewrite_needs_no_tensorflow imports this module in a bare subprocess.
REPO = Path(__file__).resolve().parents[1]
IDX = schema.SparseIndexVector


def _pruned(shape: tuple[int, ...], zeros: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.permutation(flat.size)[: round(zeros * flat.size)]] = 0.0
    return w


def _tensor(sg: schema.SubGraphT, model: schema.ModelT, shape, name: str, data: np.ndarray | None = None) -> int:
    t = schema.TensorT()
    t.shape, t.type, t.name = list(shape), schema.TensorType.FLOAT32, name
    buf = schema.BufferT()
    if data is not None:
        buf.data = np.frombuffer(data.astype("<f4").tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    t.buffer = len(model.buffers) - 1
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def conv_model(filters: list[np.ndarray], hw: int = 4, share_buffer_of_first: bool = False) -> bytes:
    """One input (1, hw, hw, C) feeding one SAME-padded CONV_2D per filter (OHWI); every conv output is an output.

    With `share_buffer_of_first`, an extra conv uses a second filter tensor that points at filter 0's buffer.
    """
    model = schema.ModelT()
    model.version, model.description = 3, "edgesr test"
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CONV_2D
    code.version = 1
    model.operatorCodes, model.buffers = [code], [schema.BufferT()]
    sg = schema.SubGraphT()
    sg.tensors, sg.operators, sg.outputs = [], [], []
    x = _tensor(sg, model, (1, hw, hw, filters[0].shape[3]), "x")
    rng = np.random.default_rng(1)
    specs = [(f, None) for f in filters]
    if share_buffer_of_first:
        specs.append((filters[0], 0))
    filter_tensors: list[int] = []
    for i, (f, share) in enumerate(specs):
        if share is None:
            w = _tensor(sg, model, f.shape, f"w{i}", f)
        else:
            w = _tensor(sg, model, f.shape, f"w{i}")
            model.buffers.pop()
            sg.tensors[w].buffer = sg.tensors[filter_tensors[share]].buffer
        filter_tensors.append(w)
        b = _tensor(sg, model, (f.shape[0],), f"b{i}", rng.normal(size=f.shape[0]))
        y = _tensor(sg, model, (1, hw, hw, f.shape[0]), f"y{i}")
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [x, w, b], [y]
        opts = schema.Conv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = schema.Padding.SAME, 1, 1
        opts.dilationHFactor = opts.dilationWFactor = 1
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.Conv2DOptions, opts
        sg.operators.append(op)
        sg.outputs.append(y)
    sg.inputs = [x]
    model.subgraphs = [sg]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def run(data: bytes, seed: int = 0) -> list[np.ndarray]:
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    x = np.random.default_rng(seed).random(inp["shape"], dtype=np.float32)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(o["index"]).copy() for o in interpreter.get_output_details()]


def op_names(model: schema.ModelT, sg: schema.SubGraphT) -> list[str]:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = model.operatorCodes
    return [
        names[max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode)]
        for op in sg.operators
    ]


def assert_same_outputs(a: bytes, b: bytes) -> None:
    for x, y in zip(run(a), run(b), strict=True):
        assert x.tobytes() == y.tobytes()


def test_csr_encoding_matches_tflite_and_decodes_back():
    w = np.zeros((2, 1, 3, 5), dtype=np.float32)
    w[0, 0, 0, [0, 3]] = [1.5, -2.0]
    w[0, 0, 2, 4] = 0.25
    w[1, 0, 1, [1, 2, 4]] = [3.0, -0.5, 7.0]
    csr = encode_csr(w)
    assert csr.segments.tolist() == [0, 2, 2, 3, 3, 6, 6]
    assert csr.indices.tolist() == [0, 3, 4, 1, 2, 4]
    assert csr.values.tolist() == [1.5, -2.0, 0.25, 3.0, -0.5, 7.0]
    np.testing.assert_array_equal(decode_csr(csr), w)
    # TFLite's own encoder (the one its sparsifier uses) gives the same vectors for this layout.
    dense, sparse = fc.TfLiteDimensionType.TF_LITE_DIM_DENSE, fc.TfLiteDimensionType.TF_LITE_DIM_SPARSE_CSR
    ref = fc.FormatConverterFp32(list(w.shape), [0, 1, 2, 3], [dense, dense, dense, sparse], [], [])
    assert ref.DenseToSparse(w) == fc.TfLiteStatus.TF_LITE_OK
    assert ref.GetDimMetadata()[-2:] == [csr.segments.tolist(), csr.indices.tolist()]
    np.testing.assert_array_equal(np.array(ref.GetData(), dtype=np.float32), csr.values)


def test_csr_roundtrip_random_and_rejects_inconsistent():
    w = _pruned((7, 3, 3, 11), 0.8, seed=3)
    np.testing.assert_array_equal(decode_csr(encode_csr(w)), w)
    bad = CsrTensor((2, 3), np.array([0, 1]), np.array([0]), np.array([1.0], dtype=np.float32))
    with pytest.raises(ValueError):
        decode_csr(bad)


def test_sparse_filters_become_densify_inputs():
    filters = [_pruned((6, 3, 3, 8), 0.8, seed=0), _pruned((5, 3, 3, 8), 0.5, seed=1)]
    src = conv_model(filters)
    out, stats = sparsify_tflite(src)
    assert stats.sparse_tensors == 2
    assert stats.conv_weights == sum(f.size for f in filters)
    assert stats.nonzeros == sum(int(np.count_nonzero(f)) for f in filters)
    assert conv_filter_stats(out) == stats
    assert len(out) < len(src)
    model = schema.ModelT.InitFromPackedBuf(out, 0)
    sg = model.subgraphs[0]
    assert op_names(model, sg) == ["DENSIFY", "DENSIFY", "CONV_2D", "CONV_2D"]
    for op, f in zip(sg.operators[:2], filters, strict=True):
        sparse_t, dense_t = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
        assert model.buffers[dense_t.buffer].data is None  # old dense data gone, not left behind
        sp = sparse_t.sparsity
        assert list(sp.traversalOrder) == [0, 1, 2, 3]
        assert [d.format for d in sp.dimMetadata] == [0, 0, 0, schema.DimensionType.SPARSE_CSR]
        assert [d.denseSize for d in sp.dimMetadata[:3]] == list(f.shape[:3])
        assert sp.dimMetadata[3].arrayIndicesType == IDX.Uint8Vector
        assert len(model.buffers[sparse_t.buffer].data) == 4 * np.count_nonzero(f)
    assert_same_outputs(src, out)


def test_dense_model_is_left_dense():
    filters = [_pruned((6, 3, 3, 8), 0.0, seed=0), _pruned((6, 3, 3, 8), 0.2, seed=1)]
    src = conv_model(filters)
    out, stats = sparsify_tflite(src)
    assert stats.sparse_tensors == 0 and stats.conv_weights == 2 * filters[0].size
    model = schema.ModelT.InitFromPackedBuf(out, 0)
    assert op_names(model, model.subgraphs[0]) == ["CONV_2D", "CONV_2D"]
    assert all(t.sparsity is None for t in model.subgraphs[0].tensors)
    assert len(model.operatorCodes) == 1  # no DENSIFY code added when nothing is sparse
    assert_same_outputs(src, out)


def test_min_sparsity_threshold():
    src = conv_model([_pruned((6, 3, 3, 8), 0.8)])
    assert sparsify_tflite(src, min_sparsity=0.9)[1].sparse_tensors == 0
    assert sparsify_tflite(src, min_sparsity=0.8)[1].sparse_tensors == 1


def test_shared_filter_buffer_is_skipped():
    filters = [_pruned((6, 3, 3, 8), 0.8, seed=0), _pruned((4, 3, 3, 8), 0.8, seed=1)]
    src = conv_model(filters, share_buffer_of_first=True)
    out, stats = sparsify_tflite(src)
    assert stats.sparse_tensors == 1  # only the filter with a buffer of its own
    model = schema.ModelT.InitFromPackedBuf(out, 0)
    sg = model.subgraphs[0]
    assert op_names(model, sg).count("DENSIFY") == 1
    assert sg.tensors[sg.operators[0].outputs[0]].name == b"w1"
    assert_same_outputs(src, out)


def test_index_vector_widths_follow_their_largest_value():
    # 300 input channels need uint16 indices; ~72k non-zeros need int32 segments.
    wide, big = _pruned((4, 1, 1, 300), 0.5, seed=0), _pruned((300, 1, 1, 600), 0.6, seed=1)
    for f, segments_type, indices_type in (
        (wide, IDX.Uint16Vector, IDX.Uint16Vector),
        (big, IDX.Int32Vector, IDX.Uint16Vector),
    ):
        src = conv_model([f], hw=2)
        out, stats = sparsify_tflite(src)
        assert stats.sparse_tensors == 1
        model = schema.ModelT.InitFromPackedBuf(out, 0)
        sg = model.subgraphs[0]
        last = sg.tensors[sg.operators[0].inputs[0]].sparsity.dimMetadata[3]
        assert (last.arraySegmentsType, last.arrayIndicesType) == (segments_type, indices_type)
        assert_same_outputs(src, out)


def test_rewrite_needs_no_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from tests.test_sparse_tflite import conv_model, _pruned\n"
        "from convert.sparse_tflite import sparsify_tflite\n"
        "sparsify_tflite(conv_model([_pruned((6, 3, 3, 8), 0.8)]))\n"
        "print('tensorflow' in sys.modules, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]
