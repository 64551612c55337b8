"""The model intake as convert uses it (compress.intake + convert.ops): any PyTorch SR model in, checked.

Bad inputs go through `python -m convert` as a real subprocess: exit code 2, one line naming the file and the
problem, and nothing left in the output folder.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.intake import ExportedModule, ModelSpec, check_sr_model, load_model, parse_factory_args
from compress.models import create_model
from compress.models.edsr import EDSR, EDSRConfig
from conftest import run_module
from convert import coreml
from convert.ops import SUPPORTED_OPS, check_supported_ops, export_program, op_counts
from device_bench import mil_exec
from edgesr.errors import BadInput
from edgesr.manifest import read_json, sha256

# A user's model file, as someone would write it: plain torch, nothing from edgesr. `Warp` uses grid_sample
# and `Spectral` an FFT, two operators neither converter path supports.
USER_MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Warp(nn.Module):
        def forward(self, x):
            theta = torch.eye(2, 3).unsqueeze(0)
            return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.irfft2(torch.fft.rfft2(x), s=x.shape[-2:])


    class TinySR(nn.Module):
        def __init__(self, feats=8, scale=2, warp=False, spectral=False):
            super().__init__()
            self.head = nn.Conv2d(3, feats, 3, padding=1)
            self.act = nn.PReLU()
            self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.LeakyReLU(0.1))
            self.up = nn.Sequential(nn.Conv2d(feats, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
            self.warp = Warp() if warp else nn.Identity()
            self.spectral = Spectral() if spectral else nn.Identity()

        def forward(self, x):
            y = self.act(self.head(x))
            y = self.up(self.body(y) + y)
            return self.spectral(self.warp(y))


    def build(**kwargs):
        return TinySR(**kwargs)


    def not_a_model():
        return "hello"


    def broken(**kwargs):
        raise ValueError("feats must be even")
    """
)


class Classifier(nn.Module):
    """Not an SR model: an image in, ten scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """user_models.py, weights for build() in several wrappings, a .pt2 of an SR model and of a classifier."""
    root = tmp_path_factory.mktemp("user")
    py = root / "user_models.py"
    py.write_text(USER_MODELS)
    namespace: dict = {}
    exec(compile(USER_MODELS, str(py), "exec"), namespace)  # the same classes, to make weights and references
    torch.manual_seed(0)
    net = namespace["build"](feats=8).eval()
    with torch.no_grad():  # pruned like a user's compressed model: 80 % of each conv's weights are zero
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[m.weight.abs() < m.weight.abs().flatten().quantile(0.8)] = 0
    state = net.state_dict()
    torch.save(state, root / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, root / "wrapped.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, root / "dataparallel.pt")
    torch.save(namespace["build"](feats=4).state_dict(), root / "narrow.pt")
    x = torch.rand(1, 3, 32, 32)
    torch.export.save(torch.export.export(net, (x,), strict=False), root / "static.pt2")
    dims = {"x": {2: torch.export.Dim("h", min=8, max=512), 3: torch.export.Dim("w", min=8, max=512)}}
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=dims, strict=False), root / "dynamic.pt2")
    torch.export.save(torch.export.export(Classifier().eval(), (x,), strict=False), root / "classifier.pt2")
    return {"root": root, "py": py, "net": net, "ns": namespace}


def _factory(user: dict, weights: str, **kwargs) -> ModelSpec:
    return ModelSpec(model=f"{user['py']}:build", weights=user["root"] / weights, factory_args=kwargs)


@pytest.mark.parametrize("weights", ["plain.pt", "wrapped.pt", "dataparallel.pt"])
def test_factory_from_a_py_file_loads_the_weights(user, weights):
    got = load_model(_factory(user, weights))
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(got.model(x), user["net"](x))
    assert got.scale == 2 and got.name == "build" and got.input_size is None and not got.model.training
    assert got.source["kind"] == "module:factory" and got.source["weights"] == str(user["root"] / weights)
    ops = op_counts(export_program(got.model, "user", 32))
    assert ops == {"aten.add": 1, "aten.conv2d": 3, "aten.leaky_relu": 1, "aten.pixel_shuffle": 1, "aten.prelu": 1}


def test_factory_by_module_name_with_args(user, monkeypatch):
    monkeypatch.syspath_prepend(str(user["root"]))
    torch.manual_seed(1)
    net = user["ns"]["build"](feats=6, scale=3).eval()
    torch.save(net.state_dict(), user["root"] / "x3.pt")
    got = load_model(
        ModelSpec(model="user_models:build", weights=user["root"] / "x3.pt", factory_args={"feats": 6, "scale": 3})
    )
    assert got.scale == 3 and got.source["factory_args"] == {"feats": 6, "scale": 3}
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(got.model(x), net(x))


def test_weights_that_do_not_match_the_factory(user):
    with pytest.raises(BadInput) as err:
        load_model(_factory(user, "narrow.pt"))
    msg = str(err.value)
    assert msg.startswith(f"{user['root'] / 'narrow.pt'}: weights do not match the model (")
    assert "'head.weight' has shape (4, 3, 3, 3), the model expects (8, 3, 3, 3)" in msg
    # missing and unexpected keys are named too (first few)
    torch.save({"head.weight": torch.zeros(8, 3, 3, 3), "extra.weight": torch.zeros(1)}, user["root"] / "keys.pt")
    with pytest.raises(
        BadInput, match=r"missing act.weight, body.0.bias, body.0.weight \(\+3 more\); unexpected extra"
    ):
        load_model(_factory(user, "keys.pt"))


def test_unsupported_operators_are_named_with_their_layers(user):
    got = load_model(_factory(user, "plain.pt", warp=True, spectral=True))
    with pytest.raises(BadInput) as err:
        check_supported_ops(export_program(got.model, "user", 32), "user")
    msg = str(err.value)
    assert "unsupported operators for TFLite/Core ML conversion" in msg and "\n" not in msg
    assert "aten.grid_sampler in warp (Warp)" in msg or "aten.grid_sampler_2d in warp (Warp)" in msg
    assert "aten.fft_rfft2 in spectral (Spectral)" in msg and "aten.fft_irfft2 in spectral (Spectral)" in msg
    assert "conv2d" not in msg and "pixel_shuffle" not in msg  # only what is unsupported
    assert {"aten.conv2d", "aten.pixel_shuffle", "aten.upsample_bilinear2d", "aten.cat"} <= SUPPORTED_OPS


def test_exported_programs_run_as_modules(user):
    static = load_model(ModelSpec(checkpoint=user["root"] / "static.pt2"))
    dynamic = load_model(ModelSpec(checkpoint=user["root"] / "dynamic.pt2"))
    assert (static.input_size, static.scale, dynamic.input_size, dynamic.scale) == (32, 2, None, 2)
    assert isinstance(static.model, ExportedModule) and static.source["kind"] == "torch.export"
    assert static.model.eval() is static.model and not static.model.training
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = user["net"](x)
        assert torch.allclose(static.model(x), ref, atol=1e-6) and torch.allclose(dynamic.model(x), ref, atol=1e-6)
        assert dynamic.model(torch.rand(1, 3, 20, 20)).shape == (1, 3, 40, 40)


def test_non_sr_exported_program(user):
    path = user["root"] / "classifier.pt2"
    with pytest.raises(BadInput) as err:
        load_model(ModelSpec(checkpoint=path))
    assert str(err.value) == f"{path}: not a super-resolution model: output (1, 10) for input (1, 3, 32, 32)"


def test_sr_shape_check():
    assert check_sr_model(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), "same") == 1
    assert check_sr_model(nn.Sequential(nn.Conv2d(3, 48, 1), nn.PixelShuffle(4)), "x4") == 4
    with pytest.raises(BadInput, match=r"^gray: not a super-resolution model: output \(1, 1, 64, 64\) for input"):
        check_sr_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.PixelShuffle(2)), "gray")
    with pytest.raises(BadInput, match=r"^down: not a super-resolution model: output \(1, 3, 16, 16\)"):
        check_sr_model(nn.Conv2d(3, 3, 2, stride=2), "down")


def test_edsr_pytorch_official_and_edgesr_checkpoints(tmp_path):
    torch.manual_seed(0)
    official = EDSR(EDSRConfig(n_resblocks=2, n_feats=8, scale=3, rgb_range=255.0))
    torch.save(official.state_dict(), tmp_path / "edsr_x3.pt")  # what EDSR-PyTorch releases: a bare state dict
    got = load_model(ModelSpec(checkpoint=tmp_path / "edsr_x3.pt"))
    assert got.scale == 3 and got.source["kind"] == "EDSR-PyTorch state dict" and got.name == "edsr_x3"
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(got.model(x), official.eval()(x))
    ckpt = save_checkpoint(tmp_path / "ck", create_model("edsr-tiny", 2, n_resblocks=1), {"name": "mine"})
    mine = load_model(ModelSpec(checkpoint=ckpt))
    assert mine.name == "mine" and mine.source["kind"] == "edgesr checkpoint" and mine.scale == 2


def test_official_edsr_large_gets_res_scale_0_1(tmp_path):
    """EDSR-PyTorch's 32 x 256 EDSR is trained with --res_scale 0.1, which its state dict does not record."""
    keys = EDSR(EDSRConfig(n_resblocks=32, n_feats=8, scale=2)).state_dict()  # key layout of 32 blocks
    state = {}
    for k, v in keys.items():  # the same tensors at width 256, cheaply (zeros): only shapes matter here
        shape = [256 if d == 8 else 1024 if d == 32 else d for d in v.shape]
        state[k] = torch.zeros(shape)
    torch.save(state, tmp_path / "edsr_x2.pt")
    model, _ = load_checkpoint(tmp_path / "edsr_x2.pt")
    assert (model.config.n_resblocks, model.config.n_feats, model.config.res_scale) == (32, 256, 0.1)


def test_spec_and_argument_errors(user):
    with pytest.raises(BadInput, match="either --checkpoint FILE or --model"):
        ModelSpec()
    with pytest.raises(BadInput, match="go with --model"):
        ModelSpec(checkpoint=Path("m.pt"), weights=Path("w.pt"))
    with pytest.raises(BadInput, match="--factory-args: not valid JSON"):
        parse_factory_args("{scale: 2}")
    with pytest.raises(BadInput, match="expected a JSON object"):
        parse_factory_args("[2]")
    w = user["root"] / "plain.pt"
    cases = [
        (f"{user['root']}/nope.py:build", "nope.py: no such Python file"),
        ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
        (f"{user['py']}:missing", "has no callable 'missing'"),
        (f"{user['py']}:not_a_model", "returned str, not a torch nn.Module"),
        (f"{user['py']}:broken", "broken(**{}) failed: ValueError: feats must be even"),
        ("justaname", "unknown model 'justaname'; known: edsr-8-128"),
    ]
    for factory, message in cases:
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            load_model(ModelSpec(model=factory, weights=w))
    with pytest.raises(BadInput, match="not a torch.export program"):
        load_model(ModelSpec(checkpoint=_write(user["root"] / "junk.pt2", b"not a zip")))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ CLI, bad inputs


def _assert_one_line_exit_2(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def out_with_user_file(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    return out


def test_cli_unsupported_operator(user, out_with_user_file):
    res = run_module(
        "convert",
        "--model",
        f"{user['py']}:build",
        "--factory-args",
        '{"warp": true}',
        "--weights",
        user["root"] / "plain.pt",
        "--out",
        out_with_user_file,
    )
    _assert_one_line_exit_2(res, "unsupported operators", "grid_sampler", "in warp (Warp)")
    assert _leftovers(out_with_user_file) == ["keep.txt"]


def test_cli_checkpoint_not_matching_the_factory(user, out_with_user_file):
    weights = user["root"] / "narrow.pt"
    res = run_module("convert", "--model", f"{user['py']}:build", "--weights", weights, "--out", out_with_user_file)
    _assert_one_line_exit_2(res, f"{weights}: weights do not match the model", "'head.weight' has shape (4, 3, 3, 3)")
    assert _leftovers(out_with_user_file) == ["keep.txt"]


def test_cli_non_sr_pt2(user, tmp_path):
    path, out = user["root"] / "classifier.pt2", tmp_path / "out"
    res = run_module("convert", "--checkpoint", path, "--out", out)
    line = _assert_one_line_exit_2(res)
    assert line == f"error: {path}: not a super-resolution model: output (1, 10) for input (1, 3, 32, 32)"
    assert not out.exists()


def test_cli_static_pt2_with_another_tile(user, tmp_path):
    res = run_module("convert", "--checkpoint", user["root"] / "static.pt2", "--tile", 48, "--out", tmp_path / "o")
    _assert_one_line_exit_2(res, "exported for a 32x32 input, so the tile must be 32, not 48")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nobody can write into: a read-only bind mount when we are root (root ignores mode bits),
    mode 0555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("user file")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("where", ["into it", "below it"])
def test_cli_unwritable_output_folder(read_only_folder, where):
    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / "edsr-tiny-x2" / "model.pt"
    out = read_only_folder if where == "into it" else read_only_folder / "new"
    assert not os.access(read_only_folder, os.W_OK)
    res = run_module("convert", "--checkpoint", ckpt, "--out", out)
    expected = "output folder is not writable" if where == "into it" else f"{read_only_folder} is not writable"
    _assert_one_line_exit_2(res, str(out), expected)
    assert _leftovers(read_only_folder) == ["keep.txt"]


# ------------------------------------------------------------------------------------------ end to end


def _run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def _check_files_compute_the_net(out: Path, net: nn.Module, tile: int) -> dict:
    """Every artifact in `out` runs (TFLite in ai_edge_litert, Core ML in the reference executor) and computes
    what the user's torch module computes on an input of our own, within fp32 tolerance."""
    m = read_json(out / "manifest.json")
    x = np.random.default_rng(3).random((1, tile, tile, 3), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert [a["file"] for a in m["artifacts"]] == [
        "dense.tflite",
        "sparse.tflite",
        "dense.mlpackage",
        "sparse.mlpackage",
    ]
    for a in m["artifacts"]:
        if a["format"] == "tflite":
            y = _run_tflite(out / a["file"], x).transpose(0, 3, 1, 2)
        else:
            (y,) = mil_exec.run_mlpackage(out / a["file"], {coreml.INPUT_NAME: x.transpose(0, 3, 1, 2)}).values()
        assert y.shape == ref.shape and np.max(np.abs(y - ref)) <= 1e-4, a["file"]
        assert a["parity"]["max_abs_error"] <= 1e-4 and a["weights"]["nonzeros"] < a["weights"]["conv_weights"]
    assert sorted(p.name for p in out.iterdir()) == sorted([a["file"] for a in m["artifacts"]] + ["manifest.json"])
    return m


def test_cli_factory_model_end_to_end(user, tmp_path):
    out = tmp_path / "out"
    weights = user["root"] / "wrapped.pt"
    res = run_module(
        "convert",
        "--model",
        f"{user['py']}:build",
        "--factory-args",
        '{"feats": 8}',
        "--weights",
        weights,
        "--tile",
        32,
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = _check_files_compute_the_net(out, user["net"], 32)
    assert m["model"] == "build" and m["scale"] == 2 and m["tile"]["height"] == 32
    assert m["source"]["kind"] == "module:factory" and m["source"]["factory_args"] == {"feats": 8}
    assert m["source"]["sha256"] == sha256(weights)


@pytest.mark.slow
def test_cli_exported_program_end_to_end(user, tmp_path):
    out = tmp_path / "out"
    res = run_module("convert", "--checkpoint", user["root"] / "static.pt2", "--name", "exported", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    m = _check_files_compute_the_net(out, user["net"], 32)  # the tile is the size the program was exported for
    assert m["model"] == "exported" and m["tile"]["height"] == 32 and m["source"]["kind"] == "torch.export"
    assert m["tile"]["receptive_field_radius"] == 3  # three 3x3 convs at LR resolution
