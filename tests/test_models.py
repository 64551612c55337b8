"""EDSR presets, shapes at every scale, and EDSR-PyTorch's official key layout."""

import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.models import build_from_spec, create_model, list_models, model_spec
from edgesr.errors import BadInput


def official_keys(n_resblocks: int, scale: int) -> list[str]:
    """Key names of sanghyun-son/EDSR-PyTorch src/model/edsr.py, written out independently of our model."""
    keys = ["sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias", "head.0.weight", "head.0.bias"]
    for i in range(n_resblocks):
        keys += [f"body.{i}.body.0.weight", f"body.{i}.body.0.bias", f"body.{i}.body.2.weight", f"body.{i}.body.2.bias"]
    keys += [f"body.{n_resblocks}.weight", f"body.{n_resblocks}.bias"]
    ups = ["tail.0.0", "tail.0.2"] if scale == 4 else ["tail.0.0"]
    keys += [f"{u}.{t}" for u in ups for t in ("weight", "bias")] + ["tail.1.weight", "tail.1.bias"]
    return keys


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_key_layout_and_output_shape(scale):
    model = create_model("edsr-baseline", scale=scale, n_resblocks=2)
    assert sorted(model.state_dict()) == sorted(official_keys(2, scale))
    y = model(torch.rand(1, 3, 10, 12))
    assert y.shape == (1, 3, 10 * scale, 12 * scale)


def test_presets():
    assert list_models() == ["edsr-8-128", "edsr-baseline", "edsr-tiny", "rdn-small", "rdn-tiny"]
    base = create_model("edsr-baseline")
    assert (base.config.n_resblocks, base.config.n_feats) == (16, 64)
    assert sum(p.numel() for p in base.parameters() if p.requires_grad) == 1_369_859  # EDSR-baseline x2: 1.37 M
    wide = create_model("edsr-8-128")
    assert (wide.config.n_resblocks, wide.config.n_feats) == (8, 128)
    with pytest.raises(BadInput, match="unknown model 'rcan'; known: edsr-8-128"):
        create_model("rcan")
    with pytest.raises(BadInput, match="scale must be 2, 3 or 4"):
        create_model("edsr-tiny", scale=8)


def test_official_state_dict_loads_with_inferred_config(tmp_path):
    torch.manual_seed(0)
    n, c = 3, 16
    shapes = {
        "sub_mean.weight": (3, 3, 1, 1),
        "sub_mean.bias": (3,),
        "add_mean.weight": (3, 3, 1, 1),
        "add_mean.bias": (3,),
        "head.0.weight": (c, 3, 3, 3),
        "head.0.bias": (c,),
        f"body.{n}.weight": (c, c, 3, 3),
        f"body.{n}.bias": (c,),
        "tail.0.0.weight": (9 * c, c, 3, 3),
        "tail.0.0.bias": (9 * c,),
        "tail.1.weight": (3, c, 3, 3),
        "tail.1.bias": (3,),
    }
    for i in range(n):
        for j in (0, 2):
            shapes[f"body.{i}.body.{j}.weight"] = (c, c, 3, 3)
            shapes[f"body.{i}.body.{j}.bias"] = (c,)
    state = {k: torch.randn(s) * 0.05 for k, s in shapes.items()}
    torch.save(state, tmp_path / "edsr_x3.pt")
    model, manifest = load_checkpoint(tmp_path / "edsr_x3.pt")
    cfg = model.config
    assert (cfg.n_resblocks, cfg.n_feats, cfg.scale, cfg.rgb_range) == (n, c, 3, 255.0)
    assert torch.equal(model.state_dict()["tail.0.0.weight"], state["tail.0.0.weight"])
    assert manifest["source"] == "EDSR-PyTorch state dict"
    # A checkpoint of another width must be refused with the offending key named.
    state["head.0.weight"] = torch.randn(c, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BadInput, match=r"'head.0.weight' has shape \(16, 3, 5, 5\)"):
        load_checkpoint(tmp_path / "bad.pt")


def test_edgesr_checkpoint_round_trip(tmp_path):
    model = create_model("edsr-tiny", scale=2)
    path = save_checkpoint(tmp_path / "ck", model, {"name": "ck", "psnr_y_db": 1.0})
    loaded, manifest = load_checkpoint(path)
    assert manifest == {"name": "ck", "psnr_y_db": 1.0}
    assert (tmp_path / "ck" / "manifest.json").is_file()
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    spec = model_spec(model)
    spec["config"]["n_blocks"] = 3
    with pytest.raises(BadInput, match="unknown edsr config keys: n_blocks"):
        build_from_spec(spec)


def test_unreadable_checkpoints(tmp_path):
    model = create_model("edsr-tiny", scale=2)
    path = save_checkpoint(tmp_path / "ck", model, {})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="trunc.pt: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(BadInput, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
