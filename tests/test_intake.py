"""compress.intake: one model intake for every stage, and its bad inputs through the real CLIs.

Each bad input is a real `python -m compress` / `python -m convert` run: exit code 2, one line naming the file or
flag and the problem, and nothing written.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.checkpoint import read_checkpoint, save_checkpoint
from compress.intake import ModelSpec, load_model
from compress.models import create_model
from compress.models.edsr import EDSR, EDSRConfig
from conftest import run_module
from edgesr.errors import BadInput

USER = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, feats=8, flip=False):
            super().__init__()
            self.head = nn.Conv2d(3, feats, 3, padding=1)
            self.up = nn.Sequential(nn.Conv2d(feats, 12, 3, padding=1), nn.PixelShuffle(2))
            self.flip = flip

        def forward(self, x):
            h = torch.relu(self.head(x))
            return self.up(torch.flip(h, dims=[1]) if self.flip else h)


    class OwnKernel(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(12, 3, 3, 3))

        def forward(self, x):
            return torch.pixel_shuffle(torch.nn.functional.conv2d(x, self.kernel, padding=1), 2)


    def build(**kwargs):
        return Net(**kwargs)


    def pretrained():
        torch.manual_seed(3)
        return Net()  # loads its own weights (here: a seeded init stands for them)


    def own_kernel():
        return OwnKernel()


    def broken(**kwargs):
        raise ValueError("feats must be even")


    def not_a_model():
        return "hello"
    """
)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("user")
    (root / "nets.py").write_text(USER)
    ns: dict = {}
    exec(compile(USER, "nets.py", "exec"), ns)
    torch.manual_seed(0)
    net = ns["build"]().eval()
    torch.save(net.state_dict(), root / "w.pt")
    torch.save(ns["build"](feats=4).state_dict(), root / "narrow.pt")
    torch.save({"params_ema": net.state_dict(), "params": {}}, root / "basicsr.pth")
    return {"root": root, "py": root / "nets.py", "net": net, "ns": ns}


def test_factory_without_weights_is_used_as_it_returns(user):
    loaded = load_model(ModelSpec(model=f"{user['py']}:pretrained"))
    torch.manual_seed(3)
    expected = user["ns"]["Net"]().eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expected(x))
    assert loaded.scale == 2 and loaded.trained and loaded.source["weights"] is None
    assert loaded.recipe == {
        "kind": "factory",
        "factory": f"{user['py'].resolve()}:pretrained",
        "factory_args": {},
        "factory_sha256": loaded.recipe["factory_sha256"],
    }


def test_basicsr_weights_and_presets(user):
    loaded = load_model(ModelSpec(model=f"{user['py']}:build", weights=user["root"] / "basicsr.pth"))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), user["net"](x))  # params_ema, not the empty params
    preset = load_model(ModelSpec(model="edsr-tiny", factory_args={"scale": 3}))
    assert preset.scale == 3 and not preset.trained and preset.recipe["kind"] == "preset"


def test_basicsr_edsr_checkpoint_computes_what_edsr_pytorch_computes(tmp_path):
    """BasicSR's EDSR arch (conv_first, body.i.conv1/2, conv_after_body, upsample, conv_last, img_range 255) is
    EDSR-PyTorch's EDSR under other names: the same weights give the same output."""
    torch.manual_seed(0)
    edsr = EDSR(EDSRConfig(n_resblocks=2, n_feats=8, scale=2, rgb_range=255.0)).eval()
    sd = edsr.state_dict()
    basicsr = {"conv_first.weight": sd["head.0.weight"], "conv_first.bias": sd["head.0.bias"]}
    for i in range(2):
        for j, conv in ((0, "conv1"), (2, "conv2")):
            for p in ("weight", "bias"):
                basicsr[f"body.{i}.{conv}.{p}"] = sd[f"body.{i}.body.{j}.{p}"]
    for p in ("weight", "bias"):
        basicsr[f"conv_after_body.{p}"] = sd[f"body.2.{p}"]
        basicsr[f"upsample.0.{p}"] = sd[f"tail.0.0.{p}"]
        basicsr[f"conv_last.{p}"] = sd[f"tail.1.{p}"]
    torch.save({"params": basicsr}, tmp_path / "EDSR_x2.pth")
    ckpt = read_checkpoint(tmp_path / "EDSR_x2.pth")
    assert ckpt.kind == "BasicSR checkpoint" and ckpt.model.config.rgb_range == 255.0
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x), edsr(x), atol=1e-5)
    torch.save({"params": {"conv_first.weight": torch.zeros(1), "rrdb.0.weight": torch.zeros(1)}}, tmp_path / "o.pth")
    with pytest.raises(BadInput, match="BasicSR checkpoint of an architecture edgesr does not build.*--model"):
        read_checkpoint(tmp_path / "o.pth")


def test_pruned_factory_checkpoint_rebuilds_from_another_folder(user, tmp_path, monkeypatch):
    """A checkpoint of a user model stores the factory (resolved) and the shapes: it loads from any cwd."""
    from compress.pruning.coupling import find_groups
    from compress.pruning.slicing import slice_model

    loaded = load_model(ModelSpec(model=f"{user['py']}:build", weights=user["root"] / "w.pt"))
    groups = find_groups(loaded.model)
    head = next(g for g in groups if g.member("head", "out") is not None)
    sliced = slice_model(loaded.model, groups, {head.id: torch.arange(8) % 2 == 0})
    save_checkpoint(tmp_path / "ck", sliced, {"name": "sliced"}, recipe=loaded.recipe)
    monkeypatch.chdir(tmp_path)
    again = load_model(ModelSpec(checkpoint=tmp_path / "ck" / "model.pt"))
    assert again.model.head.out_channels == 4 and again.source["kind"] == "edgesr checkpoint"
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.model(x), sliced(x))
    with pytest.raises(ValueError, match="not an edgesr preset: pass the recipe"):
        save_checkpoint(tmp_path / "no", sliced, {})


def _parent(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "parent", create_model("edsr-tiny", 2, n_resblocks=1, n_feats=8), {})


def bad_cases(user: dict, tmp_path: Path) -> list[tuple[tuple, str]]:
    py = user["py"]
    return [
        (("--model", f"{py}:broken"), f"--model {py}:broken: broken(**{{}}) failed: ValueError: feats must be even"),
        (("--model", f"{py}:not_a_model"), "not_a_model() returned str, not a torch nn.Module"),
        (
            ("--model", f"{py}:build", "--weights", user["root"] / "narrow.pt"),
            "narrow.pt: weights do not match the model ('head.weight' has shape (4, 3, 3, 3), the model expects "
            "(8, 3, 3, 3)",
        ),
        (("--model", f"{py}:build", "--factory-args", "[1]"), "--factory-args: expected a JSON object"),
        (("--model", "edsr-huge"), "unknown model 'edsr-huge'; known: edsr-8-128"),
        (("--checkpoint", tmp_path / "missing.pt"), "missing.pt: no such checkpoint file"),
    ]


def test_bad_models_through_compress_prune(user, tmp_path):
    for model, message in bad_cases(user, tmp_path):
        out = tmp_path / "out"
        r = run_module("compress", "prune", *model, "--method", "magnitude", "--sparsity", "0.5", "--out", out)
        assert r.returncode == 2 and message in r.stderr, (model, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and not out.exists()


def test_bad_models_through_convert(user, tmp_path):
    for model, message in bad_cases(user, tmp_path):
        out = tmp_path / "out"
        r = run_module("convert", *model, "--formats", "tflite", "--out", out)
        assert r.returncode == 2 and message in r.stderr, (model, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and not out.exists()


def test_pruning_refusals_name_the_node_the_op_and_the_flag(user, tmp_path):
    py, out = user["py"], tmp_path / "out"
    flip = ("--model", f"{py}:build", "--factory-args", json.dumps({"flip": True}))
    r = run_module("compress", "prune", *flip, "--method", "channel-l1", "--params", "0.5", "--out", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "cannot follow channels through node 'flip' (call_function flip): unknown channel semantics" in r.stderr
    r = run_module("compress", "prune", "--model", f"{py}:own_kernel", "--sparsity", "0.5", "--out", out)
    assert r.returncode == 2 and "module '' (OwnKernel) owns a 4-D parameter 'kernel'" in r.stderr, r.stderr
    parent = _parent(tmp_path)
    r = run_module("compress", "prune", "--checkpoint", parent, "--method", "channel-l1", "--params", "0.5",
                   "--weight-sparsity", "0.3", "--out", out)  # fmt: skip
    assert r.returncode == 2 and "--weight-sparsity does not apply to --method channel-l1" in r.stderr
    r = run_module("compress", "prune", "--checkpoint", parent, "--sparsity", "0.5", "--sparsit", "0.5", "--out", out)
    assert r.returncode == 2 and "unrecognized arguments: --sparsit" in r.stderr  # no abbreviations
    assert not out.exists()
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(user["net"], (torch.rand(1, 3, 16, 16),)), pt2)
    r = run_module("compress", "prune", "--checkpoint", pt2, "--sparsity", "0.5", "--out", out)
    assert r.returncode == 2 and "a .pt2 is an inference graph and cannot be trained or pruned" in r.stderr
    assert not out.exists()


def test_not_an_sr_model(tmp_path):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "lin.pt")
    with pytest.raises(BadInput, match="lin.pt: not an edgesr checkpoint, an EDSR-PyTorch state dict"):
        load_model(ModelSpec(checkpoint=tmp_path / "lin.pt"))
