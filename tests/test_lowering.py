"""convert.lowering: a ConvTranspose2d rewritten as conv + pixel shuffle computes the same, and what it refuses.

The rewrite is checked against torch's own nn.ConvTranspose2d over kernels, strides, paddings, output paddings,
groups and unequal per-axis settings (float64: to rounding; float32: within the pipeline's 1e-5), then on whole
models through the torch.export graph (a module:factory model, a .pt2, a decomposed .pt2). The op check's
refusals (node, operator, reason) are checked on exported graphs, no conversion needed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.intake import ExportedModule
from convert import ops
from convert.lowering import MAX_ABS_ERROR, ConvTransposeAsConv, LoweredModel, lower_for_conversion
from convert.parity import parity_tile
from edgesr.errors import BadInput

# (kernel, stride, padding, output_padding, groups): the two upsamplers of tests/topology_models.py first.
CASES = [
    (9, 2, 4, 1, 1),  # FSRCNN: kernel 9, stride 2, padding 4, output_padding 1
    (4, 2, 3, 0, 1),  # waifu2x UpConv7 style: the padding crops
    (4, 2, 1, 0, 1),  # the common "exact x2" deconv
    (2, 2, 0, 0, 1),  # kernel = stride: no overlap
    (3, 3, 1, 2, 1),
    (6, 4, 1, 3, 2),
    (3, 1, 1, 0, 1),  # stride 1: a plain conv with a flipped kernel
    (5, 2, 7, 1, 1),  # padding larger than the kernel: the input is cropped
    (1, 2, 0, 1, 1),
    (3, 2, 0, 0, 4),  # grouped
    (4, 2, 1, 0, 8),  # depthwise (groups = in channels)
    ((3, 5), (2, 3), (1, 2), (1, 0), 2),  # unequal per axis
    ((4, 1), (1, 2), (0, 0), (0, 1), 1),
    ((2, 7), (3, 2), (2, 0), (2, 1), 1),
]


def _ids(case: tuple) -> str:
    return "k{}-s{}-p{}-op{}-g{}".format(*case).replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_lowered_conv_transpose_equals_torch(case):
    kernel, stride, padding, output_padding, groups = case
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(8, 8 if groups == 8 else 12, kernel, stride, padding, output_padding, groups=groups)
    lowered = ConvTransposeAsConv.from_module(ct)
    assert isinstance(lowered.conv, nn.Conv2d) and lowered.conv.groups == groups
    ct64 = copy.deepcopy(ct).double()
    lowered64 = ConvTransposeAsConv.from_module(ct64)
    for size in ((7, 7), (8, 9), (12, 10)):
        x = torch.rand(2, 8, *size)
        with torch.no_grad():
            want, got = ct(x), lowered(x)
            want64, got64 = ct64(x.double()), lowered64(x.double())
        assert got.shape == want.shape and got64.dtype == torch.float64
        assert float((got - want).abs().max()) <= MAX_ABS_ERROR
        assert float((got64 - want64).abs().max()) <= 1e-12


def test_lowered_weights_are_the_original_ones_rearranged():
    """Every original weight appears once per phase it serves, bias once per phase; the rest are zeros."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(16, 3, 9, stride=2, padding=4, output_padding=1)
    lowered = ConvTransposeAsConv.from_module(ct)
    assert tuple(lowered.conv.weight.shape) == (12, 16, 5, 5) and lowered.conv.padding == (2, 2)
    assert lowered.describe() == "Conv2d(16, 12, kernel 5x5) + PixelShuffle(2)"
    w, lw = ct.weight.detach(), lowered.conv.weight.detach()
    assert torch.equal(torch.sort(lw[lw != 0]).values, torch.sort(w[w != 0]).values)
    assert torch.equal(lowered.conv.bias, ct.bias.detach().repeat_interleave(4))
    crop = ConvTransposeAsConv.from_module(nn.ConvTranspose2d(4, 4, 3, stride=2, padding=0))
    assert crop.rows.crop_after == 1 and crop.describe().endswith(" + pad/crop")


def test_dilation_is_refused():
    with pytest.raises(BadInput, match=r"dilation \(2, 2\): only dilation 1 is lowered"):
        ConvTransposeAsConv.from_module(nn.ConvTranspose2d(4, 4, 3, stride=2, dilation=2))


# ------------------------------------------------------------------------------------------ whole models


class Deconv(nn.Module):
    def __init__(self, dilation: int = 1, functional: bool = False) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1, dilation=dilation)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.head(x))
        if self.functional:
            return F.conv_transpose2d(h, self.up.weight, self.up.bias, stride=2, padding=1)
        return self.up(h)


def _tile() -> np.ndarray:
    return parity_tile(16, 2)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _check_lowered(model: nn.Module, reference: nn.Module, origin: str) -> dict:
    x = _tile()
    lowered = lower_for_conversion(model, x, origin)
    assert isinstance(lowered.model, LoweredModel) and lowered.check["max_abs_error"] <= MAX_ABS_ERROR
    (record,) = lowered.records
    assert record["module"] == "up" and record["to"] == "Conv2d(8, 12, kernel 3x3) + PixelShuffle(2)"
    assert record["from"] == "ConvTranspose2d(8, 3, kernel 4x4, stride 2x2, padding 1x1)"
    assert record["weight_elements"] == {"from": 8 * 3 * 16, "to": 12 * 8 * 9} and record["max_abs_error"] < 1e-6
    counts = ops.op_counts(lowered.program)
    assert "aten.conv_transpose2d" not in counts and counts["aten.pixel_shuffle"] == 1
    with torch.no_grad():
        got, want = lowered.model(_nchw(x)), reference.eval()(_nchw(x))
    assert float((got - want).abs().max()) <= MAX_ABS_ERROR
    # the lowered model's own weights: the conv that replaced the transposed conv, no leftover ConvTranspose2d weight
    shapes = sorted(tuple(p.shape) for p in lowered.model.parameters())
    assert (12, 8, 3, 3) in shapes and (8, 3, 4, 4) not in shapes
    return record


def test_module_model_is_lowered_through_its_graph():
    torch.manual_seed(0)
    model = Deconv().eval()
    _check_lowered(model, model, "deconv")
    assert isinstance(model.up, nn.ConvTranspose2d)  # the user's model is left as it was


@pytest.mark.parametrize("decomposed", [False, True], ids=["pt2", "decomposed-pt2"])
def test_exported_program_is_lowered(decomposed):
    """A .pt2 holds aten.conv_transpose2d nodes; a decomposed one aten.convolution(transposed=True)."""
    torch.manual_seed(0)
    model = Deconv().eval()
    program = torch.export.export(model, (torch.rand(1, 3, 16, 16),), strict=False)
    if decomposed:
        program = program.run_decompositions()
        assert "aten.conv_transpose2d" not in ops.op_counts(program)
    assert any(ops.conv_transpose_args(n) for n in program.graph.nodes)
    _check_lowered(ExportedModule(program), model, "deconv.pt2")


def test_nothing_to_lower_returns_the_model_itself():
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2)).eval()
    lowered = lower_for_conversion(model, _tile(), "plain")
    assert lowered.model is model and lowered.records == [] and lowered.check is None and lowered.program is None


def _refusals(model: nn.Module) -> list[ops.Refusal]:
    return ops.refusals(torch.export.export(model.eval(), (torch.rand(1, 3, 16, 16),), strict=False))


@pytest.mark.parametrize("kind", ["dilated", "functional"])
def test_unlowerable_transposed_convs_are_refused_with_their_node(kind):
    torch.manual_seed(0)
    model = Deconv(dilation=2) if kind == "dilated" else Deconv(functional=True)
    (refusal,) = _refusals(model)
    assert refusal.op == "aten.conv_transpose2d" and refusal.node == "conv_transpose2d"
    if kind == "dilated":
        assert refusal.layer == "up (ConvTranspose2d)" and refusal.reason.startswith("dilation (2, 2)")
    else:
        assert refusal.layer == "forward of Deconv" and "F.conv_transpose2d" in refusal.reason
    with pytest.raises(BadInput) as err:
        lower_for_conversion(model, _tile(), "m.py:build")
    msg = str(err.value)
    assert msg.startswith("m.py:build: cannot lower aten.conv_transpose2d in ") and "[node conv_transpose2d]" in msg
    assert "\n" not in msg


def test_after_lowering_no_transposed_conv_is_accepted():
    program = torch.export.export(Deconv().eval(), (torch.rand(1, 3, 16, 16),), strict=False)
    ops.check_supported_ops(program, "deconv")  # the intake check: lowering will take it
    with pytest.raises(BadInput, match=r"aten.conv_transpose2d in up \(ConvTranspose2d\) \[node conv_transpose2d\]"):
        ops.check_supported_ops(program, "deconv", lowering=False)


# ------------------------------------------------------------------------------------------ the op check


class Op(nn.Module):
    """conv -> f -> conv + pixel shuffle, where f is the operator under test."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.head, self.up = f, nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.up(self.f(self.head(x))), 2)


def _crop(y: torch.Tensor, n: int) -> torch.Tensor:
    return y[..., n:-n, n:-n] if n else y


@pytest.mark.parametrize(
    ("f", "op", "reason"),
    [
        (lambda y: _crop(F.pad(y, (1, 1, 1, 1), mode="circular"), 1), "aten.pad", "padding mode 'circular'"),
        (lambda y: F.pad(F.pad(y, (2, 2, 2, 2)), (-1, -1, -1, -1))[..., 1:-1, 1:-1], "aten.pad", "negative padding"),
        (
            lambda y: F.interpolate(F.interpolate(y, scale_factor=1.5), size=y.shape[-2:]),
            "aten.upsample_nearest2d",
            "nearest resize 16x16 -> 24x24 is not by a whole factor",
        ),
        (lambda y: y * F.interpolate(F.adaptive_avg_pool2d(y, 2), scale_factor=8), "aten.adaptive_avg_pool2d", "only"),
        (lambda y: torch.fft.irfft2(torch.fft.rfft2(y), s=y.shape[-2:]), "aten.fft_rfft2", ""),
    ],
    ids=["circular-pad", "negative-pad", "nearest-x1.5", "adaptive-pool-2", "fft"],
)
def test_op_check_refusals_name_node_and_reason(f, op, reason):
    found = [r for r in _refusals(Op(f)) if r.op == op]
    assert found and found[0].layer == "forward of Op" and found[0].node
    assert found[0].reason.startswith(reason) if reason else found[0].reason == ""


@pytest.mark.parametrize(
    "f",
    [
        lambda y: _crop(F.pad(y, (2, 2, 2, 2), mode="replicate"), 2),
        lambda y: _crop(F.pad(y, (1, 1, 1, 1), mode="reflect"), 1),
        lambda y: F.pad(y, (0, 1, 0, 1), value=0.5)[..., :-1, :-1],
        lambda y: F.interpolate(F.interpolate(y, scale_factor=3), scale_factor=1 / 3, mode="bilinear"),
        lambda y: y * F.adaptive_avg_pool2d(y, 1),
        lambda y: torch.cat(torch.split(y, [1, 3], dim=1)[::-1], 1),
        lambda y: torch.cat([*y.chunk(2, 1), y.narrow(1, 0, 2)], 1)[:, :4],
        lambda y: y * (y.var((2, 3), keepdim=True) + y.std((2, 3), keepdim=True)).rsqrt(),
        lambda y: torch.stack(torch.unbind(y, 1)[::-1], 1).pow(2).sqrt(),
    ],
    ids=[
        "replicate",
        "reflect",
        "constant-value",
        "nearest-x3",
        "global-pool",
        "split",
        "chunk-narrow",
        "var-std",
        "unbind",
    ],
)
def test_op_check_accepts_what_the_converters_handle(f):
    assert _refusals(Op(f)) == []
