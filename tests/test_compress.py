"""Training, gradual magnitude pruning, resume, size figures and the compress CLI, on real photos."""

import json

import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.data import PatchSampler
from compress.evaluate import model_stats
from compress.models import create_model
from compress.pruning.methods.magnitude import GradualMagnitudePruner, MagnitudeConfig
from compress.train import TrainConfig, TrainData, train
from conftest import REPO, run_module
from edgesr.datasets import load_training_images
from edgesr.errors import BadInput


@pytest.fixture(scope="module")
def photos():
    return [img for _, img in load_training_images("bundled")[:3]]


def data(photos):
    return TrainData(PatchSampler(photos, 2, 12, 2, 0), scale=2)


def small_model():
    torch.manual_seed(0)
    return create_model("edsr-tiny", scale=2, n_resblocks=1, n_feats=8)


def test_gradual_schedule_reaches_target_exactly_and_masks_hold(tmp_path, photos):
    model = small_model()
    pruner = GradualMagnitudePruner(model, MagnitudeConfig(sparsity=0.8, prune_fraction=0.6, frequency=2), 10)
    assert [round(pruner.sparsity_at(s), 4) for s in (0, 3, 6, 9)] == [0.0, 0.7, 0.8, 0.8]
    cfg = TrainConfig(steps=10, batch_size=2, lr_patch=12, save_every=100, device="cpu")
    train(model, data(photos), cfg, tmp_path, pruner=pruner)
    pruner.finalize()
    for name, conv in pruner.layers.items():
        zeros = int((conv.weight == 0).sum())
        assert zeros == round(0.8 * conv.weight.numel()), name  # uniform: every layer exactly at target
    # After fine-tuning steps the masked weights are still exactly zero (the mask gates held them).
    assert model_stats(model, 2)["sparsity_prunable"] == pytest.approx(0.8, abs=1e-3)


def test_resume_continues_exactly(tmp_path, photos):
    # Constant LR, so a run cut at step 3 and a 6-step run share their first 3 steps exactly.
    cfg = TrainConfig(steps=6, batch_size=2, lr_patch=12, save_every=3, lr_min_ratio=1.0, device="cpu")
    straight = small_model()
    train(straight, data(photos), cfg, tmp_path / "a")

    # "Crash" after step 3: run 3 steps, then relabel the saved state as the 6-step run's and resume it.
    state_dir = tmp_path / "b"
    train(small_model(), data(photos), TrainConfig(**{**cfg.__dict__, "steps": 3}), state_dir)
    state = torch.load(state_dir / "train_state.pt", weights_only=True)
    state["train_config"]["steps"] = 6
    torch.save(state, state_dir / "train_state.pt")
    resumed = small_model()
    run = train(resumed, data(photos), cfg, state_dir)
    assert run["resumed_from"] == 3
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    # Other settings with the same folder are refused rather than silently mixed.
    with pytest.raises(BadInput, match="saved run used other settings"):
        train(small_model(), data(photos), TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), state_dir)


def test_macs_for_720p_output_by_hand():
    model = create_model("edsr-tiny", scale=2)  # 4 blocks x 32 feats
    stats = model_stats(model, 2)
    lr_px, hr_px = 640 * 360, 1280 * 720
    lr_weights = 3 * 32 * 9 + 9 * 32 * 32 * 9 + 32 * 128 * 9 + 9  # head, 9 body convs, upsampler, sub_mean
    hr_weights = 32 * 3 * 9 + 9  # tail conv and add_mean run on the 2x output
    assert stats["macs_1280x720"] == lr_px * lr_weights + hr_px * hr_weights
    assert stats["params"] == 122_011


def run_compress(*args):
    return run_module("compress", *args)


def test_prune_cli_writes_checkpoint_and_manifest(tmp_path):
    parent = save_checkpoint(tmp_path / "parent", small_model(), {"name": "parent", "psnr_y_db": 30.0})
    out = tmp_path / "pruned"
    r = run_compress(
        "prune",
        "--checkpoint",
        str(parent),
        "--sparsity",
        "0.5",
        "--steps",
        "8",
        "--batch-size",
        "2",
        "--patch",
        "12",
        "--test-set",
        "butterfly",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "checkpoint" and manifest["pruning"]["method"] == "magnitude"
    assert manifest["stats"]["sparsity_prunable"] == pytest.approx(0.5, abs=2e-3)
    assert manifest["parent"]["psnr_y_db"] == 30.0 and manifest["seed"] == 0
    assert set(manifest["stats"]["layers"]["head.0"]) >= {"shape", "params", "nonzeros", "sparsity"}
    assert manifest["psnr_y_db"] > 10 and manifest["test_set"]["images"] == ["butterfly"]
    model, saved = load_checkpoint(out / "model.pt")
    assert saved["psnr_y_db"] == manifest["psnr_y_db"]


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path):
    r = run_compress("prune", "--checkpoint", str(tmp_path / "none.pt"), "--sparsity", "0.8", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "none.pt: no such checkpoint" in r.stderr
    parent = save_checkpoint(tmp_path / "p", small_model(), {})
    r = run_compress("prune", "--checkpoint", str(parent), "--sparsity", "1.5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--sparsity must be in (0, 1)" in r.stderr and "Traceback" not in r.stderr
    r = run_compress("train", "--model", "edsr-tiny", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "nodata: training data folder does not exist" in r.stderr


def test_shipped_checkpoint_beats_bicubic():
    """The checkpoint the demo starts from: its manifest is true and it beats bicubic on the sporco photos."""
    from compress.evaluate import evaluate, evaluate_bicubic
    from edgesr.datasets import load_test_set

    model, manifest = load_checkpoint(REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt")
    pairs = load_test_set("sporco", 2)
    ours, bicubic = evaluate(model, pairs, 2)["mean"]["psnr_y_db"], evaluate_bicubic(pairs, 2)["mean"]["psnr_y_db"]
    assert ours > bicubic + 0.5
    # Same figure as recorded; thread count changes float summation order, hence not bit-exact.
    assert ours == pytest.approx(manifest["psnr_y_db"], abs=1e-3)


def test_default_fine_tuning_keeps_a_trained_model(tmp_path):
    """Pruning the shipped model by 1 % with the fine-tuning defaults (distilled, warm-up, lr for 1 % removed)
    does not cost it quality; the manifest records the settings the defaults chose."""
    from compress.evaluate import evaluate
    from compress.train import FINETUNE, finetune_lr
    from edgesr.datasets import load_test_set

    ckpt = REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt"
    model, _ = load_checkpoint(ckpt)
    before = evaluate(model, load_test_set("butterfly", 2), 2)["mean"]["psnr_y_db"]
    out = tmp_path / "p1"
    r = run_compress("prune", "--checkpoint", ckpt, "--sparsity", "0.01", "--steps", "40", "--test-set", "butterfly",
                     "--device", "cpu", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["train"]["config"]
    assert cfg["lr"] == finetune_lr(0.01) == FINETUNE.lr * 0.1 and cfg["distill"] == 1.0 and cfg["warmup"] == 0.05
    assert manifest["psnr_y_db"] > before - 0.05, (manifest["psnr_y_db"], before)
    assert finetune_lr(0.8) == pytest.approx(5e-4 * 0.8**0.5) and finetune_lr(0.0) == 5e-5


def test_training_from_a_div2k_folder_uses_its_lr_files_and_a_bounded_cache(tmp_path):
    """A DIV2K-layout folder: the shipped LR files are the training inputs (not re-made from HR), images are read
    lazily, and the decoded-image cache stays within its byte budget."""
    from compress.data import TrainingSet
    from edgesr.images import bicubic_downscale, load_rgb, modcrop, save_png

    hr_dir, lr_dir = tmp_path / "DIV2K_train_HR", tmp_path / "DIV2K_train_LR_bicubic" / "X2"
    hr_dir.mkdir()
    lr_dir.mkdir(parents=True)
    for i, (_, img) in enumerate(load_training_images("bundled")[:4]):
        hr = modcrop(img[:200, :240], 2)
        save_png(hr_dir / f"{i:04d}.png", hr)
        save_png(lr_dir / f"{i:04d}x2.png", 255 - bicubic_downscale(hr, 2, "matlab"))  # unmistakably the file's
    budget = 2 * 200 * 240 * 3  # about two decoded HR + LR pairs
    images = TrainingSet.from_source(tmp_path, 2, cache_bytes=budget)
    assert [e.lr_path.name for e in images.entries] == [f"{i:04d}x2.png" for i in range(4)]
    hr, lr = images.pair(1)
    assert torch.equal(lr, torch.from_numpy(load_rgb(lr_dir / "0001x2.png")).permute(2, 0, 1))
    sampler = PatchSampler(images, 2, 16, 4, 0)
    for _ in range(6):
        lr_batch, hr_batch = sampler.batch()
        assert lr_batch.shape == (4, 3, 16, 16) and hr_batch.shape == (4, 3, 32, 32)
        assert images._cached_bytes <= budget
    out = tmp_path / "ft"
    shipped = REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt"
    r = run_compress("train", "--checkpoint", shipped, "--data", tmp_path, "--steps", "2", "--batch-size", "2",
                     "--patch", "16", "--test-set", "butterfly", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["config"]["distill"] == 1.0 and manifest["pruning"] is None
