"""RDN (Zhang et al., CVPR 2018, "Residual Dense Network for Image Super-Resolution"), idealo ISR flavour.

Why it is here: it is a plain conv/ReLU/concat/residual net, so it exercises the concat bookkeeping of the
channel-coupling analysis, and its `rdn-small` preset has exactly the shape of idealo ISR's pretrained
`psnr-small` x2 model (C3-D10-G64-G0 64, 2,619,635 parameters), the one real pretrained photo-SR model that
ships in a package.

Layout (ISR names in brackets): f_m1 [F_m1] 3x3 -> f_0 [F_0] 3x3 -> D residual dense blocks, each C 3x3 convs
of growth G with ReLU whose input is the concat of the block input and every earlier output in the block, a
1x1 local feature fusion (lff) [LFF_d] and a local residual add -> global feature fusion gff.0 (1x1 over the
concat of all block outputs) [GFF_1], gff.1 (3x3) [GFF_2], add f_m1 -> upn.0 5x5 + ReLU [UPN1], upn.2 3x3 +
ReLU [UPN2], upn.4 3x3 to n_colors*s^2 [UPN3] -> upsample -> sr 3x3 to n_colors [SR].
`upscaling="shuffle"` is PixelShuffle (the sr conv then reads n_colors channels); `"nearest"` is ISR's
UpSampling2D used by its older weights incl. psnr-small (the sr conv reads all n_colors*s^2 channels).
Unlike ISR, F_0 has G0 outputs as in the paper (ISR uses G, which only works when G == G0).
Inputs and outputs are float RGB in [0, 1], NCHW, no mean shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

UPSCALING = ("shuffle", "nearest")


@dataclass(frozen=True)
class RDNConfig:
    C: int = 3  # convs per residual dense block
    D: int = 10  # residual dense blocks
    G: int = 64  # growth: output channels of each block conv
    G0: int = 64  # feature width of the trunk
    scale: int = 2
    n_colors: int = 3
    upscaling: str = "shuffle"
    upn_channels: tuple[int, int] = (64, 32)  # widths of UPN1 and UPN2 (fixed at 64 and 32 in ISR)

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ValueError(f"RDNConfig.scale must be 2, 3 or 4, got {self.scale}")
        if min(self.C, self.D, self.G, self.G0, self.n_colors) < 1:
            raise ValueError(f"RDNConfig needs C, D, G, G0, n_colors >= 1, got {self}")
        if self.upscaling not in UPSCALING:
            raise ValueError(f"RDNConfig.upscaling must be one of {', '.join(UPSCALING)}, got {self.upscaling!r}")
        upn = tuple(int(c) for c in self.upn_channels)
        if len(upn) != 2 or min(upn) < 1:
            raise ValueError(f"RDNConfig.upn_channels must be two widths >= 1, got {self.upn_channels!r}")
        object.__setattr__(self, "upn_channels", upn)


def conv(c_in: int, c_out: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, padding=k // 2)


class RDB(nn.Module):
    """Residual dense block: C densely connected conv+ReLU, 1x1 local feature fusion, local residual."""

    def __init__(self, G0: int, G: int, C: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv(G0 + c * G, G) for c in range(C))
        self.lff = conv(G0 + C * G, G0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x
        for layer in self.convs:
            feats = torch.cat([feats, F.relu(layer(feats))], dim=1)
        return x + self.lff(feats)


class RDN(nn.Module):
    def __init__(self, config: RDNConfig) -> None:
        super().__init__()
        self.config = config
        g0, s, rgb = config.G0, config.scale, config.n_colors
        u1, u2 = config.upn_channels
        self.f_m1 = conv(rgb, g0)
        self.f_0 = conv(g0, g0)
        self.rdbs = nn.ModuleList(RDB(g0, config.G, config.C) for _ in range(config.D))
        self.gff = nn.Sequential(conv(config.D * g0, g0, 1), conv(g0, g0))
        self.upn = nn.Sequential(conv(g0, u1, 5), nn.ReLU(), conv(u1, u2), nn.ReLU(), conv(u2, rgb * s * s))
        shuffle = config.upscaling == "shuffle"
        self.upsample = nn.PixelShuffle(s) if shuffle else nn.Upsample(scale_factor=s, mode="nearest")
        self.sr = conv(rgb if shuffle else rgb * s * s, rgb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) RGB in [0, 1] -> (N, 3, sH, sW), not clamped."""
        f_m1 = self.f_m1(x)
        h = self.f_0(f_m1)
        block_outputs = []
        for block in self.rdbs:
            h = block(h)
            block_outputs.append(h)
        h = self.gff(torch.cat(block_outputs, dim=1)) + f_m1
        return self.sr(self.upsample(self.upn(h)))


PRESETS: dict[str, dict] = {
    # Trains and prunes in CPU-minutes; narrower upsampling convs than ISR's fixed 64/32.
    "rdn-tiny": dict(C=3, D=2, G=16, G0=32, upn_channels=(32, 16)),
    # Exactly idealo ISR psnr-small (rdn-C3-D10-G64-G064-x2): nearest upsampling, 2,619,635 params at x2.
    "rdn-small": dict(C=3, D=10, G=64, G0=64, upscaling="nearest"),
}


def rdn_config(preset: str, scale: int, **overrides) -> RDNConfig:
    return RDNConfig(**{**PRESETS[preset], "scale": scale, **overrides})
