"""IKS: the gate, the target-guided decay rule, selection, baking, resume, the CLI and DDP, on real photos."""

import json
import os
import subprocess
import sys

import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.data import PatchSampler
from compress.evaluate import validator
from compress.models import create_model
from compress.pruning.gates import bake, select_layers
from compress.pruning.methods.iks import IKSConfig, IKSGate, IKSPruner, theta_shape
from compress.train import TrainConfig, TrainData, train
from conftest import REPO, run_module
from edgesr.datasets import load_test_set, load_training_images
from edgesr.errors import CheckFailed


@pytest.fixture(scope="module")
def photos():
    return [img for _, img in load_training_images("bundled")[:3]]


def small_model(feats: int = 8):
    torch.manual_seed(0)
    return create_model("edsr-tiny", scale=2, n_resblocks=1, n_feats=feats)


def test_soft_and_hard_gate_by_hand():
    w = torch.tensor([0.5, -0.5, 0.01, -0.02, 0.0]).view(5, 1, 1, 1)
    theta = torch.logit(torch.tensor(0.1)).item()  # threshold sigmoid(θ) = 0.1
    soft = IKSGate(w, (1,), theta_init=theta, gate="soft")
    out = soft(w).flatten()
    assert torch.allclose(out, torch.tensor([0.4, -0.4, 0.0, 0.0, 0.0]), atol=1e-6)
    hard = IKSGate(w, (1,), theta_init=theta, gate="hard")
    assert torch.equal(hard(w).flatten(), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))


def test_gate_gradients_follow_the_reference():
    w = torch.tensor([0.5, -0.3, 0.05]).view(3, 1, 1, 1).requires_grad_()
    gate = IKSGate(w, tuple(w.shape), theta_init=-2.0, gate="soft")  # threshold ~0.119
    gate(w).sum().backward()
    t = torch.sigmoid(torch.tensor(-2.0))
    # Live weights: dW'/dW = 1 and dW'/dθ = -sign(W) σ'(θ); the dead one (|w| <= t) gets no gradient at all.
    assert torch.allclose(w.grad.flatten(), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(gate.theta.grad.flatten(), torch.tensor([-1.0, 1.0, 0.0]) * t * (1 - t))
    hard = IKSGate(w, tuple(w.shape), theta_init=-2.0, gate="hard")
    hard(w).sum().backward()
    assert hard.theta.grad is None or torch.count_nonzero(hard.theta.grad) == 0


def test_ste_gate_has_the_hard_value_and_the_soft_gradient_for_theta():
    w = torch.tensor([0.5, -0.2, 0.05, -0.01], requires_grad=True)
    grads = {}
    for kind in ("soft", "ste"):
        g = IKSGate(w.detach(), tuple(w.shape), theta_init=-3.0, gate=kind)
        out = g(w)
        if kind == "ste":
            assert torch.equal(out.detach(), IKSGate(w.detach(), tuple(w.shape), -3.0, "hard")(w).detach())
        out.sum().backward()
        grads[kind] = (w.grad.clone(), g.theta.grad.clone())
        w.grad = None
    assert torch.equal(grads["ste"][0], grads["soft"][0])  # survivors pass dL/dW' through, the dead nothing
    assert torch.allclose(grads["ste"][1], grads["soft"][1]) and grads["ste"][1].abs().sum() > 0


@pytest.mark.parametrize(
    "granularity, shape",
    [("weight", (4, 3, 3, 3)), ("kernel", (4, 3, 1, 1)), ("filter", (4, 1, 1, 1)), ("layer", (1,))],
)
def test_theta_granularity_shapes(granularity, shape):
    assert theta_shape(torch.nn.Conv2d(3, 4, 3), granularity) == shape
    # ConvTranspose2d keeps its weight as [in, out, kh, kw]: a filter is one output channel, along dim 1.
    transposed = {"weight": (3, 4, 3, 3), "kernel": (3, 4, 1, 1), "filter": (1, 4, 1, 1), "layer": (1,)}
    assert theta_shape(torch.nn.ConvTranspose2d(3, 4, 3), granularity) == transposed[granularity]


def test_default_layers_are_edsr_body_convs_and_net_starts_dense():
    model = small_model()
    x = torch.rand(1, 3, 16, 16)
    dense_out = model(x)
    pruner = IKSPruner(model, IKSConfig(sparsity=0.5), 100)
    assert list(pruner.layers) == ["body.0.body.0", "body.0.body.2", "body.1"]
    assert set(select_layers(model, "all")) - set(pruner.layers) == {"head.0", "tail.0.0", "tail.1"}
    # θ0 = -12: threshold ~6e-6 changes nothing visible.
    assert pruner.gated_sparsity() == 0.0
    assert torch.allclose(model(x), dense_out, atol=1e-4)


def _set_weights(pruner: IKSPruner, zero_fraction: float) -> None:
    """Give the gated layers weights of which exactly `zero_fraction` are exact zeros, the rest 0.5."""
    with torch.no_grad():
        for conv in pruner.layers.values():
            w = conv.parametrizations.weight.original
            w.fill_(0.5)
            w.view(-1)[: round(zero_fraction * w.numel())] = 0.0


def test_decay_rule_distance_band_and_end_exactly_as_reference():
    model = small_model()
    cfg = IKSConfig(sparsity=0.5, eval_every=2, decay_distance=3, finish="reference")  # 20 epochs, D = 3
    pruner = IKSPruner(model, cfg, 40)
    assert pruner.epochs == 20
    thetas = lambda: torch.cat([t.detach().flatten() for t in pruner.thetas()])  # noqa: E731
    _set_weights(pruner, 0.25)
    s = pruner.gated_sparsity()
    for step in range(1, 8):  # epochs 1..3 (steps 2, 4, 6): epoch - 0 > 3 never holds yet
        pruner.step(step)
    assert pruner.decays == [] and torch.all(thetas() == -12.0)
    pruner.step(8)  # epoch 4: 4 - 0 > 3, S_cur 25% is outside [50, 51] -> θ *= 1 + 0.005 (25 - 50)
    ratio = 1 + 0.005 * (s - 50.0)
    assert pruner.decays == [{"step": 8, "epoch": 4, "sparsity_pct": round(s, 4), "ratio": ratio}]
    assert torch.allclose(thetas(), torch.full_like(thetas(), -12.0 * ratio))
    for step in (10, 12, 14):  # epochs 5..7: too close to the last decay
        pruner.step(step)
    assert len(pruner.decays) == 1
    _set_weights(pruner, 0.505)  # inside the band [50, 51]: no decay even when allowed
    pruner.step(16)
    assert len(pruner.decays) == 1
    _set_weights(pruner, 0.9)  # too sparse: r > 1 releases weights
    pruner.step(18)
    assert pruner.decays[-1]["epoch"] == 9 and pruner.decays[-1]["ratio"] > 1
    _set_weights(pruner, 0.1)
    for step in range(20, 41, 2):  # epoch 17 = 20 - D is "near the end": last allowed decay is epoch 16
        pruner.step(step)
    assert [d["epoch"] for d in pruner.decays] == [4, 9, 13]


def test_bake_gives_plain_convs_with_exact_zeros_and_same_output():
    model = small_model()
    pruner = IKSPruner(model, IKSConfig(sparsity=0.5, granularity="kernel"), 10)
    with torch.no_grad():
        for theta in pruner.thetas():
            theta.uniform_(-4.5, -2.5)  # thresholds 0.01 .. 0.08: a real mix of dead and live weights
    x = torch.rand(1, 3, 16, 16)
    gated_out, s = model(x), pruner.gated_sparsity()
    assert 10 < s < 90
    bake(pruner.layers)
    plain = small_model()
    plain.load_state_dict(model.state_dict(), strict=True)  # no θ, no parametrization keys left
    assert torch.equal(plain(x), gated_out)
    zeros = sum(int((plain.get_submodule(n).weight == 0).sum()) for n in pruner.layers)
    total = sum(plain.get_submodule(n).weight.numel() for n in pruner.layers)
    assert 100 * zeros / total == pytest.approx(s)
    negative_zeros = [torch.signbit(c.weight[c.weight == 0]).any() for c in select_layers(plain, "all").values()]
    assert not any(negative_zeros)


def test_short_run_lands_in_band_and_selection_never_returns_below_target(tmp_path, photos):
    model = small_model(feats=16)
    cfg = TrainConfig(steps=300, batch_size=4, lr_patch=16, save_every=1000, lr=5e-4, device="cpu")
    iks = IKSConfig(sparsity=0.8, eval_every=2, decay_distance=3, finish="reference")
    val = validator(load_test_set("butterfly", 2), 2)
    pruner = IKSPruner(model, iks, cfg.steps, validate=val)
    train(model, TrainData(PatchSampler(photos, 2, 16, 4, 0), 2), cfg, tmp_path, pruner=pruner)
    info = pruner.finalize()
    achieved = info["achieved_sparsity_pruned_layers"]
    assert 0.80 <= achieved <= 0.81, info["trace_step_sparsity_pct_val_psnr"][-20:]
    assert info["selected"]["sparsity_pct"] == pytest.approx(100 * achieved)
    assert info["decays"] and info["decays"][0]["ratio"] == pytest.approx(1 - 0.005 * 80, abs=1e-6)
    # Every validated state had at least the target sparsity; unvalidated ones were never candidates.
    validated = [t for t in info["trace_step_sparsity_pct_val_psnr"] if t[2] != -1]
    assert validated and all(t[1] >= 80.0 for t in validated)
    assert info["selected"]["val_psnr_db"] == pytest.approx(max(t[2] for t in validated), abs=1e-4)


def test_unreached_target_fails_instead_of_returning_a_denser_model(tmp_path, photos):
    model = small_model()
    cfg = TrainConfig(steps=6, batch_size=2, lr_patch=12, save_every=100, device="cpu")
    pruner = IKSPruner(model, IKSConfig(sparsity=0.9, eval_every=2, finish="reference"), 6, validate=lambda m: 20.0)
    train(model, TrainData(PatchSampler(photos, 2, 12, 2, 0), 2), cfg, tmp_path, pruner=pruner)
    with pytest.raises(CheckFailed, match="never validated a state at >= 90.0% sparsity"):
        pruner.finalize()


def test_resume_reproduces_thresholds_decays_and_selection(tmp_path, photos):
    def run(steps: int, folder: str, total: int = 12):
        model = small_model()
        cfg = TrainConfig(steps=steps, batch_size=2, lr_patch=12, save_every=4, lr_min_ratio=1.0, device="cpu")
        iks = IKSConfig(sparsity=0.3, eval_every=1, decay_distance=1, theta_init=-4.0, finish="reference")
        pruner = IKSPruner(model, iks, total, validate=lambda m: -float(pruner.gated_sparsity()))
        train(model, TrainData(PatchSampler(photos, 2, 12, 2, 0), 2), cfg, tmp_path / folder, pruner=pruner)
        return model, pruner

    straight_model, straight = run(12, "a")
    run(6, "b")  # "crash" at step 6, then resume the same folder as the 12-step run
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    state["train_config"]["steps"] = 12
    torch.save(state, tmp_path / "b" / "train_state.pt")
    resumed_model, resumed = run(12, "b")
    assert resumed.decays == straight.decays and straight.decays
    assert resumed.trace == straight.trace
    for (k, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


# ------------------------------------------------------------------------- finish "mask" (the default)


def test_fix_mask_keeps_exactly_the_target_by_threshold_margin_and_restores_survivors():
    for survivors in ("unshrunk", "shrunk"):
        model = small_model()
        pruner = IKSPruner(model, IKSConfig(sparsity=0.6, survivors=survivors), 100)
        with torch.no_grad():
            for conv in pruner.layers.values():  # thresholds that differ per weight: the margin, not |W|, decides
                conv.parametrizations.weight[0].theta.uniform_(-5.0, -1.0)
        originals = {n: c.parametrizations.weight.original.detach().clone() for n, c in pruner.layers.items()}
        shrunk = {n: c.weight.detach().clone() for n, c in pruner.layers.items()}
        margins = torch.cat([
            (c.parametrizations.weight.original.abs() - torch.sigmoid(c.parametrizations.weight[0].theta)).flatten()
            for c in pruner.layers.values()
        ]).detach()  # fmt: skip
        record = pruner.fix_mask()
        total = margins.numel()
        kept = torch.cat([c.parametrizations.weight[0].mask.flatten() for c in pruner.layers.values()])
        assert int(kept.sum()) == total - round(0.6 * total)  # exactly the target, over all gated layers
        assert margins[kept].min() >= margins[~kept].max()  # the largest margins survive
        for name, conv in pruner.layers.items():
            mask = conv.parametrizations.weight[0].mask
            source = originals[name] if survivors == "unshrunk" else shrunk[name]
            assert torch.equal(conv.weight.detach(), source * mask)
        assert record["forced"] == (record["sparsity_at_fix_pct"] < 60.0)


def test_mask_finish_stops_thresholds_at_the_target_then_fine_tunes_under_a_fixed_mask(tmp_path, photos):
    from compress.pruning.methods import iks

    model = small_model(feats=16)
    cfg = TrainConfig(steps=120, batch_size=4, lr_patch=16, save_every=1000, lr=5e-4, device="cpu")
    config = IKSConfig(sparsity=0.7, eval_every=2, decay_distance=3, threshold_fraction=0.75)
    _, record = iks.run(model, TrainData(PatchSampler(photos, 2, 16, 4, 0), 2), cfg, tmp_path, config)
    threshold, finetune = record["runs"]["threshold"], record["runs"]["finetune"]
    assert threshold["steps"] == record["threshold_steps"] <= 90 and threshold["steps"] + finetune["steps"] == 120
    assert record["finetune_steps"] == finetune["steps"] > 0
    trace = record["trace_step_sparsity_pct_val_psnr"]
    assert trace[-1][0] == record["threshold_steps"] and all(t[2] == -1 for t in trace)  # no validation needed
    assert record["forced"] == (trace[-1][1] < 70.0)
    assert record["achieved_sparsity_pruned_layers"] == pytest.approx(0.7, abs=1e-3)
    assert (tmp_path / "threshold" / "train_state.pt").exists() and (tmp_path / "finetune" / "train_state.pt").exists()
    # resuming the finished run changes nothing
    again = small_model(feats=16)
    _, second = iks.run(again, TrainData(PatchSampler(photos, 2, 16, 4, 0), 2), cfg, tmp_path, config)
    assert second["threshold_steps"] == record["threshold_steps"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def run_compress(*args):
    return run_module("compress", *args)


TRAIN_SMALL = ("--batch-size", "2", "--patch", "12", "--test-set", "butterfly", "--device", "cpu")
SMALL = (*TRAIN_SMALL, "--val-set", "butterfly")


@pytest.fixture(scope="module")
def iks_run(tmp_path_factory: pytest.TempPathFactory):
    """One real `compress prune --method iks` run to 80 % on a 16-feature EDSR, through the CLI."""
    root = tmp_path_factory.mktemp("iks")
    parent = save_checkpoint(root / "parent", small_model(16), {"name": "parent", "psnr_y_db": 30.0})
    args = ("prune", "--checkpoint", parent, "--method", "iks", "--sparsity", "0.8", "--steps", "200")
    r = run_compress(*args, "--eval-every", "2", "--decay-distance", "3", *SMALL, "--out", root / "iks")
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "iks"


def test_prune_cli_iks_writes_baked_checkpoint_and_manifest(iks_run):
    manifest = json.loads((iks_run / "manifest.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["method"] == "iks" and pruning["target_sparsity"] == 0.8
    assert pruning["achieved_sparsity_pruned_layers"] == pytest.approx(0.8, abs=1e-4)  # the fixed mask: exact
    assert pruning["config"]["reference_sparse_mode"] == "pw" and pruning["decays"]
    assert pruning["config"]["finish"] == "mask" and pruning["threshold_steps"] + pruning["finetune_steps"] == 200
    layers = manifest["stats"]["layers"]
    assert {n for n, v in layers.items() if v["prunable"] and v["sparsity"] > 0.3} == set(pruning["pruned_layers"])
    for name in pruning["pruned_layers"]:
        assert layers[name]["sparsity"] == pruning["per_layer_sparsity"][name]
    # Whole-model figures sit next to the pruned-layer one, and are lower (head/tail/upsampler stay dense).
    assert manifest["stats"]["sparsity_all_params"] < pruning["achieved_sparsity_pruned_layers"]
    model, _ = load_checkpoint(iks_run / "model.pt")  # a plain EDSR: θ is gone
    assert not any("theta" in k or "parametrizations" in k for k in model.state_dict())


def test_baked_iks_model_converts_and_sparse_tflite_follows_its_zeros(iks_run, tmp_path):
    from convert.pipeline import convert_checkpoint

    manifest = convert_checkpoint(iks_run / "model.pt", tmp_path / "convert", formats=("tflite",), tile=32)
    dense, sparse = manifest["artifacts"]
    assert sparse["parity"]["bit_identical_to_dense"] is True and sparse["parity"]["max_abs_error"] < 1e-4
    model, ckpt = load_checkpoint(iks_run / "model.pt")
    gated = [model.get_submodule(n).weight for n in ckpt["pruning"]["pruned_layers"]]
    assert sparse["weights"]["sparse_tensors"] == len(gated)  # exactly the gated convs were worth encoding
    zeros = sum(int((w == 0).sum()) for w in gated)
    nnz = sum(int((w != 0).sum()) for w in gated)
    rows = sum(w.shape[0] * w.shape[2] * w.shape[3] for w in gated)  # CSR over OHWI: one segment per (o, h, w)
    saved = dense["size_bytes"] - sparse["size_bytes"]
    # Each zero saves its 4 bytes; CSR pays one index per non-zero and one segment entry per row (1-2 B each)
    # plus ~270 B of tables per sparse tensor and the DENSIFY opcode once.
    assert 4 * zeros - (2 * nnz + 2 * (rows + len(gated)) + 300 * len(gated) + 100) <= saved < 4 * zeros


def test_prune_cli_iks_bad_inputs(tmp_path):
    parent = save_checkpoint(tmp_path / "p", small_model(), {})
    base = ("prune", "--checkpoint", parent, "--method", "iks", "--out", tmp_path / "o")
    for bad in ("0", "1", "-0.2", "1.5"):
        r = run_compress(*base, "--sparsity", bad)
        assert r.returncode == 2 and "--sparsity must be in (0, 1)" in r.stderr, r.stderr
    r = run_compress(*base, "--sparsity", "0.8", "--data", tmp_path / "missing")
    assert r.returncode == 2 and "missing: training data folder does not exist" in r.stderr
    r = run_compress(*base, "--sparsity", "0.8", "--layers", "trunk.*")
    assert r.returncode == 2 and "trunk.* match no prunable layer" in r.stderr
    r = run_compress(*base, "--sparsity", "0.8", "--tolerance", "0.9")
    assert r.returncode == 2 and "--tolerance must be in [0, sparsity)" in r.stderr
    # A checkpoint of another architecture: a classifier's state dict.
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 10)).state_dict(), tmp_path / "c.pt")
    r = run_compress(
        "prune", "--checkpoint", tmp_path / "c.pt", "--method", "iks", "--sparsity", "0.8", "--out", tmp_path / "x"
    )
    assert r.returncode == 2 and "c.pt: not an edgesr checkpoint, an EDSR-PyTorch state dict" in r.stderr
    # Resuming a folder whose saved run is of another architecture (wider net) is refused by name.
    wide = save_checkpoint(tmp_path / "w", small_model(16), {})
    out = tmp_path / "r"
    ok = run_compress("prune", "--checkpoint", wide, "--sparsity", "0.5", "--steps", "2", *TRAIN_SMALL, "--out", out)
    assert ok.returncode == 0, ok.stderr[-1000:]
    r = run_compress("prune", "--checkpoint", parent, "--sparsity", "0.5", "--steps", "2", *TRAIN_SMALL, "--out", out)
    assert r.returncode == 2 and "train_state.pt: saved run is of another model or method" in r.stderr
    # A flag of another method is refused by name rather than ignored.
    r2 = run_compress("prune", "--checkpoint", parent, "--sparsity", "0.5", "--val-set", "hopper", "--out", out)
    assert r2.returncode == 2 and "--val-set does not apply to --method magnitude" in r2.stderr
    for res in (r, r2):
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0


def test_torchrun_ddp_on_cpu_two_processes(tmp_path):
    parent = save_checkpoint(tmp_path / "parent", small_model(), {"name": "parent"})
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "compress", "prune", "--checkpoint", str(parent), "--method", "iks", "--sparsity", "0.5"]
    args += ["--steps", "40", "--eval-every", "1", "--decay-distance", "2", "--theta-init", "-4"]
    args += [str(a) for a in SMALL] + ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(torchrun + args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["processes"] == 2
    assert manifest["pruning"]["achieved_sparsity_pruned_layers"] >= 0.5
