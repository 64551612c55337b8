"""Channel coupling: which conv output and input channels must be pruned together, for any traced SR network.

Why: channel pruning (FMP/DHP channel vectors) removes whole channels, and in an SR net a channel is rarely
owned by one conv. Residual adds tie every conv writing into the stream, concats place a producer's channels at
an offset inside a consumer's input, and PixelShuffle folds s^2 conv outputs into one channel. Torch-Pruning
gets the last one wrong (it treats PixelShuffle as channel-preserving; VainF/Torch-Pruning#420).

How: the model is traced with torch.fx (every nn.Conv2d is a leaf, so EDSR's MeanShift stays one node) and run
once on an example input for shapes. Every conv output channel gets a fresh channel variable; ops map variables
from inputs to outputs (ReLU, scalar mul, interpolate: pass through; add/sub/mul of two feature tensors: unify
channel by channel; cat on dim 1: concatenate the lists; pixel_shuffle(s): unify each run of s^2 variables into
one). Union-find then gives equivalence classes of channels; classes touching the same convs in the same way
form one `ChannelGroup`, whose channel j maps to the layer channels `member.index[j]` of each member.
A group is unprunable when it reaches the network input or output (RGB) or a fixed conv (EDSR's MeanShift).
Ops with unknown channel semantics raise ValueError naming the node.
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

log = logging.getLogger(__name__)


@dataclass
class GroupMember:
    """One conv side of a group: group channel j is the layer's `kind` channels `index[j]` (shape (size, k))."""

    layer: str
    kind: str  # "out" (a producer's output channels) or "in" (a consumer's input channels)
    index: torch.Tensor  # LongTensor (group size, k); k = s^2 for a conv feeding PixelShuffle(s), else 1


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


# Channel-preserving ops: output channel c depends only on input channel c (for channel bookkeeping).
PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Sigmoid,
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
)
PASS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.hardtanh,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    operator.neg,
    torch.neg,
    F.interpolate,
    F.dropout,
    F.avg_pool2d,
    F.max_pool2d,
    F.adaptive_avg_pool2d,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "neg", "contiguous", "clone", "float"}
# Elementwise binary ops: two feature operands are unified channel by channel; a scalar operand passes through.
BINARY_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
SHUFFLE_FUNCTIONS = {F.pixel_shuffle, torch.pixel_shuffle}
UNSHUFFLE_FUNCTIONS = {F.pixel_unshuffle, torch.pixel_unshuffle}


class _ConvLeafTracer(fx.Tracer):
    """Default fx tracer, except that every Conv2d (also subclasses such as MeanShift) is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = _ConvLeafTracer().trace(model)
    return fx.GraphModule(model, graph)


def _default_input(model: nn.Module) -> torch.Tensor:
    config = getattr(model, "config", None)
    colors = getattr(config, "n_colors", None)
    if colors is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        colors = first.in_channels if first is not None else 3
    return torch.rand(1, colors, 16, 16)


class _Analysis:
    """Union-find over channel variables, filled by walking the fx graph once."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.flags: list[set[str]] = []  # reasons a variable's class is not prunable (valid at roots)
        self.sides: list[tuple[str, str, int, int]] = []  # (layer, kind, layer channel, variable)
        self.chans: dict[fx.Node, list[int]] = {}  # feature tensor node -> variable per channel
        self.conv_calls: dict[str, tuple[list[int], list[int]]] = {}  # conv name -> (in vars, out vars)

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
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda n: self.flag(self.chans.get(n, []), "reaches the network output"))
            elif node.op in ("call_module", "call_function", "call_method"):
                feeds = [n for n in node.all_input_nodes if n in self.chans]
                if not feeds or self._shape(node) is None:
                    continue  # a constant, or a non-tensor value such as x.shape
                out = self._visit(node)
                shape = self._shape(node)
                if len(shape) != 4 or len(out) != shape[1]:
                    raise ValueError(
                        f"coupling: node '{node.name}' ({self._op(node)}) gives shape {tuple(shape)}, "
                        f"which channel bookkeeping does not follow"
                    )
                self.chans[node] = out

    def _shape(self, node: fx.Node) -> torch.Size | None:
        meta = node.meta.get("tensor_meta")
        return meta.shape if meta is not None and hasattr(meta, "shape") else None

    def _op(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"call_module {type(self.gm.get_submodule(node.target)).__name__}"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"

    def _unknown(self, node: fx.Node, why: str = "unknown channel semantics") -> ValueError:
        return ValueError(f"coupling: cannot follow channels through node '{node.name}' ({self._op(node)}): {why}")

    def _visit(self, node: fx.Node) -> list[int]:
        t = node.target
        if node.op == "call_module":
            mod = self.gm.get_submodule(t)
            if isinstance(mod, nn.Conv2d):
                return self._conv(node, t, mod)
            if isinstance(mod, nn.PixelShuffle):
                return self._shuffle(self.chans[node.args[0]], mod.upscale_factor)
            if isinstance(mod, nn.PixelUnshuffle):
                return self._unshuffle(self.chans[node.args[0]], mod.downscale_factor)
            if isinstance(mod, nn.PReLU) and mod.num_parameters == 1 or isinstance(mod, PASS_MODULES):
                return self.chans[node.args[0]]
            raise self._unknown(node)
        if node.op == "call_function" and t in (F.conv2d, torch.conv2d):
            raise self._unknown(node, "functional conv2d; use an nn.Conv2d module so it can be sliced")
        if (node.op, t) in {("call_function", f) for f in PASS_FUNCTIONS} | {("call_method", m) for m in PASS_METHODS}:
            return self._pass(node)
        if node.op == "call_function" and t in BINARY_FUNCTIONS or node.op == "call_method" and t in BINARY_METHODS:
            return self._binary(node)
        if node.op == "call_function" and t in CAT_FUNCTIONS:
            return self._cat(node)
        if node.op == "call_function" and t in SHUFFLE_FUNCTIONS | UNSHUFFLE_FUNCTIONS:
            factor = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()))
            fn = self._shuffle if t in SHUFFLE_FUNCTIONS else self._unshuffle
            return fn(self.chans[node.args[0]], int(factor))
        if node.op == "call_method" and t in ("pixel_shuffle", "pixel_unshuffle"):
            fn = self._shuffle if t == "pixel_shuffle" else self._unshuffle
            return fn(self.chans[node.args[0]], int(node.args[1]))
        raise self._unknown(node)

    def _conv(self, node: fx.Node, name: str, conv: nn.Conv2d) -> list[int]:
        if conv.groups != 1:
            raise self._unknown(node, f"grouped conv (groups={conv.groups}) is not supported")
        x = self.chans[node.args[0]]
        if name in self.conv_calls:  # a conv called twice: both calls share its channels
            ins, outs = self.conv_calls[name]
            for a, b in zip(ins + outs, x + outs, strict=True):
                self.union(a, b)
            return outs
        outs = self.new(conv.out_channels)
        self.conv_calls[name] = (x, outs)
        self.sides += [(name, "in", c, v) for c, v in enumerate(x)]
        self.sides += [(name, "out", c, v) for c, v in enumerate(outs)]
        if not conv.weight.requires_grad:
            self.flag(x + outs, f"passes through fixed conv '{name}'")
        return outs

    def _pass(self, node: fx.Node) -> list[int]:
        if len([n for n in node.all_input_nodes if n in self.chans]) != 1 or node.args[0] not in self.chans:
            raise self._unknown(node, "expected one feature tensor as first argument")
        return self.chans[node.args[0]]

    def _binary(self, node: fx.Node) -> list[int]:
        a, b = (list(node.args) + [node.kwargs.get("other")])[:2]
        feats = [self.chans[n] for n in (a, b) if isinstance(n, fx.Node) and n in self.chans]
        for other in (a, b):
            if isinstance(other, fx.Node) and other not in self.chans:
                shape = self._shape(other)
                if shape is not None and shape.numel() != 1:
                    raise self._unknown(node, f"constant tensor operand of shape {tuple(shape)}")
        if not feats:
            raise self._unknown(node, "no feature tensor among the first two operands")
        if len(feats) == 2:
            if len(feats[0]) != len(feats[1]):
                raise self._unknown(node, f"operands have {len(feats[0])} and {len(feats[1])} channels")
            for u, v in zip(*feats, strict=True):
                self.union(u, v)
        return feats[0]

    def _cat(self, node: fx.Node) -> list[int]:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if any(n not in self.chans for n in tensors):
            raise self._unknown(node, "concatenates a constant with features")
        parts = [self.chans[n] for n in tensors]
        if dim in (1, -3):
            return [v for part in parts for v in part]
        for part in parts[1:]:  # concat over batch or space: the channels of all parts coincide
            for u, v in zip(parts[0], part, strict=True):
                self.union(u, v)
        return parts[0]

    def _shuffle(self, x: list[int], s: int) -> list[int]:
        """depth_to_space: output channel c is input channels c*s^2 .. c*s^2 + s^2 - 1 (one unit)."""
        block = s * s
        for c in range(0, len(x), block):
            for i in range(1, block):
                self.union(x[c], x[c + i])
        return x[::block]

    def _unshuffle(self, x: list[int], s: int) -> list[int]:
        return [v for v in x for _ in range(s * s)]

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
            reasons = sorted(flags) or ([] if any(m.kind == "out" for m in members) else ["no producing conv"])
            groups.append(ChannelGroup(len(groups), members, not reasons, "; ".join(reasons)))
        return groups


def find_groups(model: nn.Module, example_input: torch.Tensor | None = None) -> list[ChannelGroup]:
    """Coupled channel groups of `model`; every conv input and output channel lies in exactly one group."""
    gm = trace(model)
    x = _default_input(model) if example_input is None else example_input
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    analysis = _Analysis(gm)
    analysis.run()
    groups = analysis.groups()
    log.debug("coupling: %d groups, %d prunable", len(groups), sum(g.prunable for g in groups))
    return groups


def group_masks_to_layer_masks(
    model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-conv (out_keep, in_keep) bool masks from per-group keep masks (groups absent from `keep` stay whole)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    masks = {
        n: (torch.ones(m.out_channels, dtype=torch.bool), torch.ones(m.in_channels, dtype=torch.bool))
        for n, m in convs.items()
    }
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
                raise ValueError(f"group {gid} names conv '{m.layer}', which this model does not have")
            masks[m.layer][0 if m.kind == "out" else 1][m.index[~k].flatten()] = False
    return masks


@torch.no_grad()
def apply_group_masks(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor]) -> nn.Module:
    """Zero the pruned channels in place (producer rows and biases, consumer columns); returns `model`."""
    for name, (out_keep, in_keep) in group_masks_to_layer_masks(model, groups, keep).items():
        conv = model.get_submodule(name)
        conv.weight[~out_keep] = 0
        conv.weight[:, ~in_keep] = 0
        if conv.bias is not None:
            conv.bias[~out_keep] = 0
    return model
