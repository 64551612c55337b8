"""convert: an 80%-pruned edsr-tiny through litert-torch, the sparse rewrite and coremltools, checked for real.

The fp32 conversion runs once per module (it takes a while on 2 cores); the tests read what it wrote. One more
run builds every precision of a small model, for the precision plumbing and the manifest's `skipped`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.models import create_model
from compress.pruning.methods.magnitude import prune_once
from compress.receptive_field import receptive_field_radius
from conftest import run_module
from convert import coreml
from convert.cli import main
from convert.pipeline import PRECISIONS, WEIGHT_KEYS, convert_checkpoint, parse_formats, parse_precisions
from convert.tflite import tflite_op_counts
from convert.verify import Tolerance, check
from device_bench import mil_exec
from edgesr.errors import BadInput, CheckFailed, run_cli
from edgesr.manifest import read_json, sha256, size_bytes

TILE = 64


def _pruned_edsr_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr-tiny", 2)
    prune_once(model, 0.8)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model = _pruned_edsr_tiny()
    ckpt = save_checkpoint(root / "ckpt", model, {"name": "t"})
    out = root / "out"
    manifest = convert_checkpoint(ckpt, out, formats=("tflite", "coreml"), tile=TILE)
    return {"model": model, "ckpt": ckpt, "out": out, "manifest": manifest}


def _artifact(converted, file: str) -> dict:
    return next(a for a in converted["manifest"]["artifacts"] if a["file"] == file)


def _convs(model: nn.Module) -> list[np.ndarray]:
    return [m.weight.detach().numpy() for m in model.modules() if isinstance(m, nn.Conv2d)]


def _sparse_enough(w: np.ndarray) -> bool:
    return 1.0 - np.count_nonzero(w) / w.size >= 0.3


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def test_sparse_tflite_is_small_and_encoded(converted):
    out = converted["out"]
    dense, sparse = (out / "dense.tflite").read_bytes(), (out / "sparse.tflite").read_bytes()
    assert len(sparse) <= 0.35 * len(dense)
    # Which filters are worth a sparse tensor is convert.sparse_tflite's choice (tests/test_sparse_tflite.py);
    # here: every DENSIFY op reads a CSR tensor, they come first, and the manifest counts them.
    model = schema.ModelT.InitFromPackedBuf(sparse, 0)
    sg = model.subgraphs[0]
    densify = [op for op in sg.operators if _is_densify(model, op)]
    expected = _artifact(converted, "sparse.tflite")["weights"]["sparse_tensors"]
    assert len(densify) == expected > 0
    assert sg.operators[:expected] == densify  # DENSIFY ops come first
    for op in densify:
        sp = sg.tensors[op.inputs[0]].sparsity
        assert sp is not None and schema.DimensionType.SPARSE_CSR in [d.format for d in sp.dimMetadata]
    assert sum(t.sparsity is not None for t in sg.tensors) == expected
    assert tflite_op_counts(sparse)["DENSIFY"] == expected
    # the bilinear skip of edsr-tiny converts to a native op
    assert tflite_op_counts(dense)["RESIZE_BILINEAR"] == 1


def _is_densify(model: schema.ModelT, op: schema.OperatorT) -> bool:
    oc = model.operatorCodes[op.opcodeIndex]
    return max(oc.builtinCode, oc.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY


def test_tflite_matches_torch_and_sparse_matches_dense(converted):
    # an input of our own, independent of the parity check the pipeline ran on monarch
    x = np.random.default_rng(7).random((1, TILE, TILE, 3), dtype=np.float32)
    with torch.no_grad():
        ref = converted["model"](torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    dense, sparse = _run(converted["out"] / "dense.tflite", x), _run(converted["out"] / "sparse.tflite", x)
    assert dense.shape == (1, 2 * TILE, 2 * TILE, 3)
    assert np.max(np.abs(dense - ref)) <= 1e-4
    assert sparse.tobytes() == dense.tobytes()
    for file in ("dense.tflite", "sparse.tflite"):
        par = _artifact(converted, file)["parity"]
        assert par["reference"] == "torch" and par["max_abs_error"] <= par["tolerance"]["max_abs_error"] <= 1e-4
        assert par["psnr_db"] is None or par["psnr_db"] > 100
        assert par["verified_with"]["runtime"] == "ai-edge-litert" and par["verified_with"]["delegate"] == "xnnpack"


def test_coreml_sparse_package(converted):
    out, model = converted["out"], converted["model"]
    dense_bin, sparse_bin = coreml.weight_bin(out / "dense.mlpackage"), coreml.weight_bin(out / "sparse.mlpackage")
    assert sparse_bin.stat().st_size <= 0.35 * dense_bin.stat().st_size
    assert coreml.mlpackage_stats(out / "dense.mlpackage").sparse_tensors == 0
    assert coreml.mlpackage_stats(out / "sparse.mlpackage").sparse_tensors > 0
    for file in ("dense.mlpackage", "sparse.mlpackage"):
        a = _artifact(converted, file)
        assert a["weights"]["sparse_tensors"] == coreml.mlpackage_stats(out / file).sparse_tensors
        assert a["weight_bin_bytes"] == coreml.weight_bin(out / file).stat().st_size
        # executed on Linux by the reference executor, and within fp32 tolerance of torch
        par = a["parity"]
        assert par["verified_with"]["runtime"] == mil_exec.RUNTIME and par["max_abs_error"] <= 1e-4
        assert a["io"]["layout"] == "NCHW" and a["io"]["input_shape"] == [1, 3, TILE, TILE]
    # the weights read back from the sparse package are exactly torch's
    read_back = coreml.read_conv_weights(out / "sparse.mlpackage")
    assert coreml.same_weights(read_back, _convs(model))


def test_manifest(converted):
    m, out = converted["manifest"], converted["out"]
    assert read_json(out / "manifest.json") == m
    assert m["kind"] == "convert" and m["model"] == "t" and m["scale"] == 2
    assert m["source"] == {
        "kind": "edgesr checkpoint",
        "checkpoint": str(converted["ckpt"]),
        "sha256": sha256(converted["ckpt"]),
        "psnr_y_db": None,
        "test_set": None,
        "degradation": None,
    }
    assert m["io"] == {
        "layout": "NHWC",
        "dtype": "float32",
        "range": [0, 1],
        "input_shape": [1, TILE, TILE, 3],
        "output_shape": [1, 2 * TILE, 2 * TILE, 3],
    }
    assert m["tile"]["height"] == m["tile"]["width"] == TILE
    assert [a["file"] for a in m["artifacts"]] == [
        "dense.tflite",
        "sparse.tflite",
        "dense.mlpackage",
        "sparse.mlpackage",
    ]
    assert m["formats"] == ["tflite", "coreml"] and m["precisions"] == ["fp32"] and m["skipped"] == []
    assert m["ops"]["aten.conv2d"] == 14 and m["ops"]["aten.pixel_shuffle"] == 1
    for a in m["artifacts"]:
        assert a["precision"] == "fp32" and a["encoding"] in a["file"] and a["sha256"] == sha256(out / a["file"])
        assert a["size_bytes"] == size_bytes(out / a["file"])
        assert set(WEIGHT_KEYS) <= set(a["weights"]) and 0 < a["weights"]["weight_bytes"] < a["size_bytes"]
        assert {"reference", "max_abs_error", "psnr_db", "tolerance", "verified_with"} <= set(a["parity"])
    assert {"torch", "litert-torch", "ai-edge-litert", "coremltools"} <= set(m["versions"])
    assert sorted(p.name for p in out.iterdir()) == sorted([a["file"] for a in m["artifacts"]] + ["manifest.json"])


def test_weight_counts_and_bound(converted):
    distinct = {w.tobytes(): w for w in _convs(converted["model"])}.values()
    for a in converted["manifest"]["artifacts"]:
        w = a["weights"]
        assert w["bound_bytes"] == w["nonzeros"] * 4 + math.ceil(w["conv_weights"] / 8)  # fp32 values + 1 bit
        if a["encoding"] == "sparse":  # how close to the bound is the benchmark's (benchmarks/sparse_encoding.py)
            dense = next(d for d in converted["manifest"]["artifacts"] if d["file"] == f"dense{Path(a['file']).suffix}")
            assert w["weight_bytes"] <= 0.35 * dense["weights"]["weight_bytes"], a["file"]
        convs = distinct if a["format"] == "tflite" else _convs(converted["model"])
        assert w["conv_weights"] == sum(x.size for x in convs)
        assert w["nonzeros"] == sum(int(np.count_nonzero(x)) for x in convs)


def _edsr_radius(model: nn.Module) -> int:
    """From the architecture: each k x k conv at LR resolution adds k//2; the last conv runs at HR resolution."""
    lr_convs = [
        m for part in (model.head, model.body, model.tail[0]) for m in part.modules() if isinstance(m, nn.Conv2d)
    ]
    hr_conv, scale = model.tail[1], model.config.scale
    radius = sum(c.kernel_size[0] // 2 for c in lr_convs) + math.ceil((hr_conv.kernel_size[0] // 2) / scale)
    return max(radius, 1 if model.config.bilinear_skip else 0)  # bilinear x2 reads LR pixels at distance <= 1


def test_receptive_field(converted):
    model = converted["model"]
    expected = _edsr_radius(model)
    assert expected == 12
    assert converted["manifest"]["tile"]["receptive_field_radius"] == expected
    assert converted["manifest"]["tile"]["overlap"] == expected + 1


class _Bilinear(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("model", "radius"),
    [
        (nn.Sequential(nn.Conv2d(3, 12, 5, padding=2), nn.PixelShuffle(2)), 2),
        (
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 27, 3, padding=1), nn.PixelShuffle(3)),
            2,
        ),
        (_Bilinear(), 1),
        (create_model("edsr-tiny", 2, bilinear_skip=False, n_resblocks=1), 6),
    ],
)
def test_receptive_field_of_other_models(model, radius):
    assert receptive_field_radius(model) == radius


def test_parity_failure_is_one_line():
    ref = np.zeros((1, 4, 4, 3), dtype=np.float32)
    out = ref.copy()
    out[0, 1, 1, 0] = 0.01
    with pytest.raises(CheckFailed) as err:
        check("dense.tflite", "fp32 output", out, ref, Tolerance(max_abs_error=1e-4), "monarch")
    assert "dense.tflite" in str(err.value) and "0.01" in str(err.value) and "\n" not in str(err.value)
    record = check("dense.tflite", "fp32 output", out, ref, Tolerance(max_abs_error=0.02), "monarch")
    assert record["max_abs_error"] == pytest.approx(0.01) and record["tolerance"]["max_abs_error"] == 0.02


def test_bad_inputs_write_nothing(converted, tmp_path):
    ckpt = converted["ckpt"]
    with pytest.raises(BadInput, match="unknown format 'onnx'"):
        parse_formats("tflite,onnx")
    with pytest.raises(BadInput, match="unknown precision 'int4'; known: fp32, fp16, int8-dynamic, int8, lut1"):
        parse_precisions("fp32,int4")
    assert parse_precisions(" FP16,int8 ,fp16") == ("fp16", "int8") and len(PRECISIONS) == 12
    with pytest.raises(BadInput, match="must be larger than 2 x overlap = 26"):
        convert_checkpoint(ckpt, tmp_path / "small", formats=("tflite",), tile=26)
    with pytest.raises(BadInput, match="does not exist"):
        convert_checkpoint(ckpt, tmp_path / "no" / "such", formats=("tflite",), tile=TILE)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a folder"):
        convert_checkpoint(ckpt, tmp_path / "file", formats=("tflite",), tile=TILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_cli_bad_checkpoint_exit_2(converted, tmp_path, case):
    ckpt = tmp_path / "model.pt"
    if case == "truncated":
        data = converted["ckpt"].read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    res = run_module("convert", "--checkpoint", ckpt, "--out", out, "--tile", TILE, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(ckpt) in lines[0], res.stderr
    assert not out.exists()


def test_cli_parity_failure_exit_1_keeps_out_dir_as_it_was(tmp_path):
    # Weights scaled up 1e4 make fp32 rounding differences between XNNPACK and torch exceed the 1e-4 tolerance.
    torch.manual_seed(0)
    model = create_model("edsr-tiny", 2, n_resblocks=1, n_feats=8)
    with torch.no_grad():
        model.tail[1].weight.mul_(1e4)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"name": "loud"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--formats", "tflite", "--tile", "32"]
    assert run_cli(main, argv) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unpruned_model_gets_no_sparse_artifacts(tmp_path):
    """Nothing worth encoding: no sparse file that merely duplicates (or outgrows) the dense one."""
    torch.manual_seed(1)
    model = create_model("edsr-tiny", scale=2, n_resblocks=1, n_feats=8)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"name": "dense"})
    manifest = convert_checkpoint(ckpt, tmp_path / "out", formats=("tflite",), tile=32)
    assert [a["file"] for a in manifest["artifacts"]] == ["dense.tflite"]
    assert [s["file"] for s in manifest["skipped"]] == ["sparse.tflite"]
    assert not (tmp_path / "out" / "sparse.tflite").exists()


@pytest.mark.slow
def test_every_precision_of_a_small_model(tmp_path):
    """fp32 .. lut4 through both formats: each file named for its precision, verified within its tolerance;
    a precision a format cannot build is listed under skipped with the reason."""
    torch.manual_seed(0)
    model = create_model("edsr-tiny", 2, n_resblocks=1, n_feats=16)
    prune_once(model, 0.8)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"name": "small"})
    precisions = ("fp32", "fp16", "int8-dynamic", "int8", "lut4")
    m = convert_checkpoint(ckpt, tmp_path / "out", formats=("tflite", "coreml"), tile=32, precisions=precisions)
    arts = {a["file"]: a for a in m["artifacts"]}
    not_written = {s["file"] for s in m["skipped"] if "file" in s}
    for ext, suffixes in (("tflite", ("int8-dynamic", "int8")), ("mlpackage", ("int8", "lut4"))):
        for suffix in ("", "-fp16", *(f"-{p}" for p in suffixes)):
            dense, sparse = f"dense{suffix}.{ext}", f"sparse{suffix}.{ext}"
            # every buildable precision has its dense file, and its sparse file or the reason it has none
            assert dense in arts and (sparse in arts) != (sparse in not_written), suffix
    assert "sparse.tflite" in arts and "sparse.mlpackage" in arts and "sparse-lut4.mlpackage" in arts
    assert len(arts) + len(not_written) == 16
    assert m["precisions"] == list(precisions)
    skipped = {(s["format"], s["precision"]): s["reason"] for s in m["skipped"] if "file" not in s}
    assert set(skipped) == {("tflite", "lut4"), ("coreml", "int8-dynamic")}
    assert "palettized" in skipped[("tflite", "lut4")] and "Core ML" in skipped[("coreml", "int8-dynamic")]
    out = tmp_path / "out"
    for name, a in arts.items():
        expected_precision = (
            "fp32" if name.split(".")[0] in ("dense", "sparse") else name.split(".")[0].split("-", 1)[1]
        )
        assert a["precision"] == expected_precision and a["sha256"] == sha256(out / name)
        par, tol = a["parity"], a["parity"]["tolerance"]
        if tol.get("max_abs_error") is not None:
            assert par["max_abs_error"] <= tol["max_abs_error"], name
        if tol.get("psnr_db_min") is not None:
            assert par["psnr_db"] is None or par["psnr_db"] >= tol["psnr_db_min"], name
        assert a["weights"]["nonzeros"] <= a["weights"]["conv_weights"]
    # smaller values, smaller files
    assert arts["dense-int8.tflite"]["size_bytes"] < arts["dense-fp16.tflite"]["size_bytes"]
    assert arts["dense-fp16.tflite"]["size_bytes"] < arts["dense.tflite"]["size_bytes"]
    assert (
        arts["sparse-lut4.mlpackage"]["weights"]["weight_bytes"] < arts["sparse.mlpackage"]["weights"]["weight_bytes"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*arts, "manifest.json"])
