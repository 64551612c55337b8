"""Channel coupling groups checked by hand on small nets, and exactness of physical slicing against masking."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.models import build_from_spec, create_model, model_spec
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
    assert all(after[n][:2] == (int(o.sum()), int(i.sum())) for n, (o, i) in masks.items())
    assert any(after[n] != before[n] for n in before)
    # The compact architecture rebuilds from its spec, also after a JSON round trip (lists, not tuples).
    rebuilt = build_from_spec(json.loads(json.dumps(model_spec(sliced))))
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)


def test_sliced_checkpoint_round_trip(tmp_path):
    model = tiny_edsr(3)
    groups = find_groups(model)
    sliced = slice_model(model, groups, random_keep(groups, seed=7))
    loaded, manifest = load_checkpoint(save_checkpoint(tmp_path / "ck", sliced, {"pruned": True}))
    assert manifest == {"pruned": True} and loaded.config == sliced.config and loaded.config.conv_channels
    x = torch.rand(1, 3, 14, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), sliced.eval()(x))
    # Slicing a sliced model again keeps the earlier overrides.
    again = slice_model(loaded, find_groups(loaded), random_keep(find_groups(loaded), seed=8))
    build_from_spec(model_spec(again)).load_state_dict(again.state_dict(), strict=True)


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
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), r"grouped conv \(groups=2\)"),
    ],
)
def test_unknown_ops_are_refused(middle, pattern):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), middle, nn.Conv2d(4, 3, 3, padding=1))
    with pytest.raises(ValueError, match=pattern):
        find_groups(model)
