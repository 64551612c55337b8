"""A user's model file, one per topology real SR networks use, through `compress prune --model` (magnitude and
channel-l1) as real CLI runs; the pruned checkpoints rebuild from the factory plus recorded shapes, and convert.

The models are tests/topology_models.py, plain torch as a user writes them; weights are saved with torch.save.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import topology_models
from compress.checkpoint import read_checkpoint
from compress.evaluate import evaluate, model_stats
from conftest import REPO, run_module
from edgesr.datasets import load_test_set

MODELS = REPO / "tests" / "topology_models.py"
FAST = ("--steps", "3", "--batch-size", "2", "--patch", "16", "--test-set", "butterfly", "--device", "cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name in topology_models.TOPOLOGIES:
        out[name] = root / f"{name}.pt"
        torch.save(topology_models.make(name).state_dict(), out[name])
    return out


def prune(name: str, weights: Path, out: Path, *method: str):
    factory, kwargs = topology_models.TOPOLOGIES[name]
    model = ("--model", f"{MODELS}:{factory}", "--factory-args", json.dumps(kwargs), "--weights", weights)
    return run_module("compress", "prune", *model, *method, *FAST, "--out", out)


def check_rebuilds(out: Path) -> tuple[torch.nn.Module, dict]:
    """The checkpoint rebuilds (factory + shapes) into the model the manifest describes."""
    ckpt = read_checkpoint(out / "model.pt")
    manifest = json.loads((out / "manifest.json").read_text())
    assert ckpt.recipe["kind"] == "factory" and ckpt.recipe["factory"].startswith(str(MODELS))
    assert model_stats(ckpt.model, 2)["params"] == manifest["stats"]["params"]
    psnr = evaluate(ckpt.model, load_test_set("butterfly", 2), 2)["mean"]["psnr_y_db"]
    assert psnr == pytest.approx(manifest["psnr_y_db"], abs=1e-3)
    return ckpt.model, manifest


# One model per factory: the pad modes and the two interpolations prune alike (their conversion differs, and
# tests/test_topology_convert.py converts every entry).
ONE_PER_FACTORY = list({factory: name for name, (factory, _) in reversed(topology_models.TOPOLOGIES.items())}.values())


@pytest.mark.parametrize("name", ONE_PER_FACTORY)
def test_magnitude_prunes_every_conv_like_layer(name, weights, tmp_path):
    r = prune(name, weights[name], tmp_path / "m", "--method", "magnitude", "--sparsity", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    model, manifest = check_rebuilds(tmp_path / "m")
    layers = manifest["stats"]["layers"]
    # Every conv-like layer is counted and pruned (a ConvTranspose2d included), each at the target.
    conv_like = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert sorted(layers) == sorted(conv_like) == sorted(manifest["pruning"]["pruned_layers"])
    assert all(abs(v["sparsity"] - 0.5) < 0.02 for v in layers.values()), layers
    assert {v["type"] for v in layers.values()} >= ({"ConvTranspose2d"} if "ConvTranspose2d" in str(model) else set())


CHANNEL_CASES = [n for n in ONE_PER_FACTORY if n != "separable"]


@pytest.mark.parametrize("name", CHANNEL_CASES)
def test_channel_l1_slices_to_the_budget(name, weights, tmp_path):
    r = prune(name, weights[name], tmp_path / "c", "--method", "channel-l1", "--params", "0.8")
    assert r.returncode == 0, r.stderr[-2000:]
    model, manifest = check_rebuilds(tmp_path / "c")
    dense = sum(p.numel() for p in topology_models.make(name).parameters())
    assert manifest["stats"]["params"] <= 0.8 * dense < dense
    assert manifest["pruning"]["widths"]  # some layer really got narrower


def test_channel_l1_on_a_model_without_prunable_channels_says_why(weights, tmp_path):
    r = prune("separable", weights["separable"], tmp_path / "s", "--method", "channel-l1", "--params", "0.8")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no channel group of this model can be pruned" in r.stderr and "grouped Conv2d" in r.stderr
    assert not (tmp_path / "s" / "model.pt").exists()


@pytest.mark.parametrize("name", ["fsrcnn", "imdn"])
def test_pruned_foreign_models_convert_unchanged(name, weights, tmp_path):
    """convert takes the pruned checkpoint as it is: parity against the pruned torch model."""
    r = prune(name, weights[name], tmp_path / "c", "--method", "channel-l1", "--params", "0.8")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_module("convert", "--checkpoint", tmp_path / "c" / "model.pt", "--formats", "tflite", "--tile", "32",
                   "--out", tmp_path / "t")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    dense = next(a for a in manifest["artifacts"] if a["file"] == "dense.tflite")
    assert dense["parity"]["max_abs_error"] < 1e-4
    assert manifest["source"]["kind"] == "edgesr checkpoint"
