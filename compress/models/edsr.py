"""EDSR (Lim et al., CVPRW 2017, "Enhanced Deep Residual Networks for Single Image Super-Resolution").

Module names mirror EDSR-PyTorch (sanghyun-son/EDSR-PyTorch, src/model/edsr.py) so its official checkpoints
load with `strict=True`: sub_mean, head.0, body.{i}.body.{0,2}, body.{n}, tail.0 (upsampler), tail.1, add_mean.
Inputs and outputs are float RGB in [0, 1]; `rgb_range` scales internally (official checkpoints use 255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# DIV2K RGB mean used by EDSR-PyTorch's MeanShift.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class EDSRConfig:
    n_resblocks: int = 16
    n_feats: int = 64
    scale: int = 2
    res_scale: float = 1.0
    rgb_range: float = 1.0  # 255 for EDSR-PyTorch checkpoints
    n_colors: int = 3
    # Add a bilinear upsampling of the input to the output. Not in the paper: it lets a tiny net beat bicubic
    # after minutes of CPU training. RESIZE_BILINEAR converts to TFLite and Core ML.
    bilinear_skip: bool = False

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ValueError(f"EDSRConfig.scale must be 2, 3 or 4, got {self.scale}")
        if self.n_resblocks < 1 or self.n_feats < 1:
            raise ValueError(f"EDSRConfig needs n_resblocks >= 1 and n_feats >= 1, got {self}")


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv that subtracts (sign=-1) or adds (sign=+1) the dataset mean, scaled by rgb_range."""

    def __init__(self, rgb_range: float, sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(DIV2K_RGB_MEAN)
        for p in self.parameters():
            p.requires_grad = False


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResBlock(nn.Module):
    def __init__(self, n_feats: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feats, n_feats), nn.ReLU(inplace=True), conv3x3(n_feats, n_feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsampler(nn.Sequential):
    """conv -> PixelShuffle, once for x2/x3 and twice (x2, x2) for x4, as in EDSR-PyTorch."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        if scale in (2, 4):
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        else:
            layers += [conv3x3(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        super().__init__(*layers)


class EDSR(nn.Module):
    def __init__(self, config: EDSRConfig) -> None:
        super().__init__()
        self.config = config
        c, n = config.n_feats, config.n_resblocks
        self.sub_mean = MeanShift(config.rgb_range, -1)
        self.head = nn.Sequential(conv3x3(config.n_colors, c))
        self.body = nn.Sequential(*[ResBlock(c, config.res_scale) for _ in range(n)], conv3x3(c, c))
        self.tail = nn.Sequential(Upsampler(config.scale, c), conv3x3(c, config.n_colors))
        self.add_mean = MeanShift(config.rgb_range, +1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) RGB in [0, 1] -> (N, 3, sH, sW), not clamped."""
        y = self.sub_mean(x * self.config.rgb_range)
        y = self.head(y)
        y = self.body(y) + y
        y = self.add_mean(self.tail(y)) / self.config.rgb_range
        if self.config.bilinear_skip:
            y = y + F.interpolate(x, scale_factor=self.config.scale, mode="bilinear", align_corners=False)
        return y


PRESETS: dict[str, dict] = {
    "edsr-baseline": dict(n_resblocks=16, n_feats=64),
    "edsr-8-128": dict(n_resblocks=8, n_feats=128),
    # Small enough to train and prune in CPU-minutes; the bilinear skip makes short training pay off.
    "edsr-tiny": dict(n_resblocks=4, n_feats=32, bilinear_skip=True),
}


def edsr_config(preset: str, scale: int, **overrides) -> EDSRConfig:
    return EDSRConfig(**{**PRESETS[preset], "scale": scale, **overrides})


def config_from_official_state_dict(state_dict: dict[str, torch.Tensor]) -> EDSRConfig:
    """Infer blocks, width and scale from an EDSR-PyTorch state dict (rgb_range 255, as it was trained)."""
    n_feats = state_dict["head.0.weight"].shape[0]
    n_resblocks = len({k.split(".")[1] for k in state_dict if k.startswith("body.") and ".body." in k})
    up = [k for k in state_dict if k.startswith("tail.0.") and k.endswith(".weight")]
    if len(up) == 2:
        scale = 4
    else:
        scale = {4 * n_feats: 2, 9 * n_feats: 3}.get(state_dict["tail.0.0.weight"].shape[0], 0)
    return EDSRConfig(n_resblocks=n_resblocks, n_feats=n_feats, scale=scale, rgb_range=255.0)
