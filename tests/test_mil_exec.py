"""device_bench.mil_exec: the numpy executor runs real saved .mlpackages and matches torch.

Models: the shipped edsr-tiny x2 checkpoint pruned in memory to 80 %, edsr-tiny x4 (random init, 50 %), rdn-tiny x2
(random init, 80 %; concats) and a user-style module (conv, ReLU, PixelShuffle) like a `module:factory` model.
Each is converted by coremltools and compressed as the artifacts are: dense, sparse, sparse + int8 and sparse +
4-bit palette (iOS18 joint compression), plus dense int8 / palette (iOS16 ops) for the checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from compress.models import create_model
from compress.pruning.methods.magnitude import prune_once
from conftest import REPO
from convert import coreml
from convert.coreml_artifacts import torch_with_weights
from device_bench import mil_exec
from edgesr.errors import BadInput

TILE = 16


class UserSR(nn.Module):
    """What a user brings through module:factory: a plain conv / ReLU / PixelShuffle x2 network."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(24, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.body(x))


def _prune(model: nn.Module, target: float) -> nn.Module:
    prune_once(model, target)
    return model.eval()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "edsr-tiny-x2-ckpt":
        model, _ = load_checkpoint(REPO / "checkpoints/edsr-tiny-x2/model.pt")
        return _prune(model, 0.8)
    if name == "edsr-tiny-x4":
        return _prune(create_model("edsr-tiny", 4), 0.5)
    if name == "rdn-tiny-x2":
        return _prune(create_model("rdn-tiny", 2), 0.8)
    return _prune(UserSR(), 0.8)


def _variants(model: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[object, dict]]:
    """variant -> (compressed mlmodel, uncompressed conv weights by op name)."""
    out = {}
    ios16, ios18 = coreml.convert_coreml(model, TILE, "iOS16"), coreml.convert_coreml(model, TILE, "iOS18")
    w16, w18 = dict(coreml.conv_weight_consts(ios16)), dict(coreml.conv_weight_consts(ios18))
    for name in names:
        if name == "dense":
            out[name] = (ios16, w16)
        elif name == "sparse":
            out[name] = (coreml.sparsify_coreml(ios16, 0.0), w16)
        elif name == "dense-int8":
            out[name] = (coreml.quantize_int8(ios16), w16)
        elif name == "dense-lut4":
            out[name] = (coreml.palettize(ios16, 4), w16)
        elif name == "sparse-int8":
            out[name] = (coreml.quantize_int8(coreml.sparsify_coreml(ios18, 0.0, 8), joint=True), w18)
        elif name == "sparse-lut4":
            out[name] = (coreml.palettize(coreml.sparsify_coreml(ios18, 0.0, 4), 4, joint=True), w18)
    return out


EXPECTED_OPS = {
    "sparse": {"constexpr_sparse_to_dense"},
    "dense-int8": {"constexpr_affine_dequantize"},
    "dense-lut4": {"constexpr_lut_to_dense"},
    "sparse-int8": {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    "sparse-lut4": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
}
CASES = {
    "edsr-tiny-x2-ckpt": ("dense", "sparse", "dense-int8", "dense-lut4", "sparse-int8", "sparse-lut4"),
    "edsr-tiny-x4": ("dense", "sparse", "sparse-int8", "sparse-lut4"),
    "rdn-tiny-x2": ("dense", "sparse", "sparse-int8", "sparse-lut4"),
    "user-module": ("dense", "sparse", "sparse-int8", "sparse-lut4"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_executor_matches_torch(name, tmp_path):
    model = _model(name)
    x = np.random.default_rng(3).random((1, 3, TILE, TILE), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    torch_convs = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, nn.Conv2d)]
    for variant, (mlmodel, original) in _variants(model, CASES[name]).items():
        path = coreml.save_mlpackage(mlmodel, tmp_path / f"{variant}.mlpackage")
        program = mil_exec.load_program(path)
        op_types = {op.op_type for op in mil_exec.operations(program.functions["main"])}
        assert EXPECTED_OPS.get(variant, set()) <= op_types, (variant, op_types)
        if name == "rdn-tiny-x2":
            assert "concat" in op_types
        out = mil_exec.run_program(program, {coreml.INPUT_NAME: x})[coreml.OUTPUT_NAME]
        assert out.shape == reference.shape and out.dtype == np.float32
        if variant in ("dense", "sparse"):
            # fp32 weights stored exactly: the executor is torch up to float rounding
            assert np.max(np.abs(out - reference)) <= 1e-4, (variant, np.max(np.abs(out - reference)))
            weights = [w.value for w in mil_exec.conv_weights(program)]
            assert coreml.same_weights(weights, torch_convs)
        else:
            # lossy weights: torch with the file's dequantized weights is what the executor must reproduce
            clone, replaced = torch_with_weights(model, original, path)
            assert replaced == len(torch_convs)
            with torch.no_grad():
                expected = clone(torch.from_numpy(x)).numpy()
            assert np.max(np.abs(out - expected)) <= 1e-4, (variant, np.max(np.abs(out - expected)))
            assert np.max(np.abs(out - reference)) > 1e-6  # the weights really are quantized
        # our decoders agree with coremltools' own for every compressed weight
        for op in mil_exec.operations(program.functions["main"]):
            if op.op_type == "conv" and op.weight.op.op_type.startswith("constexpr_"):
                ours = mil_exec.materialized_weights(path)[op.name]
                assert np.array_equal(ours, np.asarray(op.weight.op.materialized_val_inference()))


def test_fp16_program_rounds_activations(tmp_path):
    model = _model("user-module")
    path = coreml.save_mlpackage(coreml.convert_coreml(model, TILE, compute_precision="fp16"), tmp_path / "h.mlpackage")
    x = np.random.default_rng(4).random((1, 3, TILE, TILE), dtype=np.float32)
    out = mil_exec.run_mlpackage(path, {"lr": x})["sr"]
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    err = np.max(np.abs(out - reference))
    assert out.dtype == np.float32 and 1e-6 < err < 1e-2  # fp16 rounding, nothing worse


class KitchenSink(nn.Module):
    """More ops a user model may have: stride-2 / grouped / dilated convs, nearest and bilinear resizing,
    leaky ReLU, PReLU, sigmoid, concat, sub, mul, clamp."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.group = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.prelu = nn.PReLU(8)
        self.mix = nn.Conv2d(16, 12, 1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.leaky_relu(self.down(x), 0.2)
        z = self.prelu(self.group(y)) * torch.sigmoid(y)
        y = nn.functional.interpolate(torch.cat([y, z - y], dim=1), scale_factor=2, mode="nearest")
        y = self.shuffle(self.mix(y))
        skip = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return torch.clamp(y + skip, 0.0, 1.0)


def test_more_ops_match_torch(tmp_path):
    torch.manual_seed(1)
    model = KitchenSink().eval()
    path = coreml.save_mlpackage(coreml.convert_coreml(model, TILE), tmp_path / "k.mlpackage")
    program = mil_exec.load_program(path)
    op_types = {op.op_type for op in mil_exec.operations(program.functions["main"])}
    assert {"upsample_nearest_neighbor", "upsample_bilinear", "concat", "leaky_relu", "sigmoid"} <= op_types
    x = np.random.default_rng(5).random((1, 3, TILE, TILE), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    out = mil_exec.run_program(program, {"lr": x})["sr"]
    assert np.max(np.abs(out - reference)) <= 1e-4


def test_unknown_op_is_named(tmp_path):
    class Wavy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(self.conv(x))

    path = coreml.save_mlpackage(coreml.convert_coreml(Wavy(), TILE), tmp_path / "wavy.mlpackage")
    program = mil_exec.load_program(path)
    sin = next(op for op in mil_exec.operations(program.functions["main"]) if op.op_type == "sin")
    with pytest.raises(mil_exec.UnsupportedOp) as err:
        mil_exec.run_mlpackage(path, {"lr": np.zeros((1, 3, TILE, TILE), np.float32)})
    message = str(err.value)
    assert "'sin'" in message and f"'{sin.outputs[0].name}'" in message and str(path) in message
    assert isinstance(err.value, BadInput) and "\n" not in message


def test_bad_inputs_are_one_line_errors(tmp_path):
    path = coreml.save_mlpackage(coreml.convert_coreml(UserSR().eval(), TILE), tmp_path / "u.mlpackage")
    with pytest.raises(BadInput, match="input 'lr' has shape"):
        mil_exec.run_mlpackage(path, {"lr": np.zeros((1, 3, TILE + 1, TILE), np.float32)})
    with pytest.raises(BadInput, match="missing inputs lr"):
        mil_exec.run_mlpackage(path, {})
    with pytest.raises(BadInput, match="not a .mlpackage"):
        mil_exec.load_program(tmp_path)


def test_pixel_shuffle_and_depth_to_space_orders():
    """pixel_shuffle is torch's order, depth_to_space TensorFlow's DCR order; both checked against references."""
    x = np.arange(2 * 8 * 2 * 3, dtype=np.float32).reshape(2, 8, 2, 3)
    ps = mil_exec._pixel_shuffle(None, {"x": x, "upscale_factor": 2}.__getitem__)
    assert np.array_equal(ps, nn.functional.pixel_shuffle(torch.from_numpy(x), 2).numpy())
    un = mil_exec._pixel_unshuffle(None, {"x": ps, "downscale_factor": 2}.__getitem__)
    assert np.array_equal(un, x)
    d2s = mil_exec._depth_to_space(None, {"x": x, "block_size": 2}.__getitem__)
    tf_ref = np.zeros_like(d2s)  # TF: out[n, c, h*b+i, w*b+j] = in[n, (i*b+j)*C' + c, h, w]
    for i in range(2):
        for j in range(2):
            tf_ref[:, :, i::2, j::2] = x[:, (i * 2 + j) * 2 : (i * 2 + j) * 2 + 2]
    assert np.array_equal(d2s, tf_ref)
    s2d = mil_exec._space_to_depth(None, {"x": d2s, "block_size": 2}.__getitem__)
    assert np.array_equal(s2d, x)
