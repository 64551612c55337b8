"""TFLite precisions end to end: the shipped edsr-tiny x2 checkpoint, body convs magnitude-pruned to 80 %, through
litert-torch in fp32, fp16, int8-dynamic and int8 (calibrated on real patches), dense and sparse, each run in
ai_edge_litert.

The four conversions run once per module (they take a while on 2 cores); the tests read what they wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from compress.checkpoint import load_checkpoint
from compress.pruning.methods.magnitude import prune_once
from conftest import REPO
from convert import parity
from convert.calibration import calibration_patches
from convert.sparse_tflite import (
    SPARSE_TENSOR_OVERHEAD_BYTES,
    VALUE_BYTES,
    conv_filter_stats,
    decode_sparse,
    read_sparse_tensor,
    tf_sparsify,
)
from convert.tflite import float_io, tflite_bytes, tflite_op_counts
from convert.tflite_artifacts import TFLITE_PRECISIONS, tflite_artifacts, tflite_file_name
from edgesr.datasets import SPORCO_IMAGES, load_test_set
from edgesr.errors import BadInput, CheckFailed
from edgesr.images import bicubic_upscale, quantize_uint8
from edgesr.metrics import psnr, psnr_float

TILE, SCALE = 32, 2
ARTIFACT_KEYS = {"file", "format", "encoding", "precision", "size_bytes", "sha256", "weights", "parity"}
WEIGHT_KEYS = {"conv_weights", "nonzeros", "sparse_tensors", "weight_bytes", "bound_bytes"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, _ = load_checkpoint(REPO / "checkpoints/edsr-tiny-x2/model.pt")
    # the body convs (EDSR's default sparse layers): one-shot 80 % there keeps a usable SR model (33 dB Y-PSNR on
    # the sporco crops vs 41 dense), which the quality comparisons between precisions need
    prune_once(model, 0.8, layers="default")
    model.eval()
    staging = tmp_path_factory.mktemp("tflite-variants")
    x = parity.parity_tile(TILE, SCALE)
    reference = parity.torch_output(model, x)
    calibration = calibration_patches(TILE)
    artifacts, skipped = {}, []
    for precision in TFLITE_PRECISIONS:
        built_, skipped_ = tflite_artifacts(model, staging, precision, TILE, 0.0, x, reference, calibration)
        artifacts.update({(a["precision"], a["encoding"]): a for a in built_})
        skipped += skipped_
    return {"model": model, "dir": staging, "x": x, "reference": reference, "artifacts": artifacts, "skipped": skipped}


def _path(built, precision: str, encoding: str) -> Path:
    return built["dir"] / built["artifacts"][(precision, encoding)]["file"]


def test_every_precision_dense_and_sparse_with_float32_nhwc_io(built):
    assert TFLITE_PRECISIONS == ("fp32", "fp16", "int8-dynamic", "int8")
    assert built["skipped"] == []
    assert set(built["artifacts"]) == {(p, e) for p in TFLITE_PRECISIONS for e in ("dense", "sparse")}
    for (precision, encoding), a in built["artifacts"].items():
        assert a["file"] == tflite_file_name(encoding, precision)
        assert ARTIFACT_KEYS <= set(a) and WEIGHT_KEYS <= set(a["weights"])
        assert a["format"] == "tflite" and a["size_bytes"] == _path(built, precision, encoding).stat().st_size
        interpreter = Interpreter(model_path=str(_path(built, precision, encoding)))
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        # device_bench's runner feeds every file the same float32 NHWC tiles
        assert inp["dtype"] == np.float32 and tuple(inp["shape"]) == (1, TILE, TILE, 3)
        assert out["dtype"] == np.float32 and tuple(out["shape"]) == (1, SCALE * TILE, SCALE * TILE, 3)
    assert tflite_file_name("dense", "fp32") == "dense.tflite"
    assert tflite_file_name("sparse", "int8") == "sparse-int8.tflite"


def test_parity_with_torch_within_each_precisions_tolerance(built):
    # Independently of the records: a crop of another photo, run here, against torch.
    pair = next(p for p in load_test_set("sporco", SCALE) if p.name == SPORCO_IMAGES[0])
    x = np.ascontiguousarray(pair.lr[40 : 40 + TILE, 60 : 60 + TILE], dtype=np.float32)[None] / 255.0
    ref = parity.torch_output(built["model"], x)
    errors = {}
    for (precision, encoding), a in built["artifacts"].items():
        tol = parity.TFLITE_TOLERANCES[precision]
        delegate = a["parity"]["verified_with"]["delegate"]
        y = parity.run_tflite(_path(built, precision, encoding), x, delegate)
        err = float(np.max(np.abs(y.astype(np.float64) - ref)))
        assert err <= tol.max_abs_error and psnr_float(y, ref) >= tol.psnr_db_min, (a["file"], err)
        errors[a["file"]] = err
        rec = a["parity"]
        assert rec["reference"] == "torch" and rec["tolerance"] == {
            "max_abs_error": tol.max_abs_error,
            "psnr_db_min": tol.psnr_db_min,
        }
        assert rec["verified_with"]["runtime"] == "ai-edge-litert" and rec["verified_with"]["version"]
        assert rec["max_abs_error"] <= tol.max_abs_error
    # The precisions really differ: fp32 is exact to float rounding, quantized files are not.
    assert errors["dense.tflite"] < errors["dense-fp16.tflite"] < errors["dense-int8.tflite"]


def test_sparse_output_is_bit_identical_to_dense_per_precision(built):
    for precision in TFLITE_PRECISIONS:
        sparse = built["artifacts"][(precision, "sparse")]
        assert sparse["parity"]["bit_identical_to_dense"] is True
        for delegate in {sparse["parity"]["verified_with"]["delegate"], parity.BUILTIN}:
            a = parity.run_tflite(_path(built, precision, "dense"), built["x"], delegate)
            b = parity.run_tflite(_path(built, precision, "sparse"), built["x"], delegate)
            assert a.tobytes() == b.tobytes(), (precision, delegate)


def test_xnnpack_failing_combination_is_recorded(built):
    flagged = set()
    for (precision, encoding), a in built["artifacts"].items():
        path = _path(built, precision, encoding)
        if a.get("runtime_requirements") == {"xnnpack": False}:
            flagged.add((precision, encoding))
            assert a["parity"]["verified_with"]["delegate"] == parity.BUILTIN
            assert "XNNPACK cannot prepare" in a["note"] and "xnnpack" in a["parity"]["xnnpack_error"].lower()
            with pytest.raises(RuntimeError, match="XNNPack"):
                parity.run_tflite(path, built["x"], parity.XNNPACK)
        else:
            assert "runtime_requirements" not in a and a["parity"]["verified_with"]["delegate"] == parity.XNNPACK
            parity.run_tflite(path, built["x"], parity.XNNPACK)
    # stack.md: sparse weights feeding dynamic-range int8 convs fail to prepare under XNNPACK (full int8 runs).
    assert flagged == {("int8-dynamic", "sparse")}


def _stored_filters(data: bytes) -> dict[bytes, tuple[schema.TensorT, np.ndarray]]:
    """Conv filter storage by tensor name: (tensor carrying the quantization, dense values at stored precision)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sg = model.subgraphs[0]
    out = {}
    densified = set()
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY:
            t = sg.tensors[op.outputs[0]]
            out[t.name] = (t, decode_sparse(read_sparse_tensor(model, sg.tensors[op.inputs[0]])))
            densified.add(op.outputs[0])
    for i, t in enumerate(sg.tensors):
        constant = model.buffers[t.buffer].data is not None
        if i not in densified and t.sparsity is None and t.type in VALUE_BYTES and constant:
            dtype = {schema.TensorType.FLOAT32: "<f4", schema.TensorType.FLOAT16: "<f2", schema.TensorType.INT8: "i1"}
            raw = np.asarray(model.buffers[t.buffer].data, dtype=np.uint8).tobytes()
            if len(t.shape) == 4:
                out[t.name] = (t, np.frombuffer(raw, dtype=dtype[t.type]).reshape(tuple(t.shape)))
    return out


def test_sparse_filters_keep_values_type_and_quantization(built):
    expected_type = {
        "fp32": schema.TensorType.FLOAT32,
        "fp16": schema.TensorType.FLOAT16,
        "int8-dynamic": schema.TensorType.INT8,
        "int8": schema.TensorType.INT8,
    }
    for precision in TFLITE_PRECISIONS:
        dense = _stored_filters(_path(built, precision, "dense").read_bytes())
        sparse = _stored_filters(_path(built, precision, "sparse").read_bytes())
        assert dense.keys() == sparse.keys()
        types = set()
        for name, (t_dense, w_dense) in dense.items():
            t_sparse, w_sparse = sparse[name]
            assert t_sparse.type == t_dense.type and w_sparse.dtype == w_dense.dtype
            np.testing.assert_array_equal(w_sparse, w_dense)
            if t_dense.quantization is not None and t_dense.quantization.scale is not None:
                # per-channel int8: the same scales and zero points on the same axis
                np.testing.assert_array_equal(t_sparse.quantization.scale, t_dense.quantization.scale)
                np.testing.assert_array_equal(t_sparse.quantization.zeroPoint, t_dense.quantization.zeroPoint)
                assert t_sparse.quantization.quantizedDimension == t_dense.quantization.quantizedDimension
            types.add(t_dense.type)
        assert expected_type[precision] in types


def test_sparse_is_smaller_than_dense_and_than_tensorflows_sparsifier(built):
    for precision in TFLITE_PRECISIONS:
        dense, sparse = built["artifacts"][(precision, "dense")], built["artifacts"][(precision, "sparse")]
        assert sparse["size_bytes"] < dense["size_bytes"]
        assert sparse["weights"]["weight_bytes"] < dense["weights"]["weight_bytes"]
        for k in ("conv_weights", "nonzeros", "bound_bytes"):
            assert sparse["weights"][k] == dense["weights"][k]
        assert sparse["weights"]["sparse_tensors"] > 0 and dense["weights"]["sparse_tensors"] == 0
        tf_file = tf_sparsify(_path(built, precision, "dense").read_bytes())
        tf = conv_filter_stats(tf_file)
        assert tf.sparse_tensors > 0 and tf.conv_weights == sparse["weights"]["conv_weights"]
        assert sparse["size_bytes"] < len(tf_file), precision
        # Weight bytes with each sparse tensor's flatbuffer tables: TF also encodes the 9-weight MeanShift filter
        # (17 B less data, ~270 B more tables); we keep it dense. Counting the tables, ours is never larger.
        ours = sparse["weights"]["weight_bytes"] + SPARSE_TENSOR_OVERHEAD_BYTES * sparse["weights"]["sparse_tensors"]
        assert ours <= tf.weight_bytes + SPARSE_TENSOR_OVERHEAD_BYTES * tf.sparse_tensors, precision


def test_fp16_within_005_db_of_fp32_and_int8_loss_reported(built):
    scores = {p: built["artifacts"][(p, "dense")]["quality"]["psnr_y_db"] for p in TFLITE_PRECISIONS}
    for p in TFLITE_PRECISIONS:
        q, d = built["artifacts"][(p, "sparse")]["quality"], built["artifacts"][(p, "dense")]["quality"]
        assert q["test_set"] == "sporco" and q["tiles"] == 20
        if q["delegate"] == d["delegate"]:  # bit-identical outputs, same score
            assert q["psnr_y_db"] == pytest.approx(scores[p], abs=1e-9)
        else:  # sparse int8-dynamic runs on the builtin kernels, which round differently from XNNPACK
            assert q["psnr_y_db"] == pytest.approx(scores[p], abs=0.05)
    print("Y-PSNR on sporco crops:", {p: round(v, 3) for p, v in scores.items()})
    assert abs(scores["fp16"] - scores["fp32"]) <= 0.05
    # int8 loses some, bounded (measured here: int8-dynamic -0.16 dB, int8 -0.24 dB, fp16 -0.002 dB)
    assert 0.0 < scores["fp32"] - scores["int8"] <= 1.5
    assert scores["fp32"] - scores["int8-dynamic"] <= 1.0
    # and the score is the SR protocol's on the real HR crops: far above noise, near the torch model's own
    tiles = parity.sporco_tiles(TILE, SCALE)
    with torch.no_grad():
        torch_psnr = np.mean(
            [
                psnr(quantize_uint8(parity.torch_output(built["model"], lr)[0]), hr, crop_border=SCALE)
                for lr, hr in tiles
            ]
        )
    assert abs(scores["fp32"] - torch_psnr) <= 0.01 and scores["fp32"] > 25


def test_parity_gate_fails_with_a_clear_message(built):
    path = _path(built, "fp32", "dense")
    y = parity.run_tflite(path, built["x"])
    with pytest.raises(CheckFailed, match=r"dense\.tflite: fp32 output vs torch: max abs error .* \(limit 0\.0001\)"):
        parity.tflite_parity(path, built["x"], built["reference"] + 1e-3, "fp32", y, parity.XNNPACK)
    path = _path(built, "int8", "dense")
    y = parity.run_tflite(path, built["x"])
    with pytest.raises(CheckFailed, match=r"PSNR .* dB \(limit >= 32 dB\)"):
        parity.tflite_parity(path, built["x"], np.zeros_like(built["reference"]), "int8", y, parity.XNNPACK)


def test_calibration_patches_are_real_training_photo_crops():
    a = calibration_patches(24, count=10, seed=0)
    assert a.shape == (10, 24, 24, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
    assert np.array_equal(a, calibration_patches(24, count=10, seed=0))
    assert not np.array_equal(a, calibration_patches(24, count=10, seed=1))
    assert np.all(a == np.round(a * 255) / 255)  # 8-bit photo values, not noise
    with pytest.raises(BadInput, match="larger than every bundled training photo"):
        calibration_patches(5000)


def test_int8_needs_calibration_and_unknown_precision_is_bad_input(built):
    with pytest.raises(BadInput, match="int8 needs calibration patches"):
        tflite_bytes(built["model"], TILE, "int8", None)
    with pytest.raises(BadInput, match="unknown TFLite precision 'lut4'"):
        tflite_bytes(built["model"], TILE, "lut4")


def test_sporco_tiles_are_aligned_lr_hr_crops():
    tiles = parity.sporco_tiles(TILE, SCALE)
    assert len(tiles) == 4 * len(SPORCO_IMAGES)
    for lr, hr in tiles:
        assert lr.shape == (1, TILE, TILE, 3) and lr.dtype == np.float32
        assert hr.shape == (SCALE * TILE, SCALE * TILE, 3) and hr.dtype == np.uint8
    # aligned: bicubic upscaling of the LR crop is close to its HR crop (a one-pixel shift costs several dB)
    lr, hr = tiles[0]
    assert psnr(bicubic_upscale(quantize_uint8(lr[0]), SCALE), hr, crop_border=SCALE) > 25
    shifted = np.roll(hr, 3, axis=1)
    assert psnr(bicubic_upscale(quantize_uint8(lr[0]), SCALE), shifted, crop_border=SCALE) < psnr(
        bicubic_upscale(quantize_uint8(lr[0]), SCALE), hr, crop_border=SCALE
    )
    assert parity.sporco_tiles(1000, SCALE) == []  # larger than every LR image: nothing to score


QUANTIZED = ("int8-dynamic", "int8")


@pytest.fixture(scope="module")
def conv_first(tmp_path_factory):
    """A plain user model whose first op is a conv (no MeanShift in front), 80 % magnitude-pruned, in both int8
    precisions through the pipeline's own build-and-verify step. The converter alone gives int8 I/O here."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 12, 3, padding=1),
        torch.nn.PixelShuffle(2),
    )
    prune_once(model, 0.8, layers="all")
    model.eval()
    staging = tmp_path_factory.mktemp("tflite-conv-first")
    x = parity.parity_tile(TILE, SCALE)
    reference = parity.torch_output(model, x)
    artifacts = {}
    for precision in QUANTIZED:
        built_, skipped = tflite_artifacts(
            model, staging, precision, TILE, 0.0, x, reference, calibration_patches(TILE)
        )
        assert skipped == []
        artifacts.update({(a["precision"], a["encoding"]): a for a in built_})
    return {"model": model, "dir": staging, "artifacts": artifacts}


def test_conv_first_model_int8_files_keep_float32_io_and_parity(conv_first):
    assert set(conv_first["artifacts"]) == {(p, e) for p in QUANTIZED for e in ("dense", "sparse")}
    pair = next(p for p in load_test_set("sporco", SCALE) if p.name == SPORCO_IMAGES[0])
    x = np.ascontiguousarray(pair.lr[40 : 40 + TILE, 60 : 60 + TILE], dtype=np.float32)[None] / 255.0
    ref = parity.torch_output(conv_first["model"], x)
    for (precision, _), a in conv_first["artifacts"].items():
        path = conv_first["dir"] / a["file"]
        # builtin kernels: XNNPACK cannot prepare sparse int8-dynamic (recorded; checked per delegate below)
        interpreter = Interpreter(
            model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        assert inp["dtype"] == np.float32 and tuple(inp["shape"]) == (1, TILE, TILE, 3), a["file"]
        assert out["dtype"] == np.float32 and tuple(out["shape"]) == (1, SCALE * TILE, SCALE * TILE, 3), a["file"]
        assert inp["name"] == "serving_default_args_0"  # the float32 edge keeps the converter's name
        # the signature runner (what signature-based runtimes call) takes and returns float32 too
        runner = interpreter.get_signature_runner()
        (sig_out,) = runner(args_0=x).values()
        assert sig_out.dtype == np.float32 and sig_out.shape == ref.shape
        tol = parity.TFLITE_TOLERANCES[precision]
        delegates = {parity.BUILTIN, a["parity"]["verified_with"]["delegate"]}
        if a.get("runtime_requirements") != {"xnnpack": False}:
            assert delegates == {parity.BUILTIN, parity.XNNPACK}
        for delegate in delegates:
            y = parity.run_tflite(path, x, delegate)
            err = float(np.max(np.abs(y.astype(np.float64) - ref)))
            assert err <= tol.max_abs_error and psnr_float(y, ref) >= tol.psnr_db_min, (a["file"], delegate, err)
            assert err > 0  # really quantized
        assert a["parity"]["max_abs_error"] <= tol.max_abs_error
    # the rewritten files still sparse-encode: the 16->12 filter (the 432-weight first one is smaller dense in int8)
    for precision in QUANTIZED:
        assert conv_first["artifacts"][(precision, "sparse")]["weights"]["sparse_tensors"] == 1
        assert conv_first["artifacts"][(precision, "dense")]["weights"]["sparse_tensors"] == 0


def test_float_io_quantizes_the_int8_edges_with_their_own_parameters(conv_first):
    data = (conv_first["dir"] / tflite_file_name("dense", "int8")).read_bytes()
    assert float_io(data) == data  # already float32 at the edges: unchanged, byte for byte
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sg = model.subgraphs[0]
    codes = [model.operatorCodes[op.opcodeIndex] for op in sg.operators]
    ops = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in codes]
    assert ops[0] == schema.BuiltinOperator.QUANTIZE and ops[-1] == schema.BuiltinOperator.DEQUANTIZE
    assert tflite_op_counts(data)["QUANTIZE"] == 1 and tflite_op_counts(data)["DEQUANTIZE"] == 1
    first, last = sg.operators[0], sg.operators[-1]
    assert list(sg.inputs) == list(first.inputs) and list(sg.outputs) == list(last.outputs)
    (sig,) = model.signatureDefs
    assert [t.tensorIndex for t in sig.inputs] == list(sg.inputs)
    assert [t.tensorIndex for t in sig.outputs] == list(sg.outputs)
    for float_t, int_t in ((first.inputs[0], first.outputs[0]), (last.outputs[0], last.inputs[0])):
        f, q = sg.tensors[float_t], sg.tensors[int_t]
        assert f.type == schema.TensorType.FLOAT32 and q.type == schema.TensorType.INT8
        assert q.name == f.name + b"_int8" and list(f.shape) == list(q.shape)
        assert len(q.quantization.scale) == 1 and q.quantization.scale[0] > 0
    # the input keeps the calibrated range: the patches' [min, max] (0 included) over 256 int8 steps
    q_in = sg.tensors[first.outputs[0]].quantization
    calibration = calibration_patches(TILE)
    span = max(float(calibration.max()), 0.0) - min(float(calibration.min()), 0.0)
    assert q_in.scale[0] == pytest.approx(span / 255, rel=0.02) and q_in.zeroPoint[0] == -128
    # QUANTIZE maps the float32 input onto that int8 tensor with those parameters
    x = parity.parity_tile(TILE, SCALE)
    interpreter = Interpreter(
        model_content=data,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    q = details["serving_default_args_0_int8"]
    scale, zero = q["quantization"]
    expected = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    assert np.abs(interpreter.get_tensor(q["index"]).astype(int) - expected).max() <= 1
