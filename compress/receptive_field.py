"""Receptive-field radius of an SR model, measured, so tiling works for any architecture.

The device runner splits an LR image into fixed-size tiles that overlap, runs each, and keeps only the part of
each output that did not see the tile's zero-padded border. That is exact when the overlap is at least the
radius r: every output pixel in HR row Y depends only on LR rows floor(Y/s) - r .. floor(Y/s) + r.

r is measured from gradients: for a central LR pixel c, take the s x s HR output pixels it owns, back-propagate
a random weighting of them to the input, and find how far from c the non-zero gradient reaches. Gradients in
float64 over several random inputs (ReLUs switch off different units on each) give the support of the function
the weights compute; a probe that touches its own border is retried at twice the size.

A model with global context (channel attention over a global average pool, IMDN's contrast = std + mean per
channel) depends on every input pixel, so no overlap makes tiling exact. `local_receptive_field` measures the
radius of its local paths with those global statistics held fixed (they pass no gradient) and names the
reductions it held, so the manifest can say that tiled output only approximates whole-frame output.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgesr.errors import BadInput

log = logging.getLogger(__name__)

OVERLAP_MARGIN = 1  # one LR pixel beyond the measured radius, in case no random probe reached a rare path


def receptive_field_radius(model: nn.Module, trials: int = 3, start: int = 33, limit: int = 513) -> int:
    """Radius in LR pixels of the input region any output pixel depends on. Model maps (1,3,h,w) -> (1,3,sh,sw)."""
    probe = copy.deepcopy(model).to(torch.float64).eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    size = start
    while size <= limit:
        support = torch.zeros(size, size, dtype=torch.bool)
        for _ in range(trials):
            support |= _gradient_support(probe, size, generator)
            if _touches_border(support):
                break  # too small a probe: no need for more trials at this size
        else:
            rows, cols = support.any(dim=1).nonzero().flatten(), support.any(dim=0).nonzero().flatten()
            if rows.numel() == 0:
                return 0  # the output does not depend on the input at all
            c = size // 2
            radius = int(max(c - rows[0], rows[-1] - c, c - cols[0], cols[-1] - c))
            log.info("receptive field radius: %d LR pixels (probe %dx%d)", radius, size, size)
            return radius
        size += 2 * max(16, size // 4)  # even steps keep the size odd and the probed pixel central
    raise BadInput(f"receptive field wider than a {limit}x{limit} input; this model cannot be tiled")


def _touches_border(support: torch.Tensor) -> bool:
    return bool(support[0].any() or support[-1].any() or support[:, 0].any() or support[:, -1].any())


def _gradient_support(model: nn.Module, size: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.rand(1, 3, size, size, dtype=torch.float64, generator=generator, requires_grad=True)
    y = model(x)
    if y.dim() != 4 or y.shape[:2] != (1, 3) or y.shape[2] % size or y.shape[2] != y.shape[3]:
        raise BadInput(f"model maps (1, 3, {size}, {size}) to {tuple(y.shape)}, not (1, 3, s*{size}, s*{size})")
    s, c = y.shape[2] // size, size // 2
    owned = y[:, :, s * c : s * (c + 1), s * c : s * (c + 1)]
    (owned * torch.randn(owned.shape, dtype=torch.float64, generator=generator)).sum().backward()
    return x.grad[0].abs().sum(dim=0) > 0


# Reductions that can collapse H and W (called as torch functions, Tensor methods or ATen ops of a .pt2 graph).
_REDUCTIONS = frozenset(
    {"mean", "var", "std", "var_mean", "std_mean", "sum", "amax", "amin", "max", "min", "norm", "logsumexp"}
    | {"adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"}
)


class _Seen(list):
    """The names of the reductions held fixed; shared, not copied, by the probe's deepcopy of the model."""

    def __deepcopy__(self, memo: dict) -> _Seen:
        return self


class _FixedGlobalStatistics(TorchFunctionMode):
    """Detach the result of every reduction over all of H and W (a global statistic), recording its name."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "").split(".")[0]
        x = args[0] if args else None
        if name in _REDUCTIONS and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-2:].numel() > 1:
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and _collapses_hw(x, first):
                self.seen.append(name)
                return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        return out


def _collapses_hw(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `y` is a reduction of `x` (N, C, H, W) over both H and W (kept as 1 x 1, dropped, or everything)."""
    if y.dim() == 4:
        return tuple(y.shape[-2:]) == (1, 1)
    return y.dim() == 0 or (y.dim() == 2 and tuple(y.shape) == tuple(x.shape[:2]))


class _LocalPaths(nn.Module):
    """`model` with its global statistics held fixed (only inside its forward: the probe's loss is a sum too)."""

    def __init__(self, model: nn.Module, seen: _Seen) -> None:
        super().__init__()
        self.model, self.seen = model, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _FixedGlobalStatistics(self.seen):
            return self.model(x)


def local_receptive_field(model: nn.Module, **probe: int) -> tuple[int, list[str]]:
    """(radius of the local paths, names of the global reductions held fixed; [] for a purely local model).

    For a model without global statistics this is `receptive_field_radius` itself."""
    seen = _Seen()
    radius = receptive_field_radius(_LocalPaths(model, seen), **probe)
    return radius, sorted(set(seen))


def tiling_overlap(radius: int) -> int:
    """The overlap (LR pixels) the runner uses between tiles: the radius plus a safety margin."""
    return radius + OVERLAP_MARGIN
