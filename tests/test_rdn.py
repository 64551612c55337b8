"""RDN presets: shapes at every scale, the idealo ISR psnr-small parameter count, registry and width overrides."""

import json

import pytest
import torch
from torch import nn

from compress.models import build_from_spec, create_model, default_sparse_layers, list_models, model_spec
from compress.models.shapes import apply_shapes, record_shapes, resize_tensor
from compress.pruning.gates import select_layers
from edgesr.errors import BadInput

# idealo ISR psnr-small (rdn-C3-D10-G64-G064-x2) as shipped in @upscalerjs/models 0.9.0: 2,619,635 parameters
# (research/data.md, counted from the .h5). Our rdn-small x2 must have exactly that many.
ISR_PSNR_SMALL_PARAMS = 2_619_635


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("upscaling", ["shuffle", "nearest"])
def test_output_shape(scale, upscaling):
    model = create_model("rdn-tiny", scale=scale, upscaling=upscaling)
    y = model(torch.rand(1, 3, 10, 12))
    assert y.shape == (1, 3, 10 * scale, 12 * scale)


def test_rdn_small_is_isr_psnr_small():
    model = create_model("rdn-small", scale=2)
    cfg = model.config
    assert (cfg.C, cfg.D, cfg.G, cfg.G0, cfg.upscaling) == (3, 10, 64, 64, "nearest")
    assert n_params(model) == ISR_PSNR_SMALL_PARAMS
    # Dense connectivity: conv c of a block reads G0 + c*G channels; the local fusion reads G0 + C*G.
    block = model.rdbs[0]
    assert [c.in_channels for c in block.convs] == [64, 128, 192] and block.lff.in_channels == 256
    assert model.gff[0].in_channels == 10 * 64
    # With PixelShuffle the SR conv reads 3 channels instead of 3*s^2: only that conv's weights differ.
    shuffle = create_model("rdn-small", scale=2, upscaling="shuffle")
    assert ISR_PSNR_SMALL_PARAMS - n_params(shuffle) == (12 - 3) * 3 * 3 * 3


def test_registry():
    assert {"edsr-8-128", "edsr-baseline", "edsr-tiny", "rdn-tiny", "rdn-small"} <= set(list_models())
    model = create_model("rdn-tiny", scale=3)
    assert model_spec(model)["arch"] == "rdn"
    assert default_sparse_layers(model) == ["rdbs.*"]
    cfg = model.config
    assert len(select_layers(model, "default")) == cfg.D * (cfg.C + 1)
    with pytest.raises(BadInput, match="upscaling must be one of shuffle, nearest"):
        create_model("rdn-tiny", upscaling="bicubic")
    with pytest.raises(BadInput, match="scale must be 2, 3 or 4"):
        create_model("rdn-tiny", scale=8)


def test_recorded_shapes_rebuild_a_narrowed_model_and_bad_shapes_are_refused():
    model = create_model("rdn-tiny", scale=2)
    conv = model.rdbs[0].convs[0]
    resize_tensor(conv, "weight", (5, 32, 3, 3))
    resize_tensor(conv, "bias", (5,))
    conv.out_channels = 5
    shapes = record_shapes(model)
    assert shapes["rdbs.0.convs.0"] == {
        "type": "Conv2d",
        "attrs": {"in_channels": 32, "out_channels": 5, "groups": 1},
        "tensors": {"weight": [5, 32, 3, 3], "bias": [5]},
    }
    rebuilt = build_from_spec(model_spec(model))
    apply_shapes(rebuilt, json.loads(json.dumps(shapes)))  # as a manifest carries them
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.rdbs[0].convs[0].out_channels == 5
    with pytest.raises(BadInput, match="recorded shapes name module 'nope'"):
        apply_shapes(build_from_spec(model_spec(model)), {"nope": shapes["rdbs.0.convs.0"]})
    with pytest.raises(BadInput, match="module 'f_m1' is a Conv2d in the rebuilt model, the checkpoint recorded a"):
        apply_shapes(build_from_spec(model_spec(model)), {"f_m1": {**shapes["f_m1"], "type": "Linear"}})
