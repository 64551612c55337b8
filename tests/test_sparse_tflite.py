"""The sparse + DENSIFY rewrite on small .tflite files built here with the schema, run in the real interpreter.

Encodings are checked against TFLite's own encoder (FormatConverterFp32), sizes against the encoder itself, and
every file runs in ai_edge_litert with XNNPACK and with the builtin kernels, bit-identical to the dense file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import format_converter_wrapper_pybind11 as fc
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import convert.sparse_tflite as st
from convert.sparse_tflite import (
    SPARSE_TENSOR_OVERHEAD_BYTES,
    SparseLayout,
    SparseTensor,
    candidate_layouts,
    choose_layout,
    conv_filter_stats,
    decode_sparse,
    encode_sparse,
    encoded_bytes,
    index_dtype,
    layout_bytes,
    read_sparse_tensor,
    sparsify_tflite,
)

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


def run(data: bytes, seed: int = 0, builtin: bool = False) -> list[np.ndarray]:
    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin else {}
    interpreter = Interpreter(model_content=data, **kwargs)
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
    """Bit-identical outputs with XNNPACK (the default delegate) and with the builtin kernels."""
    for builtin in (False, True):
        for x, y in zip(run(a, builtin=builtin), run(b, builtin=builtin), strict=True):
            assert x.tobytes() == y.tobytes()


def sparse_filters(data: bytes) -> list[tuple[schema.TensorT, SparseTensor]]:
    """(dense filter tensor, its sparse content) for every DENSIFY op of the file, in operator order."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sg = model.subgraphs[0]
    out = []
    for op in sg.operators:
        if op_names(model, sg)[sg.operators.index(op)] == "DENSIFY":
            out.append((sg.tensors[op.outputs[0]], read_sparse_tensor(model, sg.tensors[op.inputs[0]])))
    return out


def _by_dim(layout: SparseLayout) -> list:
    # FormatConverterFp32's constructor takes formats per original dim (its DenseToSparse indexes them so); the
    # file stores them per traversal level, which is what DENSIFY reads.
    dense, sparse = fc.TfLiteDimensionType.TF_LITE_DIM_DENSE, fc.TfLiteDimensionType.TF_LITE_DIM_SPARSE_CSR
    formats = [dense] * len(layout.order)
    for level, dim in enumerate(layout.order):
        formats[dim] = sparse if layout.sparse[level] else dense
    return formats


def test_csr_encoding_matches_tflite_and_decodes_back():
    w = np.zeros((2, 1, 3, 5), dtype=np.float32)
    w[0, 0, 0, [0, 3]] = [1.5, -2.0]
    w[0, 0, 2, 4] = 0.25
    w[1, 0, 1, [1, 2, 4]] = [3.0, -0.5, 7.0]
    sp = encode_sparse(w, SparseLayout.csr(4))
    assert sp.segments[:3] == (None, None, None)
    assert sp.segments[3].tolist() == [0, 2, 2, 3, 3, 6, 6]
    assert sp.indices[3].tolist() == [0, 3, 4, 1, 2, 4]
    assert sp.values.tolist() == [1.5, -2.0, 0.25, 3.0, -0.5, 7.0]
    np.testing.assert_array_equal(decode_sparse(sp), w)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_layout_matches_tflites_encoder_and_round_trips(seed):
    # Zeros with some structure (a pruned output channel and input channel) so outer sparse levels matter.
    w = _pruned((5, 3, 2, 7), 0.7, seed=seed)
    w[2], w[..., 4] = 0.0, 0.0
    for layout in candidate_layouts(4):
        sp = encode_sparse(w, layout)
        ref = fc.FormatConverterFp32(list(w.shape), list(layout.order), _by_dim(layout), [], [])
        assert ref.DenseToSparse(w) == fc.TfLiteStatus.TF_LITE_OK
        expected = []
        for level, dim in enumerate(layout.order):
            if layout.sparse[level]:
                expected += [sp.segments[level].tolist(), sp.indices[level].tolist()]
            else:
                expected += [[w.shape[dim]], []]
        assert ref.GetDimMetadata() == expected, layout
        np.testing.assert_array_equal(np.array(ref.GetData(), dtype=np.float32), sp.values)
        np.testing.assert_array_equal(decode_sparse(sp), w)
        # the size the chooser uses is the size of what the encoder writes
        for value_bytes in (1, 2, 4):
            assert layout_bytes(w, layout, value_bytes) == encoded_bytes(sp, value_bytes)


def test_decode_rejects_inconsistent():
    good = encode_sparse(_pruned((2, 3), 0.5), SparseLayout.csr(2))
    bad = SparseTensor((2, 3), good.layout, good.segments, (None, np.array([0])), good.values)
    with pytest.raises(ValueError):
        decode_sparse(bad)


def test_index_dtype_is_the_smallest_that_holds_the_values():
    assert index_dtype(np.array([], dtype=np.int64)) is np.uint8
    assert index_dtype(np.array([0, 255])) is np.uint8
    assert index_dtype(np.array([256])) is np.uint16
    assert index_dtype(np.array([65535])) is np.uint16
    assert index_dtype(np.array([65536])) is np.int32


def test_chooser_picks_the_smallest_layout():
    # A head-like filter (3 input channels): CSR over the input channels pays a segment per (o, h, w) row; putting
    # the 32 output channels last is smaller, and the chooser finds that.
    w = _pruned((32, 3, 3, 3), 0.8, seed=2)
    layout, size = choose_layout(w, 4)
    sizes = {lay: layout_bytes(w, lay, 4) for lay in candidate_layouts(4)}
    assert size == min(sizes.values()) + SPARSE_TENSOR_OVERHEAD_BYTES == sizes[layout] + SPARSE_TENSOR_OVERHEAD_BYTES
    assert layout != SparseLayout.csr(4) and sizes[layout] < sizes[SparseLayout.csr(4)]
    # Whole output channels pruned (channel-structured zeros): a sparse outer level skips them for free.
    w = _pruned((32, 3, 3, 32), 0.5, seed=3)
    w[::2] = 0.0
    layout, _ = choose_layout(w, 4)
    assert any(layout.sparse[:-1]) and layout_bytes(w, layout, 4) < layout_bytes(w, SparseLayout.csr(4), 4)
    # Too few zeros for any encoding to pay: dense.
    assert choose_layout(_pruned((8, 3, 3, 8), 0.1), 4) == (None, 8 * 3 * 3 * 8 * 4)
    # The value width decides too: at 50 % zeros CSR pays for float32 but not for int8 (index as big as value).
    w = _pruned((64, 3, 3, 64), 0.5, seed=4)
    assert choose_layout(w, 4)[0] is not None and choose_layout(w, 1)[0] is None


def test_sparse_filters_become_densify_inputs():
    filters = [_pruned((6, 3, 3, 8), 0.8, seed=0), _pruned((5, 3, 3, 8), 0.5, seed=1)]
    src = conv_model(filters)
    out, stats = sparsify_tflite(src)
    assert stats.sparse_tensors == 2
    assert stats.conv_weights == sum(f.size for f in filters)
    assert stats.nonzeros == sum(int(np.count_nonzero(f)) for f in filters)
    assert stats.bound_bytes == 4 * stats.nonzeros + -(-stats.conv_weights // 8)
    assert conv_filter_stats(out) == stats
    assert len(out) < len(src)
    model = schema.ModelT.InitFromPackedBuf(out, 0)
    sg = model.subgraphs[0]
    assert op_names(model, sg) == ["DENSIFY", "DENSIFY", "CONV_2D", "CONV_2D"]
    for (dense_t, sp), f in zip(sparse_filters(out), filters, strict=True):
        assert model.buffers[dense_t.buffer].data is None  # old dense data gone, not left behind
        np.testing.assert_array_equal(decode_sparse(sp), f)
        assert sp.layout == choose_layout(f, 4)[0]
    weight_bytes = sum(sp.values.nbytes + sp.index_bytes() for _, sp in sparse_filters(out))
    assert stats.weight_bytes == weight_bytes
    assert_same_outputs(src, out)


def test_every_candidate_layout_runs_in_both_runtimes(monkeypatch):
    # Every traversal order and DENSE/SPARSE_CSR pattern the chooser may pick is accepted by DENSIFY (builtin) and
    # by XNNPACK's static unpacking, and restores the filter bit for bit. Zeros in every dim make every layout
    # smaller than dense, so none is reverted.
    f = np.zeros((8, 3, 3, 8), dtype=np.float32)
    f[:3, :1, 1:, :3] = _pruned((3, 1, 2, 3), 0.3, seed=5)
    src = conv_model([f])
    layouts = candidate_layouts(4)
    assert len(layouts) == 24 * 15
    for layout in layouts[::7] + [SparseLayout((3, 2, 1, 0), (True,) * 4)]:
        monkeypatch.setattr(st, "choose_layout", lambda dense, value_bytes, lay=layout: (lay, 0))
        out, stats = sparsify_tflite(src)
        assert stats.sparse_tensors == 1, layout
        ((_, sp),) = sparse_filters(out)
        assert sp.layout == layout
        assert_same_outputs(src, out)


def test_dense_model_is_left_dense():
    filters = [_pruned((6, 3, 3, 8), 0.0, seed=0), _pruned((6, 3, 3, 8), 0.2, seed=1)]
    src = conv_model(filters)
    out, stats = sparsify_tflite(src)
    assert stats.sparse_tensors == 0 and stats.conv_weights == 2 * filters[0].size
    assert out == src  # nothing worth encoding: the input comes back as it was
    assert stats.weight_bytes == 4 * stats.conv_weights


@pytest.mark.parametrize("zeros", [0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.6, 0.9, 0.99])
def test_file_is_never_larger_than_dense(zeros):
    filters = [_pruned((4, 3, 3, 16), zeros, seed=1), _pruned((16, 3, 3, 16), zeros, seed=2)]
    src = conv_model(filters)
    out, stats = sparsify_tflite(src)
    assert len(out) <= len(src)
    assert stats.weight_bytes <= 4 * stats.conv_weights
    if stats.sparse_tensors:
        assert_same_outputs(src, out)
    if zeros >= 0.4:  # enough zeros to pay for the tables of the 2304-weight filter
        assert stats.sparse_tensors >= 1


def test_min_sparsity_threshold():
    src = conv_model([_pruned((6, 3, 3, 8), 0.8)])
    assert sparsify_tflite(src, min_sparsity=0.9)[1].sparse_tensors == 0
    assert sparsify_tflite(src, min_sparsity=0.8)[1].sparse_tensors == 1
    with pytest.raises(ValueError):
        sparsify_tflite(src, min_sparsity=1.5)


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


def test_index_vectors_in_the_file_use_the_smallest_type():
    # 300 input channels need uint16 indices somewhere; ~72k non-zeros need int32 segments on a CSR level below.
    idx = schema.SparseIndexVector
    kinds = {np.uint8: idx.Uint8Vector, np.uint16: idx.Uint16Vector, np.int32: idx.Int32Vector}
    seen = set()
    for f in (_pruned((4, 1, 1, 300), 0.5, seed=0), _pruned((300, 1, 1, 600), 0.6, seed=1)):
        src = conv_model([f], hw=2)
        out, stats = sparsify_tflite(src)
        assert stats.sparse_tensors == 1
        model = schema.ModelT.InitFromPackedBuf(out, 0)
        sg = model.subgraphs[0]
        sp_t = sg.tensors[sg.operators[0].inputs[0]]
        sp = read_sparse_tensor(model, sp_t)
        for level, meta in enumerate(sp_t.sparsity.dimMetadata):
            if sp.layout.sparse[level]:
                for kind, values in (
                    (meta.arraySegmentsType, sp.segments[level]),
                    (meta.arrayIndicesType, sp.indices[level]),
                ):
                    assert kind == kinds[index_dtype(values)]
                    seen.add(kind)
        assert_same_outputs(src, out)
    assert {idx.Uint16Vector, idx.Int32Vector} <= seen


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
