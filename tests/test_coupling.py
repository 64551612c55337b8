"""Channel coupling groups checked by hand on small nets, and exactness of physical slicing against masking."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topology_models
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.evaluate import model_stats
from compress.models import build_from_spec, create_model, model_spec
from compress.models.shapes import apply_shapes, record_shapes
from compress.pruning.budget import ChannelCost
from compress.pruning.coupling import ChannelGroup, apply_group_masks, find_groups, group_masks_to_layer_masks
from compress.pruning.slicing import slice_model
from edgesr.datasets import load_test_set

FEATS = 8


def tiny_edsr(scale: int, bilinear_skip: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return create_model("edsr-tiny", scale, n_resblocks=2, n_feats=FEATS, bilinear_skip=bilinear_skip).eval()


def sides(group: ChannelGroup) -> set[tuple[str, str]]:
    return {(m.layer, m.kind) for m in group.members}


def group_of(groups: list[ChannelGroup], layer: str, kind: str) -> ChannelGroup:
    found = [g for g in groups if g.member(layer, kind) is not None]
    assert len(found) == 1, f"{layer}.{kind} lies in {len(found)} groups"
    return found[0]


def column(n: int) -> torch.Tensor:
    return torch.arange(n).view(n, 1)


def butterfly_lr(scale: int) -> torch.Tensor:
    lr = load_test_set("butterfly", scale)[0].lr
    return torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255


def random_keep(groups: list[ChannelGroup], seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        if g.prunable:
            k = torch.rand(g.size, generator=gen) < 0.6
            k[torch.randint(g.size, (1,), generator=gen)] = True  # never empty
            keep[g.id] = k
    return keep


def assert_partition(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Every conv input and output channel lies in exactly one group."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            for kind, n in (("out", conv.out_channels), ("in", conv.in_channels)):
                idx = torch.cat(
                    [m.index.flatten() for g in groups for m in g.members if (m.layer, m.kind) == (name, kind)]
                )
                assert sorted(idx.tolist()) == list(range(n)), f"{name}.{kind}"


@pytest.mark.parametrize("scale,skip", [(2, True), (2, False), (3, True), (4, True), (4, False)])
def test_edsr_groups(scale, skip):
    model = tiny_edsr(scale, skip)
    groups = find_groups(model)
    assert_partition(model, groups)
    n = model.config.n_resblocks
    # One residual stream: head, every block's conv2, the final body conv write into it; conv1s, the final body
    # conv and the upsampler read from it.
    stream = group_of(groups, "head.0", "out")
    expected = {("head.0", "out"), (f"body.{n}", "out"), (f"body.{n}", "in"), ("tail.0.0", "in")}
    expected |= {(f"body.{i}.body.2", "out") for i in range(n)} | {(f"body.{i}.body.0", "in") for i in range(n)}
    assert sides(stream) == expected and stream.prunable and stream.size == FEATS
    assert all(torch.equal(m.index, column(FEATS)) for m in stream.members)
    for i in range(n):  # each ResBlock's inner channels are free
        inner = group_of(groups, f"body.{i}.body.0", "out")
        assert sides(inner) == {(f"body.{i}.body.0", "out"), (f"body.{i}.body.2", "in")} and inner.prunable
    # Upsampler: feature c of a PixelShuffle(s) stage is the conv's outputs c*s^2 .. c*s^2 + s^2 - 1.
    stages = [("tail.0.0", "tail.0.2", 2), ("tail.0.2", "tail.1", 2)] if scale == 4 else [("tail.0.0", "tail.1", scale)]
    for conv, reader, s in stages:
        up = group_of(groups, conv, "out")
        assert sides(up) == {(conv, "out"), (reader, "in")} and up.prunable and up.size == FEATS
        assert torch.equal(up.member(conv, "out").index, torch.arange(FEATS * s * s).view(FEATS, s * s))
        assert torch.equal(up.member(reader, "in").index, column(FEATS))
    # RGB and MeanShift channels are never prunable; nothing else is fixed.
    for layer, kind in [
        ("sub_mean", "in"),
        ("sub_mean", "out"),
        ("head.0", "in"),
        ("tail.1", "out"),
        ("add_mean", "in"),
    ]:
        assert not group_of(groups, layer, kind).prunable
    assert "network input" in group_of(groups, "sub_mean", "in").reason
    assert "fixed conv 'add_mean'" in group_of(groups, "tail.1", "out").reason
    assert sum(g.prunable for g in groups) == 1 + n + len(stages)
    # With the bilinear skip the RGB input and output are one channel set (input + upsampled input).
    assert (group_of(groups, "sub_mean", "in") is group_of(groups, "add_mean", "out")) == skip


class ConcatNet(nn.Module):
    """cat([relu(a(x)), b(x), a(x), x]) -> c -> out; `a` is read twice, at offsets 0 and 9, the input at 13."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(16, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.out(self.c(torch.cat([F.relu(a), self.b(x), a, x], dim=1)))


def test_concat_offsets_hand_made():
    model = ConcatNet()
    groups = find_groups(model)
    assert_partition(model, groups)
    a = group_of(groups, "a", "out")
    assert sides(a) == {("a", "out"), ("c", "in")} and a.prunable
    assert torch.equal(a.member("c", "in").index, torch.stack([torch.arange(4), torch.arange(4) + 9], dim=1))
    b = group_of(groups, "b", "out")
    assert torch.equal(b.member("c", "in").index, column(5) + 4)
    rgb = group_of(groups, "a", "in")
    assert sides(rgb) == {("a", "in"), ("b", "in"), ("c", "in")} and not rgb.prunable
    assert torch.equal(rgb.member("c", "in").index, column(3) + 13)
    assert not group_of(groups, "out", "out").prunable
    x = torch.rand(1, 3, 9, 9)
    keep = random_keep(groups, seed=3)
    assert (
        slice_model(model, groups, keep)(x) - apply_group_masks(copy.deepcopy(model), groups, keep)(x)
    ).abs().max() < 1e-5


def test_rdn_tiny_concat_offsets():
    model = create_model("rdn-tiny", scale=2)
    cfg = model.config
    C, D, G, G0 = cfg.C, cfg.D, cfg.G, cfg.G0
    groups = find_groups(model)
    assert_partition(model, groups)
    for d in range(D):
        for c in range(C):
            g = group_of(groups, f"rdbs.{d}.convs.{c}", "out")
            readers = {(f"rdbs.{d}.convs.{k}", "in") for k in range(c + 1, C)} | {(f"rdbs.{d}.lff", "in")}
            assert sides(g) == {(f"rdbs.{d}.convs.{c}", "out")} | readers and g.size == G and g.prunable
            for layer, kind in readers:  # channel j of conv c sits after the block input and c earlier outputs
                assert torch.equal(g.member(layer, kind).index, column(G) + G0 + c * G)
    # The local residual adds make every block output one channel set; GFF reads it once per block.
    stream = group_of(groups, "f_0", "out")
    assert {(f"rdbs.{d}.lff", "out") for d in range(D)} <= sides(stream)
    assert torch.equal(
        stream.member("gff.0", "in").index, torch.stack([torch.arange(G0) + d * G0 for d in range(D)], 1)
    )
    glob = group_of(groups, "f_m1", "out")
    assert sides(glob) == {("f_m1", "out"), ("gff.1", "out"), ("f_0", "in"), ("upn.0", "in")} and glob.prunable
    up = group_of(groups, "upn.4", "out")
    assert torch.equal(up.member("upn.4", "out").index, torch.arange(12).view(3, 4))
    assert not group_of(groups, "f_m1", "in").prunable and not group_of(groups, "sr", "out").prunable


@pytest.mark.parametrize("name,scale", [("edsr", 2), ("edsr", 3), ("edsr", 4), ("rdn-tiny", 2)])
def test_slicing_matches_masking(name, scale):
    model = tiny_edsr(scale) if name == "edsr" else create_model(name, scale).eval()
    x = butterfly_lr(scale)
    groups = find_groups(model, x)
    keep = random_keep(groups, seed=scale)
    masked = apply_group_masks(copy.deepcopy(model), groups, keep)
    sliced = slice_model(model, groups, keep)
    with torch.no_grad():
        y_ref, y_masked, y_sliced = model(x), masked(x), sliced(x)
    assert y_sliced.shape == y_ref.shape == (1, 3, x.shape[2] * scale, x.shape[3] * scale)
    assert (y_masked - y_ref).abs().max() > 1e-3  # the masks really removed something
    assert (y_sliced - y_masked).abs().max() < 1e-5
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    before = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    after = {n: m.weight.shape for n, m in sliced.named_modules() if isinstance(m, nn.Conv2d)}
    assert before.keys() == after.keys()
    assert all(after[n][0] <= b[0] and after[n][1] <= b[1] and after[n][2:] == b[2:] for n, b in before.items())
    masks = group_masks_to_layer_masks(model, groups, keep)
    assert all(after[n][:2] == (int(m["out"].sum()), int(m["in"].sum())) for n, m in masks.items())
    assert any(after[n] != before[n] for n in before)
    # The compact architecture rebuilds from its recipe and recorded shapes, also after a JSON round trip.
    rebuilt = build_from_spec(json.loads(json.dumps(model_spec(sliced))))
    apply_shapes(rebuilt, json.loads(json.dumps(record_shapes(sliced))))
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)


def test_sliced_checkpoint_round_trip(tmp_path):
    model = tiny_edsr(3)
    groups = find_groups(model)
    sliced = slice_model(model, groups, random_keep(groups, seed=7))
    loaded, manifest = load_checkpoint(save_checkpoint(tmp_path / "ck", sliced, {"pruned": True}))
    assert manifest == {"pruned": True} and loaded.config == sliced.config
    assert record_shapes(loaded) == record_shapes(sliced) != record_shapes(model)
    x = torch.rand(1, 3, 14, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), sliced.eval()(x))
    # Slicing a sliced model again, and its checkpoint, keep the earlier cuts.
    again = slice_model(loaded, find_groups(loaded), random_keep(find_groups(loaded), seed=8))
    reloaded, _ = load_checkpoint(save_checkpoint(tmp_path / "ck2", again, {}))
    with torch.no_grad():
        assert torch.equal(reloaded(x), again.eval()(x))


def test_keep_masks_are_validated():
    model = tiny_edsr(2)
    groups = find_groups(model)
    fixed = group_of(groups, "tail.1", "out")
    stream = group_of(groups, "head.0", "out")
    with pytest.raises(ValueError, match=f"group {fixed.id} is not prunable"):
        slice_model(model, groups, {fixed.id: torch.tensor([True, False, True])})
    with pytest.raises(ValueError, match="removes all 8 channels"):
        slice_model(model, groups, {stream.id: torch.zeros(FEATS, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has shape \\(3,\\), the group has 8 channels"):
        apply_group_masks(model, groups, {stream.id: torch.ones(3, dtype=torch.bool)})
    # Keeping everything changes nothing.
    keep_all = {g.id: torch.ones(g.size, dtype=torch.bool) for g in groups}
    assert sum(p.numel() for p in slice_model(model, groups, keep_all).parameters()) == sum(
        p.numel() for p in model.parameters()
    )


class Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[1])


@pytest.mark.parametrize(
    "middle,pattern",
    [
        (Flip(), r"node 'flip' \(call_function flip\)"),
        (nn.ChannelShuffle(2), r"node '\w+' \(call_module ChannelShuffle\)"),
        (nn.Softmax(dim=1), r"node '\w+' \(call_module Softmax\): unknown channel semantics"),
    ],
)
def test_unknown_ops_are_refused(middle, pattern):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), middle, nn.Conv2d(4, 3, 3, padding=1))
    with pytest.raises(ValueError, match=pattern):
        find_groups(model)


# --------------------------------------------------------------------------- the topologies real SR nets use

TOPOLOGY_PRUNABLE = {  # how many channel groups each topology leaves prunable (the rest: reasons below)
    "fsrcnn": 5,
    "padded_valid_zero": 3,
    "padded_valid_reflect": 3,
    "padded_valid_replicate": 3,
    "srresnet": 4,
    "imdn": 5,
    "interp_nearest": 2,
    "interp_bilinear": 2,
    "separable": 0,
    "rcan": 6,
}


@pytest.mark.parametrize("name", list(topology_models.TOPOLOGIES))
def test_every_topology_slices_exactly_and_its_cost_matches_the_stats(name):
    """Sliced equals masked to 1e-5 on a real photo, and the budget accounting counts what model_stats counts."""
    model = topology_models.make(name)
    x = butterfly_lr(2)[..., :48, :40]
    groups = find_groups(model)
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == TOPOLOGY_PRUNABLE[name], groups
    keep = random_keep(groups, seed=1)
    sliced = slice_model(model, groups, keep)
    masked = apply_group_masks(copy.deepcopy(model), groups, keep)
    with torch.no_grad():
        y_ref, y_masked, y_sliced = model(x), masked(x), sliced(x)
    assert y_sliced.shape == y_ref.shape == (1, 3, 96, 80)
    assert (y_sliced - y_masked).abs().max() < 1e-5
    if prunable:
        assert (y_masked - y_ref).abs().max() > 1e-4  # something was really removed
        assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    cost = ChannelCost(model, groups, [g.id for g in prunable], 2)
    stats = model_stats(sliced, 2)
    kept = {g: int(k.sum()) for g, k in keep.items()}
    assert (cost.params(kept), cost.macs(kept)) == (stats["params"], stats["macs_1280x720"])


def test_topology_groups_by_hand():
    groups = {n: find_groups(topology_models.make(n)) for n in ("fsrcnn", "srresnet", "imdn", "separable", "rcan")}
    # FSRCNN: the PReLU after each conv carries the conv's channels; the ConvTranspose2d reads the last group.
    last = group_of(groups["fsrcnn"], "mid.6", "out")
    assert sides(last) == {("mid.6", "out"), ("mid.7", "chan"), ("last", "in")} and last.prunable
    # SRResNet: BatchNorm sits in its conv's group, the stream ties the block outputs and the fuse's BatchNorm.
    stream = group_of(groups["srresnet"], "head.0", "out")
    assert {("blocks.0.body.4", "chan"), ("blocks.1.body.4", "chan"), ("fuse.1", "chan")} <= sides(stream)
    assert stream.prunable
    # IMDN: channels that torch.split / chunk / narrow / slicing cut at fixed offsets are kept, with the reason.
    split = [g for g in groups["imdn"] if g.member("blocks.0.c1", "out") is not None]
    assert len(split) == 2 and all(not g.prunable and "fixed channel offsets by 'split'" in g.reason for g in split)
    attention = group_of(groups["imdn"], "blocks.0.attention.squeeze", "out")
    assert attention.prunable  # the attention's inner channels are free
    # Depthwise + grouped: the grouped conv fixes the residual stream, and says so.
    stream = group_of(groups["separable"], "head", "out")
    assert not stream.prunable and "grouped Conv2d 'blocks.0.grouped' (groups=2)" in stream.reason
    # RCAN: the attention's excitation conv writes the stream's channels (x * sigmoid(...)): one group.
    stream = group_of(groups["rcan"], "head", "out")
    assert {("body.0.body.3.weigh.2", "out"), ("body.0.body.3.weigh.0", "in")} <= sides(stream) and stream.prunable


class MobileBlock(nn.Module):
    """Pointwise expand -> depthwise 3x3 -> pointwise project, with a residual: the expanded channels are free,
    each depthwise output tied to its one input channel."""

    def __init__(self, mult: int = 1) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 12, 1)
        self.depthwise = nn.Conv2d(12, 12 * mult, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12 * mult, 8, 1)
        self.up = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.up(h + self.project(F.relu6(self.depthwise(F.relu6(self.expand(h))))))


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_ties_outputs_to_inputs_and_slices_exactly(mult):
    torch.manual_seed(0)
    model = MobileBlock(mult).eval()
    groups = find_groups(model)
    inner = group_of(groups, "expand", "out")
    expected = {("expand", "out"), ("depthwise", "in"), ("depthwise", "out"), ("project", "in")}
    assert sides(inner) == expected and inner.prunable and inner.size == 12
    assert torch.equal(inner.member("depthwise", "out").index, torch.arange(12 * mult).view(12, mult))
    assert torch.equal(inner.member("project", "in").index, torch.arange(12 * mult).view(12, mult))
    keep = {inner.id: torch.tensor([True, False] * 6)}
    sliced = slice_model(model, groups, keep)
    assert sliced.depthwise.groups == 6 and sliced.depthwise.weight.shape == (6 * mult, 1, 3, 3)
    x = butterfly_lr(2)[..., :32, :32]
    masked = apply_group_masks(copy.deepcopy(model), groups, keep)
    with torch.no_grad():
        assert (sliced(x) - masked(x)).abs().max() < 1e-5


class SigmoidGate(nn.Module):
    """conv -> sigmoid -> conv: a pruned channel would be 0.5, not 0, where the second conv reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.a(x))
        return F.pixel_shuffle(self.c(F.relu(self.b(h)) * h), 2)  # x * sigmoid: vanishes again


def test_channels_that_would_not_vanish_are_kept():
    groups = find_groups(SigmoidGate())
    a = group_of(groups, "a", "out")
    assert not a.prunable and "'b' reads channels that do not vanish when pruned" in a.reason
    assert group_of(groups, "b", "out") is a  # b's output multiplies h: the same channels
