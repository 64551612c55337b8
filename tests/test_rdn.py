"""RDN presets: shapes at every scale, the idealo ISR psnr-small parameter count, registry and width overrides."""

import pytest
import torch
from torch import nn

from compress.models import build_from_spec, create_model, default_sparse_layers, list_models, model_spec
from compress.pruning.gates import select_convs
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
    assert len(select_convs(model, "default")) == cfg.D * (cfg.C + 1)
    with pytest.raises(BadInput, match="upscaling must be one of shuffle, nearest"):
        create_model("rdn-tiny", upscaling="bicubic")
    with pytest.raises(BadInput, match="scale must be 2, 3 or 4"):
        create_model("rdn-tiny", scale=8)


def test_width_overrides_rebuild_from_json_like_spec():
    model = create_model("rdn-tiny", scale=2, conv_channels=[["rdbs.0.convs.0", 5, 32], ["rdbs.0.convs.1", 16, 37]])
    assert model.rdbs[0].convs[0].weight.shape == (5, 32, 3, 3)
    assert model.config.conv_channels == (("rdbs.0.convs.0", 5, 32), ("rdbs.0.convs.1", 16, 37))
    rebuilt = build_from_spec(model_spec(model))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(BadInput, match="conv_channels names 'nope'"):
        create_model("rdn-tiny", conv_channels=[["nope", 1, 1]])
    with pytest.raises(BadInput, match="conv_channels names 'sub_mean'"):  # EDSR's fixed MeanShift stays fixed
        create_model("edsr-tiny", conv_channels=[["sub_mean", 3, 3]])
