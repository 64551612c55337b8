"""FMP (hypernetwork channel + weight pruning), channel-only meta pruning and the L1 channel baseline, on tiny nets."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.data import PatchSampler
from compress.evaluate import model_stats
from compress.models import create_model
from compress.pruning.budget import ChannelCost
from compress.pruning.coupling import find_groups
from compress.pruning.gates import gate
from compress.pruning.layers import prunable_layers
from compress.pruning.methods import channel_l1, fmp
from compress.pruning.methods.channel_l1 import ChannelL1Config, l1_channel_scores, l1_keep
from compress.pruning.methods.fmp import FMPConfig, FMPSearch, materialize
from compress.pruning.methods.fmp.hypernetwork import ChannelVectors, HyperGate
from compress.pruning.methods.fmp.materialize import finetune_pruner
from compress.pruning.slicing import slice_model
from compress.train import TrainConfig, TrainData, train
from edgesr.datasets import load_test_set, load_training_images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to other jobs oversubscribing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos():
    return [img for _, img in load_training_images("bundled")[:3]]


@pytest.fixture(scope="module")
def butterfly():
    lr = load_test_set("butterfly", 2)[0].lr
    return torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255


def tiny(name: str = "edsr") -> nn.Module:
    torch.manual_seed(0)
    if name == "edsr":
        return create_model("edsr-tiny", scale=2, n_resblocks=1, n_feats=16)
    return create_model("rdn-tiny", scale=2)


def train_cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 2, "lr_patch": 12, "save_every": 1000, "device": "cpu", **kw})


def sampler(photos) -> TrainData:
    return TrainData(PatchSampler(photos, 2, 12, 2, 0), scale=2)


def group_with(search: FMPSearch, layer: str, kind: str):
    return next(g for g in search.groups if g.member(layer, kind) is not None)


def zero_fraction(model: nn.Module, layers: list[str]) -> float:
    weights = [model.get_submodule(n).weight for n in layers]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# Settings under which the 16-feature EDSR's search meets both targets well inside its budget at lr 2e-3 (search
# at the loop's lr): the prox shrinks z by 0.02 a step; the indicators start when the channels lock, at the default
# lr that lets an undefended one die half-way through the search steps left.
LR = 2e-3
FAST = dict(
    lambda_channel=10.0,
    channel_lr=LR,
    search_lr_scale=1.0,
    lambda_weight=2e-2,
    check_every=5,
    search_fraction=0.9,
)


def scramble_channels(search: FMPSearch, seed: int) -> torch.Generator:
    """Random z with about half the channels at 0 (a search that has found its channels); the generator goes on."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for z in search.vectors.z.values():
            z.copy_(torch.rand(z.shape, generator=gen) * (torch.rand(z.shape, generator=gen) < 0.5))
    return gen


@pytest.mark.parametrize("name, channel_init", [("edsr", "ones"), ("rdn", "ones"), ("edsr", "l1"), ("rdn", "l1")])
def test_pretrained_init_reproduces_the_dense_model(name, channel_init, butterfly):
    model = tiny(name).eval()
    with torch.no_grad():
        dense = model(butterfly)
    config = FMPConfig(params=0.5, weight_sparsity=0.3, channel_init=channel_init)
    search = FMPSearch(model, config, total_steps=10, scale=2)
    if channel_init == "l1":  # z starts at the channels' L1 scores (mean 1 per group), not at 1
        scores = l1_channel_scores(tiny(name), search.groups)
        for g in search.searched:
            z = search.vectors.vector(g).detach()
            assert torch.allclose(z.double(), scores[g].clamp(min=1e-2)) and not torch.all(z == 1)
    with torch.no_grad():
        generated = model(butterfly)
    assert (generated - dense).abs().max() < 1e-5
    # Every trainable conv lies in a prunable group here, so every one gets a hypernetwork; the stored weights
    # no longer train, z and U are the pruner's own, the hypernetworks the loop's.
    assert set(search.layers) == set(prunable_layers(tiny(name)))
    assert all(not c.parametrizations.weight.original.requires_grad for c in search.layers.values())
    own = {id(p) for p in search.own_parameters()}
    assert len(own) == len(search.searched) + len(search.layers)
    assert all(id(h.W2) not in own and h.W2.requires_grad for h in search.hyper.values())


def test_kernel_is_dhp_hypernetwork_by_hand():
    torch.manual_seed(1)
    c_out, c_in, k, m = 3, 2, 3, 4
    vectors = ChannelVectors({7: c_out, 9: c_in}, "scratch", torch.device("cpu"))
    src_out = torch.arange(c_out) + vectors.offset[7]
    src_in = torch.arange(c_in) + vectors.offset[9]
    hyper = HyperGate(nn.Conv2d(c_in, c_out, k), vectors, src_out, src_in, m, "scratch", indicators=True)
    with torch.no_grad():
        for p in (hyper.B0, hyper.b1, hyper.b2):
            p.normal_()
        hyper.U.uniform_()
    z_out, z_in = vectors.vector(7).detach(), vectors.vector(9).detach()
    # DHP: for input channel i (n = c_in) and output channel j (c = c_out): M_ij = z_in_i z_out_j + B0_ij,
    # e_ij = M_ij w1_ij + b1_ij, o_ij = W2_ij e_ij + b2_ij, then [n, c, k, k] permuted to [c, n, k, k].
    # Our parameters are stored [out, in], so DHP's (i, j) entry is ours at [j, i].
    dhp = torch.zeros(c_in, c_out, k, k)
    for i in range(c_in):
        for j in range(c_out):
            mij = z_in[i] * z_out[j] + hyper.B0[j, i]
            e = mij * hyper.w1[j, i] + hyper.b1[j, i]
            dhp[i, j] = (hyper.W2[j, i] @ e + hyper.b2[j, i]).view(k, k)
    expected = dhp.permute(1, 0, 2, 3) * hyper.U
    assert torch.allclose(hyper(torch.zeros(1)), expected, atol=1e-6)
    # DHP's scratch init: W2 ~ U(+-sqrt3 sqrt(1 / (m n k^2))), w1 ~ U(+-sqrt3).
    assert hyper.W2.abs().max() <= 3**0.5 * (1 / (m * c_in * k * k)) ** 0.5
    assert hyper.w1.abs().max() <= 3**0.5


def test_scratch_init_is_dhp():
    model = tiny("edsr")
    search = FMPSearch(model, FMPConfig(params=0.5, weight_sparsity=0.0, init="scratch"), total_steps=10, scale=2)
    z = torch.cat([z.detach() for z in search.vectors.z.values()])
    assert z.std() > 0.5 and not torch.any(z == 1)  # N(0, 1), not the pretrained ones
    for name, conv in search.layers.items():
        h = search.hyper[name]
        c_in, k2 = conv.in_channels, h.W2.shape[2]
        assert h.W2.abs().max() <= 3**0.5 * (1 / (8 * c_in * k2)) ** 0.5
        assert not conv.bias.any() and not h.B0.any() and not h.b1.any() and not h.b2.any() and h.U is None


def test_channel_vectors_follow_pixel_shuffle_and_concat():
    search = FMPSearch(tiny("edsr"), FMPConfig(params=0.5, weight_sparsity=0.0), total_steps=10, scale=2)
    with torch.no_grad():
        for z in search.vectors.z.values():
            z.normal_()
    flat = search.vectors.flat().detach()
    up = group_with(search, "tail.0.0", "out")
    z_up = search.vectors.vector(up.id).detach()
    # The upsampler conv's s^2 = 4 outputs of one shuffled channel read the same entry; tail.1 reads it once.
    assert torch.equal(flat[search.hyper["tail.0.0"].src_out], z_up.repeat_interleave(4))
    assert torch.equal(flat[search.hyper["tail.1"].src_in], z_up)
    assert torch.equal(flat[search.hyper["tail.1"].src_out], torch.ones(3))  # RGB output: fixed
    rdn = FMPSearch(tiny("rdn"), FMPConfig(params=0.5, weight_sparsity=0.0), total_steps=10, scale=2)
    with torch.no_grad():
        for z in rdn.vectors.z.values():
            z.normal_()
    flat = rdn.vectors.flat().detach()
    # A residual dense block's 1x1 fusion reads the block input, then each of its convs' outputs, concatenated.
    parts = [group_with(rdn, "rdbs.0.lff", "out")] + [group_with(rdn, f"rdbs.0.convs.{c}", "out") for c in range(3)]
    expected = torch.cat([rdn.vectors.vector(g.id).detach() for g in parts])
    assert torch.equal(flat[rdn.hyper["rdbs.0.lff"].src_in], expected)


def test_prox_is_the_soft_threshold_and_groups_keep_min_channels():
    config = FMPConfig(
        params=0.5, weight_sparsity=0.0, check_every=1000, lambda_channel=0.1, channel_lr=0.25, channel_init="ones"
    )
    search = FMPSearch(tiny("edsr"), config, total_steps=10_000, scale=2)
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    start = torch.arange(1, 17) * 0.05 * signs  # distinct magnitudes 0.05 .. 0.8 (within z's scale 1), alternating
    with torch.no_grad():
        for z in search.vectors.z.values():
            z.copy_(start)
    lr, lam = 0.25, search.config.lambda_channel  # z's own SGD lr: shrink lambda * lr = 0.025 per step
    search.step(1, 1e-3)  # no gradients: SGD leaves z alone, only the prox acts (the loop's lr is not z's)
    expected = torch.sign(start) * (start.abs() - lam * lr).clamp_min(0)
    for z in search.vectors.z.values():
        assert torch.allclose(z.detach(), expected, atol=1e-7)
    for step in range(2, 200):
        search.step(step, lr)
    t = search.config.channel_threshold
    for gid in search.searched:
        z = search.vectors.vector(gid).detach()
        # Once only min_channels entries are above T the prox leaves the group alone.
        assert int((z.abs() > t).sum()) == 4
        assert int(search.current_keep()[gid].sum()) == 4
    frozen = [z.detach().clone() for z in search.vectors.z.values()]
    search.step(200, lr)
    assert all(torch.equal(a, b.detach()) for a, b in zip(frozen, search.vectors.z.values(), strict=True))
    # z never leaves its starting scale (1 for the pretrained init), whatever the gradient step did.
    with torch.no_grad():
        search.vectors.vector(search.searched[0])[0] = 5.0
    search.step(201, lr)
    # clamped to 1, then (5 entries above T again) the prox: 1 - lambda lr
    assert float(search.vectors.vector(search.searched[0]).abs().max()) == pytest.approx(1.0 - lam * lr)
    # A prox step that kills a whole group at once still leaves min_channels in its keep mask.
    with torch.no_grad():
        search.vectors.vector(search.searched[0]).zero_()
    assert int(search.current_keep()[search.searched[0]].sum()) == 4


def test_locked_search_net_computes_what_the_compact_net_computes(butterfly):
    model = tiny("edsr")
    config = FMPConfig(  # --finetune-from search: the compact net takes over the searched kernels
        params=0.5, weight_sparsity=0.3, lambda_weight=0.0, check_every=1, rewind=False, finetune_from="search"
    )
    search = FMPSearch(model, config, total_steps=100, scale=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for z in search.vectors.z.values():  # about half of every group's channels below T
            z.copy_(torch.rand(z.shape, generator=gen) * (torch.rand(z.shape, generator=gen) < 0.5))
        for h in search.hyper.values():  # about 40 % of the indicators at 0
            h.U.copy_(torch.rand(h.U.shape, generator=gen) * (torch.rand(h.U.shape, generator=gen) > 0.4))
    before = {n: h.U.detach().clone() for n, h in search.hyper.items()}
    search.step(1, 0.0)
    score = {n: before[n] * h.generate().detach().abs() for n, h in search.hyper.items()}  # U x |W| at the lock
    assert search.channels_locked_at == 1 and search.weights_locked_at == 1 and search.done()
    entry = search.trace[-1]
    # The cut sits at the targets: channels refilled up to the budget, exactly 30 % of the weights dead.
    assert 0.45 < entry["params_fraction"] <= 0.5
    assert 0.3 <= entry["weight_sparsity"] < 0.3 + 1e-3
    # The cut ones are 0 and the lowest U x |W| over all layers went first; survivors keep their U.
    dead, alive = [], []
    for n, h in search.hyper.items():
        assert torch.equal(h.U, before[n] * h.weight_mask)
        region = (h.out_mask[:, None, None, None] & h.in_mask[None, :, None, None]).expand(h.shape)
        dead.append(score[n][~h.weight_mask])
        alive.append(score[n][h.weight_mask & region])
    assert torch.cat(dead).max() <= torch.cat(alive).min()
    with torch.no_grad():
        searched = model(butterfly)
        compact = materialize(search)
        out = compact(butterfly)
    assert (out - searched).abs().max() < 1e-5
    assert search.report["forced"] is False and search.report["weight_masks"] == "locked by the search"


def test_rewind_restores_the_channel_lock_state_and_undamps_survivors(butterfly):
    model = tiny("edsr")
    config = FMPConfig(params=0.5, weight_sparsity=0.3, lambda_weight=0.0, check_every=1, finetune_from="search")
    search = FMPSearch(model, config, total_steps=100, scale=2)
    gen = scramble_channels(search, seed=3)
    search.step(1, 0.0)  # channels lock; the indicators are all 1, so the weights do not
    assert search.channels_locked_at == 1 and search.weights_locked_at is None
    at_lock = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # what the indicator phase does: other parameters adapt, indicators decay
        model.head[0].bias.add_(1.0)
        for h in search.hyper.values():
            h.B0.add_(0.1)
            h.U.copy_(torch.rand(h.U.shape, generator=gen) * (torch.rand(h.U.shape, generator=gen) > 0.4))
    decayed = {n: h.U.detach().clone() for n, h in search.hyper.items()}
    search.step(2, 0.0)  # checked at once (indicator phase): 40 % at U = 0, so the weights lock
    assert search.weights_locked_at == 2 and search.done()
    state = model.state_dict()
    for k, v in at_lock.items():
        if k.rpartition(".")[2] not in ("U", "weight_mask"):
            assert torch.equal(state[k], v), k
    for n, h in search.hyper.items():
        assert torch.equal(h.U, h.weight_mask.to(h.U.dtype))  # survivors undamped, the cut ones 0
        assert not (decayed[n] * h.generate().detach().abs())[~h.weight_mask].any()  # the lowest U x |W| went
    assert 0.3 <= search.trace[-1]["weight_sparsity"] < 0.3 + 1e-3
    with torch.no_grad():
        searched = model(butterfly)
        out = materialize(search)(butterfly)
    assert (out - searched).abs().max() < 1e-5


def test_finetune_from_checkpoint_starts_the_compact_net_from_its_weights(butterfly):
    """--finetune-from checkpoint: the search only chooses the masks; the compact net holds the dense model's own
    weights (sliced, the cut ones zero), whatever the search did to the hypernetworks and the other layers."""
    model = tiny("edsr")
    dense = copy.deepcopy(model)
    config = FMPConfig(params=0.5, weight_sparsity=0.3, lambda_weight=0.0, check_every=1, finetune_from="checkpoint")
    search = FMPSearch(model, config, total_steps=100, scale=2)
    gen = scramble_channels(search, seed=3)
    with torch.no_grad():
        for h in search.hyper.values():
            h.U.copy_(torch.rand(h.U.shape, generator=gen) * (torch.rand(h.U.shape, generator=gen) > 0.4))
            h.B0.add_(0.1)  # the search moved the hypernetworks ...
        model.head[0].bias.add_(1.0)  # ... and a layer without one
    search.step(1, 0.0)
    assert search.done()
    keep = {g: k.clone() for g, k in search.channel_keep.items()}
    compact = materialize(search)
    assert search.report["finetune_from"] == "checkpoint"
    expected = slice_model(dense, find_groups(dense), keep)
    for name, module in expected.named_modules():
        for attr in ("weight", "bias"):
            w = getattr(module, attr, None) if isinstance(module, nn.Conv2d) else None
            if w is None:
                continue
            g = getattr(compact.get_submodule(name), attr).detach()  # through the mask gate, if any
            assert g.shape == w.shape, name
            assert torch.equal(g[g != 0], w.detach()[g != 0]), (name, attr)  # every survivor: the checkpoint's
    zeros = zero_fraction(compact, search.report["hypernetwork_layers"])
    assert 0.3 <= zeros < 0.3 + 2e-2  # the cut ones (and nothing else but the checkpoint's own zeros)
    with torch.no_grad():
        assert (compact(butterfly) - expected(butterfly)).abs().max() > 0  # the masks did cut something


def test_weight_ramp_closes_the_searched_mask_smallest_first(tmp_path, photos):
    """--weight-ramp: the compact net starts whole; the searched dead weights go in order of |W|, a cubic share at
    each step of the ramp, and from its end (and after bake) exactly the searched ones are zero."""
    model = tiny("edsr")
    config = FMPConfig(params=0.5, weight_sparsity=0.3, lambda_weight=0.0, check_every=1, weight_ramp=0.5)
    search = FMPSearch(model, config, total_steps=100, scale=2)
    gen = scramble_channels(search, seed=3)
    with torch.no_grad():
        for h in search.hyper.values():
            h.U.copy_(torch.rand(h.U.shape, generator=gen) * (torch.rand(h.U.shape, generator=gen) > 0.4))
    search.step(1, 0.0)
    compact = materialize(search)
    layers = search.report["hypernetwork_layers"]
    assert zero_fraction(compact, layers) < 0.01  # the gates start open: nothing cut yet
    pruner = finetune_pruner(search, compact, steps=40)
    assert (pruner.end, pruner.frequency) == (20, 1)
    pruner.step(5)
    share, closed_total = 1 - (1 - 5 / 20) ** 3, 0
    for name, alive in search.weight_alive.items():
        weight = compact.get_submodule(name).parametrizations.weight.original.detach().abs()
        closed = ~gate(compact.get_submodule(name)).mask
        assert int(closed.sum()) == round(share * int((~alive).sum()))
        assert not (closed & alive).any()  # only searched-dead weights close ...
        still = ~alive & ~closed
        if closed.any() and still.any():
            assert weight[closed].max() <= weight[still].min()  # ... the smallest |W| of them first
        closed_total += int(closed.sum())
    assert closed_total > 0
    train(compact, sampler(photos), train_cfg(40), tmp_path, pruner=pruner)
    report = pruner.finalize()
    assert report["weight_ramp_steps"] == 20
    for name, alive in search.weight_alive.items():
        weight = compact.get_submodule(name).weight.detach()
        assert torch.equal(weight[~alive], torch.zeros_like(weight[~alive]))
    assert 0.3 <= zero_fraction(compact, layers) < 0.3 + 2e-2


def test_run_fmp_meets_both_targets_and_round_trips(tmp_path, photos, butterfly):
    model = tiny("edsr")
    dense = copy.deepcopy(model)
    config = FMPConfig(params=0.5, weight_sparsity=0.3, **FAST)
    cfg = train_cfg(100, lr=LR)
    compact, report = fmp.run(model, sampler(photos), cfg, tmp_path / "run", config)
    # The search met both targets itself (nothing forced) and stopped early; fine-tuning took the rest.
    assert report["method"] == "fmp" and report["forced"] is False, report["trace"][-3:]
    assert report["channels_locked_at"] is not None and report["weights_locked_at"] is not None
    assert report["search_steps"] < report["search_budget_steps"]
    assert report["search_steps"] + report["finetune_steps"] == cfg.steps
    assert report["trace"][-1]["channels_locked"]
    # The first check is at full width, where the budget counts the 30 % weight zeros to come: non-zeros only.
    hyper_weights = sum(dense.get_submodule(n).weight.numel() for n in report["hypernetwork_layers"])
    total = sum(p.numel() for p in dense.parameters())
    expected = (total - math.ceil(0.3 * hyper_weights)) / total  # the cut rounds the zero count up
    assert report["trace"][0]["params_fraction"] == pytest.approx(expected, abs=1e-6)
    # Fewer channels; at most half the original's parameters are non-zero (counted exactly, so no slack). The
    # weight zeros pay for part of the budget, so the compact net keeps more than half the dense parameters.
    before, after = model_stats(dense, 2), model_stats(compact, 2)
    nonzeros = sum(int((p != 0).sum()) for p in compact.parameters())
    assert nonzeros <= report["compact"]["nonzeros"] <= 0.5 * before["params"] < after["params"]
    assert report["compact"] == {
        "params": after["params"],
        "nonzeros": report["compact"]["nonzeros"],
        "macs": after["macs_1280x720"],
    }
    assert report["original"] == {"params": before["params"], "macs": before["macs_1280x720"]}
    shapes = {n: (m.out_channels, m.in_channels) for n, m in compact.named_modules() if isinstance(m, nn.Conv2d)}
    for name, widths in report["widths"].items():
        (c_out, c_in), (o_out, o_in) = widths["compact"], widths["original"]
        assert (c_out, c_in) == shapes[name] and c_out <= o_out and c_in <= o_in
    assert report["widths"] and sum(g["kept"] for g in report["kept_channels"].values()) < 48
    # At least 30 % exact zeros in the hypernetwork convs after bake, kept through fine-tuning by the masks.
    assert not any(parametrize.is_parametrized(m) for m in compact.modules())
    achieved = zero_fraction(compact, report["pruned_layers"])
    assert achieved >= 0.3 and achieved == pytest.approx(report["achieved_sparsity_pruned_layers"], abs=1e-6)
    with torch.no_grad():
        out = compact.eval()(butterfly)
    assert out.shape == (1, 3, 2 * butterfly.shape[2], 2 * butterfly.shape[3])
    path = save_checkpoint(tmp_path / "ck", compact, {"pruning": report})
    loaded, manifest = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded(butterfly), out)
    assert manifest["pruning"] == json.loads(json.dumps(report))
    # Run again on the finished folder: both phases resume at their end and rebuild the same compact net.
    again, report_again = fmp.run(tiny("edsr"), sampler(photos), cfg, tmp_path / "run", config)
    with torch.no_grad():
        assert torch.equal(again.eval()(butterfly), out)
    assert {k: v for k, v in report_again.items() if k != "runs"} == {k: v for k, v in report.items() if k != "runs"}


def test_forced_targets_keep_the_largest_z_and_weights(tmp_path, photos):
    """A search too short to prune anything: materialize forces both targets."""
    model = tiny("edsr")
    search = FMPSearch(
        model, FMPConfig(params=0.5, weight_sparsity=0.3, check_every=100, search_fraction=0.5), total_steps=8, scale=2
    )
    train(model, sampler(photos), train_cfg(8), tmp_path, pruner=search)
    assert search.steps_made == search.budget_steps == 4 and search.channels_locked_at is None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # z has not moved yet (lambda_C calibrates over the first check): make |z| distinct
        for v in search.vectors.z.values():
            v.copy_(torch.rand(v.shape, generator=gen) + 0.01)
    z = {g: search.vectors.vector(g).detach().abs().clone() for g in search.searched}
    compact = materialize(search)
    report = finetune_pruner(search, compact, steps=0).finalize()
    assert report["forced"] is True and report["forced_parts"] == {"channels": True, "weights": True}
    assert report["achieved_params_fraction"] <= 0.5 and report["search_steps"] == 4
    # Forced channels: every group kept its largest |z| (one global ascending order removed the rest).
    widths = {n: (m.out_channels, m.in_channels) for n, m in compact.named_modules() if isinstance(m, nn.Conv2d)}
    assert any(int(k.sum()) < k.numel() for k in search.channel_keep.values())
    for g, keep in search.channel_keep.items():
        kept = int(keep.sum())
        assert set(torch.topk(z[g], kept).indices.tolist()) == set(torch.nonzero(keep).flatten().tolist())
        producer = search.groups[g].producers[0]
        assert widths[producer.layer][0] == kept * producer.index.shape[1] or len(search.groups[g].producers) > 1
    # Forced weights: every hypernetwork conv at the target (per layer), exact zeros.
    for name in report["pruned_layers"]:
        assert report["per_layer_sparsity"][name] >= 0.3
        assert zero_fraction(compact, [name]) >= 0.3


def test_macs_target_on_rdn_is_forced_by_mac_count(butterfly):
    model = tiny("rdn")
    before = model_stats(model, 2)["macs_1280x720"]
    search = FMPSearch(model, FMPConfig(macs=0.4, weight_sparsity=0.5), total_steps=10, scale=2)
    compact = materialize(search)
    report = finetune_pruner(search, compact, steps=0).finalize()
    stats = model_stats(compact, 2)
    assert report["forced_parts"] == {"channels": True, "weights": True}
    assert stats["macs_1280x720"] == report["compact"]["macs"] <= 0.4 * before
    assert report["achieved_sparsity_pruned_layers"] >= 0.5 and stats["sparsity_prunable"] >= 0.5
    with torch.no_grad():
        assert compact(butterfly).shape == (1, 3, 2 * butterfly.shape[2], 2 * butterfly.shape[3])


def test_channel_only_meta_pruning_has_no_weight_zeros(tmp_path, photos):
    model = tiny("edsr")
    before = model_stats(model, 2)["params"]
    compact, report = fmp.run(
        model, sampler(photos), train_cfg(8), tmp_path, FMPConfig(params=0.5, weight_sparsity=0.0)
    )
    assert report["method"] == "channel-only" and report["weight_masks"] is None
    assert report["achieved_sparsity_pruned_layers"] < 0.01  # zeros only by chance
    assert model_stats(compact, 2)["params"] <= 0.5 * before


def test_l1_baseline_keeps_the_highest_l1_channels(tmp_path, photos):
    model = tiny("edsr").eval()
    groups = find_groups(model)
    keep, cost = l1_keep(model, groups, 2, ChannelL1Config(params=0.5))
    assert cost.fraction({g: int(k.sum()) for g, k in keep.items()}, "params") <= 0.5
    # The residual stream by hand: channel j is written by head.0, the block's second conv and the final body
    # conv; its score sums the L1 norms of those three filters, divided by the group's mean.
    stream = next(g for g in groups if g.member("head.0", "out") is not None)
    by_hand = sum(
        model.get_submodule(n).weight.detach().abs().sum(dim=(1, 2, 3)) for n in ("head.0", "body.0.body.2", "body.1")
    )
    kept = int(keep[stream.id].sum())
    assert 4 <= kept < 16
    assert set(torch.topk(by_hand, kept).indices.tolist()) == set(torch.nonzero(keep[stream.id]).flatten().tolist())
    # The upsampler group: each channel's four PixelShuffle filters summed.
    up = next(g for g in groups if g.member("tail.0.0", "out") is not None)
    filters = model.get_submodule("tail.0.0").weight.detach().abs().sum(dim=(1, 2, 3)).view(16, 4).sum(1)
    n_up = int(keep[up.id].sum())
    assert set(torch.topk(filters, n_up).indices.tolist()) == set(torch.nonzero(keep[up.id]).flatten().tolist())
    compact, report = channel_l1.run(model, sampler(photos), train_cfg(2), tmp_path, ChannelL1Config(params=0.5))
    stats = model_stats(compact, 2)
    assert report["method"] == "channel-l1" and report["compact"]["params"] == stats["params"]
    assert stats["params"] <= 0.5 * model_stats(model, 2)["params"] and report["finetune_steps"] == 2


def test_channel_cost_matches_model_stats_on_rdn():
    model = tiny("rdn").eval()
    groups = find_groups(model)
    keep, cost = l1_keep(model, groups, 2, ChannelL1Config(params=0.4))
    from compress.pruning.slicing import slice_model

    stats = model_stats(slice_model(model, groups, keep), 2)
    kept = {g: int(k.sum()) for g, k in keep.items()}
    assert (cost.params(kept), cost.macs(kept)) == (stats["params"], stats["macs_1280x720"])
    assert isinstance(cost, ChannelCost) and cost.params(kept) <= 0.4 * cost.original["params"]


def test_group_prox_asks_each_channel_to_keep_up_with_its_own_groups_median(tmp_path, photos):
    """--channel-prox group: after the calibration each group's z gradients are scaled so that its median mean
    |dL/dz| equals lambda_C (the global prox then treats every group alike); a resumed search gets the same scales."""
    config = FMPConfig(params=0.5, weight_sparsity=0.3, check_every=4, channel_prox="group")
    model = tiny("edsr")
    search = FMPSearch(model, config, total_steps=40, scale=2)
    train(model, sampler(photos), train_cfg(6, lr=LR, save_every=6), tmp_path / "a", pruner=search)
    assert search.lambda_c > 0
    medians = {g: float((search.z_grad_sum[g] / search.z_grad_steps).median()) for g in search.searched}
    for g in search.searched:
        assert search.grad_scale[g] * medians[g] == pytest.approx(search.lambda_c, rel=1e-6)
    assert len({round(v, 6) for v in search.grad_scale.values()}) > 1  # the groups' gradients differ in scale
    again = FMPSearch(tiny("edsr"), config, total_steps=40, scale=2)
    again.load_state_dict(search.state_dict())
    assert again.grad_scale == search.grad_scale
    with pytest.raises(ValueError, match="group needs --lambda-channel 0"):
        FMPConfig(params=0.5, weight_sparsity=0.3, lambda_channel=1.0, channel_prox="group")


def test_resume_reproduces_vectors_indicators_and_trace(tmp_path, photos):
    fast = {**FAST, "lambda_channel": 30.0, "lambda_weight": 5e-2, "check_every": 2}
    config = FMPConfig(params=0.5, weight_sparsity=0.3, **fast)

    def run(steps: int, folder: str):
        model = tiny("edsr")
        search = FMPSearch(model, config, total_steps=40, scale=2)
        cfg = train_cfg(steps, lr=LR, lr_min_ratio=1.0, save_every=4)
        train(model, sampler(photos), cfg, tmp_path / folder, pruner=search)
        return model, search

    straight_model, straight = run(40, "a")
    run(20, "b")  # "crash" at step 20, then resume the same folder as the 40-step run
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    state["train_config"]["steps"] = 40
    torch.save(state, tmp_path / "b" / "train_state.pt")
    resumed_model, resumed = run(40, "b")
    assert resumed.trace == straight.trace and straight.channels_locked_at is not None, straight.trace[-2:]
    assert straight.weights_locked_at is not None and straight.steps_made < 36  # stopped when both locked
    # the crash fell between the locks: the rewind snapshot and the indicator means came back from the state file
    assert straight.channels_locked_at < 20 < straight.weights_locked_at, (
        straight.channels_locked_at,
        straight.weights_locked_at,
    )
    assert resumed.steps_made == straight.steps_made
    for g in straight.searched:
        assert torch.allclose(straight.vectors.vector(g), resumed.vectors.vector(g), atol=1e-6)
    for n, h in straight.hyper.items():
        assert torch.allclose(h.U, resumed.hyper[n].U, atol=1e-6)
        assert torch.equal(h.weight_mask, resumed.hyper[n].weight_mask)
    for (k, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), k


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="params or --macs is needed by the channel methods"):
        FMPConfig()
    with pytest.raises(ValueError, match="one of them, not both"):
        FMPConfig(params=0.5, macs=0.5, weight_sparsity=0.3)
    with pytest.raises(ValueError, match="weight_sparsity is needed by --method fmp"):
        FMPConfig(params=0.5)
    with pytest.raises(ValueError, match="weight_sparsity must be in"):
        FMPConfig(params=0.5, weight_sparsity=1.0)
    with pytest.raises(ValueError, match="smallest reachable fraction"):
        FMPSearch(tiny("edsr"), FMPConfig(params=0.01, weight_sparsity=0.0), total_steps=10, scale=2)
    with pytest.raises(ValueError, match="smallest reachable fraction"):
        l1_keep(tiny("edsr"), find_groups(tiny("edsr")), 2, ChannelL1Config(params=0.01))
