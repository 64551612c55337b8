"""Small SR networks in the shapes real ones take, written the way a user writes a model file: plain torch only.

One model per topology edgesr must take end to end (compress prune --model, convert --model, their .pt2):
- `fsrcnn`: per-channel PReLU and a ConvTranspose2d upsampler (Dong et al. 2016, kernel 9, stride s);
- `padded_valid`: an explicit F.pad (zero, reflect or replicate), VALID 3x3 convs with LeakyReLU and a stride-2
  ConvTranspose2d whose padding crops (waifu2x UpConv7 style);
- `srresnet`: BatchNorm after every body conv, PReLU, PixelShuffle (Ledig et al. 2017);
- `imdn`: IMDN/RFDN distillation blocks that split channels with torch.split, chunk, narrow and slicing, concat
  the distilled parts and weigh them by contrast-aware channel attention;
- `interp_up`: nearest or bilinear upsampling followed by convs (ESRGAN style);
- `separable`: depthwise 3x3 + pointwise 1x1 blocks and a grouped conv;
- `rcan`: RCAN residual channel-attention blocks (global pool -> 1x1 convs -> sigmoid -> multiply).

Each factory takes keyword arguments only (what `--factory-args` passes) and maps (N, 3, H, W) in [0, 1] to
(N, 3, sH, sW). `TOPOLOGIES` lists them with the arguments the tests use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FSRCNN(nn.Module):
    def __init__(self, scale: int = 2, d: int = 16, s: int = 8, m: int = 2) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, d, 5, padding=2), nn.PReLU(d))
        layers: list[nn.Module] = [nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.mid = nn.Sequential(*layers)
        self.last = nn.ConvTranspose2d(d, 3, 9, stride=scale, padding=4, output_padding=scale - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.mid(self.first(x)))


class PaddedValid(nn.Module):
    """Pad by 4, three VALID convs (-6), ConvTranspose2d(k4, s2, p3): 2(H + 2) - 4 = 2H."""

    def __init__(self, feats: int = 16, pad_mode: str = "reflect") -> None:
        super().__init__()
        self.pad_mode = pad_mode
        self.body = nn.Sequential(
            nn.Conv2d(3, feats, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(feats, feats, 3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(feats, feats, 3),
            nn.LeakyReLU(0.1),
        )
        self.up = nn.ConvTranspose2d(feats, 3, 4, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (4, 4, 4, 4), mode=self.pad_mode)
        return self.up(self.body(x))


class ResidualBN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.PReLU(c),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    def __init__(self, scale: int = 2, feats: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, feats, 9, padding=4), nn.PReLU(feats))
        self.blocks = nn.Sequential(*[ResidualBN(feats) for _ in range(blocks)])
        self.fuse = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.BatchNorm2d(feats))
        self.up = nn.Sequential(
            nn.Conv2d(feats, feats * scale * scale, 3, padding=1), nn.PixelShuffle(scale), nn.PReLU()
        )
        self.tail = nn.Conv2d(feats, 3, 9, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.up(self.fuse(self.blocks(h)) + h))


class ContrastAttention(nn.Module):
    """IMDN's CCA: (std + mean) per channel -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid, times the input."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c, max(1, c // reduction), 1)
        self.excite = nn.Conv2d(max(1, c // reduction), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(std + mean))))


class DistillationBlock(nn.Module):
    """IMDB: each step keeps a quarter of the channels (distilled) and refines the rest."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.d, self.r = c // 4, c - c // 4
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(self.r, c, 3, padding=1)
        self.c3 = nn.Conv2d(self.r, 2 * self.r, 3, padding=1)
        self.c4 = nn.Conv2d(self.r - self.d, self.d, 3, padding=1)
        self.act = nn.LeakyReLU(0.05)
        self.attention = ContrastAttention(4 * self.d)
        self.fuse = nn.Conv2d(4 * self.d, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1, r1 = torch.split(self.act(self.c1(x)), (self.d, self.r), dim=1)
        o2 = self.act(self.c2(r1))
        d2, r2 = o2.narrow(1, 0, self.d), o2.narrow(1, self.d, self.r)
        a3, b3 = self.act(self.c3(r2)).chunk(2, dim=1)
        d3, r3 = a3[:, : self.d], a3[:, self.d :] + b3[:, self.d :]
        d4 = self.c4(r3)
        return x + self.fuse(self.attention(torch.cat([d1, d2, d3, d4], dim=1)))


class IMDN(nn.Module):
    def __init__(self, scale: int = 2, feats: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, feats, 3, padding=1)
        self.blocks = nn.ModuleList(DistillationBlock(feats) for _ in range(blocks))
        self.fuse = nn.Sequential(nn.Conv2d(feats * blocks, feats, 1), nn.LeakyReLU(0.05))
        self.up = nn.Sequential(nn.Conv2d(feats, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        outs, y = [], h
        for block in self.blocks:
            y = block(y)
            outs.append(y)
        return self.up(self.fuse(torch.cat(outs, dim=1)) + h)


class InterpUp(nn.Module):
    def __init__(self, mode: str = "nearest", feats: int = 16, scale: int = 2) -> None:
        super().__init__()
        self.mode, self.scale = mode, scale
        self.head = nn.Conv2d(3, feats, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.LeakyReLU(0.2))
        self.up_conv = nn.Conv2d(feats, feats, 3, padding=1)
        self.hr_conv = nn.Conv2d(feats, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.body(h)
        h = F.interpolate(h, scale_factor=self.scale, mode=self.mode)
        return self.hr_conv(F.leaky_relu(self.up_conv(h), 0.2))


class SeparableBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pointwise = nn.Conv2d(c, c, 1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.grouped(F.relu(self.pointwise(F.relu(self.depthwise(x)))))


class Separable(nn.Module):
    def __init__(self, scale: int = 2, feats: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, feats, 3, padding=1)
        self.blocks = nn.Sequential(*[SeparableBlock(feats) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Conv2d(feats, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.blocks(self.head(x)))


class ChannelAttention(nn.Module):
    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.weigh = nn.Sequential(
            nn.Conv2d(c, c // reduction, 1), nn.ReLU(inplace=True), nn.Conv2d(c // reduction, c, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weigh(self.pool(x))


class RCAB(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1), ChannelAttention(c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RCAN(nn.Module):
    def __init__(self, scale: int = 2, feats: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, feats, 3, padding=1)
        self.body = nn.Sequential(*[RCAB(feats) for _ in range(blocks)], nn.Conv2d(feats, feats, 3, padding=1))
        self.tail = nn.Sequential(
            nn.Conv2d(feats, feats * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
            nn.Conv2d(feats, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.body(h) + h)


def fsrcnn(**kwargs) -> nn.Module:
    return FSRCNN(**kwargs)


def padded_valid(**kwargs) -> nn.Module:
    return PaddedValid(**kwargs)


def srresnet(**kwargs) -> nn.Module:
    return SRResNet(**kwargs)


def imdn(**kwargs) -> nn.Module:
    return IMDN(**kwargs)


def interp_up(**kwargs) -> nn.Module:
    return InterpUp(**kwargs)


def separable(**kwargs) -> nn.Module:
    return Separable(**kwargs)


def rcan(**kwargs) -> nn.Module:
    return RCAN(**kwargs)


# name -> (factory name in this file, factory keyword arguments) for parametrized tests
TOPOLOGIES: dict[str, tuple[str, dict]] = {
    "fsrcnn": ("fsrcnn", {}),
    "padded_valid_zero": ("padded_valid", {"pad_mode": "constant"}),
    "padded_valid_reflect": ("padded_valid", {"pad_mode": "reflect"}),
    "padded_valid_replicate": ("padded_valid", {"pad_mode": "replicate"}),
    "srresnet": ("srresnet", {}),
    "imdn": ("imdn", {}),
    "interp_nearest": ("interp_up", {"mode": "nearest"}),
    "interp_bilinear": ("interp_up", {"mode": "bilinear"}),
    "separable": ("separable", {}),
    "rcan": ("rcan", {}),
}


@torch.no_grad()
def make(name: str, seed: int = 0) -> nn.Module:
    """The topology `name` with seeded weights and BatchNorm statistics that are not the identity, in eval mode."""
    factory, kwargs = TOPOLOGIES[name]
    torch.manual_seed(seed)
    model = globals()[factory](**kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.uniform_(0.05, 0.3)
    return model.eval()
