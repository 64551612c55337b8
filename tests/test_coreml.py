"""convert.coreml_artifacts: every Core ML precision of the pruned shipped checkpoint, built and verified for real.

The artifacts are built once per module (the shipped edsr-tiny x2 checkpoint, pruned in memory to 80 %, 32x32
parity tile from the bundled monarch photo); the tests read what was written.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from compress.pruning.methods.magnitude import prune_once
from conftest import REPO
from convert import coreml, coreml_artifacts, parity
from convert.coreml_artifacts import COREML_PRECISIONS, TOLERANCES
from convert.verify import Tolerance
from convert.weight_bound import bound_bytes
from device_bench import mil_exec
from edgesr.datasets import load_test_set
from edgesr.errors import CheckFailed
from edgesr.images import quantize_uint8
from edgesr.manifest import sha256
from edgesr.metrics import psnr

TILE, SCALE = 32, 2
CHECKPOINT = REPO / "checkpoints/edsr-tiny-x2/model.pt"
log = logging.getLogger(__name__)


def _pruned_checkpoint(target: float) -> nn.Module:
    model, _ = load_checkpoint(CHECKPOINT)
    prune_once(model, target)
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    staging = tmp_path_factory.mktemp("coreml")
    model = _pruned_checkpoint(0.8)
    x = parity.parity_tile(TILE, SCALE)
    reference = parity.torch_output(model, x)
    artifacts, skipped = {}, []
    for precision in ("fp32", "fp16", "int8", "lut4", "lut1", "lut5"):
        made, not_made = coreml_artifacts.coreml_artifacts(model, staging, precision, TILE, 0.0, x, reference, SCALE)
        artifacts.update({a["file"]: a for a in made})
        skipped += not_made
    return {
        "staging": staging,
        "model": model,
        "x": x,
        "reference": reference,
        "artifacts": artifacts,
        "skipped": skipped,
    }


def test_files_and_manifest_entries(built):
    arts, staging = built["artifacts"], built["staging"]
    expected = {"dense.mlpackage", "sparse.mlpackage", "dense-fp16.mlpackage", "sparse-fp16.mlpackage"}
    expected |= {"dense-int8.mlpackage", "sparse-int8.mlpackage", "dense-lut4.mlpackage", "sparse-lut4.mlpackage"}
    expected |= {"dense-lut1.mlpackage"}
    assert set(arts) == expected
    assert sorted(p.name for p in staging.iterdir()) == sorted(expected)  # nothing else, no temp folders
    for name, a in arts.items():
        assert a["format"] == "coreml" and a["sha256"] == sha256(staging / name)
        assert a["encoding"] in name and (a["precision"] == "fp32" or a["precision"] in name)
        w = a["weights"]
        assert set(w) >= {"conv_weights", "nonzeros", "sparse_tensors", "weight_bytes", "bound_bytes"}
        assert (w["sparse_tensors"] > 0) == (a["encoding"] == "sparse")
        assert a["io"]["input_shape"] == [1, 3, TILE, TILE] and a["io"]["output_shape"] == [1, 3, 64, 64]
        p = a["parity"]
        assert p["reference"] == "torch" and p["tolerance"] == vars(TOLERANCES[a["precision"]])
        assert p["verified_with"]["runtime"].startswith(mil_exec.RUNTIME) and p["verified_with"]["delegate"] is None
        target = "iOS18" if a["encoding"] == "sparse" and a["precision"] not in ("fp32", "fp16") else "iOS16"
        assert a["minimum_deployment_target"] == target
    # lut5 cannot be built, lut1 gains nothing from sparse storage (1-bit indices + 1-bit mask > 1-bit indices)
    reasons = {(s["precision"], s.get("file")): s["reason"] for s in built["skipped"]}
    assert "1, 2, 3, 4, 6 or 8 bits" in reasons[("lut5", None)]
    assert set(COREML_PRECISIONS) == {"fp32", "fp16", "int8", *(f"lut{n}" for n in range(1, 9))}
    assert "smaller stored sparse" in reasons[("lut1", "sparse-lut1.mlpackage")]


def test_parity_within_tolerances(built):
    arts = built["artifacts"]
    for name in ("dense.mlpackage", "sparse.mlpackage"):
        assert arts[name]["parity"]["max_abs_error"] <= 1e-4
    for name in ("sparse.mlpackage", "sparse-fp16.mlpackage"):
        assert arts[name]["parity"]["bit_identical_to_dense"] is True
    for name in ("dense-int8.mlpackage", "sparse-int8.mlpackage", "dense-lut4.mlpackage", "sparse-lut4.mlpackage"):
        deq = arts[name]["parity"]["dequantized_torch"]
        assert deq["max_abs_error"] <= 1e-4 and deq["convs_replaced"] == 14
    psnrs = {name: a["parity"]["psnr_db"] for name, a in arts.items()}
    log.info("PSNR vs torch: %s", psnrs)
    assert psnrs["dense-fp16.mlpackage"] > 60 and psnrs["sparse-int8.mlpackage"] > 60
    assert psnrs["sparse-lut4.mlpackage"] > 40 > psnrs["dense-lut1.mlpackage"]


def test_fp16_psnr_on_photo_within_005_db_of_fp32(built):
    """Against the real HR crop (Y channel, shave = scale): fp16 compute costs under 0.05 dB."""
    pair = {p.name: p for p in load_test_set(parity.PARITY_SET, SCALE)}[parity.PARITY_IMAGE]
    h, w = pair.lr.shape[:2]
    top, left = (h - TILE) // 2, (w - TILE) // 2
    hr = pair.hr[top * SCALE : (top + TILE) * SCALE, left * SCALE : (left + TILE) * SCALE]
    x = np.ascontiguousarray(built["x"].transpose(0, 3, 1, 2))
    scores = {}
    for name in ("dense.mlpackage", "dense-fp16.mlpackage", "sparse-int8.mlpackage"):
        out = mil_exec.run_mlpackage(built["staging"] / name, {"lr": x})["sr"][0].transpose(1, 2, 0)
        scores[name] = psnr(quantize_uint8(out), hr, crop_border=SCALE)
    log.info("PSNR-Y vs HR on the monarch crop: %s", scores)
    assert abs(scores["dense-fp16.mlpackage"] - scores["dense.mlpackage"]) <= 0.05
    assert abs(scores["sparse-int8.mlpackage"] - scores["dense.mlpackage"]) <= 0.5


def test_small_tensors_sparse_inline_ones_reported(built):
    weights = mil_exec.conv_weights(mil_exec.load_program(built["staging"] / "sparse.mlpackage"))
    head = [w for w in weights if w.value.size == 3 * 32 * 9]  # head 3->32 and tail 32->3: 864 < 2048 elements
    assert len(head) == 2 and all(w.sparse and not w.inline for w in head)
    inline = [w for w in weights if w.inline]
    assert [w.value.size for w in inline] == [9, 9] and not any(w.sparse for w in inline)  # MeanShift 1x1 convs
    assert built["artifacts"]["sparse.mlpackage"]["weights"]["inline_tensors"] == 2


def test_lossy_sparse_files_are_smaller(built):
    size = {n: a["weights"]["weight_bytes"] for n, a in built["artifacts"].items()}
    assert size["sparse-lut4.mlpackage"] < size["sparse-int8.mlpackage"] < size["sparse-fp16.mlpackage"]
    assert size["sparse-fp16.mlpackage"] < size["sparse.mlpackage"] < size["dense.mlpackage"]
    for a in built["artifacts"].values():
        if a["encoding"] == "sparse":
            assert a["weights"]["weight_bytes"] <= 1.1 * a["weights"]["bound_bytes"], a["file"]


def test_parity_gate_fails_with_one_line(built, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCES, "lut2", Tolerance(psnr_db_min=200.0))
    with pytest.raises(CheckFailed) as err:
        coreml_artifacts.coreml_artifacts(
            built["model"], tmp_path, "lut2", TILE, 0.0, built["x"], built["reference"], SCALE
        )
    message = str(err.value)
    assert (
        message.startswith("dense-lut2.mlpackage: ")
        and "Core ML output vs torch" in message
        and "(limit >= 200 dB)" in message
        and "\n" not in message
    )


def test_sparse_encoding_decisions():
    w = np.ones(1024, np.float32)
    w[:32] = 0  # 1/32 zeros: mask + non-zeros is exactly as big as dense fp32, so dense
    assert not coreml.sparse_saves_bytes(w, 32)
    w[:33] = 0
    assert coreml.sparse_saves_bytes(w, 32) and not coreml.sparse_saves_bytes(w, 32, min_sparsity=0.5)
    assert not coreml.sparse_saves_bytes(w, 16)  # fp16 breaks even at 1/16 zeros
    w[:900] = 0
    assert not coreml.sparse_saves_bytes(w, 1)  # 1-bit palettes never gain from a mask
    assert not coreml.sparse_saves_bytes(np.zeros(9, np.float32), 32)  # inline tensors stay as they are
    assert coreml.palette_saves_bytes(1000, 4) and not coreml.palette_saves_bytes(200, 8)


def test_tensor_with_few_zeros_stays_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2)).eval()
    with torch.no_grad():
        model[0].weight.view(-1)[:200] = 0  # 46 % zeros: sparse
        model[1].weight.view(-1)[:20] = 0  # 1.2 % zeros: sparse would be larger
    path = coreml.save_mlpackage(coreml.sparsify_coreml(coreml.convert_coreml(model, 8), 0.0), tmp_path / "s.mlpackage")
    first, second = mil_exec.conv_weights(mil_exec.load_program(path))
    assert first.sparse and not second.sparse
    assert second.stored_bytes == 4 * second.value.size and first.stored_bytes < 4 * first.value.size


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_sparse_bytes_vs_bound_and_coremltools_default(sparsity, tmp_path):
    model = _pruned_checkpoint(sparsity)
    dense = coreml.convert_coreml(model, 16)
    ours = coreml.mlpackage_stats(coreml.save_mlpackage(coreml.sparsify_coreml(dense, 0.0), tmp_path / "o.mlpackage"))
    theirs = coreml.mlpackage_stats(
        coreml.save_mlpackage(coreml.coremltools_default_sparse(dense, sparsity), tmp_path / "t.mlpackage")
    )
    bound = bound_bytes(ours.conv_weights, ours.nonzeros * 32)
    ratio = ours.weight_bytes / bound
    print(
        f"\n{sparsity:.0%}: conv weights {ours.conv_weights}, non-zeros {ours.nonzeros}, sparse weight bytes "
        f"{ours.weight_bytes}, bound {bound} (x{ratio:.4f}), coremltools default prune_weights {theirs.weight_bytes} "
        f"(ours x{ours.weight_bytes / theirs.weight_bytes:.4f}); weight.bin {ours.weight_bin_bytes} vs "
        f"{theirs.weight_bin_bytes}"
    )
    assert ours.nonzeros == theirs.nonzeros  # same zeros, only the encoding differs
    assert ratio <= 1.05
    assert ours.weight_bytes <= theirs.weight_bytes and ours.weight_bin_bytes <= theirs.weight_bin_bytes
    assert math.isclose(ours.nonzeros / ours.conv_weights, 1 - sparsity, abs_tol=0.01)
