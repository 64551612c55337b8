"""The whole pipeline on the shipped checkpoint: prune -> convert -> bench -> report, through the real CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, find_device_python, run_module

SHIPPED = REPO / "checkpoints" / "edsr-tiny-x2" / "model.pt"
PASS = "defaults: {max_model_kb: 1000, max_peak_mb: 4000, max_tile_ms: 60000, max_frame_ms: 600000, min_psnr_db: 20}\n"
FAIL = "defaults: {max_model_kb: 200, min_psnr_db: 20}\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    steps = [
        (
            "compress",
            "prune",
            "--checkpoint",
            SHIPPED,
            "--sparsity",
            0.8,
            "--steps",
            40,
            "--batch-size",
            8,
            "--out",
            root / "pruned",
        ),
        ("convert", "--checkpoint", root / "pruned" / "model.pt", "--tile", 96, "--out", root / "convert"),
    ]
    for module, *args in steps:
        proc = run_module(module, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    (root / "pass.yaml").write_text(PASS)
    bench = run_module(
        "device_bench",
        "bench",
        root / "convert",
        "--budgets",
        root / "pass.yaml",
        "--warmup",
        1,
        "--runs",
        3,
        "--device-python",
        find_device_python(),
        "--out",
        root / "bench",
    )
    return {
        "root": root,
        "bench": bench,
        "report": json.loads((root / "bench" / "report.json").read_text()),
        "convert": json.loads((root / "convert" / "manifest.json").read_text()),
        "pruned": json.loads((root / "pruned" / "manifest.json").read_text()),
    }


def row(pipeline: dict, encoding: str) -> dict:
    (r,) = [r for r in pipeline["report"]["rows"] if r["format"] == "tflite" and r["encoding"] == encoding]
    return r


def test_bench_passes_with_a_row_per_encoding(pipeline):
    assert pipeline["bench"].returncode == 0, pipeline["bench"].stderr[-2000:]
    for encoding in ("dense", "sparse"):
        r = row(pipeline, encoding)
        assert r["target"] == "local" and r["peak_rss_mb"] > 0 and r["latency_ms_median"] > 0
        assert set(r["budgets"]) == {"max_model_kb", "max_peak_mb", "max_tile_ms", "max_frame_ms", "min_psnr_db"}
        assert all(b["pass"] for b in r["budgets"].values())


def test_sparse_files_are_a_third_of_dense_at_80_percent(pipeline):
    assert pipeline["pruned"]["stats"]["sparsity_prunable"] == pytest.approx(0.8, abs=1e-3)
    arts = {a["file"]: a for a in pipeline["convert"]["artifacts"]}
    assert arts["sparse.tflite"]["size_bytes"] <= 0.35 * arts["dense.tflite"]["size_bytes"]
    assert arts["sparse.mlpackage"]["weight_bin_bytes"] <= 0.35 * arts["dense.mlpackage"]["weight_bin_bytes"]
    assert arts["sparse.tflite"]["parity"]["bit_identical_to_dense"] is True
    assert arts["dense.tflite"]["parity"]["max_abs_error"] <= 1e-4
    assert row(pipeline, "sparse")["size_bytes"] == arts["sparse.tflite"]["size_bytes"]


def test_tflite_psnr_equals_torch_psnr(pipeline):
    """Tiled TFLite inference on the device side scores the same as whole-image torch inference."""
    dense, sparse = row(pipeline, "dense"), row(pipeline, "sparse")
    assert dense["psnr_y_db"] == pytest.approx(pipeline["pruned"]["psnr_y_db"], abs=0.01)
    assert abs(dense["psnr_delta_vs_torch_db"]) < 0.01
    assert sparse["psnr_y_db"] == dense["psnr_y_db"]
    # The SR outputs pulled back from the runner are bit-identical between the two encodings.
    jobs = pipeline["root"] / "bench" / "jobs" / "local"
    dense_out = sorted((jobs / Path(dense["job_dir"]).name / "out").glob("*.npy"))
    assert len(dense_out) == 5
    for f in dense_out:
        assert np.array_equal(np.load(f), np.load(jobs / Path(sparse["job_dir"]).name / "out" / f.name))


def test_failing_budget_exits_1_and_says_by_how_much(pipeline):
    (pipeline["root"] / "fail.yaml").write_text(FAIL)
    proc = run_module("device_bench", "report", pipeline["root"] / "bench", "--budgets", pipeline["root"] / "fail.yaml")
    assert proc.returncode == 1
    md = (pipeline["root"] / "bench" / "report.md").read_text()
    assert "max_model_kb" in md and "over by" in md
