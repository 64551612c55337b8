"""Every topology of tests/topology_models.py converts end to end, through `python -m convert` as a user runs it.

Per topology (module-scoped, so each model converts once): seeded weights saved with torch.save go through
`--model tests/topology_models.py:<factory> --weights` to fp32 TFLite and Core ML at a 32 x 32 tile, and the same
model saved with torch.export.save goes through `--checkpoint x.pt2` to TFLite; the two subprocesses run side by
side. The tests then read the manifests and run the files themselves: TFLite in ai_edge_litert, Core ML in the
reference executor, on a crop of a real photo (not the one the pipeline checked), against the ORIGINAL torch
model (not the lowered one) within the fp32 tolerance. They also pin which ops each converter produced, so a
converter upgrade that changes the lowering shows up here. One refusal: a dilated ConvTranspose2d, which nothing
lowers, is exit 2 with one line naming its layer, node and operator, and writes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import topology_models
from conftest import REPO, run_module
from convert import coreml, parity, verify
from convert.sparse_tflite import conv_filter_stats, sparsify_tflite
from convert.tflite import tflite_bytes, tflite_op_counts
from device_bench import mil_exec
from edgesr.manifest import read_json

TILE = 32
SCALE = 2
MODELS = Path(topology_models.__file__).relative_to(REPO)  # tests/topology_models.py, as a user names it
IMAGE = "kodim23"  # the pipeline's own parity check uses monarch

# Per topology: the module lowered (None: nothing), TFLite builtins and Core ML op types that must appear.
EXPECTED: dict[str, tuple[str | None, set[str], set[str]]] = {
    "fsrcnn": ("last", {"CONV_2D", "RELU", "SUB"}, {"conv", "prelu", "pixel_shuffle"}),
    "padded_valid_zero": ("up", {"PAD", "LEAKY_RELU"}, {"pad[constant]", "leaky_relu", "pixel_shuffle"}),
    "padded_valid_reflect": ("up", {"MIRROR_PAD", "LEAKY_RELU"}, {"pad[reflect]", "pixel_shuffle"}),
    "padded_valid_replicate": ("up", {"GATHER_ND", "LEAKY_RELU"}, {"pad[replicate]", "pixel_shuffle"}),
    "srresnet": (None, {"CONV_2D", "ADD"}, {"prelu", "pixel_shuffle"}),
    "imdn": (None, {"SLICE", "MEAN", "SQRT", "LOGISTIC"}, {"split", "slice_by_index", "reduce_mean", "pow", "sqrt"}),
    "interp_nearest": (None, {"RESIZE_NEAREST_NEIGHBOR"}, {"upsample_nearest_neighbor"}),
    "interp_bilinear": (None, {"RESIZE_BILINEAR"}, {"upsample_bilinear"}),
    "separable": (None, {"DEPTHWISE_CONV_2D", "CONV_2D"}, {"conv", "pixel_shuffle"}),
    "rcan": (None, {"MEAN", "LOGISTIC", "MUL"}, {"reduce_mean", "sigmoid", "mul"}),
}
# Global statistics the receptive-field probe holds fixed (the manifest notes that tiling is then approximate).
GLOBAL = {"imdn": ["mean"], "rcan": ["adaptive_avg_pool2d"]}


def _start(*args: object) -> subprocess.Popen:
    """`python -m convert args...` from the repo root, started (not waited for); single-threaded torch, since two
    conversions run at once."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "convert", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{err[-3000:]}"


@pytest.fixture(scope="module", params=list(topology_models.TOPOLOGIES))
def converted(request, tmp_path_factory) -> dict:
    name = request.param
    factory, kwargs = topology_models.TOPOLOGIES[name]
    root = tmp_path_factory.mktemp(name)
    model = topology_models.make(name)
    torch.save(model.state_dict(), root / "weights.pt")
    with torch.no_grad():
        program = torch.export.export(model, (torch.rand(1, 3, TILE, TILE),), strict=False)
    torch.export.save(program, root / "model.pt2")
    out, out_pt2 = root / "out", root / "out_pt2"
    factory_run = _start(
        "--model", f"{MODELS}:{factory}", "--factory-args", json.dumps(kwargs), "--weights", root / "weights.pt",
        "--formats", "tflite,coreml", "--tile", TILE, "--out", out,
    )  # fmt: skip
    pt2_run = _start("--checkpoint", root / "model.pt2", "--formats", "tflite", "--out", out_pt2)
    _finish(factory_run, f"{name} (module:factory)")
    _finish(pt2_run, f"{name} (.pt2)")
    x = parity.parity_tile(TILE, SCALE, image=IMAGE)
    return {
        "name": name,
        "model": model,
        "out": out,
        "out_pt2": out_pt2,
        "manifest": read_json(out / "manifest.json"),
        "manifest_pt2": read_json(out_pt2 / "manifest.json"),
        "x": x,
        "reference": parity.torch_output(model, x),
    }


def _coreml_op_types(path: Path) -> set[str]:
    program = mil_exec.load_program(path)
    out = set()
    for op in mil_exec.operations(program.functions["main"]):
        out.add(f"pad[{op.mode.val}]" if op.op_type == "pad" else op.op_type)
    return out


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def test_fp32_files_compute_the_original_model(converted):
    """dense.tflite (ai_edge_litert) and dense.mlpackage (reference executor) against the original torch model."""
    out, x, ref = converted["out"], converted["x"], converted["reference"]
    tflite_out = parity.run_tflite(out / "dense.tflite", x)
    coreml_out = mil_exec.run_mlpackage(out / "dense.mlpackage", {coreml.INPUT_NAME: x.transpose(0, 3, 1, 2)})
    coreml_out = coreml_out[coreml.OUTPUT_NAME].transpose(0, 2, 3, 1)
    assert ref.shape == (1, SCALE * TILE, SCALE * TILE, 3)
    assert _max_err(tflite_out, ref) <= verify.FP32_MAX_ABS_ERROR
    assert _max_err(coreml_out, ref) <= verify.FP32_MAX_ABS_ERROR
    for a in converted["manifest"]["artifacts"]:
        assert a["precision"] == "fp32" and a["parity"]["max_abs_error"] <= verify.FP32_MAX_ABS_ERROR, a["file"]
        assert a["parity"]["image"] == parity.PARITY_IMAGE


def test_each_converter_gets_the_expected_ops(converted):
    name, out, m = converted["name"], converted["out"], converted["manifest"]
    lowered_module, tflite_ops, coreml_ops = EXPECTED[name]
    got_tflite = tflite_op_counts((out / "dense.tflite").read_bytes())
    got_coreml = _coreml_op_types(out / "dense.mlpackage")
    assert tflite_ops <= set(got_tflite), dict(got_tflite)
    assert coreml_ops <= got_coreml, got_coreml
    assert "TRANSPOSE_CONV" not in got_tflite and "conv_transpose" not in got_coreml
    # the manifest's ops are what the converters were given: no transposed conv is left
    assert "aten.conv_transpose2d" not in m["ops"] and m["ops"]
    if lowered_module is None:
        assert m["lowered"] == [] and m["lowering_check"] is None
    else:
        (record,) = m["lowered"]
        assert record["module"] == lowered_module and record["from"].startswith("ConvTranspose2d(")
        assert record["to"].startswith("Conv2d(") and "PixelShuffle(2)" in record["to"]
        assert record["max_abs_error"] <= 1e-5 and m["lowering_check"]["max_abs_error"] <= 1e-5
    assert m["tile"].get("global_statistics", []) == GLOBAL.get(name, [])


def test_conv_weight_figures_agree_across_formats(converted):
    """Both formats count every conv weight (depthwise and grouped included; a lowered conv as lowered)."""
    model, m = converted["model"], converted["manifest"]
    expected = sum(c.weight.numel() for c in model.modules() if isinstance(c, nn.Conv2d))
    expected += sum(r["weight_elements"]["to"] for r in m["lowered"])
    dense = {a["format"]: a["weights"] for a in m["artifacts"] if a["encoding"] == "dense"}
    assert dense["tflite"]["conv_weights"] == dense["coreml"]["conv_weights"] == expected
    assert dense["tflite"]["nonzeros"] == dense["coreml"]["nonzeros"]


def test_exported_program_converts_too(converted):
    m, out = converted["manifest_pt2"], converted["out_pt2"]
    assert m["source"]["kind"] == "torch.export" and m["tile"]["height"] == TILE
    assert [r["module"] for r in m["lowered"]] == [r["module"] for r in converted["manifest"]["lowered"]]
    assert m["tile"]["receptive_field_radius"] == converted["manifest"]["tile"]["receptive_field_radius"]
    got = parity.run_tflite(out / "dense.tflite", converted["x"])
    assert _max_err(got, converted["reference"]) <= verify.FP32_MAX_ABS_ERROR


def test_pruned_depthwise_and_grouped_filters_are_sparse_encoded(tmp_path):
    """The sparse rewrite takes DEPTHWISE_CONV_2D filters as well as (grouped) CONV_2D ones: counted, encoded,
    and the sparse file computes bit for bit what the dense one does."""
    model = topology_models.make("separable")
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight[conv.weight.abs() < conv.weight.abs().flatten().quantile(0.7)] = 0
    dense = tflite_bytes(model, 16)
    sparse, stats = sparsify_tflite(dense)
    weights = [c.weight for c in model.modules() if isinstance(c, nn.Conv2d)]
    assert stats.conv_weights == conv_filter_stats(dense).conv_weights == sum(w.numel() for w in weights)
    assert stats.nonzeros == sum(int(w.count_nonzero()) for w in weights)
    assert stats.sparse_tensors == len(weights)  # depthwise (1x3x3x16) and grouped (16x3x3x8) filters included
    ops = tflite_op_counts(sparse)
    assert ops["DENSIFY"] == len(weights) and ops["DEPTHWISE_CONV_2D"] == 2
    x = parity.parity_tile(16, SCALE, image=IMAGE)
    for delegate in (parity.XNNPACK, parity.BUILTIN):
        outputs = []
        for i, data in enumerate((dense, sparse)):
            (tmp_path / f"{i}.tflite").write_bytes(data)
            outputs.append(parity.run_tflite(tmp_path / f"{i}.tflite", x, delegate))
        assert verify.bit_identical(*outputs), delegate
        assert _max_err(outputs[0], parity.torch_output(model, x)) <= verify.FP32_MAX_ABS_ERROR


DILATED = textwrap.dedent(
    """
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 3, 3, stride=2, padding=2, output_padding=1, dilation=2)

        def forward(self, x):
            return self.up(self.head(x))


    def build():
        return Net()
    """
)


def test_an_op_nobody_handles_is_refused_in_one_line(tmp_path):
    py = tmp_path / "dilated.py"
    py.write_text(DILATED)
    namespace: dict = {}
    exec(compile(DILATED, str(py), "exec"), namespace)
    torch.save(namespace["build"]().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    res = run_module("convert", "--model", f"{py}:build", "--weights", tmp_path / "w.pt", "--out", out, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith(f"error: {py}:build ({tmp_path / 'w.pt'}): unsupported operators"), lines[0]
    assert "aten.conv_transpose2d in up (ConvTranspose2d) [node conv_transpose2d]: dilation (2, 2)" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
