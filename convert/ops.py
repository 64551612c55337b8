"""Which torch operators `convert` takes: the one allowlist, and the per-node conditions behind it.

A model is checked as torch.export captures it (ATen operators, e.g. `aten.conv2d`). An operator is taken when
litert-torch lowers it to TFLite builtins, coremltools converts it to MIL, and `device_bench.mil_exec` executes that
MIL, each matching torch to float rounding; the padding, splitting and statistics operators real SR networks use
were added after converting them both ways (tests/test_topology_convert.py converts one model per topology).
Some are taken only with certain arguments (`_CONDITIONS`), where a converter was measured to fail or to differ:
nearest resizing by whole factors only (TFLite samples other pixels otherwise), global average pooling only
(coremltools fails on other output sizes), padding in modes constant / reflect / replicate and never negative
(coremltools refuses the rest). A transposed convolution is not converted as such (litert-torch cannot legalize
it) but rewritten first by `convert.lowering` into a conv + pixel shuffle; `check_supported_ops` accepts the ones
that lowering can rewrite when `lowering=True` (the intake check, before lowering) and none after it (what the
converters see).

Everything refused is reported in one line: operator, layer (module path and class), graph node, and the reason
when the operator is known but its arguments are not handled.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from edgesr.errors import BadInput, first_line

# The one allowlist of operators a model may use, as torch.export (ATen) names: what litert-torch lowers to
# TFLite builtins, coremltools converts to MIL, and device_bench.mil_exec executes (its MIL counterparts: conv, add,
# sub, mul, real_div, pow, sqrt, rsqrt, relu, leaky_relu, prelu, clip, sigmoid, tanh, silu, elu, batch_norm,
# concat, stack, split, reshape, transpose, expand_dims, squeeze, slice_by_index, pad, reduce_mean,
# pixel_(un)shuffle, upsample_nearest_neighbor/bilinear). Conditions on arguments: `_CONDITIONS`.
SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        # convolutions (grouped and depthwise included; transposed ones only after convert.lowering)
        "aten.conv2d",
        "aten.convolution",
        "aten._convolution",
        # elementwise arithmetic
        "aten.add",
        "aten.add_",
        "aten.sub",
        "aten.sub_",
        "aten.rsub",
        "aten.mul",
        "aten.mul_",
        "aten.div",
        "aten.div_",
        "aten.neg",
        "aten.pow",
        "aten.square",
        "aten.sqrt",
        "aten.rsqrt",
        # activations
        "aten.relu",
        "aten.relu_",
        "aten.leaky_relu",
        "aten.leaky_relu_",
        "aten.prelu",
        "aten._prelu_kernel",
        "aten.clamp",
        "aten.clamp_",
        "aten.clip",
        "aten.hardtanh",
        "aten.hardtanh_",
        "aten.sigmoid",
        "aten.tanh",
        "aten.silu",
        "aten.silu_",
        "aten.elu",
        "aten.elu_",
        # inference batch norm (folded or run as MIL batch_norm)
        "aten.batch_norm",
        "aten._native_batch_norm_legit_no_training",
        # statistics (channel attention: global pooling, contrast = std + mean)
        "aten.mean",
        "aten.var",
        "aten.std",
        "aten.adaptive_avg_pool2d",
        # padding (constant, reflect, replicate)
        "aten.pad",
        "aten.constant_pad_nd",
        "aten.reflection_pad2d",
        "aten.replication_pad2d",
        # concatenation, splitting and shapes
        "aten.cat",
        "aten.concat",
        "aten.stack",
        "aten.split",
        "aten.split_with_sizes",
        "aten.chunk",
        "aten.unbind",
        "aten.narrow",
        "aten.slice",
        "aten.reshape",
        "aten.view",
        "aten._unsafe_view",
        "aten.permute",
        "aten.flatten",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.contiguous",
        "aten.clone",
        "aten.alias",
        "aten.detach",
        "aten.dropout",
        # resolution changes
        "aten.pixel_shuffle",
        "aten.pixel_unshuffle",
        "aten.upsample_nearest2d",
        "aten.upsample_bilinear2d",
    }
)
# Operators convert.lowering rewrites into supported ones before conversion (when `conv_transpose_refusal` allows).
LOWERED_OPS: frozenset[str] = frozenset({"aten.conv_transpose2d"})
# Graph bookkeeping that computes nothing on tensors (shape reads, asserts, tuple indexing).
_BOOKKEEPING = frozenset(
    {
        "aten.sym_size",
        "aten.sym_numel",
        "aten.sym_stride",
        "aten._assert_scalar",
        "aten._assert_async",
        "aten.sym_constrain_range",
        "aten.sym_constrain_range_for_size",
        "aten._assert_tensor_metadata",
        "aten.lift_fresh_copy",
    }
)
_PAD_MODES = ("constant", "reflect", "replicate")
_CONVOLUTIONS = ("aten.convolution", "aten._convolution")


@dataclass(frozen=True)
class Refusal:
    """One graph node `convert` cannot take: its operator, layer, node name and why ('' = no converter has it)."""

    op: str
    layer: str
    node: str
    reason: str = ""


@dataclass(frozen=True)
class ConvTransposeArgs:
    """A transposed convolution's arguments, per spatial axis (height, width)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def op_name(target: Any) -> str | None:
    """'aten.conv2d' for an ATen overload; None for graph bookkeeping (getitem, shape reads, asserts)."""
    if target in (operator.getitem,) or getattr(target, "__module__", None) in ("_operator", "operator", "math"):
        return None
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}"
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = str(target)
    else:
        name = getattr(target, "__qualname__", None) or str(target)
    return None if name in _BOOKKEEPING else name


def op_counts(program: torch.export.ExportedProgram) -> dict[str, int]:
    """ATen operator -> number of calls in the exported graph."""
    counts: dict[str, int] = defaultdict(int)
    for node in program.graph.nodes:
        if node.op == "call_function" and (name := op_name(node.target)):
            counts[name] += 1
    return dict(sorted(counts.items()))


def node_layer(node: fx.Node) -> str:
    """The innermost module that called `node`: 'body.3.warp (Warp)', or 'forward of SRNet' for the top level."""
    path, cls_name = node_module(node)
    if path is None:
        return "the model's forward"
    return f"{path} ({cls_name})" if path else f"forward of {cls_name}"


def node_module(node: fx.Node) -> tuple[str | None, str]:
    """(module path, class name) of the innermost module that called `node`; (None, '') when not recorded."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None, ""
    path, cls = stack[-1]
    return path, _class_name(cls)


def _class_name(cls: Any) -> str:
    return str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]


def _in_conv_transpose_module(node: fx.Node) -> bool:
    """Whether the innermost module calling `node` is an nn.ConvTranspose2d (a subclass, or by name in a .pt2,
    whose graph records classes as qualified names)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return False
    cls = stack[-1][1]
    if isinstance(cls, type):
        return issubclass(cls, nn.ConvTranspose2d)
    return _class_name(cls) == "ConvTranspose2d"


# ------------------------------------------------------------------------------------ per-node conditions


def _shape(value: Any) -> tuple[int, ...] | None:
    """Static shape of a node's recorded value (its `val` meta), None when unknown or symbolic."""
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    shape = getattr(val, "shape", None)
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    return tuple(int(s) for s in shape)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    values = [int(v) for v in value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_transpose_args(node: fx.Node) -> ConvTransposeArgs | None:
    """The arguments of a transposed convolution node (aten.conv_transpose2d, or aten.convolution with
    transposed=True as in a decomposed program); None for any other node."""
    name = op_name(node.target) if node.op == "call_function" else None
    if name == "aten.conv_transpose2d":  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        output_padding, groups = _arg(node, 5, "output_padding", 0), _arg(node, 6, "groups", 1)
        dilation = _arg(node, 7, "dilation", 1)
    elif name in _CONVOLUTIONS and _arg(node, 6, "transposed", False):
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
        stride, padding, dilation = (
            _arg(node, 3, "stride", 1),
            _arg(node, 4, "padding", 0),
            _arg(node, 5, "dilation", 1),
        )
        output_padding, groups = _arg(node, 7, "output_padding", 0), _arg(node, 8, "groups", 1)
    else:
        return None
    return ConvTransposeArgs(
        stride=_pair(stride, 1),
        padding=_pair(padding, 0),
        output_padding=_pair(output_padding, 0),
        dilation=_pair(dilation, 1),
        groups=int(groups),
    )


def conv_transpose_refusal(node: fx.Node, args: ConvTransposeArgs, constants: frozenset[str] = frozenset()) -> str:
    """Why convert.lowering cannot rewrite this transposed convolution, or '' when it can.

    Its weight and bias must be stored tensors: get_attr nodes (an unlifted graph module), or placeholders named
    in `constants` (an ExportedProgram's parameters and buffers)."""
    if not _in_conv_transpose_module(node):
        return (
            "a transposed convolution outside an nn.ConvTranspose2d module (F.conv_transpose2d) is not lowered; "
            "use nn.ConvTranspose2d"
        )
    if args.dilation != (1, 1):
        return f"dilation {args.dilation}: only dilation 1 is lowered to a conv + pixel shuffle"
    x, weight, bias = (_arg(node, i, n, None) for i, n in ((0, "input"), (1, "weight"), (2, "bias")))
    if _shape(x) is None or len(_shape(x)) != 4:
        return "only 2-D transposed convolutions of a (N, C, H, W) tensor are lowered"
    for part, value in (("weight", weight), ("bias", bias)):
        stored = isinstance(value, fx.Node) and (value.op == "get_attr" or value.name in constants)
        if value is not None and not stored:
            return f"its {part} is computed in the graph, not a stored parameter (remove parametrizations first)"
    return ""


def _pad_refusal(node: fx.Node) -> str:
    name = op_name(node.target)
    pads = _arg(node, 1, "pad" if name == "aten.pad" else "padding", [])
    if name == "aten.pad" and (mode := _arg(node, 2, "mode", "constant")) not in _PAD_MODES:
        return f"padding mode '{mode}': Core ML pads only in modes {', '.join(_PAD_MODES)}"
    if any(int(p) < 0 for p in pads):
        return "negative padding (a crop): coremltools refuses it; slice the tensor instead"
    return ""


def _nearest_refusal(node: fx.Node) -> str:
    shape_in, shape_out = _shape(node.args[0]), _shape(node)
    if shape_in is None or shape_out is None:
        return "output size unknown (symbolic shapes)"
    if any(o % i for i, o in zip(shape_in[-2:], shape_out[-2:], strict=True)):
        return (
            f"nearest resize {shape_in[-2]}x{shape_in[-1]} -> {shape_out[-2]}x{shape_out[-1]} is not by a whole "
            "factor: TFLite's RESIZE_NEAREST_NEIGHBOR then samples other pixels than torch"
        )
    return ""


def _adaptive_pool_refusal(node: fx.Node) -> str:
    shape = _shape(node)
    if shape is None or shape[-2:] != (1, 1):
        return "only global average pooling (output size 1) is converted: coremltools fails on other sizes"
    return ""


def _convolution_refusal(node: fx.Node) -> str:
    # A decomposed program writes every conv as aten.convolution; the transposed ones are lowered.
    args = conv_transpose_args(node)
    return "" if args is None else "transposed convolution: needs convert.lowering"


_CONDITIONS: dict[str, Callable[[fx.Node], str]] = {
    "aten.pad": _pad_refusal,
    "aten.constant_pad_nd": _pad_refusal,
    "aten.upsample_nearest2d": _nearest_refusal,
    "aten.adaptive_avg_pool2d": _adaptive_pool_refusal,
    "aten.convolution": _convolution_refusal,
    "aten._convolution": _convolution_refusal,
}


def node_refusal(node: fx.Node, lowering: bool, constants: frozenset[str] = frozenset()) -> Refusal | None:
    """Why `node` cannot be converted, or None when it can (as it is, or through convert.lowering if `lowering`).

    `constants`: names of the placeholder nodes that hold parameters and buffers (see `stored_tensors`)."""
    if node.op != "call_function" or not (name := op_name(node.target)):
        return None
    ct_args = conv_transpose_args(node)
    if ct_args is not None:
        if not lowering:
            reason = "no converter takes a transposed convolution; convert.lowering should have rewritten it"
        else:
            reason = conv_transpose_refusal(node, ct_args, constants)
        return Refusal(name, node_layer(node), node.name, reason) if reason else None
    if name not in SUPPORTED_OPS:
        return Refusal(name, node_layer(node), node.name)
    condition = _CONDITIONS.get(name)
    reason = condition(node) if condition else ""
    return Refusal(name, node_layer(node), node.name, reason) if reason else None


def stored_tensors(program: torch.export.ExportedProgram) -> frozenset[str]:
    """Names of the graph's placeholders that are parameters, buffers or constants (not the model's input)."""
    sig = program.graph_signature
    return frozenset(
        {*sig.inputs_to_parameters, *sig.inputs_to_buffers, *getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    )


def refusals(program: torch.export.ExportedProgram, lowering: bool = True) -> list[Refusal]:
    """Every node of the exported graph that cannot be converted, in graph order."""
    constants = stored_tensors(program)
    return [r for node in program.graph.nodes if (r := node_refusal(node, lowering, constants)) is not None]


def unsupported_ops(program: torch.export.ExportedProgram, lowering: bool = True) -> dict[str, list[str]]:
    """Each refused operator -> the layers that call it ('body.3.conv (Conv2d)'), in graph order."""
    found: dict[str, list[str]] = {}
    for r in refusals(program, lowering):
        layers = found.setdefault(r.op, [])
        if r.layer not in layers:
            layers.append(r.layer)
    return found


def check_supported_ops(program: torch.export.ExportedProgram, origin: str, lowering: bool = True) -> None:
    """BadInput naming every refused operator with its layers, nodes and reason, in one line.

    `lowering`: accept what convert.lowering rewrites (the check before lowering); False for the graph the
    converters themselves get.
    """
    found = refusals(program, lowering)
    if not found:
        return
    groups: dict[tuple[str, str], list[Refusal]] = {}
    for r in found:
        groups.setdefault((r.op, r.reason), []).append(r)
    parts = []
    for (op, reason), rs in groups.items():
        layers = list(dict.fromkeys(r.layer for r in rs))
        more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
        nodes = [r.node for r in rs]
        node_list = ", ".join(nodes[:3]) + (f" +{len(nodes) - 3}" if len(nodes) > 3 else "")
        part = f"{op} in {', '.join(layers[:3])}{more} [node{'s' if len(nodes) > 1 else ''} {node_list}]"
        parts.append(f"{part}: {reason}" if reason else part)
    raise BadInput(f"{origin}: unsupported operators for TFLite/Core ML conversion: {'; '.join(parts)}")


def export_program(model: nn.Module, origin: str, size: int) -> torch.export.ExportedProgram:
    """The program the converters see: a .pt2's own, or the model torch.exported (as litert-torch does) at
    (1, 3, size, size); BadInput if it cannot be exported."""
    exported = getattr(model, "exported", None)  # compress.intake.ExportedModule keeps its ExportedProgram
    if isinstance(exported, torch.export.ExportedProgram):
        return exported
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return torch.export.export(model.eval(), (x,), strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many types for unsupported Python
        raise BadInput(f"{origin}: torch.export cannot capture the model: {first_line(exc)}") from None
