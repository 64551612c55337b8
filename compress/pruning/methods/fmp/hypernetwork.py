"""DHP's hypernetwork per conv and the channel vectors it reads (see `compress.pruning.methods.fmp`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.pruning.coupling import ChannelGroup
from compress.pruning.gates import select_layers
from compress.pruning.layers import is_depthwise, prunable_layers

VECTORS = "fmp_channel_vectors"  # the model attribute holding the channel vectors during the search


class ChannelVectors(nn.Module):
    """The searched groups' channel vectors z_g, and a constant 1 that unsearched channels read."""

    def __init__(self, sizes: dict[int, int], init: str, device: torch.device) -> None:
        super().__init__()
        make = torch.ones if init == "pretrained" else torch.randn
        self.z = nn.ParameterDict({str(g): nn.Parameter(make(n, device=device)) for g, n in sizes.items()})
        self.register_buffer("one", torch.ones(1, device=device))
        self.offset: dict[int, int] = {}  # group id -> position of its z in `flat()` (ParameterDict sorts keys)
        pos = 1
        for key, z in self.z.items():
            self.offset[int(key)], pos = pos, pos + z.numel()

    def vector(self, group: int) -> nn.Parameter:
        return self.z[str(group)]

    def flat(self) -> torch.Tensor:
        return torch.cat([self.one, *self.z.values()])


class HyperGate(nn.Module):
    """The weight parametrization of one conv: the DHP hypernetwork's kernel times the weight indicators.

    The hypernetwork works in the layer's logical [out, in-per-group, kh, kw] layout; `in_index` [out, in-per-group]
    says which layer input channel each kernel column reads (column i for a plain conv, output j's own input
    j // multiplier for a depthwise conv), and a ConvTranspose2d's weight is that layout transposed.
    `src_out`/`src_in` give, per layer channel, its position in `ChannelVectors.flat()`.
    """

    def __init__(
        self,
        layer: nn.Module,
        vectors: ChannelVectors,
        src_out: torch.Tensor,
        src_in: torch.Tensor,
        embedding_dim: int,
        init: str,
        indicators: bool,
    ) -> None:
        super().__init__()
        self.transposed = isinstance(layer, nn.ConvTranspose2d)
        weight = layer.weight.detach()
        logical = weight.transpose(0, 1) if self.transposed else weight
        c_out, c_in, kh, kw = logical.shape
        k2, m = kh * kw, embedding_dim
        dev, dt = weight.device, weight.dtype
        self.shape = tuple(weight.shape)
        self.logical_shape = tuple(logical.shape)
        self._vectors = (vectors,)  # a tuple: shared, owned (and saved) by the model, not by each gate
        if is_depthwise(layer):
            in_index = (torch.arange(c_out) // (c_out // layer.in_channels))[:, None]
        else:
            in_index = torch.arange(c_in)[None, :].expand(c_out, c_in)
        self.register_buffer("in_index", in_index.contiguous().to(dev))
        self.register_buffer("src_out", src_out.to(dev))
        self.register_buffer("src_in", src_in.to(dev))
        w1 = torch.empty(c_out, c_in, m, device=dev, dtype=dt).uniform_(-math.sqrt(3), math.sqrt(3))
        if init == "pretrained":  # W2_ij = W_ij w1_ij^T / (M_ij |w1_ij|^2), so that W2_ij (M_ij w1_ij) = W_ij
            z = vectors.flat().detach()
            m0 = (z[src_out.to(z.device)][:, None] * z[src_in.to(z.device)][in_index.to(z.device)]).to(dev, dt)
            w = logical.reshape(c_out, c_in, k2, 1)
            w2 = w * w1[:, :, None, :] / (m0 * w1.pow(2).sum(-1))[:, :, None, None]
        else:  # DHP's "hyperfan-in"
            bound = math.sqrt(3) * math.sqrt(1.0 / (m * c_in * k2))
            w2 = torch.empty(c_out, c_in, k2, m, device=dev, dtype=dt).uniform_(-bound, bound)
        self.B0 = nn.Parameter(torch.zeros(c_out, c_in, device=dev, dtype=dt))
        self.w1 = nn.Parameter(w1)
        self.b1 = nn.Parameter(torch.zeros(c_out, c_in, m, device=dev, dtype=dt))
        self.W2 = nn.Parameter(w2.contiguous())
        self.b2 = nn.Parameter(torch.zeros(c_out, c_in, k2, device=dev, dtype=dt))
        self.register_parameter("U", nn.Parameter(torch.ones_like(weight)) if indicators else None)
        # Locked masks (all True until the search locks them), per layer channel.
        self.register_buffer("out_mask", torch.ones(src_out.numel(), dtype=torch.bool, device=dev))
        self.register_buffer("in_mask", torch.ones(src_in.numel(), dtype=torch.bool, device=dev))
        mask = torch.ones(self.shape, dtype=torch.bool, device=dev) if indicators else None
        self.register_buffer("weight_mask", mask)

    def _layout(self, logical: torch.Tensor) -> torch.Tensor:
        return logical.transpose(0, 1) if self.transposed else logical

    def generate(self) -> torch.Tensor:
        """The hypernetwork's kernel in the weight's own layout, before indicators and masks."""
        z = self._vectors[0].flat()
        m = z[self.src_out][:, None] * z[self.src_in][self.in_index] + self.B0
        e = m[..., None] * self.w1 + self.b1
        o = torch.einsum("oikm,oim->oik", self.W2, e) + self.b2
        return self._layout(o.reshape(self.logical_shape))

    def region(self, out_keep: torch.Tensor, in_keep: torch.Tensor) -> torch.Tensor:
        """Bool tensor of the weight's shape: the weights that connect a kept output to a kept input channel."""
        out_keep, in_keep = out_keep.to(self.in_index.device), in_keep.to(self.in_index.device)
        pairs = out_keep[:, None] & in_keep[self.in_index]
        return self._layout(pairs[:, :, None, None].expand(self.logical_shape))

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored weight is ignored: the kernel comes from the hypernetwork."""
        k = self.generate()
        k = k * self.region(self.out_mask, self.in_mask).to(k.dtype)
        if self.U is not None:
            k = k * self.U * self.weight_mask.to(k.dtype)
        return k


def hyper_convs(model: nn.Module, groups: list[ChannelGroup], spec: str) -> dict[str, nn.Module]:
    """The layers that get hypernetworks: "auto" = every trainable conv (plain, depthwise, transposed) in a prunable
    group, else `gates.select_layers`. Linear layers and grouped convs never do (their channels are not searched)."""
    layers = prunable_layers(model) if spec == "auto" else select_layers(model, spec)
    if spec == "auto":
        touched = {m.layer for g in groups if g.prunable for m in g.members}
        layers = {n: c for n, c in layers.items() if n in touched}
    chosen = {n: c for n, c in layers.items() if hyper_ready(c)}
    if not chosen:
        raise ValueError("no trainable conv lies in a prunable channel group")
    return chosen


def hyper_ready(layer: nn.Module) -> bool:
    """A 2-D conv (plain or depthwise) or a plain ConvTranspose2d: what HyperGate generates kernels for."""
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.groups == 1
    return isinstance(layer, nn.Conv2d) and (layer.groups == 1 or is_depthwise(layer))
