"""Channel coupling: which channels of which layers must be pruned together, for any traced SR network.

Why: channel pruning (FMP/DHP channel vectors, L1 channel pruning) removes whole channels, and in an SR net a channel
is rarely owned by one conv. Residual adds tie every conv writing into the stream, concats place a producer's
channels at an offset inside a consumer's input, PixelShuffle folds s^2 conv outputs into one channel, a depthwise
conv ties each output to one input channel, and BatchNorm / per-channel PReLU carry one parameter per channel.
Torch-Pruning gets PixelShuffle wrong (it treats it as channel-preserving; VainF/Torch-Pruning#420).

How: the model is traced with torch.fx (every conv-like layer, BatchNorm and PReLU is a leaf) and run once on an
example input for shapes. Every conv-like output channel gets a fresh channel variable; ops map variables from
inputs to outputs (elementwise ops, padding, pooling, interpolation: pass through; add/sub/mul of two feature
tensors: unify channel by channel; cat on dim 1: concatenate the lists; pixel_shuffle(s): unify each run of s^2
variables into one). Union-find then gives equivalence classes of channels; classes touching the same layers in the
same way form one `ChannelGroup`, whose channel j maps to the layer channels `member.index[j]` of each member.
Members are conv-like outputs ("out", producers), inputs ("in", consumers) and per-channel modules ("chan").

Masked and sliced must agree. Pruning a group zeroes its producers (weights, bias, and a following BatchNorm's
scale and shift), so every tensor of the group must then be zero where a consumer reads it: each node records
whether its channels "vanish" when their producers are zeroed. Zero-preserving ops keep that (ReLU, PReLU, padding,
pooling, x * y when either vanishes, x + y when both do); sigmoid, exp or adding a constant do not. A consumer that
reads a channel that would not vanish makes that channel's group fixed, so the sliced net always computes what the
masked one does. Groups are also fixed (never pruned, with the reason recorded) when they reach the network input or
output (RGB), a fixed conv (EDSR's MeanShift), a grouped conv, or a split/chunk/narrow/slice on the channel axis:
those positions are literals in the model's code. Ops with unknown channel semantics raise ValueError naming the
node and the op.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from compress.pruning.layers import (
    CONV_LIKE,
    groups_of,
    in_channels,
    is_depthwise,
    out_channels,
    probe_input,
    weight_dims,
)

log = logging.getLogger(__name__)

KINDS = ("out", "in", "chan")
CHANNEL_MODULES = (nn.BatchNorm2d, nn.PReLU)  # per-channel parameters: "chan" members (PReLU with one per channel)


@dataclass
class GroupMember:
    """One layer side of a group: group channel j is the layer's `kind` channels `index[j]` (shape (size, k))."""

    layer: str
    kind: str  # "out" (a producer's outputs), "in" (a consumer's inputs) or "chan" (a per-channel module)
    index: torch.Tensor  # LongTensor (group size, k); k = s^2 for a conv feeding PixelShuffle(s), else 1 usually


@dataclass
class ChannelGroup:
    """Channels that are kept or pruned together; `size` is the number of independently prunable channels."""

    id: int
    members: list[GroupMember]
    prunable: bool
    reason: str = ""  # why the group is not prunable

    @property
    def size(self) -> int:
        return int(self.members[0].index.shape[0])

    @property
    def producers(self) -> list[GroupMember]:
        return [m for m in self.members if m.kind == "out"]

    @property
    def consumers(self) -> list[GroupMember]:
        return [m for m in self.members if m.kind == "in"]

    def member(self, layer: str, kind: str) -> GroupMember | None:
        return next((m for m in self.members if m.layer == layer and m.kind == kind), None)

    def __repr__(self) -> str:
        sides = ", ".join(
            f"{m.layer}.{m.kind}" + (f"[x{m.index.shape[1]}]" if m.index.shape[1] > 1 else "") for m in self.members
        )
        state = "prunable" if self.prunable else f"fixed: {self.reason}"
        return f"ChannelGroup({self.id}, size={self.size}, {state}; {sides})"


# Channel-preserving ops (output channel c depends only on input channel c) that map zero to zero.
ZERO_KEEPING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Upsample,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
ZERO_KEEPING_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.hardtanh,
    torch.tanh,
    F.tanh,
    operator.neg,
    torch.neg,
    torch.abs,
    torch.sqrt,
    F.interpolate,
    F.dropout,
    F.avg_pool2d,
    F.max_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.pad,
}
ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "neg", "abs", "sqrt", "contiguous", "clone", "float"}
# Channel-preserving ops whose output is not zero where their input is (sigmoid(0) = 0.5).
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, torch.rsqrt, torch.cos}
NONZERO_METHODS = {"sigmoid", "exp", "rsqrt"}
# Reductions over spatial dims (the channel dim must not be reduced): zero-keeping.
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# Elementwise binary ops: two feature operands are unified channel by channel; a scalar operand passes through.
ADD_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
ADD_METHODS, MUL_METHODS, DIV_METHODS = {"add", "add_", "sub", "sub_"}, {"mul", "mul_"}, {"div", "div_"}
POW = ({operator.pow, torch.pow}, {"pow", "pow_"})
CLAMP = ({torch.clamp, torch.clip}, {"clamp", "clamp_", "clip"})
CAT_FUNCTIONS = {torch.cat, torch.concat}
SHUFFLE_FUNCTIONS = {F.pixel_shuffle, torch.pixel_shuffle}
UNSHUFFLE_FUNCTIONS = {F.pixel_unshuffle, torch.pixel_unshuffle}
SPLIT = ({torch.split, torch.chunk, torch.tensor_split}, {"split", "chunk", "split_with_sizes", "tensor_split"})
NARROW = ({torch.narrow}, {"narrow"})


class _LeafTracer(fx.Tracer):
    """The default fx tracer, except that conv-like layers (also subclasses such as MeanShift), BatchNorm and PReLU
    are one call_module node each."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CONV_LIKE + CHANNEL_MODULES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = _LeafTracer().trace(model)
    return fx.GraphModule(model, graph)


def _op_name(fn: Any) -> str:
    return getattr(fn, "__name__", str(fn))


class _Analysis:
    """Union-find over channel variables, filled by walking the fx graph once."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.flags: list[set[str]] = []  # reasons a variable's class is not prunable (valid at roots)
        self.sides: list[tuple[str, str, int, int]] = []  # (layer, kind, layer channel, variable)
        self.chans: dict[fx.Node, list[int]] = {}  # feature tensor node -> variable per channel
        self.vanish: dict[fx.Node, list[bool]] = {}  # ... -> per channel: zero once its producers are zeroed
        self.parts: dict[fx.Node, list[tuple[list[int], list[bool]]]] = {}  # split node -> its parts
        self.layer_calls: dict[str, tuple[list[int], list[int]]] = {}  # layer name -> (in vars, out vars)

    # union-find
    def new(self, n: int, flag: str | None = None) -> list[int]:
        start = len(self.parent)
        self.parent += range(start, start + n)
        self.flags += [{flag} if flag else set() for _ in range(n)]
        return list(range(start, start + n))

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.flags[ra] |= self.flags[rb]

    def flag(self, variables: list[int], reason: str) -> None:
        for v in variables:
            self.flags[self.find(v)].add(reason)

    # graph walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = self._shape(node)
                if shape is not None:
                    if len(shape) != 4:
                        raise ValueError(f"coupling: input '{node.name}' has shape {tuple(shape)}, expected NCHW")
                    self.chans[node] = self.new(shape[1], "reaches the network input")
                    self.vanish[node] = [True] * shape[1]  # never pruned: no need to flag its readers too
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda n: self.flag(self.chans.get(n, []), "reaches the network output"))
            elif node.op in ("call_module", "call_function", "call_method"):
                if self._split_part(node):
                    continue
                feeds = [n for n in node.all_input_nodes if n in self.chans or n in self.parts]
                if not feeds:
                    continue  # a constant, or a non-tensor value such as x.shape
                if self._is_split(node):
                    self.parts[node] = self._split(node)
                    continue
                meta = node.meta.get("tensor_meta")
                if meta is None:
                    continue  # not a tensor: x.shape, x.size(2), ...
                shape = self._shape(node)
                if shape is None:
                    raise self._unknown(node, "it returns several tensors")
                out, vanish = self._visit(node)
                if len(shape) != 4 or len(out) != shape[1]:
                    raise ValueError(
                        f"coupling: node '{node.name}' ({self._op(node)}) gives shape {tuple(shape)}, "
                        f"which channel bookkeeping does not follow (it follows NCHW feature maps)"
                    )
                self.chans[node], self.vanish[node] = out, vanish

    def _shape(self, node: fx.Node) -> torch.Size | None:
        meta = node.meta.get("tensor_meta")
        return meta.shape if meta is not None and hasattr(meta, "shape") else None

    def _op(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"call_module {type(self.gm.get_submodule(node.target)).__name__}"
        return f"{node.op} {_op_name(node.target)}"

    def _unknown(self, node: fx.Node, why: str = "unknown channel semantics") -> ValueError:
        return ValueError(f"coupling: cannot follow channels through node '{node.name}' ({self._op(node)}): {why}")

    def _is(self, node: fx.Node, funcs: set, methods: set) -> bool:
        return (node.op == "call_function" and node.target in funcs) or (
            node.op == "call_method" and node.target in methods
        )

    def _visit(self, node: fx.Node) -> tuple[list[int], list[bool]]:
        t = node.target
        if node.op == "call_module":
            mod = self.gm.get_submodule(t)
            if isinstance(mod, CONV_LIKE):
                return self._layer(node, t, mod)
            if isinstance(mod, nn.PixelShuffle):
                return self._shuffle(node.args[0], mod.upscale_factor)
            if isinstance(mod, nn.PixelUnshuffle):
                return self._unshuffle(node.args[0], mod.downscale_factor)
            if isinstance(mod, (nn.BatchNorm2d, nn.PReLU)):
                return self._per_channel(node, t, mod)
            if isinstance(mod, ZERO_KEEPING_MODULES):
                return self._pass(node, keeps_zero=True)
            if isinstance(mod, NONZERO_MODULES):
                return self._pass(node, keeps_zero=False)
            raise self._unknown(node)
        if node.op == "call_function" and t in (F.conv2d, torch.conv2d, F.conv_transpose2d, F.linear):
            raise self._unknown(
                node, "functional convolution; use an nn.Conv2d/ConvTranspose2d module so it can be sliced"
            )
        if self._is(node, ZERO_KEEPING_FUNCTIONS, ZERO_KEEPING_METHODS):
            if t is F.pad:
                self._check_pad(node)
            return self._pass(node, keeps_zero=True)
        if self._is(node, NONZERO_FUNCTIONS, NONZERO_METHODS):
            return self._pass(node, keeps_zero=False)
        if self._is(node, REDUCE_FUNCTIONS, REDUCE_METHODS):
            self._check_reduce(node)
            return self._pass(node, keeps_zero=True)
        if self._is(node, *POW):
            return self._pass(node, keeps_zero=self._scalar_arg(node, 1, "exponent") > 0)
        if self._is(node, *CLAMP):
            lo, hi = (node.args[1:3] + (None, None))[:2] if len(node.args) > 1 else (None, None)
            lo, hi = node.kwargs.get("min", lo), node.kwargs.get("max", hi)
            keeps = (lo is None or (isinstance(lo, (int, float)) and lo <= 0)) and (
                hi is None or (isinstance(hi, (int, float)) and hi >= 0)
            )
            return self._pass(node, keeps_zero=keeps)
        for funcs, methods, kind in (
            (ADD_FUNCTIONS, ADD_METHODS, "add"),
            (MUL_FUNCTIONS, MUL_METHODS, "mul"),
            (DIV_FUNCTIONS, DIV_METHODS, "div"),
        ):
            if self._is(node, funcs, methods):
                return self._binary(node, kind)
        if node.op == "call_function" and t in CAT_FUNCTIONS:
            return self._cat(node)
        if self._is(node, SHUFFLE_FUNCTIONS | UNSHUFFLE_FUNCTIONS, {"pixel_shuffle", "pixel_unshuffle"}):
            factor = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()))
            shuffle = t in SHUFFLE_FUNCTIONS or t == "pixel_shuffle"
            return (self._shuffle if shuffle else self._unshuffle)(node.args[0], int(factor))
        if self._is(node, *NARROW):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
            length = node.args[3] if len(node.args) > 3 else node.kwargs.get("length")
            return self._channel_range(node, dim, slice(int(start), int(start) + int(length)))
        if node.op == "call_function" and t is operator.getitem:
            return self._getitem(node)
        raise self._unknown(node)

    def _feature(self, node: fx.Node, arg: Any) -> tuple[list[int], list[bool]]:
        if not isinstance(arg, fx.Node) or arg not in self.chans:
            raise self._unknown(node, "expected a feature tensor as first argument")
        return self.chans[arg], self.vanish[arg]

    def _layer(self, node: fx.Node, name: str, layer: nn.Module) -> tuple[list[int], list[bool]]:
        x, vanish = self._feature(node, node.args[0])
        if name in self.layer_calls:  # a layer called twice: both calls share its channels
            ins, outs = self.layer_calls[name]
            for a, b in zip(ins, x, strict=True):
                self.union(a, b)
            self._check_reads(node, name, x, vanish)
            return outs, [True] * len(outs)
        outs = self.new(out_channels(layer))
        self.layer_calls[name] = (x, outs)
        self.sides += [(name, "in", c, v) for c, v in enumerate(x)]
        self.sides += [(name, "out", c, v) for c, v in enumerate(outs)]
        self._check_reads(node, name, x, vanish)
        g = groups_of(layer)
        if is_depthwise(layer) and not isinstance(layer, nn.ConvTranspose2d):
            mult = out_channels(layer) // g  # output c*mult + i reads input channel c only
            for c, v in enumerate(x):
                for i in range(mult):
                    self.union(v, outs[c * mult + i])
        elif g > 1:
            self.flag(x + outs, f"grouped {type(layer).__name__} '{name}' (groups={g})")
        if not layer.weight.requires_grad:
            kind = (
                "transposed conv"
                if isinstance(layer, nn.ConvTranspose2d)
                else "linear"
                if isinstance(layer, nn.Linear)
                else "conv"
            )
            self.flag(x + outs, f"passes through fixed {kind} '{name}'")
        return outs, [True] * len(outs)

    def _check_reads(self, node: fx.Node, name: str, x: list[int], vanish: list[bool]) -> None:
        """A consumer must read channels that are zero once pruned, or slicing them away would change it."""
        stays = [v for v, gone in zip(x, vanish, strict=True) if not gone]
        self.flag(stays, f"'{name}' reads channels that do not vanish when pruned (e.g. through a sigmoid)")

    def _per_channel(self, node: fx.Node, name: str, mod: nn.Module) -> tuple[list[int], list[bool]]:
        x, vanish = self._feature(node, node.args[0])
        if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return x, vanish
        self.sides += [(name, "chan", c, v) for c, v in enumerate(x)]
        # Pruning zeroes a BatchNorm's scale and shift too (see apply_group_masks): its output vanishes.
        return x, [True] * len(x) if isinstance(mod, nn.BatchNorm2d) else vanish

    def _pass(self, node: fx.Node, keeps_zero: bool) -> tuple[list[int], list[bool]]:
        feeds = [n for n in node.all_input_nodes if n in self.chans]
        if len(feeds) != 1 or node.args[0] not in self.chans:
            raise self._unknown(node, "expected one feature tensor as first argument")
        x, vanish = self.chans[node.args[0]], self.vanish[node.args[0]]
        return x, vanish if keeps_zero else [False] * len(x)

    def _check_pad(self, node: fx.Node) -> None:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if not isinstance(pad, (list, tuple)) or len(pad) > 4 and any(pad[4:]):
            raise self._unknown(node, f"padding {pad} reaches the channel axis")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
        if value not in (None, 0, 0.0):
            raise self._unknown(node, f"constant padding with value {value} (not zero) is not channel-exact")

    def _check_reduce(self, node: fx.Node) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if dim is None or any(d in (1, -3) for d in dims):
            raise self._unknown(node, f"reduces over the channel axis (dim={dim})")

    def _scalar_arg(self, node: fx.Node, index: int, what: str) -> float:
        value = node.args[index] if len(node.args) > index else node.kwargs.get(what)
        if not isinstance(value, (int, float)):
            raise self._unknown(node, f"non-constant {what}")
        return float(value)

    def _binary(self, node: fx.Node, kind: str) -> tuple[list[int], list[bool]]:
        a, b = (list(node.args) + [node.kwargs.get("other")])[:2]
        operands = [(n, n in self.chans) if isinstance(n, fx.Node) else (n, False) for n in (a, b)]
        for n, is_feature in operands:
            if isinstance(n, fx.Node) and not is_feature:
                shape = self._shape(n)
                if shape is not None and shape.numel() != 1:
                    raise self._unknown(node, f"constant tensor operand of shape {tuple(shape)}")
        feats = [(self.chans[n], self.vanish[n]) for n, is_feature in operands if is_feature]
        if not feats:
            raise self._unknown(node, "no feature tensor among the first two operands")
        if len(feats) == 2:
            (xa, va), (xb, vb) = feats
            if len(xa) != len(xb):
                raise self._unknown(node, f"operands have {len(xa)} and {len(xb)} channels")
            for u, v in zip(xa, xb, strict=True):
                self.union(u, v)
            if kind == "add":
                vanish = [p and q for p, q in zip(va, vb, strict=True)]
            elif kind == "mul":
                vanish = [p or q for p, q in zip(va, vb, strict=True)]
            else:  # a / b: zero where a is; a vanishing denominator would divide by zero
                self.flag(
                    [v for v, gone in zip(xb, vb, strict=True) if gone], f"divides by a pruned channel in '{node.name}'"
                )
                vanish = list(va)
            return xa, vanish
        x, vanish = feats[0]
        scalar = b if operands[0][1] else a
        if kind == "add" and scalar not in (0, 0.0):
            return x, [False] * len(x)  # x + c is not zero where x is
        if kind == "div" and not operands[0][1]:
            raise self._unknown(node, "divides a constant by a feature tensor")
        return x, vanish

    def _cat(self, node: fx.Node) -> tuple[list[int], list[bool]]:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if any(n not in self.chans for n in tensors):
            raise self._unknown(node, "concatenates a constant with features")
        parts = [(self.chans[n], self.vanish[n]) for n in tensors]
        if dim in (1, -3):
            return [v for p, _ in parts for v in p], [z for _, vz in parts for z in vz]
        for part, _ in parts[1:]:  # concat over batch or space: the channels of all parts coincide
            for u, v in zip(parts[0][0], part, strict=True):
                self.union(u, v)
        return parts[0][0], [all(zs) for zs in zip(*(vz for _, vz in parts), strict=True)]

    def _shuffle(self, arg: Any, s: int) -> tuple[list[int], list[bool]]:
        """depth_to_space: output channel c is input channels c*s^2 .. c*s^2 + s^2 - 1 (one unit)."""
        x, vanish = self.chans[arg], self.vanish[arg]
        block = s * s
        for c in range(0, len(x), block):
            for i in range(1, block):
                self.union(x[c], x[c + i])
        return x[::block], [all(vanish[c : c + block]) for c in range(0, len(x), block)]

    def _unshuffle(self, arg: Any, s: int) -> tuple[list[int], list[bool]]:
        x, vanish = self.chans[arg], self.vanish[arg]
        return [v for v in x for _ in range(s * s)], [z for z in vanish for _ in range(s * s)]

    # channel splits: the offsets are literals in the model's code, so the channels they touch stay fixed
    def _is_split(self, node: fx.Node) -> bool:
        return self._is(node, *SPLIT)

    def _split(self, node: fx.Node) -> list[tuple[list[int], list[bool]]]:
        x, vanish = self._feature(node, node.args[0])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        meta = node.meta.get("tensor_meta")
        sizes = [m.shape[1] if dim in (1, -3) else None for m in meta] if isinstance(meta, (list, tuple)) else None
        if sizes is None:
            raise self._unknown(node, "split result has no shapes")
        if dim not in (1, -3):
            return [(x, vanish) for _ in sizes]
        self.flag(x, f"split at fixed channel offsets by '{node.name}'")
        parts, start = [], 0
        for size in sizes:
            parts.append((x[start : start + size], vanish[start : start + size]))
            start += size
        return parts

    def _split_part(self, node: fx.Node) -> bool:
        """`parts[i]` of a split: record that part's channels; True when `node` was one."""
        if node.op != "call_function" or node.target is not operator.getitem or node.args[0] not in self.parts:
            return False
        self.chans[node], self.vanish[node] = self.parts[node.args[0]][int(node.args[1])]
        return True

    def _channel_range(self, node: fx.Node, dim: Any, index: slice) -> tuple[list[int], list[bool]]:
        x, vanish = self._feature(node, node.args[0])
        if dim not in (1, -3):
            return x, vanish
        self.flag(x, f"sliced at fixed channel offsets by '{node.name}'")
        return x[index], vanish[index]

    def _getitem(self, node: fx.Node) -> tuple[list[int], list[bool]]:
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None or not isinstance(i, (slice, int)) for i in index) or (
            index and isinstance(index[0], int)
        ):
            raise self._unknown(node, f"indexing with {index}")
        if len(index) > 1 and isinstance(index[1], slice) and index[1] != slice(None):
            return self._channel_range(node, 1, index[1])
        if len(index) > 1 and isinstance(index[1], int):
            raise self._unknown(node, "indexing a single channel")
        return self._feature(node, node.args[0])

    # result
    def groups(self) -> list[ChannelGroup]:
        by_root: dict[int, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
        for layer, kind, channel, v in self.sides:
            by_root[self.find(v)][(layer, kind)].append(channel)
        # Classes that touch the same layer sides in the same way are one group.
        by_key: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
        for root, sides in by_root.items():
            key = (
                tuple(sorted((layer, kind, len(ch)) for (layer, kind), ch in sides.items())),
                frozenset(self.flags[root]),
            )
            by_key[key].append((root, sides))
        order = {}  # group key -> first variable of its classes (execution order)
        for v in range(len(self.parent)):
            order.setdefault(self.find(v), v)
        groups = []
        for key, classes in sorted(by_key.items(), key=lambda kv: min(order[r] for r, _ in kv[1])):
            layout, flags = key
            first = (layout[0][0], layout[0][1])
            classes.sort(key=lambda rc: sorted(rc[1][first]))
            members = [
                GroupMember(layer, kind, torch.tensor([sorted(s[(layer, kind)]) for _, s in classes]))
                for layer, kind, _ in layout
            ]
            reasons = sorted(flags) or ([] if any(m.kind == "out" for m in members) else ["no producing layer"])
            groups.append(ChannelGroup(len(groups), members, not reasons, "; ".join(reasons)))
        return groups


def find_groups(model: nn.Module, example_input: torch.Tensor | None = None) -> list[ChannelGroup]:
    """Coupled channel groups of `model`; every conv-like input and output channel lies in exactly one group."""
    gm = trace(model)
    x = probe_input(model) if example_input is None else example_input
    was_training = model.training
    try:
        with torch.no_grad():
            ShapeProp(gm.eval()).propagate(x)
    finally:
        model.train(was_training)
    analysis = _Analysis(gm)
    analysis.run()
    groups = analysis.groups()
    log.debug("coupling: %d groups, %d prunable", len(groups), sum(g.prunable for g in groups))
    return groups


def _full_masks(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for n, m in model.named_modules():
        if isinstance(m, CONV_LIKE):
            masks[n] = {
                "out": torch.ones(out_channels(m), dtype=torch.bool),
                "in": torch.ones(in_channels(m), dtype=torch.bool),
            }
        elif isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.PReLU) and m.num_parameters > 1:
            masks[n] = {"chan": torch.ones(m.weight.shape[0], dtype=torch.bool)}
    return masks


def group_masks_to_layer_masks(
    model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: {"out": mask, "in": mask} (conv-like) or {"chan": mask} (BatchNorm, PReLU), from per-group keep
    masks (groups absent from `keep` stay whole)."""
    masks = _full_masks(model)
    by_id = {g.id: g for g in groups}
    for gid, k in keep.items():
        if gid not in by_id:
            raise ValueError(f"keep names group {gid}, which does not exist ({len(groups)} groups)")
        g, k = by_id[gid], torch.as_tensor(k, dtype=torch.bool)
        if k.shape != (g.size,):
            raise ValueError(f"keep mask of group {gid} has shape {tuple(k.shape)}, the group has {g.size} channels")
        if k.all():
            continue
        if not g.prunable:
            raise ValueError(f"group {gid} is not prunable ({g.reason})")
        if not k.any():
            raise ValueError(f"keep mask of group {gid} removes all {g.size} channels")
        for m in g.members:
            if m.layer not in masks:
                raise ValueError(f"group {gid} names layer '{m.layer}', which this model does not have")
            masks[m.layer][m.kind][m.index[~k].flatten()] = False
    return masks


@torch.no_grad()
def apply_group_masks(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> nn.Module:
    """Zero the pruned channels in place (producer filters and biases, consumer inputs, a BatchNorm's scale and
    shift); returns `model`. What remains computes what `slicing.slice_model` computes."""
    for name, masks in group_masks_to_layer_masks(model, groups, keep).items():
        layer = model.get_submodule(name)
        if "chan" in masks:
            layer.weight[~masks["chan"]] = 0
            if isinstance(layer, nn.BatchNorm2d) and layer.bias is not None:
                layer.bias[~masks["chan"]] = 0
            continue
        out_dim, in_dim = weight_dims(layer)
        layer.weight.index_fill_(out_dim, (~masks["out"]).nonzero().flatten(), 0)
        if groups_of(layer) == 1:  # a depthwise conv's inputs are its output groups: zeroing the outputs is enough
            layer.weight.index_fill_(in_dim, (~masks["in"]).nonzero().flatten(), 0)
        if layer.bias is not None:
            layer.bias[~masks["out"]] = 0
    return model
