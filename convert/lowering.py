"""Rewrite what a converter cannot take into exact equivalents it can, and prove them equal in torch.

litert-torch cannot convert a transposed convolution: it emits an `mhlo.convolution` with input (lhs) dilation,
which the TFLite legalizer refuses ("failed to legalize operation 'mhlo.convolution' that was explicitly marked
illegal", litert-torch issue #316). A stride-s ConvTranspose2d is a conv on the LR grid computing all s x s output
phases as channels, followed by PixelShuffle(s) (`ConvTransposeAsConv`), which every converter takes. Per axis,
with kernel k, padding p and output row o = s*q + r (q the LR row, r in [0, s) the phase):

    y[oc, s*q + r] = sum_j sum_ic x[ic, q + j] * w[ic, oc, r + p - s*j]

so the conv has out channels oc * s_h * s_w (PixelShuffle order c*s^2 + r_h*s + r_w), a kernel over
j in [ceil((p - k + 1) / s), floor((s - 1 + p) / s)] (zero where r + p - s*j falls outside the kernel), zero
padding (or a crop) so it yields Q = ceil(H_out / s) rows for H_out = (H - 1)s - 2p + k + output_padding, and
the s*Q - H_out trailing rows of the shuffled output cropped. Groups stay groups (each group's phases are
contiguous channels); the bias repeats over the phases. Dilation other than 1 and F.conv_transpose2d outside an
nn.ConvTranspose2d module are refused by `convert.ops` (node named). Unequal strides use a two-step shuffle
(rows, then columns) with the same channel order, since PixelShuffle takes one factor.

The rewrite works on the torch.export graph, so it serves module:factory models and .pt2 programs alike: each
transposed conv node becomes a call of a `ConvTransposeAsConv` submodule. The lowered model is then run against
the original on a real photo tile: max abs error <= MAX_ABS_ERROR or CheckFailed. Conversion parity is still
measured against the original model; the manifest lists what was lowered (`Lowered.records`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from convert import ops
from edgesr.errors import BadInput, CheckFailed

log = logging.getLogger(__name__)

MAX_ABS_ERROR = 1e-5  # lowered vs original model, float32, on the parity tile (measured: ~1e-7)


@dataclass(frozen=True)
class _Axis:
    """How one spatial axis of a transposed conv maps to the conv + shuffle form."""

    stride: int
    kernel: int  # taps of the lowered conv along this axis
    first_tap: int  # j of the lowered kernel's first tap (may be negative)
    pad_before: int  # zero rows before the input (negative: rows cropped)
    pad_after: int
    crop_after: int  # trailing rows of the shuffled output that the transposed conv does not produce

    @staticmethod
    def of(kernel: int, stride: int, padding: int, output_padding: int) -> _Axis:
        first, last = -((kernel - 1 - padding) // stride), (stride - 1 + padding) // stride  # ceil, floor
        taps = last - first + 1
        extent = kernel + output_padding - 2 * padding  # H_out = (H - 1) * s + extent
        pad_before = -first
        pad_after = -(-extent // stride) + taps - 2 - pad_before  # conv yields Q = H - 1 + ceil(extent / s) rows
        return _Axis(stride, taps, first, pad_before, pad_after, (-extent) % stride)


class ConvTransposeAsConv(nn.Module):
    """nn.ConvTranspose2d (dilation 1) computed as pad/crop -> Conv2d -> pixel shuffle -> crop, exactly.

    Build it with `from_module` or from the transposed conv's tensors and arguments; `conv` holds the lowered
    weight (out channels = oc * s_h * s_w, in channels per group as the original).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        output_padding: tuple[int, int] = (0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__()
        in_channels, out_per_group, kh, kw = weight.shape
        if in_channels % groups:
            raise ValueError(f"weight {tuple(weight.shape)} does not split into {groups} groups")
        rows, cols = (
            _Axis.of(k, s, p, o) for k, s, p, o in zip((kh, kw), stride, padding, output_padding, strict=True)
        )
        self.rows, self.cols, self.groups = rows, cols, groups
        self.out_channels = out_per_group * groups
        phases = rows.stride * cols.stride
        lowered = torch.zeros(
            groups, out_per_group, rows.stride, cols.stride, in_channels // groups, rows.kernel, cols.kernel,
            dtype=torch.float64,
        )  # fmt: skip
        w = weight.detach().to(torch.float64).reshape(groups, in_channels // groups, out_per_group, kh, kw)
        w = w.transpose(1, 2)  # (groups, out per group, in per group, kh, kw)
        for ry, my, ty in _taps(rows, kh, padding[0]):
            for rx, mx, tx in _taps(cols, kw, padding[1]):
                lowered[:, :, ry, rx, :, my, mx] = w[:, :, :, ty, tx]
        self.conv = nn.Conv2d(
            in_channels,
            self.out_channels * phases,
            (rows.kernel, cols.kernel),
            padding=_symmetric_padding(rows, cols),
            groups=groups,
            bias=bias is not None,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            self.conv.weight.copy_(lowered.reshape(self.conv.weight.shape))
            if bias is not None:
                self.conv.bias.copy_(bias.detach().repeat_interleave(phases))
        self.conv.requires_grad_(False)

    @classmethod
    def from_module(cls, module: nn.ConvTranspose2d) -> ConvTransposeAsConv:
        if tuple(module.dilation) != (1, 1):
            raise BadInput(f"ConvTranspose2d with dilation {tuple(module.dilation)}: only dilation 1 is lowered")
        return cls(
            module.weight, module.bias, module.stride, module.padding, module.output_padding, module.groups
        )  # fmt: skip

    def describe(self) -> str:
        """'Conv2d(16, 12, kernel 3x3) + PixelShuffle(2)', plus ' + pad/crop' when it pads unevenly or crops."""
        conv = self.conv
        groups = f", groups {self.groups}" if self.groups > 1 else ""
        text = f"Conv2d({conv.in_channels}, {conv.out_channels}, kernel {conv.kernel_size[0]}x{conv.kernel_size[1]}"
        text += f"{groups})"
        sy, sx = self.rows.stride, self.cols.stride
        if (sy, sx) != (1, 1):
            text += f" + PixelShuffle({sy})" if sy == sx else f" + shuffle({sy}x{sx})"
        if self.rows.crop_after or self.cols.crop_after or _needs_explicit_pad(self.rows, self.cols):
            text += " + pad/crop"
        return text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.rows, self.cols
        if _needs_explicit_pad(rows, cols):
            # crop first (negative padding), then zero-pad: F.pad with negative values is not converted
            top, bottom = max(0, -rows.pad_before), max(0, -rows.pad_after)
            left, right = max(0, -cols.pad_before), max(0, -cols.pad_after)
            if top or bottom or left or right:
                x = x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]
            pads = (cols.pad_before, cols.pad_after, rows.pad_before, rows.pad_after)
            if any(p > 0 for p in pads):
                x = F.pad(x, tuple(max(0, p) for p in pads))
        y = _shuffle(self.conv(x), rows.stride, cols.stride)
        if rows.crop_after or cols.crop_after:
            y = y[..., : y.shape[-2] - rows.crop_after, : y.shape[-1] - cols.crop_after]
        return y


def _taps(axis: _Axis, kernel: int, padding: int) -> list[tuple[int, int, int]]:
    """(phase r, lowered tap m, original kernel index t) for every tap where t = r + p - s*(m + first) is inside."""
    out = []
    for r in range(axis.stride):
        for m in range(axis.kernel):
            t = r + padding - axis.stride * (m + axis.first_tap)
            if 0 <= t < kernel:
                out.append((r, m, t))
    return out


def _needs_explicit_pad(rows: _Axis, cols: _Axis) -> bool:
    return not (rows.pad_before == rows.pad_after >= 0 and cols.pad_before == cols.pad_after >= 0)


def _symmetric_padding(rows: _Axis, cols: _Axis) -> tuple[int, int]:
    """The conv's own padding when both axes are padded symmetrically; else 0 (forward pads explicitly)."""
    return (0, 0) if _needs_explicit_pad(rows, cols) else (rows.pad_before, cols.pad_before)


def _shuffle(y: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    """(N, C*sy*sx, Q, P) -> (N, C, Q*sy, P*sx) with channel c*sy*sx + ry*sx + rx -> pixel (ry, rx) of each cell:
    PixelShuffle when sy == sx, else columns then rows (5-D at most, which every converter takes)."""
    if sy == sx:
        return y if sy == 1 else F.pixel_shuffle(y, sy)
    n, ch, q, p = y.shape
    c = ch // (sy * sx)
    y = y.reshape(n, c * sy, sx, q, p).permute(0, 1, 3, 4, 2).reshape(n, c * sy, q, p * sx)
    return y.reshape(n, c, sy, q, p * sx).permute(0, 1, 3, 2, 4).reshape(n, c, q * sy, p * sx)


# ------------------------------------------------------------------------------------------ the graph rewrite


class LoweredModel(nn.Module):
    """The rewritten torch.export graph as a module converters take (mode switches are not passed on: the
    unlifted graph module refuses .train()/.eval(), and it is an inference graph anyway)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def train(self, mode: bool = True) -> LoweredModel:
        self.training = mode
        return self


@dataclass
class Lowered:
    """What the converters get (`model`; the input model itself when nothing needed lowering) and what changed."""

    model: nn.Module
    records: list[dict[str, Any]] = field(default_factory=list)  # the manifest's "lowered" entries
    check: dict[str, Any] | None = None  # lowered vs original on the photo tile; None when nothing was lowered
    program: torch.export.ExportedProgram | None = None  # the lowered model exported (what the converters see)


def _graph_module(model: nn.Module, sample: torch.Tensor, origin: str) -> fx.GraphModule | None:
    """A private copy of the model's torch.export graph (a .pt2's own graph), or None if it has no transposed
    conv to lower (then no export is needed: plain modules without nn.ConvTranspose2d are taken as they are)."""
    program = getattr(model, "program", None)  # compress.intake.ExportedModule holds a .pt2's graph module
    if isinstance(program, fx.GraphModule):
        gm = program
    elif any(isinstance(m, nn.ConvTranspose2d) for m in model.modules()):
        try:
            with torch.no_grad():
                gm = torch.export.export(model.eval(), (sample,), strict=False).module()
        except Exception as exc:  # noqa: BLE001 - export raises many types for unsupported Python
            raise BadInput(f"{origin}: torch.export cannot capture the model: {type(exc).__name__}: {exc}") from None
    else:
        return None
    if not any(ops.conv_transpose_args(n) for n in gm.graph.nodes):
        return None
    return copy.deepcopy(gm)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def _drop_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a get_attr node nothing reads any more, and its tensor when no other node names it."""
    if node.users:
        return
    target = node.target
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        owner_path, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def lower_for_conversion(model: nn.Module, x_nhwc: np.ndarray, origin: str) -> Lowered:
    """Rewrite every transposed conv of `model` into conv + pixel shuffle (see the module docstring), check the
    result against `model` on the photo tile `x_nhwc` (NHWC float32) and return it with its manifest records.

    BadInput for a transposed conv that cannot be lowered (naming the node); CheckFailed when the lowered model
    is more than MAX_ABS_ERROR away from the original.
    """
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    gm = _graph_module(model, x, origin)
    if gm is None:
        return Lowered(model)
    records, replaced = [], []
    for node in list(gm.graph.nodes):
        args = ops.conv_transpose_args(node)
        if args is None:
            continue
        reason = ops.conv_transpose_refusal(node, args)
        if reason:
            raise BadInput(
                f"{origin}: cannot lower {ops.op_name(node.target)} in {ops.node_layer(node)} [node {node.name}]: "
                f"{reason}"
            )
        weight_node, bias_node = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _attr(gm, weight_node.target)
        bias = None if bias_node is None else _attr(gm, bias_node.target)
        module = ConvTransposeAsConv(weight, bias, args.stride, args.padding, args.output_padding, args.groups)
        path, _ = ops.node_module(node)
        name = _free_name(gm, f"lowered_{node.name}")
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in (weight_node, bias_node):
            if isinstance(attr, fx.Node):
                _drop_attr(gm, attr)
        records.append(
            {
                "module": path,
                "node": node.name,
                "from": _describe_transposed(weight, args),
                "to": module.describe(),
                "reason": "litert-torch cannot convert a transposed convolution (mhlo.convolution with input "
                "dilation fails to legalize); every format gets the lowered form, so all artifacts run one graph",
                "weight_elements": {"from": int(weight.numel()), "to": int(module.conv.weight.numel())},
                "note": "the artifacts' conv weight figures count the lowered conv: the original weights plus "
                "zeros for the taps a phase does not use",
            }
        )
        replaced.append((name, weight, bias, args))
    gm.recompile()
    lowered = LoweredModel(gm).eval()
    errors = _module_errors(gm, lowered, x, replaced)
    for record, err in zip(records, errors, strict=True):
        record["max_abs_error"] = err
    check = _check(model, lowered, x, origin)
    for r in records:
        log.info(
            "lowered %s: %s -> %s (max abs error %.2g)",
            r["module"] or r["node"],
            r["from"],
            r["to"],
            r["max_abs_error"],
        )
    program = _export(lowered, x, origin)
    ops.check_supported_ops(program, origin, lowering=False)
    return Lowered(lowered, records, check, program)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _describe_transposed(weight: torch.Tensor, args: ops.ConvTransposeArgs) -> str:
    ic, ocg, kh, kw = weight.shape
    text = f"ConvTranspose2d({ic}, {ocg * args.groups}, kernel {kh}x{kw}, stride {args.stride[0]}x{args.stride[1]}"
    text += f", padding {args.padding[0]}x{args.padding[1]}"
    if any(args.output_padding):
        text += f", output_padding {args.output_padding[0]}x{args.output_padding[1]}"
    if args.groups > 1:
        text += f", groups {args.groups}"
    return text + ")"


@torch.no_grad()
def _module_errors(
    gm: fx.GraphModule, lowered: nn.Module, x: torch.Tensor, replaced: list[tuple[Any, ...]]
) -> list[float]:
    """Per lowered module: max abs difference from the transposed conv it replaces, on the activations the
    photo tile gives it."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        gm.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
        for name, *_ in replaced
    ]
    try:
        lowered(x)
    finally:
        for h in hooks:
            h.remove()
    errors = []
    for name, weight, bias, args in replaced:
        a = inputs[name]
        want = F.conv_transpose2d(a, weight, bias, args.stride, args.padding, args.output_padding, args.groups)
        got = gm.get_submodule(name)(a)
        errors.append(float((got.double() - want.double()).abs().max()) if got.shape == want.shape else math.inf)
    return errors


@torch.no_grad()
def _check(model: nn.Module, lowered: nn.Module, x: torch.Tensor, origin: str) -> dict[str, Any]:
    from convert.parity import PARITY_IMAGE

    want, got = model.eval()(x), lowered(x)
    if got.shape != want.shape:
        raise CheckFailed(
            f"{origin}: the lowered model gives shape {tuple(got.shape)}, the original {tuple(want.shape)}"
        )
    err = float((got.double() - want.double()).abs().max())
    if not err <= MAX_ABS_ERROR:  # also catches NaN
        raise CheckFailed(
            f"{origin}: the lowered model differs from the original by up to {err:.3g} (limit {MAX_ABS_ERROR:g}) "
            f"on {PARITY_IMAGE}"
        )
    return {"reference": "original model (torch)", "image": PARITY_IMAGE, "max_abs_error": err, "limit": MAX_ABS_ERROR}


def _export(model: nn.Module, x: torch.Tensor, origin: str) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(model, (x,), strict=False)
    except Exception as exc:  # noqa: BLE001
        raise BadInput(
            f"{origin}: torch.export cannot capture the lowered model: {type(exc).__name__}: {exc}"
        ) from None
