"""`compress prune` with the channel methods (fmp, channel-only, channel-l1): real CLI runs, the compact model
through convert/, torchrun DDP, and bad target flags."""

import json
import os
import subprocess
import sys

import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.models import create_model
from conftest import REPO, run_module

SMALL = ("--batch-size", "2", "--patch", "12", "--test-set", "butterfly", "--device", "cpu")


def parent_checkpoint(folder):
    torch.manual_seed(0)
    model = create_model("edsr-tiny", scale=2, n_resblocks=2, n_feats=16)
    return save_checkpoint(folder, model, {"name": "parent", "psnr_y_db": 30.0}), model


def conv_shapes(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.fixture(scope="module")
def fmp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmp")
    parent, dense = parent_checkpoint(root / "parent")
    args = ("prune", "--checkpoint", parent, "--method", "fmp", "--params", "0.5", "--weight-sparsity", "0.3")
    r = run_module("compress", *args, "--steps", "60", *SMALL, "--out", root / "fmp")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "fmp", dense


def test_fmp_cli_writes_a_physically_smaller_model_with_exact_zeros(fmp_run):
    out, dense = fmp_run
    manifest = json.loads((out / "manifest.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["method"] == "fmp" and pruning["targets"]["params_fraction"] == 0.5
    compact, _ = load_checkpoint(out / "model.pt")
    n_dense = sum(p.numel() for p in dense.parameters())
    n_compact = sum(p.numel() for p in compact.parameters())
    nonzeros = sum(int((p != 0).sum()) for p in compact.parameters())
    # --params counts non-zeros: the weight zeros pay for part of the budget, the rest is channels.
    assert nonzeros <= 0.5 * n_dense < n_compact < n_dense and manifest["stats"]["params"] == n_compact
    # Fewer channels, not masks: some conv shapes shrink, none grows, RGB in/out untouched.
    before, after = conv_shapes(dense), conv_shapes(compact)
    assert any(after[n] != before[n] for n in before) and all(after[n] <= before[n] for n in before)
    assert after["head.0"][1] == 3 and after["tail.1"][0] == 3
    assert pruning["achieved_sparsity_pruned_layers"] >= 0.3
    zeros = sum(int((compact.get_submodule(n).weight == 0).sum()) for n in pruning["pruned_layers"])
    total = sum(compact.get_submodule(n).weight.numel() for n in pruning["pruned_layers"])
    assert zeros / total == pytest.approx(pruning["achieved_sparsity_pruned_layers"], abs=1e-6)
    assert manifest["train"]["steps"] == 60 and len(manifest["train"]["phases"]) == 2


def test_fmp_model_converts_dense_and_sparse_and_is_smaller_than_unpruned(fmp_run, tmp_path):
    from convert.pipeline import convert_checkpoint

    out, dense = fmp_run
    unpruned = save_checkpoint(tmp_path / "unpruned", dense, {"name": "unpruned"})
    small = convert_checkpoint(out / "model.pt", tmp_path / "c_fmp", formats=("tflite",), tile=32)
    big = convert_checkpoint(unpruned, tmp_path / "c_dense", formats=("tflite",), tile=32)
    size = {a["encoding"]: a["size_bytes"] for a in small["artifacts"]}
    assert size["dense"] < big["artifacts"][0]["size_bytes"]  # channels gone: a smaller dense file
    assert size["sparse"] < size["dense"]  # and the exact zeros make a sparse file too
    assert all(a["parity"]["max_abs_error"] < 1e-4 for a in small["artifacts"])


def test_channel_l1_and_channel_only_cli(tmp_path):
    parent, dense = parent_checkpoint(tmp_path / "parent")
    n_dense = sum(p.numel() for p in dense.parameters())
    for method in ("channel-l1", "channel-only"):
        out = tmp_path / method
        r = run_module("compress", "prune", "--checkpoint", parent, "--method", method, "--params", "0.6",
                       "--steps", "20", *SMALL, "--out", out)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["pruning"]["method"] == method
        assert manifest["stats"]["params"] <= 0.6 * n_dense
        assert manifest["pruning"]["achieved_sparsity_pruned_layers"] < 0.05  # channels only: no weight zeros


def test_channel_methods_bad_target_flags(tmp_path):
    parent, _ = parent_checkpoint(tmp_path / "p")
    base = ("prune", "--checkpoint", parent, "--out", tmp_path / "o", "--steps", "2")
    cases = [
        (("--method", "fmp", "--params", "0.5"), "--weight-sparsity is needed by --method fmp"),
        (("--method", "fmp", "--weight-sparsity", "0.3"), "--params or --macs is needed by the channel methods"),
        (("--method", "channel-only", "--params", "0.5", "--sparsity", "0.5"), "--sparsity does not apply"),
        (("--method", "channel-l1", "--params", "0.5", "--layers", "all"), "--layers does not apply to --method"),
        (("--method", "fmp", "--params", "1.2", "--weight-sparsity", "0.3"), "--params must be in (0, 1)"),
        (("--method", "iks", "--params", "0.5"), "--params does not apply to --method iks"),
        (("--method", "iks"), "--sparsity is needed by --method iks"),
        (("--method", "magnitude", "--sparsity", "nan"), "--sparsity: must be a finite number"),
        (("--method", "fmp", "--params", "0.5", "--macs", "0.5", "--weight-sparsity", "0.1"), "not both"),
    ]
    for flags, message in cases:
        r = run_module("compress", *base, *flags)
        assert r.returncode == 2 and message in r.stderr, (flags, r.stderr)
        assert r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()  # nothing written, not even the folder


def test_torchrun_ddp_fmp_on_cpu_two_processes(tmp_path):
    parent, dense = parent_checkpoint(tmp_path / "parent")
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "compress", "prune", "--checkpoint", str(parent), "--method", "fmp", "--params", "0.5"]
    args += ["--weight-sparsity", "0.2", "--steps", "20", *map(str, SMALL), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(torchrun + args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["processes"] == 2
    assert manifest["pruning"]["compact"]["nonzeros"] <= 0.5 * sum(p.numel() for p in dense.parameters())
