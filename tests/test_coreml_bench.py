"""Core ML artifacts on the bench: the runner's coreml engine over the ssh target (the local sshd) and locally.

On Linux the engine runs edgesr's numpy MIL executor ("coreml-reference"): every row must carry torch's PSNR on
the same images (within 0.01 dB), the memory phases, and the "timings not meaningful" marking; budgets apply.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ssh_targets import targets_file

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.pruning.methods.magnitude import prune_once
from conftest import REPO, find_device_python, run_module
from convert.pipeline import convert_checkpoint
from edgesr.datasets import load_test_set
from edgesr.images import quantize_uint8, to_float
from edgesr.metrics import mean_scores, sr_scores

TILE, OVERLAP = 64, 13
NOTE = "reference executor — timings not meaningful"


@pytest.fixture(scope="module")
def coreml(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo's Core ML artifacts in small: the shipped edsr-tiny x2 cut to 80 % zeros, converted to Core ML
    at a 64 px tile (dense.mlpackage and sparse.mlpackage), and the torch model they came from."""
    root = tmp_path_factory.mktemp("coreml")
    model, _ = load_checkpoint(REPO / "checkpoints/edsr-tiny-x2/model.pt")
    prune_once(model, 0.8)
    ckpt = save_checkpoint(root / "ckpt", model.eval(), {"name": "edsr-tiny-x2-sparse80"})
    manifest = convert_checkpoint(ckpt, root / "convert", formats=("coreml",), tile=TILE)
    assert sorted(a["file"] for a in manifest["artifacts"]) == ["dense.mlpackage", "sparse.mlpackage"]
    return {"out": root / "convert", "model": model.eval()}


def torch_psnr(model: torch.nn.Module, photos: Path) -> float:
    """Whole-image torch inference on the same LR images, scored as the bench scores (8 bit, Y, border 2)."""
    scores = []
    with torch.no_grad():
        for p in load_test_set(photos, 2):
            x = torch.from_numpy(to_float(p.lr)).permute(2, 0, 1)[None]
            sr = model(x)[0].permute(1, 2, 0).numpy()
            scores.append(sr_scores(quantize_uint8(sr), p.hr, 2))
    return mean_scores(scores)["psnr_y_db"]


def test_bench_runs_core_ml_over_ssh_with_torchs_psnr(sshd, photos, coreml, tmp_path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("defaults:\n  min_psnr_db: 10\n  max_peak_mb: 4096\ntargets:\n  box:\n    max_model_kb: 100\n")
    out, tfile = tmp_path / "out", targets_file(tmp_path, sshd, compute_units="CPU_ONLY")
    proc = run_module(
        "device_bench", "bench", coreml["out"], "--targets", "box", "--targets-file", tfile,
        "--out", out, "--test-set", photos, "--overlap", OVERLAP, "--warmup", 0, "--runs", 1,
        "--budgets", budgets,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    assert sorted(rows) == ["dense.mlpackage", "sparse.mlpackage"], proc.stderr[-2000:]
    reference = torch_psnr(coreml["model"], photos)
    for name, row in rows.items():
        assert row["format"] == "coreml" and row["target"] == "box"
        assert row["runtime"]["name"] == "coreml-reference" and row["runtime"]["version"] == "9.0"
        assert row["timings_meaningful"] is False and row["timing_note"] == NOTE
        assert abs(row["psnr_y_db"] - reference) <= 0.01, (name, row["psnr_y_db"], reference)
        for phase in ("load", "first_inference", "steady", "frames"):
            assert row["memory"][phase]["hwm_mb"] > 10, (name, phase)
        assert row["peak_rss_mb"] >= row["memory"]["load"]["hwm_mb"]
        assert row["latency_ms_median"] > 0 and row["frame_ms_median"] > 0 and row["tile"] == [TILE, TILE]
        # Budgets apply as to TFLite rows: PSNR and memory pass, the 100 KB file-size budget fails for both.
        verdicts = row["budgets"]
        assert verdicts["min_psnr_db"]["pass"] and verdicts["max_peak_mb"]["pass"]
        assert verdicts["max_model_kb"]["pass"] is False
    assert rows["sparse.mlpackage"]["size_bytes"] < rows["dense.mlpackage"]["size_bytes"]
    assert proc.returncode == 1, proc.stderr[-2000:]  # a budget failed
    md = (out / "report.md").read_text()
    assert f"dense.mlpackage ({NOTE})" in md and f"**{NOTE}**" in md
    assert list(sshd.remote_tmp.iterdir()) == []


def test_runner_describes_and_refuses_mlpackages(coreml, tmp_path) -> None:
    runner = REPO / "device_bench/runner.py"
    package = coreml["out"] / "sparse.mlpackage"
    proc = subprocess.run(
        [find_device_python(), runner, "--describe", package], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    desc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert desc["inputs"][0] == {"name": "lr", "shape": [1, 3, TILE, TILE], "dtype": "float32"}
    assert desc["tile"] == [TILE, TILE] and desc["scale"] == 2 and desc["runtime"]["name"] == "coreml-reference"
    fake = tmp_path / "fake.mlpackage"
    fake.mkdir()
    proc = subprocess.run([find_device_python(), runner, "--describe", fake], capture_output=True, text=True)
    assert proc.returncode == 2 and "runner error [invalid-model]" in proc.stderr and "no Manifest.json" in proc.stderr


def test_targets_that_run_only_tflite_skip_core_ml_with_a_note(coreml, photos, tmp_path) -> None:
    from device_bench.artifacts import resolve_artifacts
    from device_bench.targets import LocalTarget

    artifacts, _ = resolve_artifacts((coreml["out"],), None)
    assert {a.format for a in artifacts} == {"coreml"} and all(a.io["layout"] == "NCHW" for a in artifacts)
    assert "coreml" in LocalTarget.formats
    # The adb target runs TFLite only: a bench there lists the Core ML files as skipped, and nothing is left.
    (tmp_path / "t.yaml").write_text(
        json.dumps({"targets": {"phone": {"type": "adb", "serial": "emulator-5554", "engine": "runner"}}})
    )
    proc = run_module(
        "device_bench", "bench", coreml["out"], "--targets", "phone", "--targets-file", tmp_path / "t.yaml",
        "--out", tmp_path / "out", "--test-set", photos,
    )  # fmt: skip
    assert "on phone: skipped, this target runs no coreml files" in proc.stderr, proc.stderr[-2000:]


def test_an_iphones_xcode_report_becomes_rows_checked_against_budgets(coreml, photos, tmp_path) -> None:
    """Bench the Core ML files locally (reference executor), import an iPhone's Xcode report of one of them:
    the row has Xcode's figures, a frame latency derived from the tiles the bench's tiler cuts, no memory or
    PSNR, the target's budgets (nulls included), and it survives a resumed bench."""
    out, budgets = tmp_path / "out", tmp_path / "budgets.yaml"
    budgets.write_text(
        "defaults: {min_psnr_db: 10, max_frame_ms: 100000}\n"
        "targets:\n  iphone-15-pro: {max_frame_ms: null, min_psnr_db: null, max_frame_ms_median: 25}\n"
    )
    bench = (
        "device_bench", "bench", coreml["out"], "--out", out, "--test-set", photos, "--overlap", OVERLAP,
        "--frame", "160x120", "--warmup", 0, "--runs", 1, "--min-seconds", 0, "--budgets", budgets,
    )  # fmt: skip
    proc = run_module(*bench)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The Mac-only function (MLModel) is the one part that cannot run here: asked for, it is a clean no-runtime.
    (job,) = [j for j in (out / "jobs" / "local").iterdir() if j.name.endswith("sparse")]
    runner = [find_device_python(), REPO / "device_bench/runner.py", "--job", job, "--runtime", "coreml"]
    proc = subprocess.run(runner, capture_output=True, text=True, timeout=300)
    assert (
        proc.returncode == 3
        and "[no-runtime]: Core ML cannot load model.mlpackage here: MLModel runs on macOS only" in proc.stderr
    )
    package = coreml["out"] / "sparse.mlpackage"
    xcode = tmp_path / "reports" / "iphone.yaml"
    xcode.parent.mkdir()
    xcode.write_text(
        f"model: {package}\ndevice: iPhone 15 Pro\nos: iOS 18.2\ncompute_units: ALL\nload_ms: 20.5\n"
        "prediction_ms: 2.5\nxcode: '16.2'\nops: {neural_engine: 40, gpu: 0, cpu: 3}\n"
    )
    proc = run_module("device_bench", "import-xcode", xcode, "--out", out)
    assert proc.returncode == 1, proc.stderr[-2000:]  # 12 tiles x 2.5 ms = 30 ms > 25 ms
    report = json.loads((out / "report.json").read_text())
    local = {r["artifact"]: r for r in report["rows"] if r["target"] == "local"}
    (row,) = [r for r in report["rows"] if r["target"] == "iphone-15-pro"]
    assert sorted(local) == ["dense.mlpackage", "sparse.mlpackage"]
    assert (
        row["sha256"] == local["sparse.mlpackage"]["sha256"]
        and row["size_bytes"] == local["sparse.mlpackage"]["size_bytes"]
    )
    assert row["tiles_per_frame"] == local["sparse.mlpackage"]["tiles_per_frame"] == 12  # 3 rows x 4 columns of 64
    assert row["latency_ms_median"] == 2.5 and row["frame_ms_median"] == 30.0 and row["fps"] == pytest.approx(1000 / 30)
    assert row["load_ms"] == 20.5 and row["compute_units"] == "ALL" and row["os_version"] == "iOS 18.2"
    assert row["peak_rss_mb"] is None and row["psnr_y_db"] is None and row["frame_ms_p90"] is None
    assert row["xcode_report"]["ops"] == {"neural_engine": 40, "gpu": 0, "cpu": 3}
    assert list(row["budgets"]) == ["max_frame_ms_median"] and row["budgets"]["max_frame_ms_median"]["value"] == 30.0
    assert not row["pass"] and report["exit_code"] == 1
    assert report["environment"]["iphone-15-pro"]["device_model"] == "iPhone 15 Pro"
    md = (out / "report.md").read_text()
    assert "sparse.mlpackage (Xcode report: frame = tiles × median prediction; no memory or PSNR measured)" in md
    assert "iPhone 15 Pro" in md

    # A second report of the same file, device and compute units replaces the first; now it fits.
    xcode.write_text(xcode.read_text().replace("prediction_ms: 2.5", "prediction_ms: 2.0"))
    proc = run_module("device_bench", "import-xcode", xcode, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["target"] == "iphone-15-pro"]
    assert [r["frame_ms_median"] for r in rows] == [24.0] and rows[0]["pass"]
    # A resumed bench keeps what was imported into its folder.
    proc = run_module(*bench)
    assert proc.returncode == 0 and "resuming: 2 measurement(s)" in proc.stderr, proc.stderr[-2000:]
    rows = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["target"] == "iphone-15-pro"]
    assert [r["frame_ms_median"] for r in rows] == [24.0] and rows[0]["budgets"]["max_frame_ms_median"]["pass"]

    # Bad reports are refused before anything is written: one line naming the file, exit 2.
    before = (out / "report.json").read_bytes()
    fake = tmp_path / "reports" / "other.mlpackage"
    fake.mkdir()
    (fake / "Manifest.json").write_text("{}")
    for text, problem in [
        (xcode.read_text().replace("ALL", "NEURAL"), "compute_units must be one of"),
        (xcode.read_text().replace("prediction_ms: 2.0", "prediction_ms: -1"), "prediction_ms must be > 0"),
        (xcode.read_text().replace("load_ms: 20.5\n", ""), "missing load_ms"),
        (xcode.read_text() + "memory_mb: 3\n", "unknown key 'memory_mb'"),
        (xcode.read_text().replace(str(package), "other.mlpackage"), "is not among the Core ML files benched"),
        (xcode.read_text() + "target: local\n", "is a measured target"),
    ]:
        bad = tmp_path / "reports" / "bad.yaml"
        bad.write_text(text)
        proc = run_module("device_bench", "import-xcode", xcode, bad, "--out", out)
        assert proc.returncode == 2 and problem in proc.stderr and str(bad) in proc.stderr, (problem, proc.stderr)
        assert (out / "report.json").read_bytes() == before
