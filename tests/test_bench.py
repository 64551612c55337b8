"""`python -m device_bench` end to end: a real .tflite, the device venv, real photo crops; exit codes and reports."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, find_device_python, run_module
from edgesr.datasets import builtin_hr_images, load_test_set
from edgesr.images import save_png, to_float
from edgesr.manifest import sha256
from edgesr.metrics import mean_scores, sr_scores

TILE, OVERLAP = 64, 14
LOOSE = "defaults: {max_model_kb: 100000, max_peak_mb: 100000, max_frame_ms: 100000, min_psnr_db: 0}\n"


def cli(*args: object) -> subprocess.CompletedProcess:
    return run_module("device_bench", *args)


def bench(*args: object, device: str | None = None) -> subprocess.CompletedProcess:
    """Quick settings first, so a test's own flags (later on the command line) override them."""
    quick = ("--warmup", 1, "--runs", 3, "--min-seconds", 0)
    return cli("bench", "--device-python", device or find_device_python(), *quick, *args)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


PLOTS = ("psnr_vs_size.png", "psnr_vs_peak_rss.png", "psnr_vs_latency.png")


def report_files(out: Path) -> list[str]:
    return [name for name in ("report.json", "report.md", *PLOTS) if (out / name).exists()]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_tflite: tuple[Path, object]) -> dict:
    """A convert-style folder (manifest + dense.tflite + an entry in a format no target runs), 2 test photos."""
    import torch

    root = tmp_path_factory.mktemp("bench")
    photos = dict(builtin_hr_images("sporco"))
    test_dir = root / "photos"
    test_dir.mkdir()
    save_png(test_dir / "monarch.png", photos["monarch"][80:280, 120:380])  # LR 100x130: 2x3 tiles
    save_png(test_dir / "kodim23.png", photos["kodim23"][40:200, 300:440])  # LR 80x70: 2x2 tiles

    source, net = tiny_tflite
    conv = root / "convert"
    conv.mkdir()
    tflite = conv / "dense.tflite"
    shutil.copyfile(source, tflite)

    torch_scores = {}
    with torch.no_grad():
        for p in load_test_set(test_dir, 2):
            sr = net(torch.from_numpy(to_float(p.lr)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
            torch_scores[p.name] = sr_scores(np.clip(np.rint(sr * 255), 0, 255).astype(np.uint8), p.hr, 2)
    torch_psnr = mean_scores(list(torch_scores.values()))["psnr_y_db"]
    manifest = {
        "kind": "convert",
        "model": "edsr-tiny-x2-rand",
        "scale": 2,
        "source": {"checkpoint": "random-init", "sha256": "0" * 64, "psnr_y_db": torch_psnr, "test_set": str(test_dir)},
        "tile": {"height": TILE, "width": TILE, "overlap": OVERLAP},
        "io": {
            "layout": "NHWC",
            "dtype": "float32",
            "range": [0, 1],
            "input_shape": [1, TILE, TILE, 3],
            "output_shape": [1, 2 * TILE, 2 * TILE, 3],
        },
        "artifacts": [
            {
                "file": "dense.tflite",
                "format": "tflite",
                "encoding": "dense",
                "precision": "fp32",
                "size_bytes": tflite.stat().st_size,
                "sha256": sha256(tflite),
            },
            {"file": "dense.onnx", "format": "onnx", "encoding": "dense", "precision": "fp32"},  # no bench for it
        ],
        "versions": {},
    }
    (conv / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "convert": conv, "tflite": tflite, "photos": test_dir, "torch": torch_scores}


@pytest.fixture(scope="module")
def failed_run(env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    """Budgets that pass except a 100 KB model-size limit on the local target."""
    budgets = env["root"] / "budgets.yaml"
    budgets.write_text(LOOSE + "targets:\n  local: {max_model_kb: 100}\n")
    out = env["root"] / "out_fail"
    proc = bench(env["convert"], "--out", out, "--test-set", env["photos"], "--budgets", budgets, "--save-images")
    return proc, out


def test_budget_failure_exits_1_and_report_says_which_and_by_how_much(failed_run: tuple, env: dict) -> None:
    proc, out = failed_run
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 1 and report["passed"] is False
    row = report["rows"][0]
    size_kb = env["tflite"].stat().st_size / 1024
    verdict = row["budgets"]["max_model_kb"]
    assert verdict["limit"] == 100 and not verdict["pass"]
    assert verdict["value"] == pytest.approx(size_kb) and verdict["margin"] == pytest.approx(100 - size_kb)
    assert all(v["pass"] for k, v in row["budgets"].items() if k != "max_model_kb")
    assert report["failed_budgets"] == [
        {
            "target": "local",
            "model": "edsr-tiny-x2-rand",
            "artifact": "dense.tflite",
            "tile": [64, 64],
            "budget": "max_model_kb",
            "limit": 100.0,
            "value": pytest.approx(size_kb),
            "unit": "KB",
            "by": pytest.approx(size_kb - 100),
        }
    ]
    md = (out / "report.md").read_text()
    assert "## Failed budgets" in md and "**FAIL**: max_model_kb" in md
    assert f"measured {size_kb:.2f} KB > limit 100.00 KB, over by {size_kb - 100:.2f} KB" in md


def test_row_fields_and_psnr_equal_torch_on_the_same_images(failed_run: tuple, env: dict) -> None:
    row = json.loads((failed_run[1] / "report.json").read_text())["rows"][0]
    for key in ("model", "format", "encoding", "artifact", "target", "emulated", "size_bytes", "peak_rss_mb"):
        assert key in row
    assert (row["model"], row["format"], row["encoding"], row["artifact"]) == (
        "edsr-tiny-x2-rand",
        "tflite",
        "dense",
        "dense.tflite",
    )
    assert (row["target"], row["emulated"], row["size_bytes"]) == ("local", False, env["tflite"].stat().st_size)
    assert row["peak_rss_mb"] > row["rss_after_import_mb"] > 10
    assert (
        0 < row["latency_ms_median"] <= row["latency_ms_p90"] and row["load_ms"] > 0 and row["first_inference_ms"] > 0
    )
    assert (row["threads"], row["warmup"], row["runs"], row["tile"], row["overlap"]) == (1, 1, 3, [64, 64], OVERLAP)
    assert row["runtime"] == {"name": "ai_edge_litert", "version": "2.3.0"} and row["delegate"] == "xnnpack"
    memory = row["memory"]
    assert memory["method"] in ("clear_refs reset", "process per phase")
    for phase in ("load", "first_inference", "steady"):
        assert 10 < memory[phase]["hwm_mb"] <= row["peak_rss_mb"]
        assert memory[phase]["rss_anon_mb"] > 0 and memory[phase]["rss_file_mb"] > 0
    assert set(row["per_image"]) == {"monarch", "kodim23"}
    assert row["per_image"]["monarch"]["tiles"] == 6 and row["per_image"]["kodim23"]["tiles"] == 4
    # Tiled TFLite on the device == whole-image torch, so the host-side scores agree to well below 0.01 dB.
    for name, scores in env["torch"].items():
        assert row["per_image"][name]["psnr_y_db"] == pytest.approx(scores["psnr_y_db"], abs=0.01)
        assert row["per_image"][name]["ssim_y"] == pytest.approx(scores["ssim_y"], abs=1e-4)
    assert abs(row["psnr_delta_vs_torch_db"]) < 0.01 and row["torch_psnr_y_db"] is not None


def test_report_md_has_table_legend_skips_and_plot(failed_run: tuple) -> None:
    out = failed_run[1]
    md = (out / "report.md").read_text()
    assert "## Target `local` (real hardware)" in md and "| edsr-tiny-x2-rand | dense.tflite | 64 |" in md
    assert "## Legend" in md
    for phrase in ("VmHWM", "Python interpreter and numpy", "at least 3 frames", "after 1 warm-up", "1 thread(s)"):
        assert phrase in md, phrase
    assert "ai_edge_litert 2.3.0" in md and "BT.601" in md and "border = scale" in md and "LR: pillow-bicubic" in md
    assert "DENSIFY" in md and "file size only" in md
    assert "dense.onnx" in md and "format 'onnx' is not benchable here" in md
    report = json.loads((out / "report.json").read_text())
    assert report["test_set"]["lr"] == {"2": "pillow-bicubic"} and report["settings"]["degradation"] == "pillow"
    assert report["plots"] == {
        "*": {
            "Y-PSNR vs size": "psnr_vs_size.png",
            "Y-PSNR vs peak memory": "psnr_vs_peak_rss.png",
            "Y-PSNR vs frame latency": "psnr_vs_latency.png",
        }
    }
    for png in PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    assert report["rows"][0]["pareto"] == {"psnr_vs_size": True, "psnr_vs_peak_rss": True, "psnr_vs_latency": True}
    # memory by phase, with a legend for every column; budget verdicts with signed margins
    assert "### Memory by phase (MiB)" in md and "| model | artifact | tile | load VmHWM | load RssAnon |" in md
    for phrase in ("**VmHWM**", "**RssAnon**", "**RssFile**", "mmap'd model", "clear_refs"):
        assert phrase in md, phrase
    assert "### Budget verdicts" in md and "| value − limit | % of limit |" in md
    size_kb = report["rows"][0]["size_bytes"] / 1024
    assert f"| {size_kb - 100:+.2f} KB | {(size_kb - 100) / 100 * 100:+.1f} % | **FAIL** |" in md
    # the environment block: runtime and version, threads, delegate, tile, device facts
    for phrase in (
        "- runtime: ai_edge_litert 2.3.0",
        "- threads: 1",
        "- delegate: xnnpack",
        "- workload: LR frames test images (2); tiles (LR px): 64 (overlap 14)",
    ):
        assert phrase in md, phrase
    assert sorted(p.name for p in (out / "images" / "local").rglob("*.png")) == ["kodim23.png", "monarch.png"]


def test_report_rerenders_from_json_and_rechecks_budgets(failed_run: tuple, tmp_path: Path) -> None:
    shutil.copy(failed_run[1] / "report.json", tmp_path / "report.json")
    proc = cli("report", tmp_path)
    assert proc.returncode == 1, proc.stderr  # the recorded verdict
    assert (tmp_path / "report.md").read_text().count("## Legend") == 1
    assert report_files(tmp_path) == ["report.json", "report.md", *PLOTS]
    (tmp_path / "loose.yaml").write_text(LOOSE)
    assert cli("report", tmp_path, "--budgets", tmp_path / "loose.yaml").returncode == 0
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    assert "## Failed budgets" not in (tmp_path / "report.md").read_text()


def test_host_side_never_imports_torch_or_the_runtimes(failed_run: tuple, tmp_path: Path) -> None:
    shutil.copy(failed_run[1] / "report.json", tmp_path / "report.json")
    code = (
        "import sys\n"
        "import device_bench, device_bench.cli, device_bench.bench, device_bench.report, device_bench.targets\n"
        "import device_bench.budgets, device_bench.runner\n"
        "from device_bench.cli import main\n"
        "main(['report', sys.argv[1]])\n"
        "heavy = ('torch', 'litert_torch', 'coremltools', 'tensorflow', 'ai_edge_litert', 'tflite_runtime')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "report.md").exists()  # the render (matplotlib included) ran in that process


def test_bare_tflite_within_budgets_exits_0(env: dict, tmp_path: Path) -> None:
    bare = tmp_path / "my_model.tflite"
    shutil.copy(env["tflite"], bare)
    (tmp_path / "loose.yaml").write_text(LOOSE)
    out = tmp_path / "out"
    proc = bench(bare, "--out", out, "--test-set", env["photos"], "--budgets", tmp_path / "loose.yaml")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    row = report["rows"][0]
    assert report["passed"] and report["exit_code"] == 0 and row["pass"]
    assert (row["model"], row["encoding"], row["scale"], row["tile"], row["overlap"]) == (
        "my_model",
        "dense",
        2,
        [64, 64],
        16,
    )
    assert row["torch_psnr_y_db"] is None and row["psnr_delta_vs_torch_db"] is None


def test_matlab_lr_is_recorded_and_not_compared_with_a_pillow_lr_torch_score(env: dict, tmp_path: Path) -> None:
    (tmp_path / "loose.yaml").write_text(LOOSE)
    out = tmp_path / "out"
    args = ("--test-set", env["photos"], "--budgets", tmp_path / "loose.yaml", "--degradation", "matlab")
    proc = bench(env["convert"], "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["test_set"]["lr"] == {"2": "matlab-bicubic"} and report["settings"]["degradation"] == "matlab"
    assert "images, LR: matlab-bicubic)" in (out / "report.md").read_text()
    row = report["rows"][0]  # the manifest's torch score was measured on Pillow LR: not the same test
    assert row["torch_psnr_y_db"] is not None and row["psnr_delta_vs_torch_db"] is None


@pytest.mark.parametrize("case", ["missing_model", "truncated_tflite", "non_image_in_test_set", "unknown_budget_key"])
def test_bad_input_exits_2_before_writing_anything(case: str, env: dict, tmp_path: Path) -> None:
    model, test_set, extra = env["tflite"], env["photos"], []
    if case == "missing_model":
        model, needle = tmp_path / "nope.tflite", "no such model file"
    elif case == "truncated_tflite":
        model = tmp_path / "truncated.tflite"
        model.write_bytes(env["tflite"].read_bytes()[:100_000])
        needle = "not a valid TFLite model"
    elif case == "non_image_in_test_set":
        test_set = tmp_path / "photos"
        shutil.copytree(env["photos"], test_set)
        (test_set / "notes.txt").write_text("not an image\n")
        needle = "not an image file"
    else:
        (tmp_path / "budgets.yaml").write_text("defaults: {max_ram_mb: 100}\n")
        extra, needle = ["--budgets", tmp_path / "budgets.yaml"], "unknown budget key 'max_ram_mb'"
    out = tmp_path / "out"
    proc = bench(model, "--out", out, "--test-set", test_set, *extra)
    assert_one_line_error(proc, 2, needle)
    assert not out.exists()


def test_bad_usage_exits_2(env: dict, tmp_path: Path) -> None:
    assert_one_line_error(cli("bench", env["tflite"]), 2, "--out")
    assert_one_line_error(bench(env["tflite"], "--out", tmp_path / "o", "--runs", 0), 2, "--runs")
    assert_one_line_error(bench(env["tflite"], "--out", tmp_path / "o", "--targets", "pi"), 2, "unknown target")
    assert not (tmp_path / "o").exists()


def test_missing_device_python_exits_3_with_the_reason_in_the_report(env: dict, tmp_path: Path) -> None:
    proc = bench(env["tflite"], "--out", tmp_path / "out", "--test-set", env["photos"], device="/nonexistent/python")
    assert_one_line_error(proc, 3, "device Python /nonexistent/python not found")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exit_code"] == 3 and report["rows"] == []
    [failed] = report["failed_targets"]
    assert failed["target"] == "local" and "device Python /nonexistent/python not found" in failed["reason"]
    assert failed["not_run"] == ["dense--dense"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Failed targets" in md and "## Target `local` (real hardware) — FAILED" in md
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_killed_runner_exits_3_and_the_report_says_why(env: dict, tmp_path: Path) -> None:
    """The runner process really dies (SIGKILL from a wrapper when it gets a job); a stale report is replaced."""
    wrapper = tmp_path / "python-that-dies"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do if [ "$a" = "--job" ]; then kill -KILL $$; fi; done\n'
        f'exec "{find_device_python()}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # from an earlier run
    proc = bench(env["tflite"], "--out", out, "--test-set", env["photos"], device=wrapper)
    assert_one_line_error(proc, 3, "runner killed by SIGKILL")
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 3 and report["rows"] == [] and not report["passed"]
    assert "runner killed by SIGKILL" in report["failed_targets"][0]["reason"]
    assert report_files(out) == ["report.json", "report.md"]  # no measurement, nothing to plot
